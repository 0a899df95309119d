"""The conversation table: TCP and UDP conversations, IP fragments, TCP control, and what a conversation's first
segments reveal (services, TLS ClientHellos, login exchanges); and the observations made of them.

One table (5-tuple -> `Flow`), capped (`observe.eviction` chooses what a full table gives up), indexed a second
time by the IPv4 key the bulk step groups frames by (`flows4`). Both halves of the core go through it: the
per-frame path with `segment`, the bulk step (`observe.fastpath`) with `create`, `tcp_control`, `apply_hello`,
`first_reply` and `follow_login`, so a conversation changes the same way whichever path its frames take.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from operator import attrgetter
from typing import Any

from leafguard.decode import deep
from leafguard.decode.frames import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Packet
from leafguard.decode.login import LOGIN_PORTS, LoginOutcome, LoginTracker
from leafguard.detect.evidence import ConversationOpened, Evidence, LoginResult, SynSent
from leafguard.observe.addresses import ip_text, mac_text
from leafguard.observe.discovery import PORTS as DISCOVERY_PORTS
from leafguard.observe.discovery import Discovery
from leafguard.observe.eviction import EvictionQueue
from leafguard.observe.inventory import LeafInventory
from leafguard.observe.model import ConnectionSeen, Direction, LoginSeen, Observation
from leafguard.observe.settings import AnalyzerSettings
from leafguard.observe.state import CaptureStats, Flow, MacState, tcp_next_state

LOGIN_BUDGET_BYTES = 8192
"""Payload bytes of a login-port conversation inspected before it joins the fast path."""
MAX_PENDING_OBSERVATIONS = 100_000

FlowKey = tuple[int, bytes, int, bytes, int]
"""The protocol, then the lower (address, port) endpoint, then the other."""

ADDRESS_CACHE = 65_536
"""Addresses kept to be shared by the conversations that use them; a scan of random addresses only refills it."""
_PORT_NUMBERS = list(range(65536))
"""Every port number as one int object (2 MB once), shared by the conversations that use it."""

_flow_first_seen = attrgetter("first")
_flow_last_seen = attrgetter("last")


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

    def _leaf_sides(self, flow: Flow) -> Iterator[tuple[str, Direction, str, int, str, int]]:
        """Each side of a conversation that is a leaf: (MAC, direction, local address and port, remote ones)."""
        sides: tuple[tuple[bytes, int, bytes | None, bytes, int, Direction], ...] = (
            (flow.a_ip, flow.a_port, flow.a_mac, flow.b_ip, flow.b_port, "Out"),
            (flow.b_ip, flow.b_port, flow.b_mac, flow.a_ip, flow.a_port, "In"),
        )
        for leaf_ip, leaf_port, leaf_mac, peer_ip, peer_port, direction in sides:
            mac = self._inventory.leaf_mac_for(leaf_ip, leaf_mac)
            if mac is not None:
                yield mac_text(mac), direction, ip_text(leaf_ip), leaf_port, ip_text(peer_ip), peer_port

    def connection(self, flow: Flow, ts: float) -> None:
        """A new conversation, for each side of it that is a leaf."""
        proto = "tcp" if flow.proto == PROTO_TCP else "udp"
        for mac, direction, local_addr, local_port, remote_addr, remote_port in self._leaf_sides(flow):
            self._emit(
                ConnectionSeen(
                    ts=ts,
                    leaf_mac=mac,
                    direction=direction,
                    protocol="tcp" if proto == "tcp" else "udp",
                    local_addr=local_addr,
                    local_port=local_port,
                    remote_addr=remote_addr,
                    remote_port=remote_port,
                    tcp_state=flow.state or "",
                    bytes_seen=flow.bytes_ab + flow.bytes_ba,
                )
            )

    def login(self, flow: Flow, protocol: Any, outcome: LoginOutcome, ts: float) -> None:
        """A login exchange's outcome on a conversation, for each side of it that is a leaf."""
        if not self.enabled:
            return
        for mac, direction, local_addr, local_port, remote_addr, remote_port in self._leaf_sides(flow):
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


class ConversationTable:
    """The conversations, their fragments and TCP state."""

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
        self.flows: dict[FlowKey, Flow] = {}
        self.flows4: dict[tuple[int, int], Flow] = {}
        """The IPv4 conversations again, keyed as the bulk step groups frames (see `fastpath.plan_batch`)."""
        self.order: EvictionQueue[Flow] = EvictionQueue(_flow_last_seen, _flow_first_seen)
        """The order in which the table gives up entries when full (`observe.eviction`)."""
        # Fragment tables forget their oldest entry when full, in O(1) (a dict's next(iter()) is not: it first skips
        # every slot deleted since its last resize).
        self._addresses: dict[bytes, bytes] = {}
        """Addresses seen in new conversations, each as one bytes object the conversations share (bounded)."""
        self._address_cap = min(ADDRESS_CACHE, settings.max_flows)
        self._frags: OrderedDict[tuple[bytes, bytes, int, int], tuple[FlowKey, bool]] = OrderedDict()
        self._frag_pending: OrderedDict[tuple[bytes, bytes, int, int], list[Any]] = OrderedDict()

    def segment(self, p: Packet, data: bytes, ts: float, wirelen: int, src: MacState | None) -> Flow | None:
        """Account for one decoded TCP or UDP segment (or IP fragment) of a conversation; the conversation, when
        the frame names one."""
        proto = p.proto
        if proto not in (PROTO_TCP, PROTO_UDP):
            return None
        assert p.src_ip is not None
        assert p.dst_ip is not None
        if p.fragment and not p.frag_first:
            fid = (p.src_ip, p.dst_ip, proto, p.frag_id)
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
                return None
            fkey, forward = got
            frag_flow = self.flows.get(fkey)
            if frag_flow is None:
                return None
            frag_flow.count(forward, 1, wirelen, ts)
            return None
        if p.sport < 0:
            return None
        sip, sport, dip, dport = p.src_ip, p.sport, p.dst_ip, p.dport
        if (sip, sport) <= (dip, dport):
            key = (proto, sip, sport, dip, dport)
        else:
            key = (proto, dip, dport, sip, sport)
        flow = self.flows.get(key)
        flags = p.tcp_flags
        if flow is None:
            flow = self._new_flow(key, p, ts)
        forward = flow.a_ip == sip and flow.a_port == sport
        flow.count(forward, 1, wirelen, ts)
        if p.fragment:
            fid = (sip, dip, proto, p.frag_id)
            if len(self._frags) >= self.settings.max_fragments:
                self._frags.popitem(last=False)
            self._frags[fid] = (key, forward)
            early = self._frag_pending.pop(fid, None)
            if early is not None:
                flow.count(forward, early[0], early[1], early[2])
        if proto == PROTO_TCP:
            self._tcp(flow, forward, flags, p, data, ts, src)
        else:
            if not forward and not flow.b_seen:
                self.first_reply(flow, src, sip, ts)
            if p.payload_len and (sport in DISCOVERY_PORTS or dport in DISCOVERY_PORTS) and src is not None:
                payload = data[p.payload_off : p.payload_off + p.payload_len]
                self._discovery.datagram(sport, dport, sip, payload, src, ts)
        return flow

    def _new_flow(self, key: tuple[int, bytes, int, bytes, int], p: Packet, ts: float) -> Flow:
        assert p.src_ip is not None
        assert p.dst_ip is not None
        return self.create(
            key, p.proto, p.src_ip, p.sport, p.dst_ip, p.dport, p.src_mac, p.dst_mac, p.tcp_flags, ts
        )

    def create(
        self,
        key: tuple[int, bytes, int, bytes, int],
        proto: int,
        sip: bytes,
        sport: int,
        dip: bytes,
        dport: int,
        smac: bytes | None,
        dmac: bytes | None,
        flags: int,
        ts: float,
        nkey: tuple[int, int] | None = None,
    ) -> Flow:
        """A conversation seen for the first time, on a frame from ``sip:sport`` to ``dip:dport`` (``nkey``: the
        IPv4 key as `flows4` has it, when the caller has it already)."""
        if len(self.flows) >= self.settings.max_flows:
            self._evict(ts)
        # Ports above 256 are an int object each: one shared object per port number instead of two per conversation.
        sport, dport = _PORT_NUMBERS[sport], _PORT_NUMBERS[dport]
        # Likewise the addresses: a leaf's, or a server's, recurs in many conversations.
        addresses = self._addresses
        if len(addresses) >= self._address_cap:
            addresses.clear()
        sip = addresses.setdefault(sip, sip)
        dip = addresses.setdefault(dip, dip)
        lo_ip, hi_ip = (sip, dip) if key[1] == sip else (dip, sip)
        key = (key[0], lo_ip, _PORT_NUMBERS[key[2]], hi_ip, _PORT_NUMBERS[key[4]])
        # The MACs as the inventory holds them, when it does: one bytes object per MAC, not two per conversation.
        macs = self._inventory.macs
        if smac is not None and (st := macs.get(smac)) is not None:
            smac = st.mac
        if dmac is not None and (st := macs.get(dmac)) is not None:
            dmac = st.mac
        responder_first = proto == PROTO_TCP and flags & TCP_SYN and flags & TCP_ACK
        if responder_first:
            # Capture started between SYN and SYN-ACK: the SYN-ACK's receiver is the initiator.
            flow = Flow(proto, dip, dport, sip, sport, dmac, smac, ts)
        else:
            flow = Flow(proto, sip, sport, dip, dport, smac, dmac, ts)
        if proto == PROTO_TCP:
            flow.state = "S0" if flags & TCP_SYN and not flags & TCP_ACK else "EST" if responder_first else "OTHER"
            if flow.state == "S0":
                self._evidence.append(SynSent(ts, sip, dip, dport, smac))
            proto_name = LOGIN_PORTS.get(flow.b_port)
            if proto_name is not None:
                flow.login = LoginTracker(proto_name)
                flow.login_budget = LOGIN_BUDGET_BYTES
        flow.slow = flow.login is not None
        flow.a_is_lo = flow.a_ip == key[1] and flow.a_port == key[2]
        if self._inventory.learning:
            leaf = self._inventory.leaf_mac_for(flow.a_ip, flow.a_mac)
            if leaf is not None:
                protocol = "tcp" if proto == PROTO_TCP else "udp"
                self._evidence.append(ConversationOpened(ts, leaf, flow.b_ip, flow.b_port, protocol))
        if len(sip) == 4:
            if nkey is None:
                lo = int.from_bytes(key[1], "big")
                hi = int.from_bytes(key[3], "big")
                nkey = ((lo << 32) | hi, (key[2] << 24) | (key[4] << 8) | proto)
            flow.nkey = nkey
            self.flows4[nkey] = flow
        self.flows[key] = flow
        self.order.admit(flow)
        if self._observations.enabled:
            self._observations.connection(flow, ts)
        return flow

    def _evict(self, now: float) -> None:
        f = self.order.victim(now, self.settings.idle_flow_s)
        del self.flows[f.key()]
        if f.nkey is not None:
            self.flows4.pop(f.nkey, None)
        self.stats.evicted_flows += 1

    def _tcp(
        self, flow: Flow, forward: bool, flags: int, p: Packet, data: bytes, ts: float, src: MacState | None
    ) -> None:
        if flags & (TCP_SYN | TCP_FIN | TCP_RST):
            self.tcp_control(flow, forward, flags, src, p.src_ip, p.sport, ts)
        if p.payload_len:
            payload = data[p.payload_off : p.payload_off + p.payload_len]
            if forward and not flow.hello_checked:
                self.inspect_hello(flow, src, payload)
            if flow.login is not None:
                self.follow_login(flow, forward, payload, ts)
        flow.slow = flow.login is not None

    def follow_login(self, flow: Flow, forward: bool, payload: bytes, ts: float) -> None:
        """Feed one segment's payload to the conversation's login tracker (it is not None)."""
        login = flow.login
        assert login is not None
        flow.login_budget -= len(payload)
        for outcome in login.feed(forward, payload):
            self._observations.login(flow, login.protocol, outcome, ts)
            inv = self._inventory
            leaf = inv.leaf_mac_for(flow.a_ip, flow.a_mac) or inv.leaf_mac_for(flow.b_ip, flow.b_mac)
            self._evidence.append(
                LoginResult(
                    ts, leaf, login.protocol, flow.a_ip, flow.b_ip, flow.b_port, outcome.user or "", outcome.result
                )
            )
        if login.finished or flow.login_budget <= 0:
            # Nothing more to follow: release the tracker's buffers.
            flow.login = None
            flow.login_budget = 0

    def tcp_control(
        self,
        flow: Flow,
        forward: bool,
        flags: int,
        src: MacState | None,
        src_ip: bytes | None,
        sport: int,
        ts: float,
    ) -> None:
        """The state change a SYN, FIN or RST makes (and the service a SYN-ACK reveals)."""
        assert flow.state is not None
        flow.state = tcp_next_state(flow.state, forward, flags)
        # A router forwarding a remote server's answer is not offering that service.
        if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) and not forward:
            self.syn_ack_service(src, src_ip, sport, ts)

    def syn_ack_service(self, src: MacState | None, src_ip: bytes | None, sport: int, ts: float) -> None:
        """A responder's SYN-ACK: its port is a service of the sender, when the sender is on the leaf side."""
        if src is not None and src_ip is not None and self._inventory.is_leaf_ip(src_ip):
            self._inventory.add_service(src, "tcp", sport, ts)

    def inspect_hello(self, flow: Flow, src: MacState | None, payload: bytes) -> None:
        """The initiator's first payload: a TLS ClientHello names the server (SNI) and the offered versions."""
        self.apply_hello(flow, src, deep.tls_client_hello(payload) if src is not None else None)

    def apply_hello(self, flow: Flow, src: MacState | None, hello: deep.ClientHello | None) -> None:
        """`inspect_hello` with the payload already parsed (``None``: it is not a ClientHello)."""
        flow.hello_checked = True
        if src is not None and hello is not None:
            if hello.sni:
                self._inventory.add_name(src.tls_sni, hello.sni)
            for v in hello.versions:
                src.tls_versions[v] = None

    def first_reply(self, flow: Flow, src: MacState | None, sender_ip: bytes, ts: float) -> None:
        """The responder's first UDP datagram: its port is a service, unless the flow was first seen mid-way
        (a well-known port talking to an ephemeral one: the "responder" is really the client)."""
        flow.b_seen = True
        if src is not None and not (flow.a_port < 1024 <= flow.b_port) and self._inventory.is_leaf_ip(sender_ip):
            self._inventory.add_service(src, "udp", flow.b_port, ts)
