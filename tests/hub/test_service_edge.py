"""`leafguard run` in edge mode, as a real process with the IoT Edge environment, against the hub emulator."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from leafguard.agent.config import CONFIG_OBJECT_NAME as CFG
from leafguard.demo import demo_capture
from testkit.wait import until
from tests.agent.schema import errors
from tests.hub.helpers import MODULE, service_env
from tests.hub_emulator import HubEmulator
from tests.hub_emulator.twins import SECTION_LIMIT_BYTES, twin_size
from tests.service.helpers import free_port, http_get

LIMIT_S = 40.0
SENSOR = "leaf-5ccf7f07aefb"


@pytest.fixture
async def hub() -> AsyncIterator[HubEmulator]:
    async with HubEmulator.start(thread=True) as emulator:
        yield emulator



async def test_edge_mode_service_sends_is_tuned_by_its_twin_and_stops_cleanly(hub: HubEmulator,
                                                                             shared_dir: Path) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
        env=service_env(hub, module), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    def reported() -> dict[str, Any]:
        doc: dict[str, Any] = hub.twin(module)["reported"]
        return doc

    def max_size() -> Any:
        return reported().get("leaves", {}).get(SENSOR, {}).get(CFG, {}).get("maxMessageSizeInBytes")

    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: max_size() == {"value": 204800})
            await hub.set_desired(module, {"leaves": {SENSOR: {CFG: {"maxMessageSizeInBytes": {"value": 16384}}}}})
            await until(lambda: max_size() == {"value": 16384})
            # Rejected whole: the previous configuration stays in force and is reported again (a new version).
            version = reported()["$version"]
            await hub.set_desired(module, {"leaves": {SENSOR: {CFG: {"maxMessageSizeInBytes": {"value": "big"}}}}})
            await until(lambda: reported()["$version"] > version)
            assert max_size() == {"value": 16384}
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT_S):
            _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b"stopped cleanly" in err

    everything = hub.messages(MODULE)
    alerts = [m for m in everything if m.output_name == "alerts"]
    received = [m for m in everything if m.output_name != "alerts"]
    # The demo's cleartext MQTT and HTTP logins also go out as LeafGuard alerts: plain JSON, not security messages.
    # Batched: each alert message is a JSON array, its count and (single) type in the properties.
    alert_docs = [a for m in alerts for a in m.json()]
    assert sorted(a["type"] for a in alert_docs) == ["cleartext_login", "cleartext_login"]
    assert all(not m.is_security_message and m.properties["alertType"] == "cleartext_login"
               and m.properties["alertCount"] == str(len(m.json())) for m in alerts)
    # The MQTT login's leaf is the sensor (the client); the HTTP login's is the operator's workstation.
    assert {a["leafIdentity"] for a in alert_docs} == {SENSOR, "leaf-3c5282112233"}
    assert {m.properties["leafIdentity"] for m in alerts} == {MODULE}, "a batch is sent as the module"
    ids = {m.system["$.mid"] for m in received}
    health = reported()["leafguard"]
    # Everything the agents built was acknowledged and arrived (and so did the alerts); nothing was dropped.
    assert len(ids) == health["agents"]["messages"] == health["uplink"]["sent"] - len(alerts) > 0
    assert health["uplink"]["dropped"] == 0 and health["uplink"]["queued"] == 0
    for message in received:
        assert message.output_name == "security" and message.is_security_message
        assert message.properties["leafIdentity"].startswith("leaf-")
        assert errors(message.json()) == []
    sensor_events = [e for m in received if m.properties["leafIdentity"] == SENSOR for e in m.json()["Events"]]
    problems = [p for e in sensor_events if e["Name"] == "ConfigurationError" for p in e["Payload"]]
    assert any(p["ErrorType"] == "TypeMismatch" and p["ConfigurationName"] == "maxMessageSizeInBytes"
               for p in problems)
    assert hub.connections() == []


async def test_incomplete_edge_environment_is_a_one_line_error(hub: HubEmulator) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    env = service_env(hub, module)
    del env["IOTEDGE_WORKLOADURI"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(LIMIT_S):
        _out, err = await proc.communicate()
    assert proc.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.startswith("leafguard:")]
    assert len(lines) == 1 and "IOTEDGE_WORKLOADURI" in lines[0]


async def test_module_twin_leaf_map_and_capture_section(hub: HubEmulator) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    await hub.set_desired(
        module, {"leafMap": {"5c:cf:7f:07:ae:fb": "plant1-sensor7"}, "capture": {"extraFilter": "not arp"}}
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
        env=service_env(hub, module), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    def health() -> dict[str, Any]:
        doc: dict[str, Any] = hub.twin(module)["reported"].get("leafguard", {})
        return doc

    try:
        async with asyncio.timeout(LIMIT_S):
            # Reported properties merge: a null error is no "error" key at all.
            await until(lambda: health().get("leafMap") == {"leaves": 1})
            # A replay has no capture filter to change: reported, not applied.
            assert "live capture only" in health()["captureFilter"]["error"]
            await until(lambda: "plant1-sensor7" in hub.twin(module)["reported"].get("leaves", {}))
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT_S):
            _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    # Security messages are built at the end (packet time); the alerts went out before the twin named the leaf.
    identities = {m.properties["leafIdentity"] for m in hub.messages(MODULE) if m.output_name == "security"}
    assert "plant1-sensor7" in identities and SENSOR not in identities


async def test_module_twin_thresholds_mute_and_learn(hub: HubEmulator) -> None:
    """Issue #14 point 3 from the module twin: a threshold of the ``detection`` section, the ``mute`` rules and a
    ``learn`` token in the desired properties apply while the module runs and are reported in its ``leafguard``
    section (``detection``, ``triage``); a mute list with one bad rule keeps the rules in force; a rule the ``mute``
    direct method added stays when the twin's list changes."""
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
        env=service_env(hub, module) | {"LEAFGUARD_SETTINGS_POLL_S": "0.2"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip

    def triage() -> dict[str, Any]:
        section: dict[str, Any] = hub.twin(module)["reported"].get("leafguard", {}).get("triage", {})
        return section

    def rule_types() -> set[str]:
        return {r.get("type") for r in triage().get("mute") or []}

    until_2100 = 4_102_444_800
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: hub.twin(module)["reported"].get("leafguard", {}).get("detection"))
            await hub.set_desired(module, {"detection": {"portScanPorts": 30},
                                           "mute": [{"type": "flood", "until": until_2100}],
                                           "learn": "after-commissioning"})  # fmt: skip
            await until(lambda: triage().get("learnToken") == "after-commissioning" and rule_types() == {"flood"})
            assert triage()["learnedLeaves"] >= 3 and triage()["mute"][0]["until"] == until_2100
            await until(lambda: hub.twin(module)["reported"]["leafguard"]["detection"].get("portScanPorts") == 30)

            method = await hub.invoke_method(module, "mute", {"type": "new_peer", "forS": 600}, timeout_s=10)
            assert method.status == 200
            await until(lambda: rule_types() == {"flood", "new_peer"})
            await hub.set_desired(module, {"mute": [{"type": "flood", "until": until_2100}, {"mac": "x", "forS": 6}]})
            await until(lambda: "not a MAC" in str(triage().get("error")))
            assert rule_types() == {"flood", "new_peer"}, "one bad rule: the list in force stays"
            # A good list replaces the twin's rules (not the method's) and clears the error.
            await hub.set_desired(module, {"mute": [{"type": "arp_sweep", "forS": 60}]})
            await until(lambda: rule_types() == {"arp_sweep", "new_peer"} and not triage().get("error"))
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT_S):
            _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def test_reported_section_full_of_an_earlier_runs_leaves_does_not_freeze(hub: HubEmulator) -> None:
    """#12 defect 4: the twin still holds ~30 KB of leaves an earlier run reported, and the desired `leaves` section
    names more leaves than fit. The module deletes the stale leaves, keeps the merged section under 32 KB, names the
    leaves it left out, and a refused patch is a counted warning with the hub's reason, recovered from by itself."""
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    stale = {f"old-leaf-{i:02d}": {CFG: {"note": {"value": "v" * 950}}} for i in range(30)}
    hub.set_reported(module, {"leaves": stale, "leafguard": {"version": "0.0.1", "fromAnEarlierRun": True}})
    named = {f"plc-{i:02d}": {CFG: {"eventPriorityConnectionCreate": {"value": "Low"}}} for i in range(40)}
    await hub.set_desired(module, {"leaves": named})
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
        "--http-port", str(port), env=service_env(hub, module),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    def reported() -> dict[str, Any]:
        doc: dict[str, Any] = hub.twin(module)["reported"]
        return doc

    def uplink() -> dict[str, Any]:
        section: dict[str, Any] = reported().get("leafguard", {}).get("uplink", {})
        return section

    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: uplink().get("leaves_not_reported", 0) > 0)
            doc = reported()
            assert not [k for k in doc["leaves"] if k.startswith("old-leaf-")], "the earlier run's leaves are deleted"
            assert "fromAnEarlierRun" not in doc["leafguard"], "a stale health key is deleted, not merged"
            assert twin_size(doc) <= SECTION_LIMIT_BYTES
            left_out = set(uplink()["leaves_not_reported_names"])
            assert left_out and not left_out & set(doc["leaves"]) and left_out <= set(named) | {SENSOR}
            assert uplink()["reported_refused"] == 0

            # The hub refuses the next reported patch: a warning with its reason, counted, then recovery.
            hub.fail_twin_requests(400, count=1)
            await hub.set_desired(module, {"leaves": {SENSOR: {CFG: {"maxMessageSizeInBytes": {"value": 16384}}}}})

            def sensor_size() -> Any:
                return reported()["leaves"].get(SENSOR, {}).get(CFG, {}).get("maxMessageSizeInBytes")

            await until(lambda: sensor_size() == {"value": 16384} and uplink().get("reported_refused") == 1)
            assert "status 400" in uplink()["last_reported_error"]
            assert uplink()["reported_failures"] >= 1
            _status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
            metrics = body.decode()
            assert "leafguard_uplink_reported_refused_total" in metrics
            assert [line for line in metrics.splitlines()
                    if line.startswith("leafguard_uplink_reported_refused_total") and line.endswith(" 1")]
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT_S):
            _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    warnings = [line for line in err.decode().splitlines() if "refused a reported-properties patch" in line]
    assert len(warnings) == 1 and "status 400" in warnings[0] and "WARNING" in warnings[0].upper()


async def test_module_twin_traffic_is_pushed_and_only_on_change(hub: HubEmulator) -> None:
    """#10 point 5 on the gateway's twin, with the default coalescing and a settings poll far away (30 s): a desired
    patch is applied as the SDK delivers it and shows in the reported properties at once; with nothing changing
    no reported patch goes at all; a detection setting turned off is reported "off" (a null would delete it)."""
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    await hub.set_desired(module, {"detection": {"silentAfterS": 600}})
    env = {k: v for k, v in service_env(hub, module).items() if k != "LEAFGUARD_REPORTED_INTERVAL_S"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
        env=env | {"LEAFGUARD_SETTINGS_POLL_S": "30", "LEAFGUARD_HTTP_PORT": "off"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    def reported() -> dict[str, Any]:
        doc: dict[str, Any] = hub.twin(module)["reported"]
        return doc

    def max_size() -> Any:
        return reported().get("leaves", {}).get(SENSOR, {}).get(CFG, {}).get("maxMessageSizeInBytes")

    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: max_size() == {"value": 204800}
                        and reported().get("leafguard", {}).get("detection", {}).get("silentAfterS") == 600)
            # Off by default: reported as "off", where a null would have left no key at all.
            assert reported()["leafguard"]["detection"]["learningPeriodS"] == "off"
            # Pushed: well before the 30 s settings poll, both a leaf's configuration and a gateway setting.
            async with asyncio.timeout(5.0):
                await hub.set_desired(module, {CFG: {"maxMessageSizeInBytes": {"value": 16384}},
                                               "detection": {"silentAfterS": 900}})
                await until(lambda: max_size() == {"value": 16384})
                await until(lambda: reported()["leafguard"]["detection"].get("silentAfterS") == 900)
            # Idle: nothing changes, so nothing is reported (the health section is due again in a minute).
            await asyncio.sleep(1.0)
            version = reported()["$version"]
            await asyncio.sleep(3.0)
            assert reported()["$version"] == version, "a reported patch although nothing changed"
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT_S):
            _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
