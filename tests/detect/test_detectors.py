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
    "chrissanders_arppoison.pcapng": {"arp_spoofing": 1},
    "chrissanders_synscan.pcapng": {"port_scan": 1},
    "esnet_masscan_tcp_0_1000.pcap": {"port_scan": 1},
    "ppa_portscan.pcap": {"port_scan": 1},
    "ppa_ftp-crack.pcap": {"cleartext_login": 1, "brute_force": 1},
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
    (spoof,) = _alerts(pcaps["chrissanders_arppoison.pcapng"])
    assert spoof["mac"] == "00:25:b3:bf:91:ee" and spoof["evidence"]["ip"] == "172.16.0.1"
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


@pytest.mark.parametrize("capture", ["ndpi_netbios.pcapng", "ndpi_tplink_shp.pcap", "ndpi_syslog.pcap"])
def test_new_device_findings_do_not_depend_on_batches(capture: str) -> None:
    pcaps = {p.name: p for p in shared_pcaps()}
    if capture not in pcaps:
        pytest.skip("../shared is absent")

    def run(batch_frames: int, fast: bool) -> list[dict[str, Any]]:
        an = Analyzer(AnalyzerSettings(learning_period_s=2.0), fast_path=fast)
        for b in read_batches(pcaps[capture], batch_frames=batch_frames):
            an.feed(b)
        return an.alerts()

    found = run(8192, True)
    assert len(found) >= 5 and {a["type"] for a in found} >= {"new_device"}
    assert found == run(97, True) == run(8192, False)
