"""Header-only frame decoding: link layer, VLANs, ARP, IPv4/IPv6, TCP, UDP, ICMP.

`decode` never raises on bad input: a frame too short for the headers it announces is marked ``truncated``
(the capture cut it) and a frame whose headers contradict themselves is marked ``malformed``; the caller
counts both. Only header fields are extracted; payloads are referenced by offset into the batch buffer so
deep decoders can look at them without a copy.
"""

from __future__ import annotations

import struct

from leafguard.capture.batch import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
)

ETH_IPV4 = 0x0800
ETH_ARP = 0x0806
ETH_IPV6 = 0x86DD
ETH_PPPOE_SESSION = 0x8864
PPP_IPV4 = 0x0021
PPP_IPV6 = 0x0057
VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100})

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_IPIP = 4
PROTO_IPV6_IN_IP = 41
MAX_TUNNEL_DEPTH = 2
# IPv6 extension headers that are walked to reach the transport header (RFC 8200 section 4).
IPV6_EXT = frozenset({0, 43, 60, 135, 139, 140})
IPV6_FRAGMENT = 44
IPV6_AH = 51

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

_H = struct.Struct("!H").unpack_from
_HH = struct.Struct("!HH").unpack_from


class Packet:
    """One decoded frame. Fields that a frame does not have stay at their defaults."""

    __slots__ = (
        "arp_op",
        "arp_sha",
        "arp_spa",
        "arp_tpa",
        "dport",
        "dst_ip",
        "dst_mac",
        "ethertype",
        "frag_first",
        "frag_id",
        "fragment",
        "icmp_type",
        "ip_version",
        "malformed",
        "payload_len",
        "payload_off",
        "proto",
        "sport",
        "src_ip",
        "src_mac",
        "tcp_flags",
        "truncated",
        "vlans",
    )

    def __init__(self) -> None:
        self.src_mac: bytes | None = None
        self.dst_mac: bytes | None = None
        self.vlans: tuple[int, ...] = ()
        self.ethertype = 0
        self.ip_version = 0
        self.src_ip: bytes | None = None
        self.dst_ip: bytes | None = None
        self.proto = -1
        self.fragment = False
        """Part of a fragmented IP datagram."""
        self.frag_first = False
        """The fragment that carries the transport header."""
        self.frag_id = 0
        self.sport = -1
        self.dport = -1
        self.tcp_flags = 0
        self.icmp_type = -1
        self.payload_off = 0
        self.payload_len = 0
        self.arp_op = 0
        self.arp_sha: bytes | None = None
        self.arp_spa: bytes | None = None
        self.arp_tpa: bytes | None = None
        self.truncated = False
        self.malformed = False


def decode(data: bytes, off: int, caplen: int, linktype: int) -> Packet:
    """Decode the headers of the frame at ``data[off:off+caplen]``."""
    p = Packet()
    end = off + caplen
    if linktype == LINKTYPE_ETHERNET:
        if caplen < 14:
            p.truncated = True
            return p
        p.dst_mac = data[off : off + 6]
        p.src_mac = data[off + 6 : off + 12]
        etype = _H(data, off + 12)[0]
        pos = off + 14
        if etype in VLAN_TPIDS:
            vlans: list[int] = []
            while etype in VLAN_TPIDS:
                if pos + 4 > end:
                    p.truncated = True
                    p.vlans = tuple(vlans)
                    return p
                tci, etype = _HH(data, pos)
                vlans.append(tci & 0x0FFF)
                pos += 4
            p.vlans = tuple(vlans)
        if etype <= 1500:
            # 802.3 length field (LLC/SNAP: STP, CDP, LLDP over LLC): counted, nothing to decode.
            p.ethertype = 0
            return p
    elif linktype == LINKTYPE_LINUX_SLL:
        if caplen < 16:
            p.truncated = True
            return p
        # Only the sender's address is in the cooked header; a 6-byte one is a MAC.
        halen = _H(data, off + 4)[0]
        if halen == 6:
            p.src_mac = data[off + 6 : off + 12]
        etype = _H(data, off + 14)[0]
        pos = off + 16
    elif linktype == LINKTYPE_LINUX_SLL2:
        if caplen < 20:
            p.truncated = True
            return p
        etype = _H(data, off)[0]
        if data[off + 11] == 6:
            p.src_mac = data[off + 12 : off + 18]
        pos = off + 20
    elif linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        if caplen < 1:
            p.truncated = True
            return p
        version = data[off] >> 4
        etype = ETH_IPV4 if version == 4 else ETH_IPV6 if version == 6 else 0
        pos = off
    else:
        p.malformed = True
        return p
    if etype == ETH_PPPOE_SESSION:
        # PPPoE session header (RFC 2516): 6 bytes, then the PPP protocol number.
        if pos + 8 > end:
            p.truncated = True
            return p
        ppp = _H(data, pos + 6)[0]
        etype = ETH_IPV4 if ppp == PPP_IPV4 else ETH_IPV6 if ppp == PPP_IPV6 else etype
        if etype != ETH_PPPOE_SESSION:
            pos += 8
    p.ethertype = etype
    if etype == ETH_IPV4:
        _ipv4(p, data, pos, end)
    elif etype == ETH_IPV6:
        _ipv6(p, data, pos, end)
    elif etype == ETH_ARP:
        _arp(p, data, pos, end)
    return p


def _arp(p: Packet, data: bytes, pos: int, end: int) -> None:
    if pos + 8 > end:
        p.truncated = True
        return
    htype, ptype = _HH(data, pos)
    hlen = data[pos + 4]
    plen = data[pos + 5]
    p.arp_op = _H(data, pos + 6)[0]
    if htype != 1 or ptype != ETH_IPV4 or hlen != 6 or plen != 4:
        return
    if pos + 28 > end:
        p.truncated = True
        return
    p.arp_sha = data[pos + 8 : pos + 14]
    p.arp_spa = data[pos + 14 : pos + 18]
    p.arp_tpa = data[pos + 24 : pos + 28]


def _ipv4(p: Packet, data: bytes, pos: int, end: int, depth: int = 0) -> None:
    if pos + 20 > end:
        p.truncated = True
        return
    vihl = data[pos]
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20:
        p.malformed = True
        return
    p.ip_version = 4
    total = _H(data, pos + 2)[0]
    frag = _H(data, pos + 6)[0]
    proto = data[pos + 9]
    p.proto = proto
    p.src_ip = data[pos + 12 : pos + 16]
    p.dst_ip = data[pos + 16 : pos + 20]
    if total < ihl:
        p.malformed = True
        return
    # The IP total length bounds the payload; Ethernet padding after it is not payload.
    l4_end = min(pos + total, end)
    if frag & 0x3FFF:
        p.fragment = True
        p.frag_id = _H(data, pos + 4)[0]
        if frag & 0x1FFF:
            return
        p.frag_first = True
    if pos + ihl > end:
        p.truncated = True
        return
    if proto in (PROTO_IPIP, PROTO_IPV6_IN_IP) and not p.fragment and depth < MAX_TUNNEL_DEPTH:
        _tunnel(p, data, pos + ihl, l4_end, depth)
        return
    _transport(p, data, pos + ihl, l4_end, pos + total)


def _ipv6(p: Packet, data: bytes, pos: int, end: int, depth: int = 0) -> None:
    if pos + 40 > end:
        p.truncated = True
        return
    if data[pos] >> 4 != 6:
        p.malformed = True
        return
    p.ip_version = 6
    plen = _H(data, pos + 4)[0]
    nxt = data[pos + 6]
    p.src_ip = data[pos + 8 : pos + 24]
    p.dst_ip = data[pos + 24 : pos + 40]
    ip_end = pos + 40 + plen
    l4_end = min(ip_end, end)
    pos += 40
    # Walk extension headers; a bounded count keeps a crafted chain from looping long.
    for _ in range(8):
        if nxt in IPV6_EXT or nxt == IPV6_AH:
            if pos + 2 > end:
                p.proto = nxt
                p.truncated = True
                return
            hdr_len = (data[pos + 1] + 2) * 4 if nxt == IPV6_AH else (data[pos + 1] + 1) * 8
            nxt = data[pos]
            pos += hdr_len
        elif nxt == IPV6_FRAGMENT:
            if pos + 8 > end:
                p.proto = nxt
                p.truncated = True
                return
            p.fragment = True
            p.frag_id = struct.unpack_from("!I", data, pos + 4)[0]
            offset = _H(data, pos + 2)[0] >> 3
            nxt = data[pos]
            pos += 8
            if offset:
                p.proto = nxt
                return
            p.frag_first = True
        else:
            break
    p.proto = nxt
    if pos > ip_end:
        p.malformed = True
        return
    if nxt in (PROTO_IPIP, PROTO_IPV6_IN_IP) and not p.fragment and depth < MAX_TUNNEL_DEPTH:
        _tunnel(p, data, pos, l4_end, depth)
        return
    _transport(p, data, pos, l4_end, ip_end)


def _tunnel(p: Packet, data: bytes, pos: int, end: int, depth: int) -> None:
    """IP in IP (4) or IPv6 in IP (41, 6in4): the inner datagram is what the conversation is about, as tshark
    sees it; its addresses replace the outer ones."""
    inner = p.proto
    p.fragment = p.frag_first = False
    if inner == PROTO_IPIP:
        _ipv4(p, data, pos, end, depth + 1)
    else:
        _ipv6(p, data, pos, end, depth + 1)


def _transport(p: Packet, data: bytes, pos: int, end: int, ip_end: int) -> None:
    proto = p.proto
    if proto == PROTO_TCP:
        if pos + 20 > end:
            p.truncated = True
            return
        p.sport, p.dport = _HH(data, pos)
        doff = (data[pos + 12] >> 4) * 4
        p.tcp_flags = data[pos + 13]
        if doff < 20:
            p.malformed = True
            return
        p.payload_off = pos + doff
        p.payload_len = max(0, min(end, ip_end) - pos - doff)
    elif proto == PROTO_UDP:
        if pos + 8 > end:
            p.truncated = True
            return
        p.sport, p.dport = _HH(data, pos)
        p.payload_off = pos + 8
        p.payload_len = max(0, min(end, ip_end) - pos - 8)
    elif proto in (PROTO_ICMP, PROTO_ICMPV6):
        if pos + 1 > end:
            p.truncated = True
            return
        p.icmp_type = data[pos]
        # The message itself, for the rules that read ICMP (unreachables quote the datagram they answer).
        p.payload_off = pos
        p.payload_len = max(0, min(end, ip_end) - pos)
