"""The attack rules' records (`detect.probes.Picker`): the same whether the picker reads the reader's classification
of a batch (`fastpath.classify`, as `analyze` and live capture hand it over) or gathers every header itself."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from leafguard.capture.batch import LINKTYPE_ETHERNET, FrameBatch
from leafguard.detect.probes import Picker, Record
from leafguard.observe.fastpath import classify
from testkit.gen_capture import frames

LEAF = ("02:00:00:00:00:0a", "10.20.0.66")
OTHER = ("02:00:00:00:00:02", "10.20.0.2")
GW = ("02:00:00:00:00:01", "10.20.0.1")


def _odd_frames() -> list[bytes]:
    """Frames off the classification's plain path, or on it with flags and ports each rule treats apart."""

    def eth(src: tuple[str, str], dst: tuple[str, str]) -> Any:
        return Ether(src=src[0], dst=dst[0])

    def ip(src: tuple[str, str], dst: tuple[str, str], **kw: Any) -> Any:
        return eth(src, dst) / IP(src=src[1], dst=dst[1], **kw)

    out = []
    for flags in ["", "F", "FPU", "R", "RA", "S", "SA", "FA", "A", "PA"]:
        for sport, dport in [(40000, 22), (40000, 443), (80, 40001), (40002, 1883)]:
            out.append(ip(LEAF, OTHER) / TCP(sport=sport, dport=dport, flags=flags))
            out.append(ip(LEAF, ("02:00:00:00:00:01", "8.8.8.8")) / TCP(sport=sport, dport=dport, flags=flags))
    for sport, dport in [(40000, 161), (53, 40000), (40001, 5353), (123, 123), (40002, 9999), (9999, 40002)]:
        out.append(ip(LEAF, OTHER) / UDP(sport=sport, dport=dport) / b"x")
        out.append(ip(OTHER, LEAF) / UDP(sport=dport, dport=sport) / b"y")
        out.append(ip(LEAF, ("02:00:00:00:00:01", "1.1.1.1")) / UDP(sport=sport, dport=dport))
    out += [
        ip(LEAF, OTHER) / ICMP(type=8),
        ip(OTHER, LEAF) / ICMP(type=0),
        ip(LEAF, ("ff:ff:ff:ff:ff:ff", "10.20.255.255")) / ICMP(type=8),
        ip(OTHER, LEAF) / ICMP(type=3, code=3) / IPerror(src=LEAF[1], dst=OTHER[1]) / UDPerror(sport=40000, dport=7),
        ip(OTHER, LEAF) / ICMP(type=11),
        ip(LEAF, OTHER, options=b"\x01\x01\x01\x00") / TCP(sport=40005, dport=23, flags="S"),
        ip(LEAF, OTHER, options=b"\x01\x01\x01\x00") / UDP(sport=40006, dport=4000),
        ip(LEAF, OTHER, options=b"\x01\x01\x01\x00") / ICMP(type=8),
        ip(LEAF, OTHER, flags="MF", id=7) / UDP(sport=40007, dport=4001) / (b"z" * 40),
        ip(LEAF, OTHER, frag=3, id=7) / (b"z" * 16),
        ip(LEAF, OTHER, flags="MF", id=8) / TCP(sport=40008, dport=25, flags="S"),
        eth(LEAF, OTHER) / Dot1Q(vlan=5) / IP(src=LEAF[1], dst=OTHER[1]) / TCP(sport=40009, dport=22, flags="S"),
        eth(LEAF, GW) / Dot1Q(vlan=5) / IP(src=LEAF[1], dst="9.9.9.9") / UDP(sport=40010, dport=4002),
        eth(LEAF, OTHER) / Dot1Q(vlan=5) / Dot1Q(vlan=6) / IP(src=LEAF[1], dst=OTHER[1]) / TCP(flags="F"),
        eth(LEAF, ("ff:ff:ff:ff:ff:ff", "")) / ARP(op=1, hwsrc=LEAF[0], psrc=LEAF[1], pdst="10.20.0.9"),
        eth(OTHER, LEAF) / ARP(op=2, hwsrc=OTHER[0], psrc=GW[1], hwdst=LEAF[0], pdst=LEAF[1]),
        eth(LEAF, ("ff:ff:ff:ff:ff:ff", "")) / Dot1Q(vlan=5) / ARP(op=1, hwsrc=LEAF[0], psrc=LEAF[1], pdst="10.20.0.8"),
        eth(LEAF, ("33:33:00:00:00:01", "")) / IPv6(src="fe80::a", dst="ff02::1:ff00:2")
        / ICMPv6ND_NS(tgt="fe80::2") / ICMPv6NDOptSrcLLAddr(lladdr=LEAF[0]),
        eth(OTHER, LEAF) / IPv6(src="fe80::2", dst="fe80::a") / ICMPv6ND_NA(tgt="fe80::2", R=0, S=1, O=1),
        eth(LEAF, OTHER) / IPv6(src="fd00::a", dst="fd00::2") / ICMPv6EchoRequest(),
        eth(LEAF, OTHER) / IPv6(src="fd00::a", dst="fd00::2") / UDP(sport=40011, dport=4003),
        eth(LEAF, OTHER) / IPv6(src="fd00::a", dst="fd00::2") / TCP(sport=40012, dport=22, flags="S"),
    ]  # fmt: skip
    return [bytes(p) for p in out]


def _batches() -> list[list[tuple[float, bytes, int]]]:
    rnd = random.Random(13)
    stream = [(ts, raw, len(raw)) for ts, raw in frames(11, 30, 6_000)]
    odd = _odd_frames()
    for k in range(600):
        at = rnd.randrange(len(stream))
        raw = odd[k % len(odd)]
        if k % 9 == 0:  # cut by the snap length: headers (or all but the Ethernet header) missing
            raw = raw[: rnd.choice([14, 20, 30, 38, 42, 50])]
        stream.insert(at, (stream[at][0], raw, len(odd[k % len(odd)])))
    # Batches of many sizes, from below the bulk step's 64 frames to thousands.
    out, i = [], 0
    for size in [1, 7, 63, 64, 200, 1000] * 4:
        out.append(stream[i : i + size])
        i += size
    out.append(stream[i:])
    return out


def _fields(records: list[Record]) -> list[tuple[str, tuple[Any, ...]]]:
    return [(type(r).__name__, tuple(r)) for r in records]


def test_records_are_the_same_with_the_readers_classification_and_without() -> None:
    with_pre, without = Picker(), Picker()
    kinds: Counter[str] = Counter()
    classified = 0
    for frames_ in _batches():
        a = FrameBatch.from_frames(LINKTYPE_ETHERNET, frames_)
        b = FrameBatch.from_frames(LINKTYPE_ETHERNET, frames_)
        a.prepared = classify(a) if len(a) else None
        classified += a.prepared is not None
        got = _fields(with_pre.records(a))
        assert got == _fields(without.records(b))
        assert [ts for _, (ts, *_) in got] == sorted(ts for _, (ts, *_) in got)  # capture order
        kinds.update(kind for kind, _ in got)
    assert classified >= 20  # most batches: the classification is None only where no frame is plain IPv4
    # Every kind of record was made, so every step of both paths ran.
    assert set(kinds) == {"TcpControl", "UdpFirst", "EchoRequest", "PortUnreachable", "ArpFrame", "Neighbor",
                          "NextHop"}  # fmt: skip
