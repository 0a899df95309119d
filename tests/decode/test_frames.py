"""Header-only decoding: known layouts decode to the right fields, and no input makes the decoder raise."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from leafguard.capture.batch import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW
from leafguard.decode.frames import TCP_ACK, TCP_SYN, decode

LINKTYPES = [LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_RAW]


def _frames() -> list[bytes]:
    base = Ether(src="00:11:22:33:44:55", dst="66:77:88:99:aa:bb")
    return [
        bytes(base / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1234, dport=80, flags="S")),
        bytes(base / Dot1Q(vlan=5) / Dot1Q(vlan=7) / IP(src="10.0.0.1", dst="8.8.8.8") / UDP(sport=5, dport=53) / b"x"),
        bytes(base / IPv6(src="fe80::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / TCP(dport=22)),
        bytes(
            base / IPv6(src="fe80::1", dst="fd00::2") / IPv6ExtHdrFragment(m=1, id=9) / UDP(sport=1, dport=2) / b"ab"
        ),
        bytes(base / ARP(psrc="10.0.0.1", pdst="10.0.0.2")),
        bytes(base / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", id=77) / UDP(sport=9, dport=10) / Raw(b"z" * 40)),
    ]


def test_tcp_over_ethernet() -> None:
    raw = _frames()[0]
    p = decode(raw, 0, len(raw), LINKTYPE_ETHERNET)
    assert p.src_mac == bytes.fromhex("001122334455")
    assert p.dst_mac == bytes.fromhex("66778899aabb")
    assert p.src_ip == bytes([10, 0, 0, 1])
    assert (p.proto, p.sport, p.dport) == (6, 1234, 80)
    assert p.tcp_flags & TCP_SYN
    assert not p.tcp_flags & TCP_ACK
    assert not (p.truncated or p.malformed)


def test_qinq_tags_are_kept_and_skipped() -> None:
    raw = _frames()[1]
    p = decode(raw, 0, len(raw), LINKTYPE_ETHERNET)
    assert p.vlans == (5, 7)
    assert (p.proto, p.sport, p.dport, p.payload_len) == (17, 5, 53, 1)


def test_ipv6_extension_headers_are_walked() -> None:
    raw = _frames()[2]
    p = decode(raw, 0, len(raw), LINKTYPE_ETHERNET)
    assert (p.ip_version, p.proto, p.dport) == (6, 6, 22)
    frag = _frames()[3]
    q = decode(frag, 0, len(frag), LINKTYPE_ETHERNET)
    assert q.fragment and q.frag_first and q.frag_id == 9
    assert (q.proto, q.sport, q.dport) == (17, 1, 2)


def test_arp_and_ipv4_fragment() -> None:
    raw = _frames()[4]
    p = decode(raw, 0, len(raw), LINKTYPE_ETHERNET)
    assert p.arp_op == 1 and p.arp_spa == bytes([10, 0, 0, 1])
    frag = _frames()[5]
    q = decode(frag, 0, len(frag), LINKTYPE_ETHERNET)
    assert q.fragment and q.frag_first and q.frag_id == 77 and q.sport == 9


def test_pppoe_session_and_ip_tunnels_expose_the_inner_conversation() -> None:
    inner = IP(src="95.1.2.3", dst="93.4.5.6") / UDP(sport=514, dport=514) / b"<13>hello"
    pppoe = struct.pack("!BBHHH", 0x11, 0, 0x0042, len(bytes(inner)) + 2, 0x0021) + bytes(inner)
    raw = bytes(Ether(src="00:11:22:33:44:55", dst="66:77:88:99:aa:bb", type=0x8864)) + pppoe
    p = decode(raw, 0, len(raw), LINKTYPE_ETHERNET)
    assert (p.src_ip, p.sport, p.dport) == (bytes([95, 1, 2, 3]), 514, 514)
    six_in_four = bytes(
        Ether()
        / IP(src="193.0.0.1", dst="216.0.0.1", proto=41)
        / IPv6(src="2001:db8::2", dst="2001:db8::b")
        / UDP(sport=38159, dport=514)
    )
    q = decode(six_in_four, 0, len(six_in_four), LINKTYPE_ETHERNET)
    assert (q.ip_version, q.proto, q.sport, q.dport) == (6, 17, 38159, 514)
    assert q.src_ip is not None and len(q.src_ip) == 16


def test_cooked_and_raw_link_types() -> None:
    ip = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=7, dport=8))
    sll = struct.pack("!HHH8sH", 0, 1, 6, bytes.fromhex("0011223344550000"), 0x0800) + ip
    p = decode(sll, 0, len(sll), LINKTYPE_LINUX_SLL)
    assert p.src_mac == bytes.fromhex("001122334455") and p.dst_mac is None and p.dport == 8
    sll2 = struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, bytes.fromhex("0011223344550000")) + ip
    q = decode(sll2, 0, len(sll2), LINKTYPE_LINUX_SLL2)
    assert q.src_mac == bytes.fromhex("001122334455") and q.sport == 7
    r = decode(ip, 0, len(ip), LINKTYPE_RAW)
    assert r.src_mac is None and (r.sport, r.dport) == (7, 8)


def test_snap_length_cut_is_counted_as_truncated() -> None:
    raw = _frames()[0]
    p = decode(raw, 0, 40, LINKTYPE_ETHERNET)
    assert p.truncated and p.sport == -1
    assert p.src_ip == bytes([10, 0, 0, 1])


def test_decoding_at_an_offset_inside_a_buffer() -> None:
    raw = _frames()[0]
    buf = b"\xee" * 13 + raw + b"\xee" * 7
    p = decode(buf, 13, len(raw), LINKTYPE_ETHERNET)
    assert (p.sport, p.dport) == (1234, 80)


@settings(max_examples=1500, deadline=None)
@given(data=st.binary(max_size=200), linktype=st.sampled_from(LINKTYPES))
def test_any_bytes_never_raise(data: bytes, linktype: int) -> None:
    p = decode(data, 0, len(data), linktype)
    assert p.payload_off + p.payload_len <= max(len(data), p.payload_off)


@settings(max_examples=600, deadline=None)
@given(index=st.integers(0, 5), cut=st.integers(0, 200), flip=st.integers(0, 199), value=st.integers(0, 255))
def test_truncated_or_damaged_valid_frames_never_raise(index: int, cut: int, flip: int, value: int) -> None:
    raw = bytearray(_frames()[index])
    if flip < len(raw):
        raw[flip] = value
    cut = min(cut, len(raw))
    p = decode(bytes(raw), 0, cut, LINKTYPE_ETHERNET)
    if cut < 14:
        assert p.truncated
    assert p.payload_off + p.payload_len <= max(cut, p.payload_off)
