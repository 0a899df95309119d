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
from typing import NamedTuple

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
from leafguard.detect.pairtable import PairTable
from leafguard.observe.fastpath import Classified
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

# The records are named tuples, immutable and typed like the frozen dataclasses of the rest of the core, because
# they are made by the hundred thousand (one per TCP control segment): a tuple costs a quarter of a frozen
# dataclass's construction (about 0.2 against 0.8 us), which sets every field through object.__setattr__.


class TcpControl(NamedTuple):
    """A TCP segment with SYN, FIN or RST, or without ACK."""

    ts: float
    src_mac: bytes | None
    src: bytes
    sport: int
    dst: bytes
    dport: int
    flags: int


class UdpFirst(NamedTuple):
    """The first datagram from one address and port to another (the first of its conversation in this direction)."""

    ts: float
    src_mac: bytes | None
    src: bytes
    sport: int
    dst: bytes
    dport: int
    answers: bool
    """The other direction was seen before: this datagram answers (or continues) a conversation."""


class EchoRequest(NamedTuple):
    ts: float
    src_mac: bytes | None
    src: bytes
    dst: bytes


class PortUnreachable(NamedTuple):
    """An ICMP (or ICMPv6) port unreachable, with the UDP datagram it answers (from its quoted headers)."""

    ts: float
    prober: bytes
    target: bytes
    dport: int


class ArpFrame(NamedTuple):
    ts: float
    src_mac: bytes
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_ip: bytes


class Neighbor(NamedTuple):
    """An IPv6 neighbour solicitation (``advert`` False) or advertisement, with the binding it states."""

    ts: float
    src_mac: bytes
    advert: bool
    address: bytes
    """NS: the sender's own address (unspecified for duplicate address detection); NA: the target address."""
    link_addr: bytes | None
    """The link-layer address option (source for NS, target for NA), if present."""
    override: bool


class NextHop(NamedTuple):
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


def _control(flags: _U8, web: _B) -> _B:
    """What the TCP rules read (`scans`, `bruteforce`) of TCP segments with these flags (``web``: to or from a
    web port): segments without ACK (SYNs, RSTs without ACK, scan probes), and SYN-ACKs and FINs off the web
    ports. A RST with ACK (a closed port's answer) and the SYN-ACKs and FINs of web traffic, the bulk of the
    control segments, are left out."""
    read: _B = ((flags & TCP_ACK) == 0) | (((flags & (TCP_SYN | 0x01)) != 0) & ~web)
    return read


class _Picks:
    """One batch's records so far with the frame index of each (``at``, one array per step), and the UDP
    datagrams and leaf-side sources that are yet to be checked against what was seen before."""

    __slots__ = ("arr", "at", "data", "h_at", "h_dmac", "h_smac", "off", "recs", "stamps", "u_at", "u_fields")

    def __init__(self, batch: FrameBatch) -> None:
        self.data = batch.data
        self.arr = np.frombuffer(batch.data, dtype=np.uint8)
        self.off = np.asarray(batch.offsets, dtype=np.int64)
        self.stamps = np.asarray(batch.timestamps, dtype=np.float64)
        self.recs: list[Record] = []
        self.at: list[_I64] = []
        self.u_at: list[_I64] = []
        self.u_fields: list[tuple[_I64, _I64, _I64, _I64]] = []
        self.h_at: list[_I64] = []
        self.h_smac: list[_I64] = []
        self.h_dmac: list[_I64] = []

    def tcp(self, at: _I64, h: _I64, l4: _I64) -> None:
        """Control segments (frames ``at``, IPv4 header at ``h + 14``, TCP header at ``l4``) as records."""
        data, arr = self.data, self.arr
        self.at.append(at)
        self.recs += [
            TcpControl(t, data[m + 6 : m + 12], data[a + 26 : a + 30], sp, data[a + 30 : a + 34], dp, f)
            for t, m, a, sp, dp, f in zip(
                self.stamps[at].tolist(), self.off[at].tolist(), h.tolist(), _u16(arr, l4).tolist(),
                _u16(arr, l4 + 2).tolist(), arr[l4 + 13].tolist(), strict=True,
            )
        ]  # fmt: skip

    def udp(self, at: _I64, sip: _I64, dip: _I64, sport: _I64, dport: _I64) -> None:
        self.u_at.append(at)
        self.u_fields.append((sip, dip, sport, dport))

    def hop(self, at: _I64, smac: _I64, dmac: _I64) -> None:
        self.h_at.append(at)
        self.h_smac.append(smac)
        self.h_dmac.append(dmac)


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
        self._udp_seen = PairTable(max_keys)
        """IPv4 conversations of the Ethernet batches, in the direction of their first datagram (oldest first)."""
        self._udp6_seen: OrderedDict[tuple[bytes, bytes, int, int], None] = OrderedDict()
        """IPv6 (and other link types') conversations, in the direction of their first datagram."""
        self._hops_seen: OrderedDict[tuple[int, int], int] = OrderedDict()
        """(leaf MAC, next-hop MAC) -> the last time bucket a record was made for."""

    def set_leaf_nets(self, leaf_nets: tuple[Network, ...]) -> None:
        """The leaf side (empty: the private ranges) for the frames picked from now on."""
        v4 = tuple(n for n in leaf_nets if isinstance(n, ipaddress.IPv4Network))
        self._leaf_v4 = v4 if leaf_nets else _PRIVATE_V4

    def records(self, batch: FrameBatch) -> list[Record]:
        """The batch's records, in capture order (records of one frame in the order the rules read them)."""
        n = len(batch)
        if not n:
            return []
        data = batch.data
        ts = batch.timestamps
        if batch.linktype != LINKTYPE_ETHERNET:
            out: list[Record] = []
            for i in range(n):
                out += self._decoded(decode(data, batch.offsets[i], batch.caplens[i], batch.linktype), data, ts[i])
            return out
        return self._pick(batch)

    def _pick(self, batch: FrameBatch) -> list[Record]:
        """Every record of an Ethernet batch. The frames the reader's classification holds (plain IPv4 TCP and UDP,
        `fastpath.Classified`) are picked from its arrays; the others have their headers gathered here."""
        pre = batch.prepared if isinstance(batch.prepared, Classified) else None
        picks = _Picks(batch)
        if pre is None:
            self._gathered(batch, np.arange(len(batch), dtype=np.int64), picks)
        else:
            rest = np.ones(len(batch), dtype=bool)
            rest[pre.cand] = False
            self._gathered(batch, np.flatnonzero(rest), picks)
            self._classified(batch, pre, picks)
        self._udp_firsts(picks)
        self._next_hops(picks)
        # Records of one frame keep the order of the lists: decoded, TCP, UDP, next hop.
        at = np.concatenate(picks.at) if picks.at else np.empty(0, dtype=np.int64)
        assert at.size == len(picks.recs), "one frame index per record"
        recs = picks.recs
        return [recs[k] for k in np.argsort(at, kind="stable").tolist()]

    def _gathered(self, batch: FrameBatch, idx: _I64, picks: _Picks) -> None:
        """The frames ``idx`` (in order), with their headers gathered from the batch buffer: ARP, ICMP, IPv6 and
        encapsulations are decoded frame by frame, plain IPv4 TCP control segments become records here, and UDP
        datagrams and leaf-side sources are handed on to the steps that remember what is not new."""
        if not idx.size:
            return
        data = batch.data
        arr = np.frombuffer(data, dtype=np.uint8)
        off = np.asarray(batch.offsets, dtype=np.int64)[idx]
        cap = np.asarray(batch.caplens, dtype=np.int64)[idx]
        stamps = np.asarray(batch.timestamps, dtype=np.float64)[idx]
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
        web = np.isin(sport, WEB_PORTS_LIST) | np.isin(dport, WEB_PORTS_LIST)
        control = tcp & _control(flags, web)
        # IPv6: the next header of the fixed header; extension headers are left to the decoder.
        hv6 = np.where(v6, h, 0)
        nh = arr[hv6 + 20]
        flags6 = arr[np.where(v6 & (hcap >= 54 + 14), hv6 + 54 + 13, 0)]
        v6_pick = v6 & (
            (nh == PROTO_ICMPV6) | (nh == PROTO_UDP) | (nh == 0) | (nh == 43) | (nh == 44) | (nh == 60)
            | ((nh == PROTO_TCP) & (((flags6 & 0x07) != 0) | ((flags6 & TCP_ACK) == 0)))
        )  # fmt: skip
        # ICMP: echo requests whose message is captured (4 bytes at least) become records here, other messages
        # but unreachables make none; the rest (unreachables, odd headers) goes to the decoder.
        total = _u16(arr, hv + 16)
        plain_icmp = icmp & (ihl >= 20) & (total >= ihl) & (np.minimum(total, hcap - 14) - ihl >= 4)
        kind = arr[np.where(plain_icmp, l4, 0)]
        echo = plain_icmp & (kind == ICMP_ECHO_REQUEST)
        quiet = plain_icmp & (kind != ICMP_ECHO_REQUEST) & (kind != ICMP_UNREACHABLE)
        # ARP for IPv4 over Ethernet with its addresses captured: a record each; any other ARP frame none.
        arp_rec = arp & (hcap >= 14 + 28)
        ha = np.where(arp_rec, h, 0)
        arp_rec &= (_u32(arr, ha + 14) == 0x00010800) & (arr[ha + 18] == 6) & (arr[ha + 19] == 4)
        dec_at: list[int] = []
        caplens = batch.caplens
        for i in idx[odd | (icmp & ~echo & ~quiet) | v6_pick].tolist():
            p = decode(data, batch.offsets[i], caplens[i], LINKTYPE_ETHERNET)
            for r in self._decoded(p, data, batch.timestamps[i]):
                dec_at.append(i)
                picks.recs.append(r)
        picks.at.append(np.asarray(dec_at, dtype=np.int64))
        rows = np.flatnonzero(echo)
        picks.at.append(idx[rows])
        picks.recs += [
            EchoRequest(t, data[m + 6 : m + 12], data[a + 26 : a + 30], data[a + 30 : a + 34])
            for t, m, a in zip(stamps[rows].tolist(), o[rows].tolist(), hv[rows].tolist(), strict=True)
        ]
        rows = np.flatnonzero(arp_rec)
        picks.at.append(idx[rows])
        picks.recs += [
            ArpFrame(t, data[m + 6 : m + 12], op, data[a + 22 : a + 28], data[a + 28 : a + 32], data[a + 38 : a + 42])
            for t, m, a, op in zip(
                stamps[rows].tolist(), o[rows].tolist(), h[rows].tolist(), _u16(arr, h[rows] + 20).tolist(), strict=True
            )
        ]
        rows = np.flatnonzero(control)
        picks.tcp(idx[rows], hv[rows], l4[rows])
        sip = _u32(arr, hv + 26)
        dip = _u32(arr, hv + 30)
        common = np.isin(sport, COMMON_UDP_LIST) | np.isin(dport, COMMON_UDP_LIST)
        udp = np.flatnonzero(has_ports & (proto == PROTO_UDP) & ~common)
        picks.udp(idx[udp], sip[udp], dip[udp], sport[udp], dport[udp])
        rows = np.flatnonzero(v4 & self._remote(sip, dip))
        picks.hop(idx[rows], _u48(arr, o[rows] + 6), _u48(arr, o[rows]))

    def _classified(self, batch: FrameBatch, pre: Classified, picks: _Picks) -> None:
        """The plain IPv4 TCP and UDP frames of the reader's classification: their flags, MACs, times and
        conversations are read from its arrays, addresses and ports per conversation where that is enough."""
        arr = np.frombuffer(batch.data, dtype=np.uint8)
        cand, h, flags, tcp = pre.cand, pre.h, pre.flags, pre.tcp
        # Ports only where the rule depends on them: TCP segments with an ACK and SYN or FIN (the web check).
        noack = tcp & ((flags & TCP_ACK) == 0)
        synfin = np.flatnonzero(tcp & ~noack & ((flags & (TCP_SYN | 0x01)) != 0))
        hs = h[synfin]
        web = np.isin(_u16(arr, hs + 34), WEB_PORTS_LIST) | np.isin(_u16(arr, hs + 36), WEB_PORTS_LIST)
        control = noack
        control[synfin[~web]] = True
        rows = np.flatnonzero(control)
        picks.tcp(cand[rows], h[rows], h[rows] + 34)
        # Each conversation's addresses and ports from its key (`Classified.k1`, `k2`), then per frame by
        # direction (``src_lo``: the source is the lower end).
        k1 = np.asarray(pre.k1, dtype=np.int64)
        k2 = np.asarray(pre.k2, dtype=np.int64)
        ip_lo, ip_hi = (k1 >> 32) & 0xFFFFFFFF, k1 & 0xFFFFFFFF
        port_lo, port_hi = (k2 >> 24) & 0xFFFF, (k2 >> 8) & 0xFFFF
        inv, lo = pre.inv, pre.src_lo
        udp = ~tcp
        u_common = np.isin(port_lo, COMMON_UDP_LIST) | np.isin(port_hi, COMMON_UDP_LIST)
        rows = np.flatnonzero(udp & ~u_common[inv])
        if rows.size:
            u, s_lo = inv[rows], lo[rows]
            a, b = ip_lo[u], ip_hi[u]
            c, d = port_lo[u], port_hi[u]
            picks.udp(cand[rows], np.where(s_lo, a, b), np.where(s_lo, b, a), np.where(s_lo, c, d),
                      np.where(s_lo, d, c))  # fmt: skip
        # Leaf-side sources to destinations beyond: decided per conversation, for either direction.
        remote_ab = self._remote(ip_lo, ip_hi)
        remote_ba = self._remote(ip_hi, ip_lo)
        rows = np.flatnonzero(np.where(lo, remote_ab[inv], remote_ba[inv]))
        picks.hop(cand[rows], pre.smac[rows], pre.dmac[rows])

    def _remote(self, sip: _I64, dip: _I64) -> _B:
        """Leaf-side sources to destinations beyond the leaf side (not multicast, not broadcast)."""
        remote = _in_nets(sip, self._leaf_v4) & ~_in_nets(dip, self._leaf_v4)
        remote &= ((dip >> 28) != 0xE) & (dip != 0xFFFFFFFF) & (dip != 0) & ((dip >> 24) != 127)
        return remote

    def _udp_firsts(self, picks: _Picks) -> None:
        """A record for the first datagram of each UDP conversation (and direction) of the whole capture."""
        # Datagrams of the services that make most of a segment's new UDP conversations (DNS, NTP, DHCP, mDNS,
        # SSDP) are left out before: a probe to one of these ports is one port less in a scan's count.
        if not picks.u_at:
            return
        at = np.concatenate(picks.u_at)
        s_ip, d_ip, sp_, dp_ = (np.concatenate(c) for c in zip(*picks.u_fields, strict=True))
        order = np.argsort(at, kind="stable")
        at, s_ip, d_ip, sp_, dp_ = at[order], s_ip[order], d_ip[order], sp_[order], dp_[order]
        first = _firsts((s_ip << 32) | d_ip, (sp_ << 16) | dp_)
        at = at[first]
        data, off, stamps = picks.data, picks.off, picks.stamps
        seen = self._udp_seen
        rec_at: list[int] = []
        recs = picks.recs
        for i, m, t, a, b, c, d in zip(
            at.tolist(), off[at].tolist(), stamps[at].tolist(), s_ip[first].tolist(), d_ip[first].tolist(),
            sp_[first].tolist(), dp_[first].tolist(), strict=True,
        ):  # fmt: skip
            k1, k2 = (a << 32) | b, (c << 16) | d
            if seen.find_v4(k1, k2) >= 0:
                continue
            if seen.count >= self._max_keys:
                seen.remove(seen.oldest())
            seen.put_v4(k1, k2)
            answers = seen.find_v4((b << 32) | a, (d << 16) | c) >= 0
            rec_at.append(i)
            recs.append(UdpFirst(t, data[m + 6 : m + 12], a.to_bytes(4, "big"), c, b.to_bytes(4, "big"), d, answers))
        picks.at.append(np.asarray(rec_at, dtype=np.int64))

    def _next_hops(self, picks: _Picks) -> None:
        """A record per (leaf, next hop) and second of packet time in which the pair is used."""
        if not picks.h_at:
            return
        at = np.concatenate(picks.h_at)
        smac, dmac = np.concatenate(picks.h_smac), np.concatenate(picks.h_dmac)
        order = np.argsort(at, kind="stable")
        at, smac, dmac = at[order], smac[order], dmac[order]
        unicast = (dmac >> 40) & 1 == 0
        at, smac, dmac = at[unicast], smac[unicast], dmac[unicast]
        stamps = picks.stamps
        bucket = np.floor(stamps[at] / HOP_BUCKET_S).astype(np.int64)
        first = _firsts(smac, (dmac << 16) ^ bucket)
        at = at[first]
        seen_h = self._hops_seen
        rec_at: list[int] = []
        recs = picks.recs
        for i, t, sm, dm, b in zip(
            at.tolist(), stamps[at].tolist(), smac[first].tolist(), dmac[first].tolist(), bucket[first].tolist(),
            strict=True,
        ):  # fmt: skip
            key = (sm, dm)
            last = seen_h.get(key)
            if last is not None and last >= b:
                continue
            if last is None and len(seen_h) >= self._max_keys:
                seen_h.popitem(last=False)
            seen_h[key] = b
            rec_at.append(i)
            recs.append(NextHop(t, sm.to_bytes(6, "big"), dm.to_bytes(6, "big")))
        picks.at.append(np.asarray(rec_at, dtype=np.int64))

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
