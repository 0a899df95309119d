"""A managed leaf's reported inventory stays under its twin's 32 KB, the longest lists cut first, and says so."""

from __future__ import annotations

from leafguard.hub.leaf_link import REPORTED_BUDGET_BYTES, trim_inventory
from leafguard.hub.twin import REPORTED_LIMIT_BYTES, twin_size


def inventory(services: int, ips: int, names: int) -> dict[str, object]:
    return {
        "mac": "00:0e:8c:aa:bb:01", "vendor": "Siemens AG", "firstSeen": "2026-01-01T00:00:00+00:00",
        "services": [f"tcp/{p}" for p in range(1, services + 1)],
        "ips": [f"10.0.{i // 256}.{i % 256}" for i in range(ips)],
        "hostnames": [f"plc-{i:04d}.plant.example" for i in range(names)],
        "alerts": [{"type": "port_scan", "at": "2026-01-01T00:00:00+00:00"}] * 10,
    }


def test_a_small_inventory_is_left_whole() -> None:
    doc = inventory(5, 2, 1)
    assert trim_inventory(doc, 1500) == (doc, {})


def test_the_longest_list_goes_first_and_the_section_says_what_was_cut() -> None:
    config_bytes = 1500
    doc = inventory(5000, 30, 8)
    trimmed, cut = trim_inventory(doc, config_bytes)
    assert config_bytes + len("leafguard") + twin_size(trimmed) <= REPORTED_BUDGET_BYTES < REPORTED_LIMIT_BYTES
    assert set(cut) == {"services"} and trimmed["trimmed"] == cut
    assert len(trimmed["services"]) + cut["services"] == 5000
    assert trimmed["services"] == doc["services"][: len(trimmed["services"])], "cut from the end"
    assert trimmed["ips"] == doc["ips"] and trimmed["hostnames"] == doc["hostnames"]


def test_every_list_is_cut_when_all_are_long() -> None:
    trimmed, cut = trim_inventory(inventory(4000, 4000, 4000), 1500)
    assert twin_size(trimmed) + 1500 <= REPORTED_BUDGET_BYTES
    assert {"services", "ips", "hostnames"} <= set(cut)
    assert trimmed["mac"] == "00:0e:8c:aa:bb:01", "what identifies the leaf is never cut"


def test_the_gateway_twin_summary_stays_bounded_whatever_the_leaves() -> None:
    """Thousands of leaves, device ids of the longest IoT Hub allows, long errors: the gateway's health section,
    with its managed and unmanaged summaries, still fits the twin's reported 32 KB with room for leaves."""
    from leafguard.agent.fleet import Fleet
    from leafguard.hub.credentials import LeafCredential, Secret
    from leafguard.hub.leaf_clients import LeafClients
    from leafguard.hub.leaf_link import LeafLink, LeafState, LeafTarget
    from leafguard.hub.leaves import IdentityMode
    from leafguard.hub.output import EdgeAgentOutput
    from leafguard.hub.settings import EdgeSettings
    from leafguard.hub.transport import EdgeTransport
    from leafguard.hub.twin import ReportedState

    settings = EdgeSettings(hub_hostname="hub", device_id="edge1", module_id="leafguard", gateway_hostname="edge1")
    macs = [f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}" for i in range(3000)]
    fleet = Fleet(leaf_map={mac: f"{i:04d}" + "n" * 124 for i, mac in enumerate(macs[:2000])})
    for mac in macs:
        fleet.ensure(mac, 1_767_225_600.0)
    clients = LeafClients(settings, on_desired=lambda _i, _d: None)
    credential = LeafCredential(Secret("a2V5"), None, "secrets")
    for i in range(300):
        device = f"m{i:03d}" + "d" * 124
        link = LeafLink(LeafTarget(device, IdentityMode.MODULE, "hub", "edge1", credential), "", settings.leaves,
                        on_desired=lambda _i, _d: None)
        link.state = LeafState.AUTH_FAILED if i % 7 == 0 else LeafState.CONNECTED
        link.stats.last_error = "the edge hub refused the credentials " + "x" * 2000
        clients.links[device] = link
    clients.unmanaged_candidates = [f"c{i:03d}" + "c" * 124 for i in range(400)]
    out = EdgeAgentOutput(EdgeTransport(settings), fleet, clients)

    health = out.health() | {"uplink": out.transport.counters()}
    assert twin_size(health) <= 26 * 1024, twin_size(health)
    patch = ReportedState().take_patch(health)
    assert patch is not None and patch.size_bytes <= REPORTED_LIMIT_BYTES
    managed, unmanaged = health["managedLeaves"], health["unmanagedLeaves"]
    assert managed["count"] == 300 and managed["notShown"] == 300 - len(managed["leaves"]) > 0
    assert all(e["state"] == "auth_failed" for e in list(managed["leaves"].values())[:10]), "problems first"
    assert unmanaged["count"] == 3000 and unmanaged["notShown"] == 3000 - len(unmanaged["first"]) > 0
    assert managed["withoutCredentialsNotShown"] == 400 - len(managed["withoutCredentials"]) > 0
