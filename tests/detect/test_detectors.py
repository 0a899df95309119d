"""LeafGuard alerts: what each shared capture must raise (and nothing else), the thresholds, and the schema."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from leafguard.capture.batch import FrameBatch
from leafguard.capture.pcapfile import read_batches
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from tests.conftest import shared_pcaps

EXPECTED = {
    "chrissanders_arppoison.pcapng": {"arp_spoofing": 1, "gateway_impersonation": 1},
    "chrissanders_synscan.pcapng": {"port_scan": 1},
    "esnet_masscan_tcp_0_1000.pcap": {"port_scan": 1},
    "ppa_portscan.pcap": {"port_scan": 1},
    "ppa_ftp-crack.pcap": {"cleartext_login": 1, "brute_force": 1, "connection_brute_force": 1},
    "evilfingers_nmap_XMAS_TREE_SCAN.pcap": {"stealth_scan": 1},
    "zeek_nmap-vsn.pcap": {"arp_sweep": 1},
    "ppa_ftp.pcap": {"cleartext_login": 1},
    "ndpi_telnet.pcap": {"cleartext_login": 1},
    "ndpi_mqtt.pcapng": {"cleartext_login": 1},
    "zeek_mqtt.pcap": {"cleartext_login": 1},
    "zeek_var-services-std-ports.pcap": {"cleartext_login": 1},
}

VALIDATOR = Draft202012Validator(
    json.loads(resources.files("leafguard").joinpath("data/alert.schema.json").read_text()),
    format_checker=FormatChecker(),
)


def _alerts(path: Path, batch_frames: int = 8192, fast: bool = True) -> list[dict[str, Any]]:
    an = Analyzer(fast_path=fast)
    for b in read_batches(path, batch_frames=batch_frames):
        an.feed(b)
    return an.alerts()


@pytest.mark.parametrize("capture", [p.name for p in shared_pcaps()])
def test_each_shared_capture_raises_exactly_what_it_shows(capture: str) -> None:
    path = next(p for p in shared_pcaps() if p.name == capture)
    alerts = _alerts(path)
    assert dict(Counter(a["type"] for a in alerts)) == EXPECTED.get(capture, {})
    for alert in alerts:
        assert not list(VALIDATOR.iter_errors(alert)), alert
    # Findings do not depend on batch boundaries or on which half of the core saw the evidence.
    assert _alerts(path, batch_frames=97) == alerts == _alerts(path, fast=False)


def test_the_arp_poisoner_and_the_ftp_brute_forcer_are_named() -> None:
    pcaps = {p.name: p for p in shared_pcaps()}
    if not pcaps:
        pytest.skip("../shared is absent")
    found = {a["type"]: a for a in _alerts(pcaps["chrissanders_arppoison.pcapng"])}
    spoof = found["arp_spoofing"]
    assert spoof["mac"] == "00:25:b3:bf:91:ee" and spoof["evidence"]["ip"] == "172.16.0.1"
    # The victim's traffic to the Internet goes to the poisoner's MAC instead of the real gateway's.
    hijack = found["gateway_impersonation"]
    assert hijack["mac"] == "00:25:b3:bf:91:ee" and hijack["evidence"]["gateway_mac"] == "00:26:0b:31:07:33"
    brute = next(a for a in _alerts(pcaps["ppa_ftp-crack.pcap"]) if a["type"] == "brute_force")
    assert brute["evidence"]["client"] == "10.234.125.254" and brute["evidence"]["failures"] >= 10


def _feed(pkts: list[Any]) -> list[dict[str, Any]]:
    an = Analyzer()
    an.feed(FrameBatch.from_frames(1, [(1_700_000_000 + i * 0.5, bytes(p), len(bytes(p))) for i, p in enumerate(pkts)]))
    return an.alerts()


ATTACKER = ("02:00:00:00:00:0a", "10.5.0.66")


def _syn(dst: str, port: int) -> Any:
    return Ether(src=ATTACKER[0], dst="00:17:88:00:00:01") / IP(src=ATTACKER[1], dst=dst) / TCP(dport=port, flags="S")


def test_port_and_address_scan_thresholds() -> None:
    assert _feed([_syn("10.5.0.2", p) for p in range(1, 15)]) == []  # 14 ports: below the threshold
    (ports,) = _feed([_syn("10.5.0.2", p) for p in range(1, 16)])
    assert ports["type"] == "port_scan" and ports["mac"] == ATTACKER[0] and len(ports["evidence"]["ports"]) == 15
    (hosts,) = _feed([_syn(f"10.5.1.{h}", 23) for h in range(1, 26)])  # a Mirai-like sweep of telnet
    assert hosts["type"] == "address_scan" and hosts["evidence"]["port"] == 23


def test_rogue_dhcp_server_and_address_conflict() -> None:
    def offer(mac: str, ip: str) -> Any:
        return (
            Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
            / IP(src=ip, dst="255.255.255.255")
            / UDP(sport=67, dport=68)
            / BOOTP(op=2, chaddr=bytes(6), yiaddr="10.5.0.50")
            / DHCP(options=[("message-type", "offer"), "end"])
        )

    alerts = _feed([offer("00:1b:21:00:00:01", "10.5.0.1"), offer("02:00:00:00:00:0a", "10.5.0.66")])
    assert [a["type"] for a in alerts] == ["rogue_dhcp"] and alerts[0]["mac"] == "02:00:00:00:00:0a"
    moved = _feed(
        [
            Ether(src="00:17:88:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc="00:17:88:00:00:01", psrc="10.5.0.9"),
            Ether(src="02:00:00:00:00:0b", dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc="02:00:00:00:00:0b", psrc="10.5.0.9"),
        ]
    )
    assert [a["type"] for a in moved] == ["address_conflict"]
    assert moved[0]["evidence"]["previous_mac"] == "00:17:88:00:00:01"


def test_the_schema_rejects_what_it_should() -> None:
    good = _feed([_syn("10.5.0.2", p) for p in range(1, 16)])[0]
    assert not list(VALIDATOR.iter_errors(good))
    for broken in ({**good, "type": "nope"}, {**good, "mac": "AA:BB"}, {k: v for k, v in good.items() if k != "ts"}):
        assert list(VALIDATOR.iter_errors(broken))


def test_new_devices_after_the_learning_period() -> None:
    def hello(mac: str, ip: str, t: float) -> tuple[float, bytes, int]:
        raw = bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=mac, psrc=ip, pdst="10.5.0.1"))
        return (1_700_000_000 + t, raw, len(raw))

    frames = [hello("00:17:88:00:00:01", "10.5.0.2", 0), hello("00:17:88:00:00:02", "10.5.0.3", 5)]
    frames += [hello("00:17:88:00:00:01", "10.5.0.2", 40), hello("5c:cf:7f:00:00:03", "10.5.0.4", 60)]
    for learning, expected in ((10.0, ["5c:cf:7f:00:00:03"]), (None, []), (120.0, [])):
        an = Analyzer(AnalyzerSettings(learning_period_s=learning))
        an.feed(FrameBatch.from_frames(1, frames))
        found = an.alerts()
        assert [a["mac"] for a in found] == expected
        for alert in found:
            assert alert["type"] == "new_device" and alert["ts"] == 1_700_000_060
            assert alert["evidence"]["vendor"] == "Espressif Inc." and alert["evidence"]["ips"] == ["10.5.0.4"]
            assert not list(VALIDATOR.iter_errors(alert))


TIMED = {
    "ndpi_netbios.pcapng": {"new_device", "new_peer", "leaf_silent", "flood"},
    "ndpi_tplink_shp.pcap": {"new_device", "leaf_silent"},
    "ndpi_syslog.pcap": {"new_device", "leaf_silent"},
    "chrissanders_synscan.pcapng": {"port_scan", "leaf_silent", "flood"},
    "esnet_masscan_tcp_0_1000.pcap": {"port_scan", "flood"},
    "ppa_portscan.pcap": {"port_scan", "new_peer"},
}
"""Captures where the findings that depend on time (learning, silences, floods) show, and which ones they raise."""


@pytest.mark.parametrize("capture", sorted(TIMED))
def test_learned_silence_and_flood_findings_do_not_depend_on_batches(capture: str) -> None:
    pcaps = {p.name: p for p in shared_pcaps()}
    if capture not in pcaps:
        pytest.skip("../shared is absent")

    def run(batch_frames: int, fast: bool) -> list[dict[str, Any]]:
        settings = AnalyzerSettings(learning_period_s=2.0, silent_after_s=1.0, flood_rate_per_s=3.0)
        an = Analyzer(settings, fast_path=fast)
        for b in read_batches(pcaps[capture], batch_frames=batch_frames):
            an.feed(b)
        an.finish()
        return an.alerts()

    found = run(8192, True)
    assert {a["type"] for a in found} == TIMED[capture]
    for alert in found:
        assert not list(VALIDATOR.iter_errors(alert)), alert
    assert found == run(97, True) == run(8192, False)


LEAF_A = ("00:17:88:00:00:01", "10.5.0.2")
LEAF_B = ("00:17:88:00:00:02", "10.5.0.3")
GATEWAY_MAC = "00:1b:21:00:00:01"


def _tcp(src: tuple[str, str], dst_ip: str, dport: int, flags: str, sport: int = 40000) -> Any:
    return Ether(src=src[0], dst=GATEWAY_MAC) / IP(src=src[1], dst=dst_ip) / TCP(sport=sport, dport=dport, flags=flags)


def _synack_from(leaf: tuple[str, str], port: int, client_ip: str = "10.5.0.9") -> Any:
    return (
        Ether(src=leaf[0], dst=GATEWAY_MAC) / IP(src=leaf[1], dst=client_ip) / TCP(sport=port, dport=50000, flags="SA")
    )


def _baseline_run(frames: list[tuple[float, Any]], **kw: Any) -> Analyzer:
    an = Analyzer(AnalyzerSettings(learning_period_s=10.0), **kw)
    an.feed(FrameBatch.from_frames(1, [(1_700_000_000 + t, bytes(p), len(bytes(p))) for t, p in frames]))
    return an


def _learned_traffic() -> list[tuple[float, Any]]:
    frames: list[tuple[float, Any]] = [
        (0.0, _tcp(LEAF_A, "52.1.1.1", 8883, "S")),  # A's baseline: one cloud broker
        (0.5, _synack_from(LEAF_A, 80)),  # and its web page
    ]
    # B talks to more peers than a baseline can hold while learning (spread so that it is no scan): it gets no
    # new_peer findings later.
    frames += [
        (1.0 + i * 0.01, _tcp(LEAF_B, f"52.2.0.{i % 10}", 1000 + i // 10, "S", sport=41000 + i)) for i in range(70)
    ]
    return frames


def test_new_peer_and_new_service_against_the_learned_baseline() -> None:
    frames = [
        *_learned_traffic(),
        (20.0, _tcp(LEAF_A, "52.1.1.1", 8883, "S", sport=40001)),  # the same broker again: nothing
        (21.0, _tcp(LEAF_A, "198.51.100.7", 4444, "S")),  # a new peer
        (22.0, _synack_from(LEAF_A, 80)),  # the same service: nothing
        (23.0, _synack_from(LEAF_A, 23)),  # a telnet service appears
        (24.0, _tcp(LEAF_B, "198.51.100.7", 4444, "S")),  # B has no baseline to compare with
    ]
    alerts = _baseline_run(frames).alerts()
    assert [(a["type"], a["mac"], a["ts"]) for a in alerts] == [
        ("new_peer", LEAF_A[0], 1_700_000_021.0),
        ("new_service", LEAF_A[0], 1_700_000_023.0),
    ]
    peer, service = alerts
    assert peer["evidence"]["peer"] == "198.51.100.7" and peer["evidence"]["port"] == 4444
    assert peer["evidence"]["baseline_peers"] == ["52.1.1.1:8883/tcp"]
    assert service["evidence"]["protocol"] == "tcp" and service["evidence"]["port"] == 23
    assert service["evidence"]["known_services"] == ["tcp/80"]
    for alert in alerts:
        assert not list(VALIDATOR.iter_errors(alert)), alert
    # Without a learning period there is no baseline, and nothing of this is raised.
    quiet = Analyzer()
    quiet.feed(FrameBatch.from_frames(1, [(1_700_000_000 + t, bytes(p), len(bytes(p))) for t, p in frames]))
    assert quiet.alerts() == []


def test_new_peer_findings_are_rate_limited_per_leaf() -> None:
    frames = _learned_traffic() + [
        (30.0 + i * 0.1, _tcp(LEAF_A, f"198.51.100.{i}", 9000, "S", sport=42000 + i)) for i in range(12)
    ]
    an = _baseline_run(frames)
    assert [a["type"] for a in an.alerts()] == ["new_peer"] * 8
    assert an.capture_report()["alerts_suppressed"] == 4


def test_baseline_findings_do_not_depend_on_batches_or_paths() -> None:
    frames = _learned_traffic() + [
        (20.0 + i * 0.1, _tcp(LEAF_A, f"198.51.100.{i % 3}", 4444 + i % 2, "S", sport=43000 + i)) for i in range(9)
    ]
    frames += [(25.0, _synack_from(LEAF_A, 23)), (25.5, _synack_from(LEAF_A, 2323))]
    whole = _baseline_run(frames).alerts()
    assert len(whole) == 6 + 2
    raw = [(1_700_000_000 + t, bytes(p), len(bytes(p))) for t, p in frames]
    for fast in (True, False):
        an = Analyzer(AnalyzerSettings(learning_period_s=10.0), fast_path=fast)
        for lo in range(0, len(raw), 7):
            an.feed(FrameBatch.from_frames(1, raw[lo : lo + 7]))
        assert an.alerts() == whole


def test_equal_time_evidence_is_consumed_in_one_order_however_it_was_collected() -> None:
    """Typed evidence sorts by time, then kind, then fields: two MACs claiming one address at the same packet time
    give the same finding in either collection order."""
    from leafguard.detect.detectors import Detectors
    from leafguard.detect.evidence import AddressSeen, SynSent

    ip = bytes([10, 0, 0, 7])
    a, b = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    found = []
    for batch in (
        [AddressSeen(5.0, ip, b), SynSent(5.0, ip, ip, 80, None), AddressSeen(5.0, ip, a)],
        [AddressSeen(5.0, ip, a), AddressSeen(5.0, ip, b), SynSent(5.0, ip, ip, 80, None)],
    ):
        d = Detectors()
        d.process([AddressSeen(1.0, ip, a), *batch])
        found.append([(x.type, x.mac) for x in d.alerts])
    assert found[0] == found[1]
    assert found[0] == [("address_conflict", "02:00:00:00:00:02")]
