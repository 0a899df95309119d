"""The conversation table: TCP and UDP conversations, IP fragments, TCP control, and what a conversation's first
segments reveal (services, TLS ClientHellos, login exchanges); and the observations made of them.

The table is columnar: a conversation is a *row*, a slot in preallocated numpy columns (its IPv4 key, packets and
bytes each way, first and last packet time, TCP state, a few flags, the two MACs). An IPv4 conversation is found
by its key, the pair the bulk step groups frames by (`fastpath.classify`), in `observe.rowindex` (a table of row
numbers: a batch's conversations are looked up at once); other conversations (IPv6, other link types) are keyed
by a tuple in a dict (`flows`). So an IPv4 conversation costs no Python object at all. The bulk step adds a
batch's counters to the columns with numpy (`fastpath.count_settled`); the per-frame path reads and writes single
cells through memoryviews. Python objects exist only where a conversation needs per-frame attention: the login
exchange being followed (`logins`). `Flow` records are made from the rows for the report and the observations.

The table is capped (`observe.eviction` chooses what a full table gives up; its queues are rings of row
numbers). Both halves of the core go through it: the per-frame path with `segment`, the bulk step
(`observe.fastpath`) with `create`, `control`, `apply_hello`, `first_reply` and `follow_login`, so a
conversation changes the same way whichever path its frames take.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from leafguard.decode import deep
from leafguard.decode.frames import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Packet
from leafguard.decode.login import LOGIN_PORTS, LoginOutcome, LoginTracker
from leafguard.detect.evidence import ConversationOpened, Evidence, LoginResult, SynSent
from leafguard.observe.addresses import mac_text, recurring_ip_text
from leafguard.observe.discovery import PORTS as DISCOVERY_PORTS
from leafguard.observe.discovery import Discovery
from leafguard.observe.eviction import EvictionQueue, RowQueue
from leafguard.observe.inventory import LeafInventory
from leafguard.observe.model import ConnectionSeen, Direction, LoginSeen, Observation
from leafguard.observe.rowindex import RowIndex
from leafguard.observe.settings import AnalyzerSettings
from leafguard.observe.state import NEXT_STATE, STATE_CODE, TCP_STATES, CaptureStats, Flow, MacState

LOGIN_BUDGET_BYTES = 8192
"""Payload bytes of a login-port conversation inspected before it joins the fast path."""
MAX_PENDING_OBSERVATIONS = 100_000

FlowKey = tuple[int, int] | tuple[int, bytes, int, bytes, int]
"""IPv4: ``(k1, k2)`` as `rowindex` has them (the addresses, lower first, as one unsigned 64-bit number; the ports,
lower endpoint's first, and the protocol); otherwise the protocol, then the lower (address, port) endpoint, then
the other."""

B_SEEN = 1
"""The responder has sent (UDP): its first datagram was looked at."""
HELLO_CHECKED = 2
"""The initiator's first payload was looked at for a TLS ClientHello."""
A_IS_LO = 4
"""Side ``a`` is the lower (address, port) endpoint of the key."""
SLOW = 8
"""A login exchange on it is being followed (`ConversationTable.logins`): its frames need the per-frame path."""
NOT_V4 = 16
"""Its key is a tuple (`ConversationTable.flows`), not IPv4 columns."""
NO_MAC = -1
"""A MAC column's value for a frame without MACs (link types other than Ethernet)."""

PORT_NUMBERS = list(range(65536))
"""Every port number as one int object (2 MB once): the evidence the detectors keep (a SYN's port, in port-scan
windows) shares them instead of holding a new int per conversation."""
ADDRESS_CACHE = 65_536
"""Addresses kept to be shared by the conversations that use them; a scan of random addresses only refills it."""

T = TypeVar("T")


class Cells(Protocol, Generic[T]):
    """Single cells of a column (a memoryview of it: item access at the cost of a list's, not numpy's)."""

    def __getitem__(self, row: int, /) -> T: ...
    def __setitem__(self, row: int, value: T, /) -> None: ...


def _cells(column: npt.NDArray[Any]) -> Any:
    return column.data


def _obs_time(obs: Observation) -> float:
    return obs.ts


class ObservationLog:
    """Observations for the per-leaf agents, bounded: when nobody drains them the oldest go, counted."""

    def __init__(self, inventory: LeafInventory, stats: CaptureStats, *, enabled: bool) -> None:
        self.enabled = enabled
        """``False`` when nobody consumes them (a report-only run): they are then not built."""
        self._inventory = inventory
        self._stats = stats
        self._pending: deque[Observation] = deque(maxlen=MAX_PENDING_OBSERVATIONS)

    def _emit(self, obs: Observation) -> None:
        if len(self._pending) == MAX_PENDING_OBSERVATIONS:
            # Nobody is draining: the deque drops the oldest; memory stays bounded and the loss is counted.
            self._stats.observations_dropped += 1
        self._pending.append(obs)

    def _leaf_sides(
        self, a_ip: bytes, a_port: int, a_mac: bytes | None, b_ip: bytes, b_port: int, b_mac: bytes | None
    ) -> list[tuple[str, Direction, str, int, str, int]]:
        """Each side of a conversation that is a leaf: (MAC, direction, local address and port, remote ones)."""
        sides: list[tuple[str, Direction, str, int, str, int]] = []
        leaf_mac_for = self._inventory.leaf_mac_for
        text = recurring_ip_text
        if (mac := leaf_mac_for(a_ip, a_mac)) is not None:
            sides.append((mac_text(mac), "Out", text(a_ip), a_port, text(b_ip), b_port))
        if (mac := leaf_mac_for(b_ip, b_mac)) is not None:
            sides.append((mac_text(mac), "In", text(b_ip), b_port, text(a_ip), a_port))
        return sides

    def connection(
        self,
        ts: float,
        proto: int,
        a: tuple[bytes, int, bytes | None],
        b: tuple[bytes, int, bytes | None],
        tcp_state: str | None,
    ) -> None:
        """A new conversation (``a`` its initiator's address, port and MAC, ``b`` the responder's), for each side
        of it that is a leaf. It has no bytes counted yet: its first frame is counted after it is made."""
        protocol: Literal["tcp", "udp"] = "tcp" if proto == PROTO_TCP else "udp"
        state = tcp_state or ""
        for mac, direction, local_addr, local_port, remote_addr, remote_port in self._leaf_sides(*a, *b):
            self._emit(
                ConnectionSeen(
                    ts, mac, direction, protocol, local_addr, local_port, remote_addr, remote_port, state, 0
                )
            )

    def login(self, flow: Flow, protocol: Any, outcome: LoginOutcome, ts: float) -> None:
        """A login exchange's outcome on a conversation, for each side of it that is a leaf."""
        if not self.enabled:
            return
        sides = self._leaf_sides(flow.a_ip, flow.a_port, flow.a_mac, flow.b_ip, flow.b_port, flow.b_mac)
        for mac, direction, local_addr, local_port, remote_addr, remote_port in sides:
            self._emit(
                LoginSeen(
                    ts=ts,
                    leaf_mac=mac,
                    protocol=protocol,
                    direction=direction,
                    local_addr=local_addr,
                    local_port=local_port,
                    remote_addr=remote_addr,
                    remote_port=remote_port,
                    user=outcome.user,
                    result=outcome.result,
                    reply_code=outcome.reply_code,
                )
            )

    def drain(self) -> list[Observation]:
        """Observations since the last call, in packet order (the bulk step makes some after the walk)."""
        out = sorted(self._pending, key=_obs_time)
        self._pending.clear()
        return out


class _Login:
    """A login exchange being followed on a conversation: the one per-conversation Python object the table keeps
    (`LOGIN_BUDGET_BYTES` of payload at most)."""

    __slots__ = ("budget", "tracker")

    def __init__(self, tracker: LoginTracker) -> None:
        self.tracker = tracker
        self.budget = LOGIN_BUDGET_BYTES


class ConversationTable:
    """The conversations (rows of columns), their fragments and TCP state."""

    def __init__(
        self,
        settings: AnalyzerSettings,
        stats: CaptureStats,
        inventory: LeafInventory,
        discovery: Discovery,
        evidence: list[Evidence],
        observations: ObservationLog,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self._inventory = inventory
        self._discovery = discovery
        self._evidence = evidence
        self._observations = observations
        self.flows: dict[FlowKey, int] = {}
        """Key -> row, of the conversations that are not IPv4 (IPv4 ones are in `index`)."""
        self._other_keys: dict[int, FlowKey] = {}
        """Row -> key, of the same."""
        self._made = 0
        """Rows used so far (free ones are reused first)."""
        self._free: list[int] = []
        """Rows given up by evicted conversations, reused first (so the columns' touched pages stay few)."""
        self.logins: dict[int, _Login] = {}
        """Rows whose login exchange is being followed: their frames need the per-frame path (or the bulk step's
        segment-by-segment replay); every other conversation is *settled*."""
        # The columns, one slot per row, allocated for the cap at once: np.zeros takes zeroed pages from the
        # kernel, which become resident only when a row on them is first used.
        cap = settings.max_flows
        self.k1 = np.zeros(cap, dtype=np.uint64)
        self.k2 = np.zeros(cap, dtype=np.int64)
        """An IPv4 conversation's key (`FlowKey`)."""
        self.index = RowIndex(self.k1, self.k2)
        """IPv4 key -> row."""
        self.packets_ab = np.zeros(cap, dtype=np.int64)
        self.packets_ba = np.zeros(cap, dtype=np.int64)
        self.bytes_ab = np.zeros(cap, dtype=np.int64)
        self.bytes_ba = np.zeros(cap, dtype=np.int64)
        self.first = np.zeros(cap, dtype=np.float64)
        self.last = np.zeros(cap, dtype=np.float64)
        self.a_mac = np.zeros(cap, dtype=np.int64)
        self.b_mac = np.zeros(cap, dtype=np.int64)
        self.state = np.zeros(cap, dtype=np.uint8)
        """`state.TCP_STATES` codes (0: UDP)."""
        self.bits = np.zeros(cap, dtype=np.uint8)
        """`B_SEEN`, `HELLO_CHECKED`, `A_IS_LO`, `SLOW`, `NOT_V4`."""
        self.gen = np.zeros(cap, dtype=np.uint32)
        """How many times the row was given up: a plan that looked a conversation up knows whether its row is still
        that conversation's when it counts (`fastpath.count_settled`)."""
        self._open_cells()
        self.order: EvictionQueue[int] = EvictionQueue(self._last.__getitem__, self._first.__getitem__, RowQueue)
        """The order in which the table gives up rows when full (`observe.eviction`)."""
        self._addresses: dict[bytes, bytes] = {}
        """IPv6 addresses in new conversations' keys, each as one bytes object the keys share (bounded)."""
        self._address_cap = min(ADDRESS_CACHE, settings.max_flows)
        # Fragment tables forget their oldest entry when full, in O(1) (a dict's next(iter()) is not: it first skips
        # every slot deleted since its last resize).
        self._frags: OrderedDict[tuple[bytes, bytes, int, int], tuple[FlowKey, bool]] = OrderedDict()
        self._frag_pending: OrderedDict[tuple[bytes, bytes, int, int], list[Any]] = OrderedDict()

    def _open_cells(self) -> None:
        # Single cells, for the per-frame path: a memoryview's item access costs what a list's does.
        self._k1: Cells[int] = _cells(self.k1)
        self._k2: Cells[int] = _cells(self.k2)
        self._pk_ab: Cells[int] = _cells(self.packets_ab)
        self._pk_ba: Cells[int] = _cells(self.packets_ba)
        self._by_ab: Cells[int] = _cells(self.bytes_ab)
        self._by_ba: Cells[int] = _cells(self.bytes_ba)
        self._first: Cells[float] = _cells(self.first)
        self._last: Cells[float] = _cells(self.last)
        self._a_mac: Cells[int] = _cells(self.a_mac)
        self._b_mac: Cells[int] = _cells(self.b_mac)
        self.state_cells: Cells[int] = _cells(self.state)
        """`state`'s cells (the bulk step replays TCP control segments through them)."""
        self._bits: Cells[int] = _cells(self.bits)
        self._gen: Cells[int] = _cells(self.gen)

    def __len__(self) -> int:
        return self.index.count + len(self.flows)

    def get(self, key: FlowKey) -> int | None:
        """The row of the conversation with this key, if there is one."""
        if len(key) == 2:
            return self.index.get(key[0], key[1])
        return self.flows.get(key)

    # ----------------------------------------------------------------------------------------- rows

    def key(self, proto: int, sip: bytes, sport: int, dip: bytes, dport: int, src_lo: bool) -> FlowKey:
        """The key of a conversation seen on a frame from ``sip:sport`` to ``dip:dport`` (``src_lo``: the source
        is the lower endpoint, ``(sip, sport) <= (dip, dport)``)."""
        if src_lo:
            if len(sip) == 4:
                return int.from_bytes(sip + dip, "big"), (sport << 24) | (dport << 8) | proto
            return (proto, sip, sport, dip, dport)
        if len(sip) == 4:
            return int.from_bytes(dip + sip, "big"), (dport << 24) | (sport << 8) | proto
        return (proto, dip, dport, sip, sport)

    def endpoints(self, row: int) -> tuple[int, bytes, int, bytes, int]:
        """A row's protocol, side ``a``'s address and port, side ``b``'s."""
        bits = self._bits[row]
        if bits & NOT_V4:
            proto, lo_ip, lo_port, hi_ip, hi_port = self._other_keys[row]  # type: ignore[misc]
        else:
            ips, k2 = self._k1[row].to_bytes(8, "big"), self._k2[row]
            proto, lo_ip, hi_ip, lo_port, hi_port = k2 & 0xFF, ips[:4], ips[4:], (k2 >> 24) & 0xFFFF, (k2 >> 8) & 0xFFFF
        if bits & A_IS_LO:
            return proto, lo_ip, lo_port, hi_ip, hi_port
        return proto, hi_ip, hi_port, lo_ip, lo_port

    def record(self, row: int) -> Flow:
        """The conversation in a row, as a `Flow`."""
        proto, a_ip, a_port, b_ip, b_port = self.endpoints(row)
        a_mac, b_mac = self._a_mac[row], self._b_mac[row]
        return Flow(
            proto, a_ip, a_port, b_ip, b_port,
            a_mac.to_bytes(6, "big") if a_mac != NO_MAC else None,
            b_mac.to_bytes(6, "big") if b_mac != NO_MAC else None,
            self._pk_ab[row], self._by_ab[row], self._pk_ba[row], self._by_ba[row],
            self._first[row], self._last[row], TCP_STATES[self.state_cells[row]],
        )  # fmt: skip

    def records(self) -> list[Flow]:
        """Every conversation, as `Flow`s (in no particular order)."""
        out = [self.record(row) for row in self._other_keys]
        rows = self.index.rows()
        if not rows.size:
            return out
        # IPv4 rows column by column: the endpoints from the keys, side a first.
        k1, k2 = self.k1[rows], self.k2[rows]
        lo_ip, hi_ip = (k1 >> np.uint64(32)).astype(np.uint32), (k1 & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        lo_port, hi_port = (k2 >> 24) & 0xFFFF, (k2 >> 8) & 0xFFFF
        a_lo = (self.bits[rows] & A_IS_LO) != 0
        a_raw = np.where(a_lo, lo_ip, hi_ip).astype(">u4").tobytes()
        b_raw = np.where(a_lo, hi_ip, lo_ip).astype(">u4").tobytes()
        a_macs, b_macs = self.a_mac[rows].tolist(), self.b_mac[rows].tolist()
        macs: dict[int, bytes | None] = {NO_MAC: None}
        for m in (*a_macs, *b_macs):
            if m not in macs:
                macs[m] = m.to_bytes(6, "big")
        states = TCP_STATES
        out += [
            Flow(proto, a_raw[4 * i : 4 * i + 4], a_port, b_raw[4 * i : 4 * i + 4], b_port, macs[am], macs[bm],
                 pab, bab, pba, bba, first, last, states[st])
            for i, (proto, a_port, b_port, am, bm, pab, bab, pba, bba, first, last, st) in enumerate(zip(
                (k2 & 0xFF).tolist(), np.where(a_lo, lo_port, hi_port).tolist(),
                np.where(a_lo, hi_port, lo_port).tolist(), a_macs, b_macs, self.packets_ab[rows].tolist(),
                self.bytes_ab[rows].tolist(), self.packets_ba[rows].tolist(), self.bytes_ba[rows].tolist(),
                self.first[rows].tolist(), self.last[rows].tolist(), self.state[rows].tolist(), strict=True,
            ))
        ]  # fmt: skip
        return out

    def _count(self, row: int, forward: bool, packets: int, nbytes: int, last: float) -> None:
        """Add frames sent by ``a`` (``forward``) or by ``b``."""
        if forward:
            self._pk_ab[row] += packets
            self._by_ab[row] += nbytes
        else:
            self._pk_ba[row] += packets
            self._by_ba[row] += nbytes
        self._last[row] = max(self._last[row], last)

    # ----------------------------------------------------------------------------------------- frames

    def segment(self, p: Packet, data: bytes, ts: float, wirelen: int, src: MacState | None) -> int | None:
        """Account for one decoded TCP or UDP segment (or IP fragment) of a conversation; the conversation's row,
        when the frame names one."""
        proto = p.proto
        if proto not in (PROTO_TCP, PROTO_UDP):
            return None
        assert p.src_ip is not None
        assert p.dst_ip is not None
        if p.fragment and not p.frag_first:
            self._later_fragment((p.src_ip, p.dst_ip, proto, p.frag_id), ts, wirelen)
            return None
        if p.sport < 0:
            return None
        sip, sport, dip, dport = p.src_ip, p.sport, p.dst_ip, p.dport
        src_lo = (sip, sport) <= (dip, dport)
        key = self.key(proto, sip, sport, dip, dport, src_lo)
        row = self.get(key)
        flags = p.tcp_flags
        if row is None:
            row = self.create(
                key, proto, sip, sport, dip, dport, p.src_mac, p.dst_mac, flags, ts, src_lo=src_lo
            )
        forward = src_lo == bool(self._bits[row] & A_IS_LO)
        self._count(row, forward, 1, wirelen, ts)
        if p.fragment:
            fid = (sip, dip, proto, p.frag_id)
            if len(self._frags) >= self.settings.max_fragments:
                self._frags.popitem(last=False)
            self._frags[fid] = (key, forward)
            early = self._frag_pending.pop(fid, None)
            if early is not None:
                self._count(row, forward, early[0], early[1], early[2])
        if proto == PROTO_TCP:
            if flags & (TCP_SYN | TCP_FIN | TCP_RST):
                self.control(row, forward, flags, src, sip, sport, ts)
            if p.payload_len:
                payload = data[p.payload_off : p.payload_off + p.payload_len]
                if forward and not self._bits[row] & HELLO_CHECKED:
                    self.inspect_hello(row, src, payload)
                if row in self.logins:
                    self.follow_login(row, forward, payload, ts)
        else:
            if not forward and not self._bits[row] & B_SEEN:
                self.first_reply(row, src, sip, ts)
            if p.payload_len and (sport in DISCOVERY_PORTS or dport in DISCOVERY_PORTS) and src is not None:
                payload = data[p.payload_off : p.payload_off + p.payload_len]
                self._discovery.datagram(sport, dport, sip, payload, src, ts)
        return row

    def _later_fragment(self, fid: tuple[bytes, bytes, int, int], ts: float, wirelen: int) -> None:
        """A fragment after the first: counted for the conversation its first fragment named."""
        got = self._frags.get(fid)
        if got is None:
            # A fragment ahead of the one with the transport header: held until that one names the flow.
            pending = self._frag_pending.get(fid)
            if pending is None:
                if len(self._frag_pending) >= self.settings.max_fragments:
                    self._frag_pending.popitem(last=False)
                pending = self._frag_pending[fid] = [0, 0, ts]
            pending[0] += 1
            pending[1] += wirelen
            pending[2] = max(pending[2], ts)
            return
        fkey, forward = got
        row = self.get(fkey)
        if row is not None:
            self._count(row, forward, 1, wirelen, ts)

    def create(
        self,
        key: FlowKey,
        proto: int,
        sip: bytes,
        sport: int,
        dip: bytes,
        dport: int,
        smac: bytes | None,
        dmac: bytes | None,
        flags: int,
        ts: float,
        *,
        src_lo: bool,
    ) -> int:
        """A conversation seen for the first time, on a frame from ``sip:sport`` to ``dip:dport`` with the key
        `key` makes of them; its row."""
        if self.index.count + len(self.flows) >= self.settings.max_flows:
            self._evict(ts)
        if len(key) != 2:
            # An IPv6 key holds its addresses: a leaf's, or a server's, recurs in many conversations.
            addresses = self._addresses
            if len(addresses) >= self._address_cap:
                addresses.clear()
            sip = addresses.setdefault(sip, sip)
            dip = addresses.setdefault(dip, dip)
            key = (proto, sip, sport, dip, dport) if src_lo else (proto, dip, dport, sip, sport)
        responder_first = proto == PROTO_TCP and flags & TCP_SYN and flags & TCP_ACK
        if responder_first:
            # Capture started between SYN and SYN-ACK: the SYN-ACK's receiver is the initiator.
            a_ip, a_port, b_ip, b_port, a_mac, b_mac = dip, dport, sip, sport, dmac, smac
        else:
            a_ip, a_port, b_ip, b_port, a_mac, b_mac = sip, sport, dip, dport, smac, dmac
        row = self._take_row()
        self._pk_ab[row] = self._pk_ba[row] = self._by_ab[row] = self._by_ba[row] = 0
        self._first[row] = self._last[row] = ts
        self._a_mac[row] = int.from_bytes(a_mac, "big") if a_mac is not None else NO_MAC
        self._b_mac[row] = int.from_bytes(b_mac, "big") if b_mac is not None else NO_MAC
        bits = A_IS_LO if (a_ip, a_port) <= (b_ip, b_port) else 0
        if proto == PROTO_TCP:
            state = "S0" if flags & TCP_SYN and not flags & TCP_ACK else "EST" if responder_first else "OTHER"
            self.state_cells[row] = STATE_CODE[state]
            if state == "S0":
                self._evidence.append(SynSent(ts, sip, dip, PORT_NUMBERS[dport], self._inventory_mac(smac)))
            proto_name = LOGIN_PORTS.get(b_port)
            if proto_name is not None:
                self.logins[row] = _Login(LoginTracker(proto_name))
                bits |= SLOW
        else:
            self.state_cells[row] = 0
        if self._inventory.learning:
            leaf = self._inventory.leaf_mac_for(a_ip, a_mac)
            if leaf is not None:
                protocol = "tcp" if proto == PROTO_TCP else "udp"
                self._evidence.append(ConversationOpened(ts, leaf, b_ip, PORT_NUMBERS[b_port], protocol))
        if len(key) == 2:
            k1, k2 = key
            self._k1[row], self._k2[row] = k1, k2
            self._bits[row] = bits
            self.index.add(row, k1, k2)
        else:
            self._bits[row] = bits | NOT_V4
            self.flows[key] = row
            self._other_keys[row] = key
        self.order.admit(row)
        if self._observations.enabled:
            self._observations.connection(
                ts, proto, (a_ip, a_port, a_mac), (b_ip, b_port, b_mac), TCP_STATES[self.state_cells[row]]
            )
        return row

    def _take_row(self) -> int:
        if self._free:
            return self._free.pop()
        self._made += 1
        return self._made - 1

    def _inventory_mac(self, mac: bytes | None) -> bytes | None:
        """The MAC as the inventory holds it, when it does (one bytes object per MAC in the evidence)."""
        if mac is not None and (st := self._inventory.macs.get(mac)) is not None:
            return st.mac
        return mac

    def _evict(self, now: float) -> None:
        row = self.order.victim(now, self.settings.idle_flow_s)
        if self._bits[row] & NOT_V4:
            del self.flows[self._other_keys.pop(row)]
        else:
            self.index.remove(row)
        self.logins.pop(row, None)
        self._gen[row] = (self._gen[row] + 1) & 0xFFFFFFFF
        self._free.append(row)
        self.stats.evicted_flows += 1

    def follow_login(self, row: int, forward: bool, payload: bytes, ts: float) -> None:
        """Feed one segment's payload to the conversation's login tracker (it has one)."""
        followed = self.logins[row]
        login = followed.tracker
        followed.budget -= len(payload)
        outcomes = login.feed(forward, payload)
        if outcomes:
            flow = self.record(row)
            for outcome in outcomes:
                self._observations.login(flow, login.protocol, outcome, ts)
                inv = self._inventory
                leaf = inv.leaf_mac_for(flow.a_ip, flow.a_mac) or inv.leaf_mac_for(flow.b_ip, flow.b_mac)
                self._evidence.append(
                    LoginResult(
                        ts, leaf, login.protocol, flow.a_ip, flow.b_ip, flow.b_port, outcome.user or "",
                        outcome.result,
                    )
                )  # fmt: skip
        if login.finished or followed.budget <= 0:
            # Nothing more to follow: release the tracker's buffers; the conversation is settled.
            del self.logins[row]
            self._bits[row] &= ~SLOW

    def control(
        self,
        row: int,
        forward: bool,
        flags: int,
        src: MacState | None,
        src_ip: bytes | None,
        sport: int,
        ts: float,
    ) -> None:
        """The state change a SYN, FIN or RST makes (and the service a SYN-ACK reveals)."""
        st = self.state_cells
        st[row] = NEXT_STATE[(st[row] << 9) | (forward << 8) | flags]
        # A router forwarding a remote server's answer is not offering that service.
        if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) and not forward:
            self.syn_ack_service(src, src_ip, sport, ts)

    def syn_ack_service(self, src: MacState | None, src_ip: bytes | None, sport: int, ts: float) -> None:
        """A responder's SYN-ACK: its port is a service of the sender, when the sender is on the leaf side."""
        if src is not None and src_ip is not None and self._inventory.is_leaf_ip(src_ip):
            self._inventory.add_service(src, "tcp", sport, ts)

    def inspect_hello(self, row: int, src: MacState | None, payload: bytes) -> None:
        """The initiator's first payload: a TLS ClientHello names the server (SNI) and the offered versions."""
        self.apply_hello(row, src, deep.tls_client_hello(payload) if src is not None else None)

    def apply_hello(self, row: int, src: MacState | None, hello: deep.ClientHello | None) -> None:
        """`inspect_hello` with the payload already parsed (``None``: it is not a ClientHello)."""
        self._bits[row] |= HELLO_CHECKED
        if src is not None and hello is not None:
            if hello.sni:
                self._inventory.add_name(src.own_details().own_tls_sni(), hello.sni)
            for v in hello.versions:
                src.own_details().own_tls_versions()[v] = None

    def generation(self, row: int) -> int:
        """How many times ``row`` was given up so far (see `gen`)."""
        return int(self._gen[row])

    def hello_checked(self, row: int) -> bool:
        return bool(self._bits[row] & HELLO_CHECKED)

    def b_seen(self, row: int) -> bool:
        return bool(self._bits[row] & B_SEEN)

    def first_reply(self, row: int, src: MacState | None, sender_ip: bytes, ts: float) -> None:
        """The responder's first UDP datagram: its port is a service, unless the flow was first seen mid-way
        (a well-known port talking to an ephemeral one: the "responder" is really the client)."""
        self._bits[row] |= B_SEEN
        if src is None:
            return
        _, _, a_port, _, b_port = self.endpoints(row)
        if not (a_port < 1024 <= b_port) and self._inventory.is_leaf_ip(sender_ip):
            self._inventory.add_service(src, "udp", b_port, ts)
