"""The bulk half of the observation core: what numpy can do for a whole batch at once.

Most frames of a busy capture only add to counters: mid-flow TCP segments and UDP datagrams of conversations
that need no more inspection. For an Ethernet batch, `plan_batch` gathers the header fields of every plain IPv4
TCP/UDP frame (untagged, no IP options, not a fragment, headers captured) from the batch buffer and groups them
by conversation. Then:

* frames of conversations that are *settled* (no login exchange being followed) are not walked at all: their
  counters are added per conversation and per MAC (`count_settled`);
* conversations that *start* in the batch and need no per-frame inspection are created here too, in the order of
  their first frame, so none of their frames is walked either;
* SYN/FIN/RST segments of those conversations are replayed, in batch order, through the same state machine the
  per-frame path uses (`Analyzer.tcp_control`); the first payload from the initiator is checked for a TLS
  ClientHello and the first datagram from a UDP responder reveals a service, once per conversation;
* everything else is walked one frame at a time by `Analyzer.feed`: frames that carry something to decode (DHCP,
  DNS queries, mDNS, NetBIOS, SSDP), conversations whose login exchange is being followed, and every frame that
  is not plain IPv4 TCP/UDP (ARP, ICMP, IPv6, VLAN-tagged, fragments...). A walked frame of a conversation that
  becomes settled during the walk is deferred to the bulk step from then on.

The result is the same as walking every frame; `tests/observe/test_analyzer.py` checks it on generated sessions
and on every shared capture. Observations made in bulk carry their packet time and are merged into packet order
when they are drained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from leafguard.capture.batch import FrameBatch
from leafguard.decode.frames import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

if TYPE_CHECKING:
    from leafguard.observe.analyzer import Analyzer
    from leafguard.observe.state import Flow

_U8 = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]
_B = npt.NDArray[np.bool_]



def _u16(arr: _U8, at: _I64) -> _I64:
    return (arr[at].astype(np.int64) << 8) | arr[at + 1]


def _u32(arr: _U8, at: _I64) -> _I64:
    return (_u16(arr, at) << 16) | _u16(arr, at + 2)


def _u48(arr: _U8, at: _I64) -> _I64:
    return (_u16(arr, at) << 32) | _u32(arr, at + 2)


class Plan:
    """One batch's candidates (plain IPv4 TCP/UDP frames) and their conversations.

    Arrays indexed by candidate position have one entry per candidate, in batch order; ``cand`` maps a
    candidate position to its frame index in the batch. Lists indexed by ``u`` have one entry per conversation.
    """

    __slots__ = (
        "bare",
        "bulk_new",
        "cand",
        "deep",
        "early",
        "first",
        "flags",
        "frame_key",
        "fwd_lo",
        "is_tcp",
        "known",
        "maconly",
        "o",
        "pay_len",
        "pay_off",
        "settled",
        "sip",
        "ts",
        "uflows",
        "uinv",
        "walk",
        "wl",
    )

    def __init__(self) -> None:
        # Per frame of the batch, as lists for the walk.
        self.frame_key: list[int] = []
        """The frame's conversation ``u``, or -1 when it is not a candidate."""
        self.bare: list[bool] = []
        """A TCP segment with no payload and no SYN/FIN/RST: it cannot change any state."""
        self.deep: list[bool] = []
        """A UDP datagram whose payload the per-frame path decodes (DHCP, DNS query, mDNS, NetBIOS, SSDP)."""
        self.walk: list[int] = []
        """Frames to walk, in order (some may still be deferred during the walk)."""
        self.early: _I64 = np.empty(0, dtype=np.int64)
        """Frames counted in bulk without being walked."""
        self.maconly: _I64 = np.empty(0, dtype=np.int64)
        """Plain IPv4 frames of other protocols (ICMP, IGMP...): only their MACs and source address count."""
        # Per conversation.
        self.uflows: list[Flow | None] = []
        self.known: list[bool] = []
        """The conversation exists (it did at the start of the batch, or the walk created it)."""
        self.settled: list[bool] = []
        """Its frames (other than deep ones) only need the bulk step."""
        self.first: _I64 = np.empty(0, dtype=np.int64)
        """Candidate position of the conversation's first frame in the batch."""
        self.bulk_new: list[int] = []
        """Conversations created by the bulk step, in the order of their first frame."""
        # Per candidate.
        self.cand: _I64 = np.empty(0, dtype=np.int64)
        self.uinv: _I64 = np.empty(0, dtype=np.int64)
        self.fwd_lo: _B = np.empty(0, dtype=bool)
        """The sender is the lower (address, port) endpoint of the conversation key."""
        self.o: _I64 = np.empty(0, dtype=np.int64)
        self.sip: _I64 = np.empty(0, dtype=np.int64)
        self.wl: _I64 = np.empty(0, dtype=np.int64)
        self.ts: npt.NDArray[np.float64] = np.empty(0, dtype=np.float64)
        self.flags: _U8 = np.empty(0, dtype=np.uint8)
        self.is_tcp: _B = np.empty(0, dtype=bool)
        self.pay_off: _I64 = np.empty(0, dtype=np.int64)
        self.pay_len: _I64 = np.empty(0, dtype=np.int64)


def _group(k1: _I64, k2: _I64) -> tuple[_I64, _I64]:
    """Group equal (k1, k2) pairs: the first index of each group and, per element, its group number."""
    order = np.lexsort((k2, k1))
    s1 = k1[order]
    s2 = k2[order]
    start = np.empty(order.size, dtype=bool)
    start[0] = True
    start[1:] = (s1[1:] != s1[:-1]) | (s2[1:] != s2[:-1])
    group_sorted = np.cumsum(start) - 1
    inv = np.empty(order.size, dtype=np.int64)
    inv[order] = group_sorted
    # lexsort is stable, so the first element of each group in sorted order is its first in the batch.
    return order[start], inv


def _deep_udp(arr: _U8, sport: _I64, dport: _I64, pay_off: _I64, pay_len: _I64) -> _B:
    """The datagrams `Analyzer._udp_payload` decodes; keep the two in step."""
    has = pay_len > 0
    dhcp = (sport == 67) | (sport == 68) | (dport == 67) | (dport == 68)
    dns_port = (sport == 53) | (sport == 5353) | (sport == 5355) | (dport == 53) | (dport == 5353) | (dport == 5355)
    # A unicast DNS answer is not decoded (only queries and mDNS announcements are).
    qr = arr[np.where(pay_len > 2, pay_off + 2, 0)] & 0x80
    answer = (pay_len > 2) & (qr != 0) & (sport != 5353)
    nbns = sport == 137
    ssdp = (sport == 1900) | (dport == 1900)
    deep: _B = has & (dhcp | (~dhcp & dns_port & ~answer) | (~dhcp & ~dns_port & (nbns | ssdp)))
    return deep


def plan_batch(an: Analyzer, batch: FrameBatch) -> Plan | None:
    """Classify the frames of an Ethernet batch; ``None`` when nothing in it can be counted in bulk."""
    n = len(batch)
    arr = np.frombuffer(batch.data, dtype=np.uint8)
    off = np.asarray(batch.offsets, dtype=np.int64)
    cap = np.asarray(batch.caplens, dtype=np.int64)
    ok = cap >= 42
    safe_off = np.where(ok, off, 0)
    ok &= (arr[safe_off + 12] == 0x08) & (arr[safe_off + 13] == 0x00) & (arr[safe_off + 14] == 0x45)
    ok &= ((arr[safe_off + 20] & 0x3F) == 0) & (arr[safe_off + 21] == 0)
    proto = arr[safe_off + 23]
    is_tcp = proto == 6
    total_len = _u16(arr, safe_off + 16)
    # Neither a conversation nor a tunnel (IP in IP, 6in4), and whole enough that decoding finds nothing amiss.
    maconly = ok & (proto != 6) & (proto != 17) & (proto != 4) & (proto != 41) & (total_len >= 28)
    ok &= is_tcp | (proto == 17)
    # TCP needs its 20-byte header captured before its data offset can be read.
    tcp_off = np.where(ok & is_tcp & (cap >= 54), off, 0)
    doff = (arr[tcp_off + 46] >> 4).astype(np.int64) * 4
    # A TCP header with a bad data offset, or options beyond the captured bytes, is for the per-frame path.
    ok &= ~is_tcp | ((cap >= 54) & (doff >= 20) & (cap >= 34 + doff))
    ok &= total_len >= 20 + np.where(is_tcp, doff, 8)
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        return None
    o = off[cand]
    tcp = is_tcp[cand]
    l4_len = np.where(tcp, doff[cand], 8)
    pay_off = o + 34 + l4_len
    pay_len = np.maximum(np.minimum(total_len[cand] - 20 - l4_len, cap[cand] - 34 - l4_len), 0)
    flags = np.where(tcp, arr[np.where(tcp, o + 47, 0)], 0).astype(np.uint8)
    ctrl = tcp & ((flags & (TCP_SYN | TCP_FIN | TCP_RST)) != 0)
    bare = tcp & ~ctrl & (pay_len == 0) & (total_len[cand] - 20 - l4_len <= 0)
    sip = _u32(arr, o + 26)
    dip = _u32(arr, o + 30)
    sport = _u16(arr, o + 34)
    dport = _u16(arr, o + 36)
    deep = ~tcp & _deep_udp(arr, sport, dport, pay_off, pay_len)
    src_lo = (sip < dip) | ((sip == dip) & (sport <= dport))
    ip_lo = np.where(src_lo, sip, dip)
    ip_hi = np.where(src_lo, dip, sip)
    port_lo = np.where(src_lo, sport, dport)
    port_hi = np.where(src_lo, dport, sport)
    pr = np.where(tcp, 6, 17)
    k1 = (ip_lo << 32) | ip_hi
    k2 = (port_lo << 24) | (port_hi << 8) | pr
    first, inv = _group(k1, k2)
    nu = first.size

    plan = Plan()
    flows4 = an.flows4
    for key in zip(k1[first].tolist(), k2[first].tolist(), strict=True):
        flow = flows4.get(key)
        plan.uflows.append(flow)
        plan.known.append(flow is not None)
        plan.settled.append(flow is not None and not flow.slow)
    known0 = np.asarray(plan.known, dtype=bool)
    settled0 = np.asarray(plan.settled, dtype=bool)

    # A conversation that starts here is created before the walk, and none of its frames is walked, when none
    # of them carries a datagram to decode (TCP login exchanges are followed in bulk, in order, too).
    any_deep = np.bincount(inv, weights=deep, minlength=nu) > 0
    bulk_new = ~known0 & ~any_deep
    plan.bulk_new = np.flatnonzero(bulk_new)[np.argsort(first[bulk_new], kind="stable")].tolist()

    early_c = ~deep & (settled0[inv] | (bare & known0[inv]) | bulk_new[inv])
    early = maconly.copy()
    early[cand[early_c]] = True
    frame_key = np.full(n, -1, dtype=np.int64)
    frame_key[cand] = inv
    per_frame = np.zeros(n, dtype=bool)

    plan.early = cand[early_c]
    plan.maconly = np.flatnonzero(maconly)
    plan.walk = np.flatnonzero(~early).tolist()
    plan.frame_key = frame_key.tolist()
    per_frame[cand] = bare
    plan.bare = per_frame.tolist()
    per_frame[:] = False
    per_frame[cand] = deep
    plan.deep = per_frame.tolist()
    plan.first = first
    plan.cand = cand
    plan.uinv = inv
    plan.fwd_lo = src_lo
    plan.o = o
    plan.sip = sip
    plan.wl = np.asarray(batch.wirelens, dtype=np.int64)[cand]
    plan.ts = np.asarray(batch.timestamps, dtype=np.float64)[cand]
    plan.flags = flags
    plan.is_tcp = tcp
    plan.pay_off = pay_off
    plan.pay_len = pay_len
    return plan


def count_settled(an: Analyzer, batch: FrameBatch, plan: Plan, deferred: list[int]) -> None:
    """Account for every frame the walk did not."""
    data = batch.data
    arr = np.frombuffer(data, dtype=np.uint8)
    m = plan.maconly
    m_o = np.asarray(batch.offsets, dtype=np.int64)[m]
    m_wl = np.asarray(batch.wirelens, dtype=np.int64)[m]
    m_ts = np.asarray(batch.timestamps, dtype=np.float64)[m]
    idx = np.concatenate((plan.early, np.asarray(deferred, dtype=np.int64))) if deferred else plan.early
    if not idx.size:
        if m.size:
            _count_macs(an, arr, m_o, m_wl, m_ts, _u32(arr, m_o + 26))
        return
    idx.sort()
    pos = np.searchsorted(plan.cand, idx)
    inv = plan.uinv[pos]
    nu = len(plan.uflows)
    a_is_lo = np.zeros(nu, dtype=bool)
    present = np.unique(inv)
    uflows = plan.uflows
    for u in present.tolist():
        flow = uflows[u]
        assert flow is not None
        a_is_lo[u] = flow.a_is_lo
    fwd = plan.fwd_lo[pos] == a_is_lo[inv]
    wl = plan.wl[pos]
    ts = plan.ts[pos]
    pk_ab = np.bincount(inv[fwd], minlength=nu)
    by_ab = np.bincount(inv[fwd], weights=wl[fwd], minlength=nu)
    pk_ba = np.bincount(inv[~fwd], minlength=nu)
    by_ba = np.bincount(inv[~fwd], weights=wl[~fwd], minlength=nu)
    last = np.full(nu, -np.inf)
    np.maximum.at(last, inv, ts)
    for u in present.tolist():
        flow = plan.uflows[u]
        assert flow is not None
        flow.packets_ab += int(pk_ab[u])
        flow.bytes_ab += int(by_ab[u])
        flow.packets_ba += int(pk_ba[u])
        flow.bytes_ba += int(by_ba[u])
        if last[u] > flow.last:
            flow.last = float(last[u])
    o = plan.o[pos]
    sip = plan.sip[pos]
    if m.size:
        o = np.concatenate((o, m_o))
        wl = np.concatenate((wl, m_wl))
        ts = np.concatenate((ts, m_ts))
        sip = np.concatenate((sip, _u32(arr, m_o + 26)))
    _count_macs(an, arr, o, wl, ts, sip)
    _control(an, data, plan, pos, inv, fwd)
    _first_of_flow(an, data, plan, pos, inv, fwd)
    _logins(an, data, plan, pos, inv, fwd, present)


def _logins(an: Analyzer, data: bytes, plan: Plan, pos: _I64, inv: _I64, fwd: _B, present: _I64) -> None:
    """Follow the login exchanges of conversations that were counted in bulk, segment by segment, in order."""
    following = [u for u in present.tolist() if (f := plan.uflows[u]) is not None and f.login is not None]
    if not following:
        return
    sel = np.flatnonzero(np.isin(inv, following) & (plan.pay_len[pos] > 0))
    uflows = plan.uflows
    for k, u, forward in zip(sel.tolist(), inv[sel].tolist(), fwd[sel].tolist(), strict=True):
        flow = uflows[u]
        assert flow is not None
        if flow.login is None:
            continue
        j = int(pos[k])
        start = int(plan.pay_off[j])
        an.follow_login(flow, forward, data[start : start + int(plan.pay_len[j])], float(plan.ts[j]))
    for u in following:
        flow = uflows[u]
        assert flow is not None
        flow.slow = flow.login is not None


def create_new(an: Analyzer, batch: FrameBatch, plan: Plan) -> None:
    """Create the conversations that start in this batch and need no walk, before the walk: a frame of the
    same 5-tuple that the walk sees (one the plan could not classify) then finds the conversation as the
    per-frame path would have made it."""
    data = batch.data
    for u in plan.bulk_new:
        at = int(plan.o[int(plan.first[u])])
        j = int(plan.first[u])
        proto = 6 if plan.is_tcp[j] else 17
        sip = data[at + 26 : at + 30]
        dip = data[at + 30 : at + 34]
        sport = (data[at + 34] << 8) | data[at + 35]
        dport = (data[at + 36] << 8) | data[at + 37]
        key = (proto, sip, sport, dip, dport) if (sip, sport) <= (dip, dport) else (proto, dip, dport, sip, sport)
        flow = an.flows.get(key)
        if flow is None:
            flow = an.create_flow(
                key, proto, sip, sport, dip, dport, data[at + 6 : at + 12], data[at : at + 6], int(plan.flags[j]),
                float(plan.ts[j]),
            )  # fmt: skip
        plan.uflows[u] = flow


def _control(an: Analyzer, data: bytes, plan: Plan, pos: _I64, inv: _I64, fwd: _B) -> None:
    """Replay the bulk-counted SYN/FIN/RST segments' state changes, in batch order (``pos`` is sorted)."""
    sel = np.flatnonzero((plan.flags[pos] & (TCP_SYN | TCP_FIN | TCP_RST)) != 0)
    if not sel.size:
        return
    uflows = plan.uflows
    for k, u, forward, flags in zip(
        sel.tolist(), inv[sel].tolist(), fwd[sel].tolist(), plan.flags[pos[sel]].tolist(), strict=True
    ):
        flow = uflows[u]
        assert flow is not None
        src = src_ip = None
        sport = 0
        if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) and not forward:  # may reveal a service
            at = int(plan.o[int(pos[k])])
            src = an.macs.get(data[at + 6 : at + 12])
            src_ip = data[at + 26 : at + 30]
            sport = (data[at + 34] << 8) | data[at + 35]
        an.tcp_control(flow, forward, flags, src, src_ip, sport)


def _first_of_flow(an: Analyzer, data: bytes, plan: Plan, pos: _I64, inv: _I64, fwd: _B) -> None:
    """What the per-frame path does on a conversation's first payload from ``a`` (a TLS ClientHello is looked
    for) and on the first UDP datagram from ``b`` (the responder's port is a service): here once per conversation,
    on the same frame the per-frame path would have used (``pos`` is in batch order)."""
    has_pay = plan.pay_len[pos] > 0
    tcp = plan.is_tcp[pos]
    for mask, tls in ((fwd & has_pay & tcp, True), (~fwd & ~tcp, False)):
        sel = np.flatnonzero(mask)
        if not sel.size:
            continue
        users, first = np.unique(inv[sel], return_index=True)
        for u, k in zip(users.tolist(), sel[first].tolist(), strict=True):
            flow = plan.uflows[u]
            assert flow is not None
            at = int(plan.o[int(pos[k])])
            if tls:
                if flow.hello_checked:
                    continue
                start = int(plan.pay_off[int(pos[k])])
                payload = data[start : start + int(plan.pay_len[int(pos[k])])]
                an.inspect_hello(flow, an.macs.get(data[at + 6 : at + 12]), payload)
            elif not flow.b_seen:
                an.first_reply(flow, an.macs.get(data[at + 6 : at + 12]), data[at + 26 : at + 30])


def _sorted_groups(keys: _I64) -> tuple[_I64, _I64, _I64]:
    """The distinct keys, the order that sorts ``keys``, and where each key's run starts in that order."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return ordered[starts], order, starts


def _count_macs(an: Analyzer, arr: _U8, o: _I64, wl: _I64, ts: npt.NDArray[np.float64], sip: _I64) -> None:
    # Reductions over sorted runs (reduceat) rather than ufunc.at: one sort per side, no scattered updates.
    dst = _u48(arr, o)
    src = _u48(arr, o + 6)
    usrc, order, starts = _sorted_groups(src)
    cnt = np.diff(np.append(starts, src.size))
    byt = np.add.reduceat(wl[order], starts)
    ts_o = ts[order]
    lo = np.minimum.reduceat(ts_o, starts)
    hi = np.maximum.reduceat(ts_o, starts)
    now = float(hi.max())
    for mac_i, c, b, first_ts, last_ts in zip(
        usrc.tolist(), cnt.tolist(), byt.tolist(), lo.tolist(), hi.tolist(), strict=True
    ):
        st = an._mac(mac_i.to_bytes(6, "big"), now)
        if st.packets_out == 0 or first_ts < st.first_seen:
            st.first_seen = first_ts
        st.last_seen = max(st.last_seen, last_ts)
        st.packets_out += c
        st.bytes_out += b
    # The (MAC, source address) pairs: normally known already, but a MAC can start using a new address mid-flow.
    # Most MACs use one address per batch; only those with several need the full pair list.
    sip_o = sip[order]
    ip_lo = np.minimum.reduceat(sip_o, starts)
    ip_hi = np.maximum.reduceat(sip_o, starts)
    many = ip_lo != ip_hi
    pairs: list[tuple[int, int, float]] = list(
        zip(usrc[~many].tolist(), ip_lo[~many].tolist(), lo[~many].tolist(), strict=True)
    )
    if many.any():
        # A router's MAC carries every remote address it forwards: one sorted int64 key per (MAC, address).
        group = np.empty(src.size, dtype=np.int64)
        group[order] = np.repeat(np.arange(usrc.size), cnt)
        multi = many[group]
        both, pinv = np.unique((group[multi] << 32) | sip[multi], return_inverse=True)
        first = np.full(both.size, np.inf)
        np.minimum.at(first, pinv.reshape(-1), ts[multi])
        pairs += list(zip(usrc[both >> 32].tolist(), (both & 0xFFFFFFFF).tolist(), first.tolist(), strict=True))
    for mac_i, ip_i, first_ts in pairs:
        mac = mac_i.to_bytes(6, "big")
        known = an.macs.get(mac)
        if known is not None:
            ip = ip_i.to_bytes(4, "big")
            an._learn_ip(known, ip)
            if ip_i and an.is_leaf_ip(ip):
                an.saw_address(ip, mac, first_ts)
    unicast = (dst >> 40) & 1 == 0
    if not unicast.any():
        return
    dst = dst[unicast]
    udst, dorder, dstarts = _sorted_groups(dst)
    dcnt = np.diff(np.append(dstarts, dst.size))
    dbyt = np.add.reduceat(wl[unicast][dorder], dstarts)
    for mac_i, c, b in zip(udst.tolist(), dcnt.tolist(), dbyt.tolist(), strict=True):
        if mac_i == 0:
            continue
        st = an._mac(mac_i.to_bytes(6, "big"), now)
        st.packets_in += c
        st.bytes_in += b
