"""The bulk half of the observation core: what numpy can do for a whole batch at once.

Most frames of a busy capture only add to counters: mid-flow TCP segments and UDP datagrams of conversations
that need no more inspection. For an Ethernet batch, `classify` gathers the header fields of every plain IPv4
TCP/UDP frame (untagged, no IP options, not a fragment, headers captured) from the batch buffer and groups them
by conversation; it needs no state, so a reader process can run it beside the analysis (`capture.forked`).
`plan_batch` then looks the conversations up, and:

* frames of conversations that are *settled* (no login exchange being followed) are not walked at all: their
  counters are added per conversation and per MAC (`count_settled`);
* conversations that *start* in the batch are created here, in the order of their first frame, before the walk;
* SYN/FIN/RST segments of those conversations are replayed, in batch order, through the same state transition
  the per-frame path uses (`state.tcp_next_state`); the first payload from the initiator is checked for a TLS
  ClientHello (parsed by `classify` when it starts like one) and the first datagram from a UDP responder reveals
  a service, once per conversation;
* plain IPv4 frames of other protocols (ICMP, IGMP...) only count for their MACs and source address, in bulk too;
* datagrams with something to decode (DHCP, DNS queries, mDNS, NetBIOS, SSDP) are counted in bulk, and their
  payloads read during the walk, in order with the frames around them;
* everything else is walked one frame at a time by `Analyzer.feed`: conversations whose login exchange is being
  followed, and every frame that is not plain IPv4 (ARP, IPv6, VLAN-tagged, fragments...). A walked frame of a
  conversation that becomes settled during the walk is deferred to the bulk step from then on.

The result is the same as walking every frame; `tests/observe/test_analyzer.py` checks it on generated sessions
and on every shared capture. Observations made in bulk carry their packet time and are merged into packet order
when they are drained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from leafguard.capture.batch import FrameBatch
from leafguard.decode.deep import ClientHello, tls_client_hello
from leafguard.decode.frames import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from leafguard.observe.conversations import A_IS_LO, B_SEEN, HELLO_CHECKED, SLOW
from leafguard.observe.discovery import selected_many
from leafguard.observe.inventory import MacTotals
from leafguard.observe.state import NEXT_STATE

if TYPE_CHECKING:
    from leafguard.observe.conversations import ConversationTable
    from leafguard.observe.inventory import LeafInventory

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
    """One batch's plan: its `Classified` candidates, and what the state says of their conversations.

    Arrays indexed by candidate position have one entry per candidate, in batch order; ``pre.cand`` maps a
    candidate position to its frame index in the batch. Lists indexed by ``u`` have one entry per conversation.
    """

    __slots__ = ("bare", "bulk_new", "deep", "early", "frame_key", "gens", "known", "pre", "rows", "settled", "walk")

    def __init__(self, pre: Classified) -> None:
        self.pre = pre
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
        """Candidate frames counted in bulk without being walked."""
        # Per conversation.
        self.rows: list[int] = []
        """Its row in the conversation table, or -1 (not known yet)."""
        self.gens: list[int] = []
        """The row's generation when the plan took it (`ConversationTable.gen`): a row given up during the batch
        (its conversation evicted by a new one) has another by the time the batch is counted."""
        self.known: list[bool] = []
        """The conversation exists (it did at the start of the batch, or the walk created it)."""
        self.settled: list[bool] = []
        """Its frames only need the bulk step (the payloads of deep ones are still read during the walk)."""
        self.bulk_new: list[int] = []
        """Conversations created by the bulk step, in the order of their first frame."""


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


@dataclass(slots=True)
class Classified:
    """What can be known of an Ethernet batch without any state: its plain IPv4 TCP/UDP frames (candidates)
    grouped by conversation, their header fields, and the other plain IPv4 frames. A reader process computes it
    beside the analysis (`capture.forked`); otherwise `plan_batch` does. Arrays per candidate unless noted."""

    n: int
    cand: _I64
    inv: _I64
    """The candidate's conversation number (0..nu-1, in order of first appearance)."""
    first: _I64
    """Per conversation: the candidate position of its first frame."""
    k1: _I64
    k2: _I64
    """Per conversation: its addresses (``lo << 32 | hi``, wrapping around int64) and its ports and protocol
    (``lo << 24 | hi << 8 | proto``), as `classify` grouped the frames: its key in the conversation table
    (`conversations.FlowKey`, with ``k1`` read as unsigned)."""
    src_lo: _B
    o: _I64
    """Where the frame starts (its MACs)."""
    h: _I64
    """Where it would start without its 802.1Q tag: IP and transport fields at the offsets of an untagged frame."""
    smac: _I64
    dmac: _I64
    wl: _I64
    ts: npt.NDArray[np.float64]
    flags: _U8
    tcp: _B
    pay_off: _I64
    pay_len: _I64
    deep: _B
    bare: _B
    hellos: dict[int, ClientHello | None]
    """Candidates whose payload starts like a TLS ClientHello, and what it is; any other payload is not one."""
    maconly: _I64
    """Frame indices of plain IPv4 frames of other protocols (ICMP, IGMP...): only their MACs and source address
    count."""
    m_smac: _I64
    m_dmac: _I64
    m_ts: npt.NDArray[np.float64]
    macs: MacTotals
    """Per-MAC totals of every candidate and of the frames in ``maconly``: the bulk step counts them all."""


def classify(batch: FrameBatch) -> Classified | None:
    """The stateless half of the plan; ``None`` when no frame of the batch can be counted in bulk."""
    if batch.linktype != 1:
        return None
    n = len(batch)
    arr = np.frombuffer(batch.data, dtype=np.uint8)
    off = np.asarray(batch.offsets, dtype=np.int64)
    cap = np.asarray(batch.caplens, dtype=np.int64)
    ok = cap >= 42
    safe_off = np.where(ok, off, 0)
    # One 802.1Q tag (a trunk port, or tags the live ring re-inserts) shifts everything after the MACs by 4 bytes:
    # ``h`` is where the frame would start if it had no tag, so that the fields below are at their usual offsets.
    tagged = ok & (arr[safe_off + 12] == 0x81) & (arr[safe_off + 13] == 0x00) & (cap >= 46)
    shift = np.where(tagged, 4, 0)
    h = safe_off + shift
    hcap = cap - shift
    ok &= (arr[h + 12] == 0x08) & (arr[h + 13] == 0x00) & (arr[h + 14] == 0x45)
    ok &= ((arr[h + 20] & 0x3F) == 0) & (arr[h + 21] == 0)
    proto = arr[h + 23]
    is_tcp = proto == 6
    total_len = _u16(arr, h + 16)
    # Neither a conversation nor a tunnel (IP in IP, 6in4), and whole enough that decoding finds nothing amiss.
    maconly_mask = ok & (proto != 6) & (proto != 17) & (proto != 4) & (proto != 41) & (total_len >= 28)
    ok &= is_tcp | (proto == 17)
    # TCP needs its 20-byte header captured before its data offset can be read.
    tcp_off = np.where(ok & is_tcp & (hcap >= 54), h, 0)
    doff = (arr[tcp_off + 46] >> 4).astype(np.int64) * 4
    # A TCP header with a bad data offset, or options beyond the captured bytes, is for the per-frame path.
    ok &= ~is_tcp | ((hcap >= 54) & (doff >= 20) & (hcap >= 34 + doff))
    ok &= total_len >= 20 + np.where(is_tcp, doff, 8)
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        return None
    o = off[cand]
    hc = h[cand]
    tcp = is_tcp[cand]
    l4_len = np.where(tcp, doff[cand], 8)
    pay_off = hc + 34 + l4_len
    pay_len = np.maximum(np.minimum(total_len[cand] - 20 - l4_len, hcap[cand] - 34 - l4_len), 0)
    flags = np.where(tcp, arr[np.where(tcp, hc + 47, 0)], 0).astype(np.uint8)
    ctrl = tcp & ((flags & (TCP_SYN | TCP_FIN | TCP_RST)) != 0)
    bare = tcp & ~ctrl & (pay_len == 0) & (total_len[cand] - 20 - l4_len <= 0)
    sip = _u32(arr, hc + 26)
    dip = _u32(arr, hc + 30)
    sport = _u16(arr, hc + 34)
    dport = _u16(arr, hc + 36)
    deep = ~tcp & selected_many(arr, sport, dport, pay_off, pay_len)
    src_lo = (sip < dip) | ((sip == dip) & (sport <= dport))
    ip_lo = np.where(src_lo, sip, dip)
    ip_hi = np.where(src_lo, dip, sip)
    port_lo = np.where(src_lo, sport, dport)
    port_hi = np.where(src_lo, dport, sport)
    pr = np.where(tcp, 6, 17)
    k1 = (ip_lo << 32) | ip_hi
    k2 = (port_lo << 24) | (port_hi << 8) | pr
    first, inv = _group(k1, k2)
    # deep.tls_client_hello returns None unless the payload starts with these bytes: only those are parsed.
    at = np.where(pay_len >= 9, pay_off, 0)
    hello_like = tcp & (pay_len >= 9) & (arr[at] == 0x16) & (arr[at + 1] == 3) & (arr[at + 5] == 1)
    data = batch.data
    hellos = {
        j: tls_client_hello(data[a : a + ln])
        for j, a, ln in zip(
            np.flatnonzero(hello_like).tolist(), pay_off[hello_like].tolist(), pay_len[hello_like].tolist(),
            strict=True,
        )
    }  # fmt: skip
    maconly = np.flatnonzero(maconly_mask)
    m_o = off[maconly]
    m_h = h[maconly]
    smac = _u48(arr, o + 6)
    dmac = _u48(arr, o)
    m_smac = _u48(arr, m_o + 6)
    m_dmac = _u48(arr, m_o)
    m_ts = np.asarray(batch.timestamps, dtype=np.float64)[maconly]
    wl = np.asarray(batch.wirelens, dtype=np.int64)[cand]
    ts = np.asarray(batch.timestamps, dtype=np.float64)[cand]
    macs = _mac_totals(
        np.concatenate((smac, m_smac)),
        np.concatenate((dmac, m_dmac)),
        np.concatenate((wl, np.asarray(batch.wirelens, dtype=np.int64)[maconly])),
        np.concatenate((ts, m_ts)),
        np.concatenate((sip, _u32(arr, m_h + 26))),
    )
    return Classified(
        n=n,
        cand=cand,
        inv=inv,
        first=first,
        k1=k1[first],
        k2=k2[first],
        src_lo=src_lo,
        o=o,
        h=hc,
        smac=smac,
        dmac=dmac,
        wl=wl,
        ts=ts,
        flags=flags,
        tcp=tcp,
        pay_off=pay_off,
        pay_len=pay_len,
        deep=deep,
        bare=bare,
        hellos=hellos,
        maconly=maconly,
        m_smac=m_smac,
        m_dmac=m_dmac,
        m_ts=m_ts,
        macs=macs,
    )


def plan_batch(table: ConversationTable, batch: FrameBatch) -> Plan | None:
    """Plan an Ethernet batch; ``None`` when nothing in it can be counted in bulk."""
    pre = batch.prepared if isinstance(batch.prepared, Classified) else classify(batch)
    if pre is None:
        return None
    n = pre.n
    cand = pre.cand
    inv = pre.inv
    first = pre.first
    deep = pre.deep
    bare = pre.bare

    plan = Plan(pre)
    rows = table.index.get_many(pre.k1.view(np.uint64), pre.k2)
    known0 = rows >= 0
    settled0 = known0 & ((table.bits[rows] & SLOW) == 0)
    plan.rows = rows.tolist()
    plan.gens = table.gen[rows].tolist()
    plan.known = known0.tolist()
    plan.settled = settled0.tolist()

    # A conversation that starts here is created before the walk, and none of its frames is walked, when none
    # of them carries a datagram to decode (TCP login exchanges are followed in bulk, in order, too).
    bulk_new = ~known0
    plan.bulk_new = np.flatnonzero(bulk_new)[np.argsort(first[bulk_new], kind="stable")].tolist()

    early_c = settled0[inv] | (bare & known0[inv]) | bulk_new[inv]
    early = np.zeros(n, dtype=bool)
    early[pre.maconly] = True
    early[cand[early_c]] = True
    # Datagrams to decode are counted in bulk too, but their payloads are read during the walk, in frame order.
    early[cand[deep]] = False
    frame_key = np.full(n, -1, dtype=np.int64)
    frame_key[cand] = inv
    per_frame = np.zeros(n, dtype=bool)

    plan.early = cand[early_c]
    plan.walk = np.flatnonzero(~early).tolist()
    plan.frame_key = frame_key.tolist()
    per_frame[cand] = bare
    plan.bare = per_frame.tolist()
    per_frame[:] = False
    per_frame[cand] = deep
    plan.deep = per_frame.tolist()
    return plan


def count_settled(
    inventory: LeafInventory, table: ConversationTable, batch: FrameBatch, plan: Plan, deferred: list[int]
) -> None:
    """Account for every frame the walk did not (the analyzer has logged their send times): the conversations'
    counters are added to the table's columns per batch, with no Python work per conversation."""
    data = batch.data
    pre = plan.pre
    # Every candidate and plain IPv4 frame's MAC counters and source address.
    inventory.apply_totals(pre.macs)
    idx = np.concatenate((plan.early, np.asarray(deferred, dtype=np.int64))) if deferred else plan.early
    if not idx.size:
        return
    idx.sort()
    pos = np.searchsorted(pre.cand, idx)
    inv = pre.inv[pos]
    nu = len(plan.rows)
    present = np.unique(inv)
    rows = np.asarray(plan.rows, dtype=np.int64)[present]
    # A conversation evicted during the batch (by one created after the plan looked it up) has lost its row: its
    # frames here are not counted anywhere, as they were not when a conversation was an object.
    live = table.gen[rows] == np.asarray(plan.gens, dtype=np.uint32)[present]
    alive = np.zeros(nu, dtype=bool)
    alive[present] = live
    a_is_lo = np.zeros(nu, dtype=bool)
    a_is_lo[present] = (table.bits[rows] & A_IS_LO) != 0
    fwd = pre.src_lo[pos] == a_is_lo[inv]
    wl = pre.wl[pos]
    ts = pre.ts[pos]
    inv_ab = inv[fwd]
    inv_ba = inv[~fwd]
    at = present[live]
    rows = rows[live]
    # Each live row once (a row is one conversation's): plain fancy-indexed adds, no ufunc.at.
    table.packets_ab[rows] += np.bincount(inv_ab, minlength=nu)[at]
    table.bytes_ab[rows] += np.bincount(inv_ab, weights=wl[fwd], minlength=nu)[at].astype(np.int64)
    table.packets_ba[rows] += np.bincount(inv_ba, minlength=nu)[at]
    table.bytes_ba[rows] += np.bincount(inv_ba, weights=wl[~fwd], minlength=nu)[at].astype(np.int64)
    last = np.full(nu, -np.inf)
    np.maximum.at(last, inv, ts)
    table.last[rows] = np.maximum(table.last[rows], last[at])
    ok = alive[inv]
    _control(inventory, table, data, plan, pos, inv, fwd, ok)
    _first_of_flow(inventory, table, data, plan, pos, inv, fwd, ok)
    _logins(table, data, plan, pos, inv, fwd, at)


def _logins(table: ConversationTable, data: bytes, plan: Plan, pos: _I64, inv: _I64, fwd: _B, present: _I64) -> None:
    """Follow the login exchanges of conversations that were counted in bulk, segment by segment, in order."""
    rows = plan.rows
    logins = table.logins
    following = [u for u in present.tolist() if rows[u] in logins]
    if not following:
        return
    pre = plan.pre
    sel = np.flatnonzero(np.isin(inv, following) & (pre.pay_len[pos] > 0))
    for k, u, forward in zip(sel.tolist(), inv[sel].tolist(), fwd[sel].tolist(), strict=True):
        row = rows[u]
        if row not in logins:
            continue
        j = int(pos[k])
        start = int(pre.pay_off[j])
        table.follow_login(row, forward, data[start : start + int(pre.pay_len[j])], float(pre.ts[j]))


def create_new(table: ConversationTable, batch: FrameBatch, plan: Plan) -> None:
    """Create the conversations that start in this batch, before the walk: a frame of the same 5-tuple that the
    walk sees (one the plan could not classify) then finds the conversation as the per-frame path would have
    made it."""
    if not plan.bulk_new:
        return
    data = batch.data
    pre = plan.pre
    firsts = pre.first[plan.bulk_new]
    k1 = pre.k1[plan.bulk_new].view(np.uint64).tolist()
    k2 = pre.k2[plan.bulk_new].tolist()
    rows = plan.rows
    gens = plan.gens
    for u, key1, key2, at, h, flags, ts, lo in zip(
        plan.bulk_new, k1, k2, pre.o[firsts].tolist(), pre.h[firsts].tolist(), pre.flags[firsts].tolist(),
        pre.ts[firsts].tolist(), pre.src_lo[firsts].tolist(), strict=True,
    ):  # fmt: skip
        proto = data[h + 23]
        sip = data[h + 26 : h + 30]
        dip = data[h + 30 : h + 34]
        sport = (data[h + 34] << 8) | data[h + 35]
        dport = (data[h + 36] << 8) | data[h + 37]
        row = table.create(
            (key1, key2), proto, sip, sport, dip, dport, data[at + 6 : at + 12], data[at : at + 6], flags, ts, src_lo=lo
        )
        rows[u] = row
        gens[u] = table.generation(row)


def _control(
    inventory: LeafInventory,
    table: ConversationTable,
    data: bytes,
    plan: Plan,
    pos: _I64,
    inv: _I64,
    fwd: _B,
    alive: _B,
) -> None:
    """Replay the bulk-counted SYN/FIN/RST segments' state changes, in batch order (``pos`` is sorted)."""
    pre = plan.pre
    sel = np.flatnonzero(((pre.flags[pos] & (TCP_SYN | TCP_FIN | TCP_RST)) != 0) & alive)
    if not sel.size:
        return
    rows = plan.rows
    state = table.state_cells
    for j, u, forward, flags, ts in zip(
        pos[sel].tolist(), inv[sel].tolist(), fwd[sel].tolist(), pre.flags[pos[sel]].tolist(),
        pre.ts[pos[sel]].tolist(), strict=True,
    ):  # fmt: skip
        row = rows[u]
        state[row] = NEXT_STATE[(state[row] << 9) | (forward << 8) | flags]
        if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) and not forward:  # may reveal a service
            at, h = int(pre.o[j]), int(pre.h[j])
            src = inventory.macs.get(data[at + 6 : at + 12])
            table.syn_ack_service(src, data[h + 26 : h + 30], (data[h + 34] << 8) | data[h + 35], ts)


def _first_of_flow(
    inventory: LeafInventory,
    table: ConversationTable,
    data: bytes,
    plan: Plan,
    pos: _I64,
    inv: _I64,
    fwd: _B,
    alive: _B,
) -> None:
    """What the per-frame path does on a conversation's first payload from ``a`` (a TLS ClientHello is looked
    for) and on the first UDP datagram from ``b`` (the responder's port is a service): here once per conversation,
    on the same frame the per-frame path would have used (``pos`` is in batch order)."""
    pre = plan.pre
    has_pay = pre.pay_len[pos] > 0
    tcp = pre.tcp[pos]
    hellos = pre.hellos
    rows = plan.rows
    # What each frame's conversation has had looked at already (the walk is over: nothing else changes it here).
    bits = table.bits[np.asarray(rows, dtype=np.int64)[inv]]
    unchecked = (bits & HELLO_CHECKED) == 0
    unseen = (bits & B_SEEN) == 0
    for mask, tls in ((fwd & has_pay & tcp & alive & unchecked, True), (~fwd & ~tcp & alive & unseen, False)):
        sel = np.flatnonzero(mask)
        if not sel.size:
            continue
        users, first = np.unique(inv[sel], return_index=True)
        for u, j in zip(users.tolist(), pos[sel[first]].tolist(), strict=True):
            row = rows[u]
            at = int(pre.o[j])
            if tls:
                table.apply_hello(row, inventory.macs.get(data[at + 6 : at + 12]), hellos.get(j))
            else:
                h = int(pre.h[j])
                src = inventory.macs.get(data[at + 6 : at + 12])
                table.first_reply(row, src, data[h + 26 : h + 30], float(pre.ts[j]))


def _sorted_groups(keys: _I64) -> tuple[_I64, _I64, _I64]:
    """The distinct keys, the order that sorts ``keys``, and where each key's run starts in that order."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return ordered[starts], order, starts


def _mac_totals(src: _I64, dst: _I64, wl: _I64, ts: npt.NDArray[np.float64], sip: _I64) -> MacTotals:
    # Reductions over sorted runs (reduceat) rather than ufunc.at: one sort per side, no scattered updates.
    if not src.size:
        return MacTotals(now=-np.inf, sent=[], addresses=[], received=[])
    usrc, order, starts = _sorted_groups(src)
    cnt = np.diff(np.append(starts, src.size))
    byt = np.add.reduceat(wl[order], starts)
    ts_o = ts[order]
    lo = np.minimum.reduceat(ts_o, starts)
    hi = np.maximum.reduceat(ts_o, starts)
    sent = list(zip(usrc.tolist(), cnt.tolist(), byt.tolist(), lo.tolist(), hi.tolist(), strict=True))
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
    received: list[tuple[int, int, int]] = []
    unicast = ((dst >> 40) & 1 == 0) & (dst != 0)
    if unicast.any():
        dst = dst[unicast]
        udst, dorder, dstarts = _sorted_groups(dst)
        dcnt = np.diff(np.append(dstarts, dst.size))
        dbyt = np.add.reduceat(wl[unicast][dorder], dstarts)
        received = list(zip(udst.tolist(), dcnt.tolist(), dbyt.tolist(), strict=True))
    return MacTotals(now=float(hi.max()), sent=sent, addresses=pairs, received=received)
