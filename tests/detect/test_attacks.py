"""The attack rules of `detect.attacks` on frames built to sit just below and just at each threshold.

The lab (`tests/lab`) runs the real tools; these tests pin each rule's edge: the count that raises, the one that
does not, what must never count (answered probes, connections whose SYN was seen, web ports), and that findings
do not depend on where batches are cut.
"""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptDstLLAddr, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from leafguard.capture.batch import FrameBatch
from leafguard.detect.muting import parse_rule
from leafguard.errors import ConfigurationError
from leafguard.observe.analyzer import Analyzer

T0 = 1_700_000_000.0
SCANNER = ("02:00:00:00:00:0a", "10.5.0.66")
TARGET = ("02:00:00:00:00:02", "10.5.0.2")
GW = ("02:00:00:00:00:01", "10.5.0.1")


def _frames(pkts: list[tuple[float, Any]]) -> list[tuple[float, bytes, int]]:
    return [(T0 + t, bytes(p), len(bytes(p))) for t, p in pkts]


def _run(pkts: list[tuple[float, Any]], batch: int = 0, an: Analyzer | None = None) -> list[dict[str, Any]]:
    an = an or Analyzer()
    frames = _frames(pkts)
    step = batch or len(frames) or 1
    for i in range(0, len(frames), step):
        an.feed(FrameBatch.from_frames(1, frames[i : i + step]))
    an.finish()
    return an.alerts()


def _types(pkts: list[tuple[float, Any]]) -> list[str]:
    alerts = _run(pkts)
    # The same findings whatever the batch size (1 frame, 7 frames, or all in one batch).
    assert _run(pkts, batch=1) == alerts == _run(pkts, batch=7)
    return [a["type"] for a in alerts]


def _tcp(src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int, flags: str) -> Any:
    return Ether(src=src[0], dst=dst[0]) / IP(src=src[1], dst=dst[1]) / TCP(sport=sport, dport=dport, flags=flags)


@pytest.mark.parametrize("flags", ["", "F", "FPU"])
def test_null_fin_and_xmas_probes_make_a_stealth_scan_at_15_ports(flags: str) -> None:
    probes = [(port * 0.01, _tcp(SCANNER, TARGET, 40000, port, flags)) for port in range(1, 16)]
    assert _types(probes[:14]) == []
    (alert,) = _run(probes)
    assert alert["type"] == "stealth_scan" and alert["mac"] == SCANNER[0]
    assert alert["evidence"]["target"] == TARGET[1] and len(alert["evidence"]["ports"]) == 15


def test_ack_scan_is_seen_from_the_rsts_and_a_connections_rst_is_not() -> None:
    ack_scan = []
    for i, port in enumerate(range(100, 115)):
        ack_scan += [
            (i * 0.01, _tcp(SCANNER, TARGET, 50000, port, "A")),
            (i * 0.01 + 0.001, _tcp(TARGET, SCANNER, port, 50000, "R")),
        ]
    assert _types(ack_scan) == ["stealth_scan"]
    # Connections that were opened (their SYN seen) and then reset by the server: no scan.
    resets = []
    for i in range(30):
        t = i * 0.01
        sport = 50000 + i
        resets += [(t, _tcp(SCANNER, TARGET, sport, 22, "S")), (t + 0.001, _tcp(TARGET, SCANNER, 22, sport, "SA")),
                   (t + 0.002, _tcp(TARGET, SCANNER, 22, sport, "R"))]  # fmt: skip
    assert "stealth_scan" not in _types(resets)


def _udp(src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int) -> Any:
    return Ether(src=src[0], dst=dst[0]) / IP(src=src[1], dst=dst[1]) / UDP(sport=sport, dport=dport)


def _unreach(probe: Any) -> Any:
    return (
        Ether(src=TARGET[0], dst=SCANNER[0])
        / IP(src=TARGET[1], dst=SCANNER[1])
        / ICMP(type=3, code=3)
        / IPerror(bytes(probe[IP]))
    )


def test_udp_scan_counts_port_unreachables_and_unanswered_probes() -> None:
    ports = range(1000, 1015)
    answered = [(i * 0.01, _unreach(_udp(SCANNER, TARGET, 40000, p))) for i, p in enumerate(ports)]
    probes = [(i * 0.01 - 0.001, _udp(SCANNER, TARGET, 40000, p)) for i, p in enumerate(ports)]
    assert _types(sorted(probes + answered, key=lambda x: x[0])) == ["udp_scan"]
    # Unanswered: failed once 3 s have passed, judged at the first frame after that (or at the end of the input).
    later = (5.0, _udp(TARGET, GW, 40001, 123))
    (silent,) = _run([*probes, later])
    assert _types(probes) == []  # the input ends before 3 s have passed: not judged
    assert silent["type"] == "udp_scan" and silent["ts"] == pytest.approx(T0 + 0.14 - 0.001 + 3.0)
    assert _types([*probes[:14], later]) == []


def test_answered_udp_is_no_scan() -> None:
    # A client asking 30 services of one host, each answering: nothing failed.
    pkts = []
    for i in range(30):
        pkts += [
            (i * 0.1, _udp(SCANNER, TARGET, 40000 + i, 2000 + i)),
            (i * 0.1 + 0.01, _udp(TARGET, SCANNER, 2000 + i, 40000 + i)),
        ]
    # A DNS server answering two queries of one client, from one source port, twice: its answers are no probes.
    for i in range(40):
        pkts += [
            (5 + i * 0.1, _udp(SCANNER, TARGET, 30000 + i, 53)),
            (5 + i * 0.1 + 0.01, _udp(TARGET, SCANNER, 53, 30000 + i)),
        ]
    assert _types(pkts) == []


def test_icmp_sweep_at_25_addresses() -> None:
    def ping(host: int) -> Any:
        return Ether(src=SCANNER[0], dst=GW[0]) / IP(src=SCANNER[1], dst=f"10.9.0.{host}") / ICMP(type=8)

    assert _types([(h * 0.01, ping(h)) for h in range(1, 25)]) == []
    assert _types([(h * 0.01, ping(h)) for h in range(1, 26)]) == ["icmp_sweep"]


def test_arp_sweep_needs_25_addresses_within_60_s() -> None:
    def who_has(host: int) -> Any:
        return Ether(src=SCANNER[0], dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=SCANNER[0], psrc=SCANNER[1], pdst=f"10.5.0.{host}"
        )

    assert _types([(h * 0.01, who_has(h)) for h in range(1, 26)]) == ["arp_sweep"]
    # A router refreshing 25 leaves over two minutes is no sweep.
    assert _types([(h * 5.0, who_has(h)) for h in range(1, 26)]) == []


def test_nd_spoofing_names_the_second_claimant() -> None:
    victim, attacker = "02:00:00:00:00:21", "02:00:00:00:00:66"
    addr = "fe80::21"

    def na(mac: str) -> Any:
        return (
            Ether(src=mac, dst="33:33:00:00:00:01") / IPv6(src=addr, dst="ff02::1")
            / ICMPv6ND_NA(tgt=addr, R=0, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=mac)
        )  # fmt: skip

    ns = (
        Ether(src=victim, dst="33:33:ff:00:00:01")
        / IPv6(src=addr, dst="ff02::1:ff00:1")
        / ICMPv6ND_NS(tgt="fe80::1")
        / ICMPv6NDOptSrcLLAddr(lladdr=victim)
    )
    alerts = _run([(0.0, ns), (1.0, na(victim)), (2.0, na(attacker)), (3.0, na(victim))])
    # The attacker also sends from the victim's address: the generic address_conflict is raised as before.
    assert [a["type"] for a in alerts] == ["address_conflict", "nd_spoofing"]
    alerts = alerts[1:]
    assert alerts[0]["mac"] == attacker and alerts[0]["evidence"]["previous_mac"] == victim
    assert _types([(0.0, ns), (1.0, na(victim)), (2.0, na(victim))]) == []


def _remote(t: float, hop: str) -> tuple[float, Any]:
    return t, Ether(src=TARGET[0], dst=hop) / IP(src=TARGET[1], dst="198.51.100.7") / UDP(sport=40000, dport=123)


def test_gateway_impersonation_from_an_arp_claim_and_from_the_next_hop() -> None:
    attacker = "02:00:00:00:00:66"
    gw_arp = Ether(src=GW[0], dst=TARGET[0]) / ARP(op=2, hwsrc=GW[0], psrc=GW[1], hwdst=TARGET[0], pdst=TARGET[1])
    poison = Ether(src=attacker, dst=TARGET[0]) / ARP(op=2, hwsrc=attacker, psrc=GW[1], hwdst=TARGET[0], pdst=TARGET[1])
    found = _run([_remote(0.0, GW[0]), (0.5, gw_arp), (10.0, poison)])
    assert [a["type"] for a in found] == ["address_conflict", "gateway_impersonation"]  # the former as before
    claim = found[1]
    assert claim["type"] == "gateway_impersonation" and claim["mac"] == attacker
    assert claim["evidence"]["how"] == "arp claim" and claim["evidence"]["gateway_ip"] == GW[1]
    # The leaf's traffic to the Internet goes to another MAC in three distinct seconds while its gateway is in use.
    moved = [_remote(0.0, GW[0]), _remote(10.0, attacker), _remote(11.0, attacker)]
    assert _types(moved) == []
    assert _types([*moved, _remote(12.0, attacker)]) == ["gateway_impersonation"]
    # A router replaced after it was silent for more than 5 minutes is learned without a finding.
    assert _types([_remote(0.0, GW[0]), *(_remote(400.0 + s, attacker) for s in range(5))]) == []


def _session(t: float, sport: int, port: int, length: float) -> list[tuple[float, Any]]:
    client, server = SCANNER, TARGET
    return [
        (t, _tcp(client, server, sport, port, "S")),
        (t + 0.001, _tcp(server, client, port, sport, "SA")),
        (t + 0.002, _tcp(client, server, sport, port, "A")),
        (t + length, _tcp(server, client, port, sport, "FA")),
        (t + length + 0.001, _tcp(client, server, sport, port, "FA")),
    ]


def test_connection_brute_force_from_short_sessions() -> None:
    def sessions(n: int, port: int, length: float = 0.5) -> list[tuple[float, Any]]:
        return sorted((p for i in range(n) for p in _session(i * 1.0, 41000 + i, port, length)), key=lambda x: x[0])

    assert _types(sessions(9, 22)) == []
    (alert,) = _run(sessions(10, 22))
    assert alert["type"] == "connection_brute_force" and alert["evidence"]["port"] == 22
    assert alert["ts"] == pytest.approx(T0 + 9.5)  # the tenth connection's end
    assert _types(sessions(30, 443)) == []  # one connection per request: a web client
    assert _types(sessions(12, 22, length=40.0)) == []  # long sessions are work, not guesses


def test_thresholds_are_settings_applied_live_and_validated_as_a_whole() -> None:
    an = Analyzer()
    probes = [(port * 0.01, _tcp(SCANNER, TARGET, 40000, port, "F")) for port in range(1, 6)]
    an.set_detection(stealth_scan_ports=5.0)
    assert [a["type"] for a in _run(probes, an=an)] == ["stealth_scan"]
    with pytest.raises(ConfigurationError):
        an.set_detection(stealth_scan_ports=1.0, learning_period_s=60.0)
    assert an.settings.thresholds.stealth_scan_ports == 5 and an.settings.learning_period_s is None
    with pytest.raises(ConfigurationError):
        an.set_detection(udp_reply_timeout_s=0.0)


def test_mute_by_type_or_leaf_until_it_expires() -> None:
    probes = [(port * 0.01, _tcp(SCANNER, TARGET, 40000, port, "F")) for port in range(1, 16)]
    an = Analyzer()
    an.detectors.muting.add(parse_rule({"type": "stealth_scan", "until": T0 + 100}, now=T0))
    assert _run(probes, an=an) == [] and an.detectors.muting.muted == 1
    an = Analyzer()
    an.detectors.muting.add(parse_rule({"mac": SCANNER[0].upper(), "forS": 10}, now=T0 - 20))  # expired
    assert [a["type"] for a in _run(probes, an=an)] == ["stealth_scan"]
    for bad in (
        {},
        {"type": "port_scan"},
        {"type": "nope", "forS": 1},
        {"mac": "x", "forS": 1},
        {"type": "flood", "forS": -1},
    ):
        with pytest.raises(ConfigurationError):
            parse_rule(bad, now=T0)


def test_learn_accepts_a_new_gateway() -> None:
    an = Analyzer()
    _run([_remote(0.0, GW[0])], an=an)
    an.learn()
    assert _run([_remote(10.0 + s, "02:00:00:00:00:77") for s in range(5)], an=an) == []


def test_an_address_flipping_between_two_macs_is_one_conflict_whatever_the_batches() -> None:
    other = "02:00:00:00:00:99"

    def claim(mac: str) -> Any:
        return Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=mac, psrc=TARGET[1], pdst=GW[1])

    flips = [(i * 1.0, claim(TARGET[0] if i % 2 == 0 else other)) for i in range(8)]
    assert _types(flips) == ["address_conflict"]  # _types checks batches of 1, 7 and all alike


def test_settings_replace_their_mute_rules_and_keep_the_methods() -> None:
    an = Analyzer()
    muting = an.detectors.muting
    muting.add(parse_rule({"type": "udp_scan", "forS": 60}, now=T0))  # from the mute method
    muting.set((parse_rule({"type": "stealth_scan", "forS": 60}, now=T0),))  # from the settings
    muting.set((parse_rule({"type": "icmp_sweep", "forS": 60}, now=T0),))  # the settings' list changed
    assert sorted(r["type"] for r in muting.in_force(T0)) == ["icmp_sweep", "udp_scan"]
    assert muting.in_force(T0 + 61) == []  # expired


def test_slow_scans_nmap_T1_is_seen_after_210_s_and_T0_is_out_of_reach() -> None:
    # nmap -T1 waits 15 s between probes: the 15th port falls 210 s after the first, inside the 5 minute window.
    def syn_every(gap_s: float) -> list[tuple[float, Any]]:
        return [(i * gap_s, _tcp(SCANNER, TARGET, 40000, 1000 + i, "S")) for i in range(20)]

    (alert,) = _run(syn_every(15.0))
    assert alert["type"] == "port_scan" and alert["ts"] == pytest.approx(T0 + 14 * 15.0)
    # Slower than one probe every 300 / 14 = 21.4 s never gets 15 ports into one window (nmap -T0: 300 s).
    assert _types(syn_every(21.5)) == []
    an = Analyzer()
    an.set_detection(scan_window_s=3600.0)  # an operator who wants the slow ones widens the window
    assert [a["type"] for a in _run(syn_every(120.0), an=an)] == ["port_scan"]


def test_connections_reset_right_after_the_syn_ack_are_no_brute_force() -> None:
    # A SYN scan's answer to an open port, or a connection flood: SYN, SYN-ACK, RST, over and over.
    pkts = []
    for i in range(30):
        t = i * 0.5
        port = 41000 + i
        pkts += [(t, _tcp(SCANNER, TARGET, port, 22, "S")), (t + 0.001, _tcp(TARGET, SCANNER, 22, port, "SA")),
                 (t + 0.002, _tcp(SCANNER, TARGET, port, 22, "R"))]  # fmt: skip
    assert _types(pkts) == []
