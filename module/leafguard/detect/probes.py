"""The frames the attack rules look at, picked out of a batch and decoded into typed records, in capture order.

The attack rules (`detect.attacks`) need few frames: TCP segments that open, close or reset a connection or carry no
ACK (scans), ICMP and ICMPv6 (sweeps, unreachables, neighbour discovery), ARP, the first datagram of each UDP
conversation (UDP scans), and one frame per (leaf, next hop) of traffic leaving the leaf side (the
leaves' default gateways; one per pair and second of packet time). For Ethernet batches numpy picks them from the
batch buffer, so the bulk of a busy capture (mid-flow segments and datagrams) costs a few vector operations per
batch; only the picked frames are decoded one by one. Other link types are decoded frame by frame.

The UDP and next-hop records are made for the first frame of their kind in the whole capture (UDP), or in a second
of packet time (next hops), never per batch, so the records, and the findings, do not depend on where batches start
and end.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from leafguard.capture.batch import LINKTYPE_ETHERNET, FrameBatch
from leafguard.decode.frames import (
    ETH_ARP,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    Packet,
    decode,
)
from leafguard.observe.settings import Network

_U8 = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]
_B = npt.NDArray[np.bool_]

ICMP_ECHO_REQUEST = 8
ICMP_UNREACHABLE = 3
ICMP6_UNREACHABLE = 1
ICMP6_ECHO_REQUEST = 128
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
WEB_PORTS_LIST = [80, 443, 8080, 8443]
"""`bruteforce.WEB_PORTS`: their FINs are of no rule's interest."""
COMMON_UDP_LIST = [53, 67, 68, 123, 1900, 5353]
"""UDP ports whose datagrams the UDP-scan rule does not read (`scans`)."""
COMMON_UDP = frozenset(COMMON_UDP_LIST)
WEB_PORTS = frozenset(WEB_PORTS_LIST)
HOP_BUCKET_S = 1.0
"""A (leaf, next hop) pair makes one record per second of packet time in which it is used."""


@dataclass(frozen=True, slots=True)
class TcpControl:
    """A TCP segment with SYN, FIN or RST, or without ACK."""

    ts: float
    src_mac: bytes | None
    src: bytes
    sport: int
    dst: bytes
    dport: int
    flags: int


@dataclass(frozen=True, slots=True)
class UdpFirst:
    """The first datagram from one address and port to another (the first of its conversation in this direction)."""

    ts: float
    src_mac: bytes | None
    src: bytes
    sport: int
    dst: bytes
    dport: int
    answers: bool
    """The other direction was seen before: this datagram answers (or continues) a conversation."""


@dataclass(frozen=True, slots=True)
class EchoRequest:
    ts: float
    src_mac: bytes | None
    src: bytes
    dst: bytes


@dataclass(frozen=True, slots=True)
class PortUnreachable:
    """An ICMP (or ICMPv6) port unreachable, with the UDP datagram it answers (from its quoted headers)."""

    ts: float
    prober: bytes
    target: bytes
    dport: int


@dataclass(frozen=True, slots=True)
class ArpFrame:
    ts: float
    src_mac: bytes
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_ip: bytes


@dataclass(frozen=True, slots=True)
class Neighbor:
    """An IPv6 neighbour solicitation (``advert`` False) or advertisement, with the binding it states."""

    ts: float
    src_mac: bytes
    advert: bool
    address: bytes
    """NS: the sender's own address (unspecified for duplicate address detection); NA: the target address."""
    link_addr: bytes | None
    """The link-layer address option (source for NS, target for NA), if present."""
    override: bool


@dataclass(frozen=True, slots=True)
class NextHop:
    """A leaf-side source sending to a destination beyond the leaf side through the MAC ``hop`` (its gateway)."""

    ts: float
    leaf_mac: bytes
    hop: bytes


Record = TcpControl | UdpFirst | EchoRequest | PortUnreachable | ArpFrame | Neighbor | NextHop


def _firsts(k1: _I64, k2: _I64) -> _I64:
    """Positions of the first element of each distinct (k1, k2) pair, in order (a stable sort keeps, in each
    group, the first element first). Keys may wrap around int64: only equality matters."""
    order = np.lexsort((k2, k1))
    a, b = k1[order], k2[order]
    start = np.empty(order.size, dtype=bool)
    start[:1] = True
    start[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return np.sort(order[start])


def _first(event: tuple[int, Record | None]) -> int:
    return event[0]


_PRIVATE_V4: tuple[ipaddress.IPv4Network, ...] = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
    ipaddress.IPv4Network("169.254.0.0/16"),
)


def _u16(arr: _U8, at: _I64) -> _I64:
    return (arr[at].astype(np.int64) << 8) | arr[at + 1]


def _u32(arr: _U8, at: _I64) -> _I64:
    return (_u16(arr, at) << 16) | _u16(arr, at + 2)


def _u48(arr: _U8, at: _I64) -> _I64:
    return (_u16(arr, at) << 32) | _u32(arr, at + 2)


def _in_nets(ip: _I64, nets: tuple[ipaddress.IPv4Network, ...]) -> _B:
    out = np.zeros(ip.shape, dtype=bool)
    for net in nets:
        out |= (ip & int(net.netmask)) == int(net.network_address)
    return out


class Picker:
    """Picks and decodes the frames of a batch that the attack rules read; remembers what is not new."""

    def __init__(self, leaf_nets: tuple[Network, ...] = (), max_keys: int = 65_536) -> None:
        self.set_leaf_nets(leaf_nets)
        self._max_keys = max_keys
        self._udp_seen: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._udp6_seen: OrderedDict[tuple[bytes, bytes, int, int], None] = OrderedDict()
        """IPv6 (and other link types') conversations, in the direction of their first datagram."""
        self._hops_seen: OrderedDict[tuple[int, int], int] = OrderedDict()
        """(leaf MAC, next-hop MAC) -> the last time bucket a record was made for."""

    def set_leaf_nets(self, leaf_nets: tuple[Network, ...]) -> None:
        """The leaf side (empty: the private ranges) for the frames picked from now on."""
        v4 = tuple(n for n in leaf_nets if isinstance(n, ipaddress.IPv4Network))
        self._leaf_v4 = v4 if leaf_nets else _PRIVATE_V4

    def records(self, batch: FrameBatch) -> Iterator[Record]:
        n = len(batch)
        if not n:
            return
        data = batch.data
        ts = batch.timestamps
        if batch.linktype != LINKTYPE_ETHERNET:
            for i in range(n):
                yield from self._decoded(decode(data, batch.offsets[i], batch.caplens[i], batch.linktype), data, ts[i])
            return
        events = self._pick(batch)
        events.sort(key=_first)
        for i, record in events:
            if record is not None:
                yield record
            else:
                yield from self._decoded(decode(data, batch.offsets[i], batch.caplens[i], batch.linktype), data, ts[i])

    def _pick(self, batch: FrameBatch) -> list[tuple[int, Record | None]]:
        """(frame index, record) for every frame the rules read; None where the frame is to be decoded (ARP,
        ICMP, IPv6, encapsulations): plain IPv4 TCP and UDP records are made here from the gathered fields."""
        data = batch.data
        arr = np.frombuffer(data, dtype=np.uint8)
        off = np.asarray(batch.offsets, dtype=np.int64)
        cap = np.asarray(batch.caplens, dtype=np.int64)
        stamps = np.asarray(batch.timestamps, dtype=np.float64)
        ok = cap >= 14
        o = np.where(ok, off, 0)
        tagged = ok & (arr[o + 12] == 0x81) & (arr[o + 13] == 0x00) & (cap >= 18)
        h = o + np.where(tagged, 4, 0)
        hcap = cap - np.where(tagged, 4, 0)
        et = _u16(arr, h + 12)
        arp = ok & (et == ETH_ARP)
        # QinQ, PPPoE and other encapsulations: rare, and decoded frame by frame.
        odd = ok & ((et == 0x8100) | (et == 0x88A8) | (et == 0x9100) | (et == 0x8864))
        v6 = ok & (et == 0x86DD) & (hcap >= 54)
        v4 = ok & (et == 0x0800) & (hcap >= 34) & ((arr[np.where(ok, h + 14, 0)] >> 4) == 4)
        # IPv4: transport at 14 + IHL; only first fragments (offset 0) have a transport header.
        hv = np.where(v4, h, 0)
        ihl = (arr[hv + 14] & 0x0F).astype(np.int64) * 4
        first_frag = ((arr[hv + 20] & 0x1F) == 0) & (arr[hv + 21] == 0)
        proto = arr[hv + 23]
        l4 = hv + 14 + ihl
        has_ports = v4 & first_frag & (hcap >= 14 + ihl + 8)
        icmp = v4 & first_frag & (proto == PROTO_ICMP)
        tcp = has_ports & (proto == PROTO_TCP) & (hcap >= 14 + ihl + 14)
        flags = arr[np.where(tcp, l4 + 13, 0)]
        sport = _u16(arr, l4)
        dport = _u16(arr, l4 + 2)
        # What the TCP rules read (`scans`, `bruteforce`): segments without ACK (SYNs, RSTs without ACK, scan
        # probes), and SYN-ACKs and FINs off the web ports. A RST with ACK (a closed port's answer) and the
        # SYN-ACKs and FINs of web traffic, the bulk of the control segments, are left out.
        web = np.isin(sport, WEB_PORTS_LIST) | np.isin(dport, WEB_PORTS_LIST)
        control = tcp & (
            ((flags & TCP_ACK) == 0)
            | (((flags & (TCP_SYN | 0x01)) != 0) & ~web)
        )  # fmt: skip
        # IPv6: the next header of the fixed header; extension headers are left to the decoder.
        hv6 = np.where(v6, h, 0)
        nh = arr[hv6 + 20]
        flags6 = arr[np.where(v6 & (hcap >= 54 + 14), hv6 + 54 + 13, 0)]
        v6_pick = v6 & (
            (nh == PROTO_ICMPV6) | (nh == PROTO_UDP) | (nh == 0) | (nh == 43) | (nh == 44) | (nh == 60)
            | ((nh == PROTO_TCP) & (((flags6 & 0x07) != 0) | ((flags6 & TCP_ACK) == 0)))
        )  # fmt: skip
        events: list[tuple[int, Record | None]] = [
            (i, None) for i in np.flatnonzero(arp | odd | icmp | v6_pick).tolist()
        ]
        sip = _u32(arr, hv + 26)
        dip = _u32(arr, hv + 30)

        rows = np.flatnonzero(control)
        if rows.size:
            at = hv[rows]
            mo = o[rows]
            for i, t, m, a, sp, dp, f in zip(
                rows.tolist(), stamps[rows].tolist(), mo.tolist(), at.tolist(), sport[rows].tolist(),
                dport[rows].tolist(), flags[rows].tolist(), strict=True,
            ):  # fmt: skip
                events.append(
                    (i, TcpControl(t, data[m + 6 : m + 12], data[a + 26 : a + 30], sp, data[a + 30 : a + 34], dp, f))
                )

        # Datagrams of the services that make most of a segment's new UDP conversations (DNS, NTP, DHCP, mDNS,
        # SSDP) are left out: a probe to one of these ports is one port less in a scan's count.
        common = np.isin(sport, COMMON_UDP_LIST) | np.isin(dport, COMMON_UDP_LIST)
        udp = np.flatnonzero(has_ports & (proto == PROTO_UDP) & ~common)
        if udp.size:
            s_ip, d_ip, sp_, dp_ = sip[udp], dip[udp], sport[udp], dport[udp]
            first = _firsts((s_ip << 32) | d_ip, (sp_ << 16) | dp_)
            seen = self._udp_seen
            for j in first.tolist():
                a, b, c, d = int(s_ip[j]), int(d_ip[j]), int(sp_[j]), int(dp_[j])
                key = ((a << 32) | b, (c << 16) | d)
                if key in seen:
                    continue
                if len(seen) >= self._max_keys:
                    seen.popitem(last=False)
                seen[key] = None
                i = int(udp[j])
                m = int(o[i])
                answers = ((b << 32) | a, (d << 16) | c) in seen
                events.append(
                    (i, UdpFirst(float(stamps[i]), data[m + 6 : m + 12], a.to_bytes(4, "big"), c, b.to_bytes(4, "big"),
                                 d, answers))
                )  # fmt: skip

        # Leaf-side sources to destinations beyond the leaf side (not multicast, not broadcast).
        remote = v4 & _in_nets(sip, self._leaf_v4) & ~_in_nets(dip, self._leaf_v4)
        remote &= ((dip >> 28) != 0xE) & (dip != 0xFFFFFFFF) & (dip != 0) & ((dip >> 24) != 127)
        rows = np.flatnonzero(remote)
        if rows.size:
            smac = _u48(arr, o[rows] + 6)
            dmac = _u48(arr, o[rows])
            unicast = (dmac >> 40) & 1 == 0
            rows, smac, dmac = rows[unicast], smac[unicast], dmac[unicast]
            bucket = np.floor(stamps[rows] / HOP_BUCKET_S).astype(np.int64)
            first = _firsts(smac, (dmac << 16) ^ bucket)
            seen_h = self._hops_seen
            for j in first.tolist():
                key = (int(smac[j]), int(dmac[j]))
                b = int(bucket[j])
                last = seen_h.get(key)
                if last is not None and last >= b:
                    continue
                if last is None and len(seen_h) >= self._max_keys:
                    seen_h.popitem(last=False)
                seen_h[key] = b
                i = int(rows[j])
                events.append((i, NextHop(float(stamps[i]), key[0].to_bytes(6, "big"), key[1].to_bytes(6, "big"))))
        return events

    def _decoded(self, p: Packet, data: bytes, ts: float) -> Iterator[Record]:
        if p.ethertype == ETH_ARP:
            if p.src_mac is not None and p.arp_sha is not None and p.arp_spa is not None and p.arp_tpa is not None:
                yield ArpFrame(ts, p.src_mac, p.arp_op, p.arp_sha, p.arp_spa, p.arp_tpa)
            return
        if p.src_ip is None or p.dst_ip is None or (p.fragment and not p.frag_first):
            return
        if p.proto == PROTO_TCP and p.sport >= 0:
            f = p.tcp_flags
            if not f & TCP_ACK or (f & (TCP_SYN | 0x01) and p.sport not in WEB_PORTS and p.dport not in WEB_PORTS):
                yield TcpControl(ts, p.src_mac, p.src_ip, p.sport, p.dst_ip, p.dport, f)
        elif p.proto == PROTO_UDP and p.sport >= 0 and p.sport not in COMMON_UDP and p.dport not in COMMON_UDP:
            # Only IPv6 datagrams and other link types come here: the conversation table is the batch picker's.
            key = (p.src_ip, p.dst_ip, p.sport, p.dport)
            seen = self._udp6_seen
            if key not in seen:
                if len(seen) >= self._max_keys:
                    seen.popitem(last=False)
                seen[key] = None
                answers = (p.dst_ip, p.src_ip, p.dport, p.sport) in seen
                yield UdpFirst(ts, p.src_mac, p.src_ip, p.sport, p.dst_ip, p.dport, answers)
        elif p.proto in (PROTO_ICMP, PROTO_ICMPV6) and p.payload_len >= 4:
            yield from _icmp(p, data, ts)


def _icmp(p: Packet, data: bytes, ts: float) -> Iterator[Record]:
    assert p.src_ip is not None and p.dst_ip is not None
    at, end = p.payload_off, p.payload_off + p.payload_len
    kind, code = data[at], data[at + 1]
    if p.proto == PROTO_ICMP:
        if kind == ICMP_ECHO_REQUEST:
            yield EchoRequest(ts, p.src_mac, p.src_ip, p.dst_ip)
        elif kind == ICMP_UNREACHABLE and code == 3 and end - at >= 8 + 20 + 4:
            inner = at + 8
            ihl = (data[inner] & 0x0F) * 4
            if data[inner] >> 4 == 4 and data[inner + 9] == PROTO_UDP and end >= inner + ihl + 4:
                dport = (data[inner + ihl + 2] << 8) | data[inner + ihl + 3]
                yield PortUnreachable(ts, data[inner + 12 : inner + 16], data[inner + 16 : inner + 20], dport)
        return
    if kind == ICMP6_ECHO_REQUEST:
        if p.dst_ip[0] != 0xFF:
            yield EchoRequest(ts, p.src_mac, p.src_ip, p.dst_ip)
    elif kind == ICMP6_UNREACHABLE and code == 4 and end - at >= 8 + 40 + 4:
        inner = at + 8
        if data[inner + 6] == PROTO_UDP:
            dport = (data[inner + 40 + 2] << 8) | data[inner + 40 + 3]
            yield PortUnreachable(ts, data[inner + 8 : inner + 24], data[inner + 24 : inner + 40], dport)
    elif kind in (ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT) and end - at >= 24 and p.src_mac is not None:
        advert = kind == ND_NEIGHBOR_ADVERT
        address = data[at + 8 : at + 24] if advert else p.src_ip
        want = 2 if advert else 1  # option 2: target link-layer address; 1: source link-layer address
        link = None
        pos = at + 24
        while pos + 8 <= end:
            olen = data[pos + 1] * 8
            if olen == 0:
                break
            if data[pos] == want and olen >= 8:
                link = data[pos + 2 : pos + 8]
            pos += olen
        yield Neighbor(ts, p.src_mac, advert, address, link, advert and bool(data[at + 4] & 0x20))
