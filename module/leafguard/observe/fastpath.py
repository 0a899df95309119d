"""Bulk counting of the frames that cannot change state.

Most frames of a busy capture are mid-flow TCP segments and UDP datagrams of conversations that are already
known and need no more inspection. For those, the per-frame path would only add to counters, so this module
does the same additions for the whole batch at once with numpy: gather the header fields of every frame from
the batch buffer, pick the frames that are plain IPv4 TCP/UDP (no options, not fragments, no SYN/FIN/RST) of a
conversation whose ``slow`` flag is clear, group them by conversation and by MAC, and add. Every other frame
is returned to be walked one by one. The result is the same as walking every frame (a test checks it).

It runs before the per-frame walk of the same batch, on the state as it was at the start of the batch; frames
of conversations created or changed within the batch are walked, so the order of the two does not matter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from leafguard.capture.batch import FrameBatch
from leafguard.decode.frames import TCP_FIN, TCP_RST, TCP_SYN

if TYPE_CHECKING:
    from leafguard.observe.analyzer import Analyzer
    from leafguard.observe.state import Flow

_U8 = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]


def _u16(arr: _U8, at: _I64) -> _I64:
    return (arr[at].astype(np.int64) << 8) | arr[at + 1]


def _u32(arr: _U8, at: _I64) -> _I64:
    return (_u16(arr, at) << 16) | _u16(arr, at + 2)


def _u48(arr: _U8, at: _I64) -> _I64:
    return (_u16(arr, at) << 32) | _u32(arr, at + 2)


class Plan:
    """Per-batch bookkeeping shared by the bulk count and the per-frame walk."""

    __slots__ = (
        "bare",
        "cand",
        "ctrl",
        "ctrl_c",
        "early",
        "flags",
        "frame_key",
        "fwd_lo",
        "ip_lo",
        "is_tcp",
        "known",
        "o",
        "pay_len",
        "pay_off",
        "port_lo",
        "settled",
        "sip",
        "ts",
        "uflows",
        "uinv",
        "walk",
        "wl",
    )

    def __init__(self) -> None:
        self.frame_key: list[int] = []
        """Per frame of the batch: the index of its conversation among the candidates' keys, or -1."""
        self.settled: list[bool] = []
        """Per conversation key: its frames only add to counters (set during the walk as flows settle)."""
        self.known: list[bool] = []
        """Per conversation key: the conversation exists."""
        self.ctrl: list[bool] = []
        """Per frame: a TCP segment with SYN, FIN or RST (always walked)."""
        self.pay_off: _I64 = np.empty(0, dtype=np.int64)
        self.pay_len: _I64 = np.empty(0, dtype=np.int64)
        self.is_tcp: npt.NDArray[np.bool_] = np.empty(0, dtype=bool)
        self.flags: _U8 = np.empty(0, dtype=np.uint8)
        self.ctrl_c: npt.NDArray[np.bool_] = np.empty(0, dtype=bool)
        self.bare: list[bool] = []
        """Per frame: a TCP segment with no payload and no SYN/FIN/RST, which cannot change any state."""
        self.uflows: list[Flow | None] = []
        self.early: _I64 = np.empty(0, dtype=np.int64)
        """Frames counted in bulk without being walked."""
        self.walk: list[int] = []
        """Frames to walk, in order (some may still be deferred during the walk)."""
        self.cand: _I64 = np.empty(0, dtype=np.int64)
        self.uinv: _I64 = np.empty(0, dtype=np.int64)
        self.fwd_lo: npt.NDArray[np.bool_] = np.empty(0, dtype=bool)
        self.ip_lo: _I64 = np.empty(0, dtype=np.int64)
        self.port_lo: _I64 = np.empty(0, dtype=np.int64)
        self.o: _I64 = np.empty(0, dtype=np.int64)
        self.wl: _I64 = np.empty(0, dtype=np.int64)
        self.ts: npt.NDArray[np.float64] = np.empty(0, dtype=np.float64)
        self.sip: _I64 = np.empty(0, dtype=np.int64)


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
    first = order[start]
    return first, inv


def plan_batch(an: Analyzer, batch: FrameBatch) -> Plan | None:
    """Find the frames of an Ethernet batch that may be counted in bulk, and the conversations they belong to."""
    n = len(batch)
    arr = np.frombuffer(batch.data, dtype=np.uint8)
    off = np.asarray(batch.offsets, dtype=np.int64)
    cap = np.asarray(batch.caplens, dtype=np.int64)
    # Candidates: untagged IPv4 without options, not a fragment, TCP or UDP, headers fully captured.
    ok = cap >= 54
    safe_off = np.where(ok, off, 0)
    ok &= (arr[safe_off + 12] == 0x08) & (arr[safe_off + 13] == 0x00) & (arr[safe_off + 14] == 0x45)
    ok &= ((arr[safe_off + 20] & 0x3F) == 0) & (arr[safe_off + 21] == 0)
    proto = arr[safe_off + 23]
    is_tcp = proto == 6
    ok &= is_tcp | (proto == 17)
    flags = arr[safe_off + 47]
    # A TCP header with options longer than the captured bytes, or a bad data offset, is for the slow path.
    doff = (arr[safe_off + 46] >> 4).astype(np.int64) * 4
    ok &= ~is_tcp | ((doff >= 20) & (cap >= 34 + doff))
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        return None
    total_len = _u16(arr, safe_off + 16)
    l4_len = np.where(is_tcp, doff, 8)
    pay_len = np.minimum(total_len - 20 - l4_len, cap - 34 - l4_len)
    # Control segments change TCP state: they are walked, but they carry a conversation key like the rest.
    ctrl = ok & is_tcp & ((flags & (TCP_SYN | TCP_FIN | TCP_RST)) != 0)
    bare = ok & is_tcp & ~ctrl & (total_len - 20 - doff <= 0)
    o = off[cand]
    sip = _u32(arr, o + 26)
    dip = _u32(arr, o + 30)
    sport = _u16(arr, o + 34)
    dport = _u16(arr, o + 36)
    pr = proto[cand].astype(np.int64)
    src_lo = (sip < dip) | ((sip == dip) & (sport <= dport))
    ip_lo = np.where(src_lo, sip, dip)
    ip_hi = np.where(src_lo, dip, sip)
    port_lo = np.where(src_lo, sport, dport)
    port_hi = np.where(src_lo, dport, sport)
    first_idx, inv = _group(((ip_lo << 32) | ip_hi), (port_lo << 24) | (port_hi << 8) | pr)
    plan = Plan()
    flows = an.flows
    for j in first_idx.tolist():
        flow = flows.get(
            (
                int(pr[j]),
                int(ip_lo[j]).to_bytes(4, "big"),
                int(port_lo[j]),
                int(ip_hi[j]).to_bytes(4, "big"),
                int(port_hi[j]),
            )
        )
        plan.uflows.append(flow)
        plan.known.append(flow is not None)
        plan.settled.append(flow is not None and not flow.slow)
    frame_key = np.full(n, -1, dtype=np.int64)
    frame_key[cand] = inv
    # Frames of conversations already settled (or bare segments of known ones) skip the walk altogether.
    settled0 = np.asarray(plan.settled, dtype=bool)
    known0 = np.asarray(plan.known, dtype=bool)
    early = np.zeros(n, dtype=bool)
    early[cand] = settled0[inv] | (bare[cand] & known0[inv])
    plan.early = np.flatnonzero(early)
    plan.walk = np.flatnonzero(~early).tolist()
    plan.frame_key = frame_key.tolist()
    plan.bare = bare.tolist()
    plan.ctrl = ctrl.tolist()
    plan.pay_off = (o + 34 + l4_len[cand])
    plan.pay_len = np.maximum(pay_len[cand], 0)
    plan.is_tcp = is_tcp[cand]
    plan.flags = flags[cand]
    plan.ctrl_c = ctrl[cand]
    plan.cand = cand
    plan.uinv = inv
    plan.fwd_lo = src_lo
    plan.ip_lo = ip_lo
    plan.port_lo = port_lo
    plan.o = o
    plan.sip = sip
    plan.wl = np.asarray(batch.wirelens, dtype=np.int64)[cand]
    plan.ts = np.asarray(batch.timestamps, dtype=np.float64)[cand]
    return plan


def count_settled(an: Analyzer, batch: FrameBatch, plan: Plan, deferred: list[int]) -> None:
    """Add the deferred frames (indices into the batch) to their conversations and MACs."""
    idx = np.concatenate((plan.early, np.asarray(deferred, dtype=np.int64))) if deferred else plan.early
    if not idx.size:
        return
    pos = np.searchsorted(plan.cand, idx)
    inv = plan.uinv[pos]
    nu = len(plan.uflows)
    a_is_lo = np.zeros(nu, dtype=bool)
    present, first = np.unique(inv, return_index=True)
    for u, j in zip(present.tolist(), pos[first].tolist(), strict=True):
        flow = plan.uflows[u]
        assert flow is not None
        a_is_lo[u] = flow.a_ip == int(plan.ip_lo[j]).to_bytes(4, "big") and flow.a_port == int(plan.port_lo[j])
    fwd = plan.fwd_lo[pos] == a_is_lo[inv]
    wl = plan.wl[pos]
    ts = plan.ts[pos]
    pk_ab = np.bincount(inv[fwd], minlength=nu)
    by_ab = np.bincount(inv[fwd], weights=wl[fwd], minlength=nu)
    pk_ba = np.bincount(inv[~fwd], minlength=nu)
    by_ba = np.bincount(inv[~fwd], weights=wl[~fwd], minlength=nu)
    last = np.full(nu, -np.inf)
    np.maximum.at(last, inv, ts)
    for u in np.flatnonzero(pk_ab + pk_ba).tolist():
        flow = plan.uflows[u]
        assert flow is not None
        flow.packets_ab += int(pk_ab[u])
        flow.bytes_ab += int(by_ab[u])
        flow.packets_ba += int(pk_ba[u])
        flow.bytes_ba += int(by_ba[u])
        if last[u] > flow.last:
            flow.last = float(last[u])
    arr = np.frombuffer(batch.data, dtype=np.uint8)
    _count_macs(an, arr, plan.o[pos], wl, ts, plan.sip[pos])
    _control(an, batch.data, plan, pos, inv, fwd)
    _first_of_flow(an, batch.data, arr, plan, pos, inv, fwd)


def _control(an: Analyzer, data: bytes, plan: Plan, pos: _I64, inv: _I64, fwd: npt.NDArray[np.bool_]) -> None:
    """Replay the deferred SYN/FIN/RST segments' state changes, in batch order (``pos`` is sorted)."""
    sel = np.flatnonzero(plan.ctrl_c[pos])
    if not sel.size:
        return
    uflows = plan.uflows
    o = plan.o
    for k, u, forward, flags in zip(
        sel.tolist(), inv[sel].tolist(), fwd[sel].tolist(), plan.flags[pos[sel]].tolist(), strict=True
    ):
        flow = uflows[u]
        assert flow is not None
        src = src_ip = None
        sport = 0
        if flags & 0x12 == 0x12 and not forward:  # SYN-ACK from the responder: a service, maybe
            at = int(o[int(pos[k])])
            src = an.macs.get(data[at + 6 : at + 12])
            src_ip = data[at + 26 : at + 30]
            sport = int.from_bytes(data[at + 34 : at + 36], "big")
        an.tcp_control(flow, forward, flags, src, src_ip, sport)


def _first_of_flow(
    an: Analyzer, data: bytes, arr: _U8, plan: Plan, pos: _I64, inv: _I64, fwd: npt.NDArray[np.bool_]
) -> None:
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
            j = int(pos[k])
            if tls:
                if flow.hello_checked:
                    continue
                src = an.macs.get(data[int(plan.o[j]) + 6 : int(plan.o[j]) + 12])
                start = int(plan.pay_off[j])
                an.inspect_hello(flow, src, data[start : start + int(plan.pay_len[j])])
            elif not flow.b_seen:
                src = an.macs.get(data[int(plan.o[j]) + 6 : int(plan.o[j]) + 12])
                an.first_reply(flow, src, flow.b_ip)


def _count_macs(an: Analyzer, arr: _U8, o: _I64, wl: _I64, ts: npt.NDArray[np.float64], sip: _I64) -> None:
    dst = _u48(arr, o)
    src = _u48(arr, o + 6)
    usrc, sinv = np.unique(src, return_inverse=True)
    sinv = sinv.reshape(-1)
    nu = usrc.size
    cnt = np.bincount(sinv, minlength=nu)
    byt = np.bincount(sinv, weights=wl, minlength=nu)
    lo = np.full(nu, np.inf)
    hi = np.full(nu, -np.inf)
    np.minimum.at(lo, sinv, ts)
    np.maximum.at(hi, sinv, ts)
    now = float(hi.max())
    for u in range(nu):
        st = an._mac(int(usrc[u]).to_bytes(6, "big"), now)
        if st.packets_out == 0 or lo[u] < st.first_seen:
            st.first_seen = float(lo[u])
        if hi[u] > st.last_seen:
            st.last_seen = float(hi[u])
        st.packets_out += int(cnt[u])
        st.bytes_out += int(byt[u])
    # The (MAC, source address) pairs: normally known already, but a MAC can start using a new address mid-flow.
    # Most MACs use one address per batch; only those with several need the full pair list.
    ip_lo = np.full(nu, np.iinfo(np.int64).max)
    ip_hi = np.full(nu, -1)
    np.minimum.at(ip_lo, sinv, sip)
    np.maximum.at(ip_hi, sinv, sip)
    many = ip_lo != ip_hi
    pairs: list[tuple[int, int]] = list(zip(usrc[~many].tolist(), ip_lo[~many].tolist(), strict=True))
    if many.any():
        multi = many[sinv]
        both = np.unique(np.stack([src[multi], sip[multi]], axis=1), axis=0)
        pairs += [(int(m), int(i)) for m, i in both.tolist()]
    for mac_i, ip_i in pairs:
        known = an.macs.get(int(mac_i).to_bytes(6, "big"))
        if known is not None:
            an._learn_ip(known, int(ip_i).to_bytes(4, "big"))
    unicast = (dst >> 40) & 1 == 0
    if not unicast.any():
        return
    dst = dst[unicast]
    udst, dinv = np.unique(dst, return_inverse=True)
    dinv = dinv.reshape(-1)
    dcnt = np.bincount(dinv, minlength=udst.size)
    dbyt = np.bincount(dinv, weights=wl[unicast], minlength=udst.size)
    for u in range(udst.size):
        mac = int(udst[u]).to_bytes(6, "big")
        if mac == b"\x00" * 6:
            continue
        st = an._mac(mac, now)
        st.packets_in += int(dcnt[u])
        st.bytes_in += int(dbyt[u])
