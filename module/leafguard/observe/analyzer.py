"""The observation core: frames in, leaves, conversations and observations out.

Pure and synchronous: `Analyzer.feed` takes a `FrameBatch` and updates bounded state; packet time is the only
clock. Frames that can change state (handshakes, teardown, first payloads, discovery protocols, ARP, DHCP,
fragments, anything unusual) are walked one by one; the bulk of a busy capture, mid-flow TCP and UDP
frames of conversations that are already settled, is counted per batch with numpy (see `_fastpath`).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator
from operator import attrgetter
from typing import Any

from leafguard.capture.batch import LINKTYPE_NAMES, FrameBatch
from leafguard.decode import deep
from leafguard.decode.frames import (
    ETH_ARP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Packet,
    decode,
)
from leafguard.decode.login import LOGIN_PORTS, LoginOutcome, LoginTracker
from leafguard.detect import detectors as det
from leafguard.detect.attacks import AttackDetectors
from leafguard.detect.floods import FLOOD_WINDOW_S, FloodTracker
from leafguard.detect.sends import SendLog
from leafguard.detect.silence import SilenceTracker
from leafguard.detect.thresholds import Thresholds
from leafguard.errors import ConfigurationError
from leafguard.observe import fastpath
from leafguard.observe.addresses import ZERO_V4, ZERO_V6, ip_text, is_unicast_mac, mac_text
from leafguard.observe.discovery import PORTS as DISCOVERY_PORTS
from leafguard.observe.discovery import Discovery
from leafguard.observe.eviction import EvictionQueue
from leafguard.observe.inventory import LeafInventory
from leafguard.observe.model import ConnectionSeen, Direction, LeafView, LoginSeen, Observation
from leafguard.observe.report import capture_json, conversation_rows, leaf_json, leaf_view
from leafguard.observe.settings import AnalyzerSettings, Network
from leafguard.observe.state import CaptureStats, Flow, MacState, tcp_next_state

LOGIN_BUDGET_BYTES = 8192
"""Payload bytes of a login-port conversation inspected before it joins the fast path."""
MAX_PENDING_OBSERVATIONS = 100_000



class Analyzer:
    """Bounded passive inventory of leaves and conversations."""

    def __init__(
        self, settings: AnalyzerSettings | None = None, *, fast_path: bool = True, observations: bool = True
    ) -> None:
        """``observations=False`` when nobody consumes them (a report-only run): they are then not built."""
        self.settings = settings or AnalyzerSettings()
        self._observe = observations
        self.stats = CaptureStats()
        self._evidence: list[det.Evidence] = []
        """The batch's evidence for the detectors (the inventory adds to it too); emptied after every batch."""
        self.inventory = LeafInventory(self.settings, self.stats, self._evidence)
        self.discovery = Discovery(self.inventory, self._evidence)
        self.flows: dict[tuple[int, bytes, int, bytes, int], Flow] = {}
        self.flows4: dict[tuple[int, int], Flow] = {}
        """The IPv4 conversations again, keyed as the bulk step groups frames (see `fastpath.plan_batch`)."""
        self.flow_order: EvictionQueue[Flow] = EvictionQueue(_flow_last_seen, _flow_first_seen)
        """The order in which the table gives up entries when full (`observe.eviction`)."""
        self._frags: dict[tuple[bytes, bytes, int, int], tuple[tuple[int, bytes, int, bytes, int], bool]] = {}
        self._frag_pending: dict[tuple[bytes, bytes, int, int], list[Any]] = {}
        self.detectors = det.Detectors(self.settings.learning_period_s, self.settings.thresholds)
        self.silence: SilenceTracker | None = None
        self.floods: FloodTracker | None = None
        self.received_floods: FloodTracker | None = None
        self.sends: SendLog | None = None
        """Send times per MAC, when silences or floods are watched (the bulk step feeds it too)."""
        self.receives: SendLog | None = None
        """Receive times per unicast destination MAC, when floods are watched."""
        self._watch_time(self.settings)
        self._observations: deque[Observation] = deque(maxlen=MAX_PENDING_OBSERVATIONS)
        self.attacks = AttackDetectors(
            self.settings.thresholds, self.detectors.raise_alert, leaf_nets=self.settings.leaf_nets,
            gateway_macs=self.inventory.gateway, max_tracked=min(self.settings.max_flows, 65_536),
        )  # fmt: skip
        """Scans without SYNs, sweeps, connection brute force, impersonation: they read the batch themselves."""
        self._fast = fast_path
        self.now: float | None = None

    # ----------------------------------------------------------------------------------------- input

    def add_file(self, path: str) -> None:
        self.stats.files.append(path)

    def feed(self, batch: FrameBatch) -> None:
        """Account for every frame of ``batch``."""
        n = len(batch)
        if not n:
            return
        st = self.stats
        st.link_types[LINKTYPE_NAMES.get(batch.linktype, str(batch.linktype))] = None
        st.packets += n
        st.bytes += sum(batch.wirelens)
        ts = batch.timestamps
        lo = min(ts)
        hi = max(ts)
        if st.first_ts is None or lo < st.first_ts:
            st.first_ts = lo
        if st.last_ts is None or hi > st.last_ts:
            st.last_ts = hi
        self.now = ts[-1]
        self.attacks.feed(batch)
        data = batch.data
        offsets = batch.offsets
        caplens = batch.caplens
        wirelens = batch.wirelens
        linktype = batch.linktype
        plan = fastpath.plan_batch(self, batch) if self._fast and n >= 64 and linktype == 1 else None
        if plan is None:
            for i in range(n):
                self.frame(decode(data, offsets[i], caplens[i], linktype), data, ts[i], wirelens[i])
            self._detect()
            return
        fastpath.create_new(self, batch, plan)
        # Walk, in order, what the plan left to the per-frame path. A frame of a conversation that settles during
        # the walk (nothing left to inspect but deep datagrams) is deferred to the bulk step from then on.
        frame_key = plan.frame_key
        settled = plan.settled
        known = plan.known
        bare = plan.bare
        deep = plan.deep
        uflows = plan.uflows
        deferred: list[int] = []
        for i in plan.walk:
            u = frame_key[i]
            if u >= 0:
                if deep[i]:
                    # Counted in bulk; only its payload is read here, in order with the frames walked around it.
                    self.discovery.frame(data, offsets[i], caplens[i], ts[i])
                    continue
                if settled[u] or (bare[i] and known[u]):
                    deferred.append(i)
                    continue
            # A candidate's MACs and source address are counted in bulk with the rest of the batch.
            flow = self.frame(
                decode(data, offsets[i], caplens[i], linktype), data, ts[i], wirelens[i], macs_counted=u >= 0
            )
            if u >= 0 and flow is not None:
                known[u] = True
                uflows[u] = flow
                if not flow.slow:
                    settled[u] = True
        fastpath.count_settled(self, batch, plan, deferred)
        self._detect()

    def _detect(self) -> None:
        """Hand the batch's evidence to the detectors, in packet-time order."""
        if self.inventory.learning and self.detectors.learning_started is None:
            self.detectors.learning_started = self.stats.first_ts
        self.inventory.batch_evidence()
        if self.sends is not None:
            sends = self.sends.take()
            if self.silence is not None:
                found = self.silence.batch(sends) if sends is not None else []
                if self.stats.last_ts is not None:
                    found += self.silence.silent_now(self.stats.last_ts)
                self._silent_leaves(found)
            if self.floods is not None and sends is not None:
                self._floods(self.floods, self.floods.batch(sends), "sent")
        if self.receives is not None and self.received_floods is not None:
            receives = self.receives.take()
            if receives is not None:
                self._floods(self.received_floods, self.received_floods.batch(receives), "received")
        self._hand_over()

    def _hand_over(self) -> None:
        if self._evidence:
            evidence = self._evidence[:]
            self._evidence.clear()  # the same list: the inventory holds it
            self.detectors.process(evidence)

    def set_detection(self, **changes: float | None) -> AnalyzerSettings:
        """New detection settings (``learning_period_s``, ``silent_after_s``, ``flood_rate_per_s``, and the
        fields of `Thresholds`) while running: validated as a whole first (ConfigurationError, and nothing
        changes); a watch that changes starts afresh. Returns the settings now in force."""
        limits = {k: v for k, v in changes.items() if k in _THRESHOLD_FIELDS}
        rest = {k: v for k, v in changes.items() if k not in _THRESHOLD_FIELDS}
        if any(v is None for v in limits.values()):
            raise ConfigurationError("a detection threshold cannot be turned off (null); give a number")
        thresholds = self.settings.thresholds.replace(**limits) if limits else self.settings.thresholds  # type: ignore[arg-type]
        new = dataclasses.replace(self.settings, thresholds=thresholds, **rest)  # type: ignore[arg-type]
        old, self.settings = self.settings, new
        if new.thresholds != old.thresholds:
            self.detectors.thresholds = new.thresholds
            self.attacks.set_thresholds(new.thresholds)
        if new.learning_period_s != old.learning_period_s:
            self.detectors.learning_period_s = new.learning_period_s
            self.inventory.set_learning(new.learning_period_s is not None)
        if (new.silent_after_s, new.flood_rate_per_s) != (old.silent_after_s, old.flood_rate_per_s):
            self._watch_time(new, old)
        return new

    def set_network(self, leaf_nets: tuple[Network, ...], gateway_macs: frozenset[str]) -> AnalyzerSettings:
        """A new leaf side and set of gateway MACs while running (gateway settings): validated first
        (ConfigurationError, and nothing changes); in force for the frames analysed from now on (a MAC already
        seen keeps the side it was seen on, a gateway MAC stops counting as a leaf at once)."""
        new = dataclasses.replace(self.settings, leaf_nets=leaf_nets, gateway_macs=gateway_macs)
        self.settings = new
        self.inventory.set_network(new)
        self.attacks.set_network(new.leaf_nets, self.inventory.gateway)
        return new

    def _watch_time(self, new: AnalyzerSettings, old: AnalyzerSettings | None = None) -> None:
        """The trackers that watch rates over time, as ``new`` asks (those ``old`` had alike are kept)."""
        if old is None or new.silent_after_s != old.silent_after_s:
            after = new.silent_after_s
            self.silence = SilenceTracker(after, new.max_macs) if after is not None else None
        if old is None or new.flood_rate_per_s != old.flood_rate_per_s:
            rate = new.flood_rate_per_s
            self.floods = FloodTracker(rate, new.max_macs) if rate is not None else None
            self.received_floods = FloodTracker(rate, new.max_macs) if rate is not None else None
        if self.silence is None and self.floods is None:
            self.sends = None
        elif self.sends is None:
            self.sends = SendLog()
        self.receives = (self.receives or SendLog()) if self.received_floods is not None else None

    def learn(self, mac: str | None = None) -> int:
        """Accept the current state into the baseline (of one leaf, or of all): the leaves known now, with the
        peers and services they use, join the baseline; the attack rules start counting afresh. Returns how
        many leaves were learned."""
        macs = [st.mac for st in self.leaves() if mac is None or mac_text(st.mac) == mac]
        self.detectors.learn(macs)
        if mac is None:
            self.attacks.learn()
        return len(macs)

    def finish(self) -> None:
        """The end of the input: what waits for time to pass is looked at once more, at the last packet time."""
        self.attacks.finish(self.stats.last_ts)
        if self.silence is not None and self.stats.last_ts is not None:
            self._silent_leaves(self.silence.silent_now(self.stats.last_ts, final=True))
            self._hand_over()

    def _floods(self, floods: FloodTracker, found: list[tuple[int, float, float]], direction: str) -> None:
        for mac_i, ts, window_start in found:
            if (mac := self.inventory.leaf_of(mac_i)) is not None:
                found_flood = (mac, floods.threshold, window_start, FLOOD_WINDOW_S, floods.rate_per_s, direction)
                self._evidence.append((ts, det.FLOOD, found_flood))

    def _silent_leaves(self, found: list[tuple[int, float]]) -> None:
        assert self.silence is not None
        after = self.silence.silent_after_s
        for mac_i, start in found:
            if (mac := self.inventory.leaf_of(mac_i)) is not None:
                self._evidence.append((start + after, det.SILENT, (mac, start, after)))

    def frame(self, p: Packet, data: bytes, ts: float, wirelen: int, *, macs_counted: bool = False) -> Flow | None:
        """Account for one decoded frame (its bytes are ``data``, the batch buffer); ``macs_counted``: its MAC
        counters and source address are taken care of by the bulk step."""
        if p.truncated:
            self.stats.truncated += 1
        elif p.malformed:
            self.stats.decode_errors += 1
        if macs_counted:
            assert p.src_mac is not None
            return self._conversation(p, data, ts, wirelen, self.inventory.touch(p.src_mac, ts))
        src = None
        if p.src_mac is not None:
            if self.sends is not None:
                self.sends.sent(p.src_mac, ts)
            src = self.inventory.touch(p.src_mac, ts)
            if src.packets_out == 0 or ts < src.first_seen:
                src.first_seen = ts
            src.packets_out += 1
            src.bytes_out += wirelen
            src.last_seen = max(src.last_seen, ts)
        dst_mac = p.dst_mac
        if dst_mac is not None and is_unicast_mac(dst_mac):
            if self.receives is not None:
                self.receives.sent(dst_mac, ts)
            dst = self.inventory.touch(dst_mac, ts)
            dst.packets_in += 1
            dst.bytes_in += wirelen
        if src is not None:
            own = None
            if p.ethertype == ETH_ARP:
                if p.arp_spa is not None and p.arp_sha == p.src_mac:
                    own = p.arp_spa
                    # A probe (sender 0.0.0.0, RFC 5227) and an announcement (sender == target) are a host
                    # checking and claiming its own address: neither asks for somebody else's.
                    if own != ZERO_V4:
                        self._evidence.append((ts, det.ARP_CLAIM, (own, src.mac)))
                        if p.arp_op == 1 and p.arp_tpa is not None and p.arp_tpa != own:
                            self._evidence.append((ts, det.ARP_ASK, (p.arp_tpa, src.mac)))
            elif p.src_ip is not None:
                own = p.src_ip
            if own is not None:
                self.inventory.learn_ip(src, own)
                # Bindings only from Ethernet: a cooked capture on "any" shows one packet per interface it
                # crossed, with different link addresses.
                if p.dst_mac is not None and own not in (ZERO_V4, ZERO_V6) and self.inventory.is_leaf_ip(own):
                    self.inventory.saw_address(own, src.mac, ts)
        if p.sport >= 0 or p.fragment:
            return self._conversation(p, data, ts, wirelen, src)
        return None

    # ----------------------------------------------------------------------------------------- state

    # ----------------------------------------------------------------------------------------- flows

    def _conversation(self, p: Packet, data: bytes, ts: float, wirelen: int, src: MacState | None) -> Flow | None:
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
                        self._frag_pending.pop(next(iter(self._frag_pending)))
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
                self._frags.pop(next(iter(self._frags)))
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
                self.discovery.datagram(sport, dport, sip, payload, src, ts)
        return flow

    def _new_flow(self, key: tuple[int, bytes, int, bytes, int], p: Packet, ts: float) -> Flow:
        assert p.src_ip is not None
        assert p.dst_ip is not None
        return self.create_flow(
            key, p.proto, p.src_ip, p.sport, p.dst_ip, p.dport, p.src_mac, p.dst_mac, p.tcp_flags, ts
        )

    def create_flow(
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
            self._evict_flow(ts)
        responder_first = proto == PROTO_TCP and flags & TCP_SYN and flags & TCP_ACK
        if responder_first:
            # Capture started between SYN and SYN-ACK: the SYN-ACK's receiver is the initiator.
            flow = Flow(proto, dip, dport, sip, sport, dmac, smac, ts)
        else:
            flow = Flow(proto, sip, sport, dip, dport, smac, dmac, ts)
        if proto == PROTO_TCP:
            flow.state = "S0" if flags & TCP_SYN and not flags & TCP_ACK else "EST" if responder_first else "OTHER"
            if flow.state == "S0":
                self._evidence.append((ts, det.SYN, (sip, dip, dport, smac)))
            proto_name = LOGIN_PORTS.get(flow.b_port)
            if proto_name is not None:
                flow.login = LoginTracker(proto_name)
                flow.login_budget = LOGIN_BUDGET_BYTES
        flow.slow = flow.login is not None
        flow.a_is_lo = flow.a_ip == key[1] and flow.a_port == key[2]
        if self.inventory.learning:
            leaf = self.inventory.leaf_mac_for(flow.a_ip, flow.a_mac)
            if leaf is not None:
                protocol = "tcp" if proto == PROTO_TCP else "udp"
                self._evidence.append((ts, det.CONVERSATION, (leaf, flow.b_ip, flow.b_port, protocol)))
        if len(sip) == 4:
            if nkey is None:
                lo = int.from_bytes(key[1], "big")
                hi = int.from_bytes(key[3], "big")
                nkey = ((lo << 32) | hi, (key[2] << 24) | (key[4] << 8) | proto)
            flow.nkey = nkey
            self.flows4[nkey] = flow
        self.flows[key] = flow
        self.flow_order.admit(flow)
        if self._observe:
            self._observe_connection(flow, "tcp" if proto == PROTO_TCP else "udp", ts)
        return flow

    def _evict_flow(self, now: float) -> None:
        f = self.flow_order.victim(now, self.settings.idle_flow_s)
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
            self._observe_login(flow, login.protocol, outcome, ts)
            inv = self.inventory
            leaf = inv.leaf_mac_for(flow.a_ip, flow.a_mac) or inv.leaf_mac_for(flow.b_ip, flow.b_mac)
            self._evidence.append(
                (
                    ts,
                    det.LOGIN,
                    (leaf, login.protocol, flow.a_ip, flow.b_ip, flow.b_port, outcome.user or "", outcome.result),
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
        if src is not None and src_ip is not None and self.inventory.is_leaf_ip(src_ip):
            self.inventory.add_service(src, "tcp", sport, ts)

    def inspect_hello(self, flow: Flow, src: MacState | None, payload: bytes) -> None:
        """The initiator's first payload: a TLS ClientHello names the server (SNI) and the offered versions."""
        self.apply_hello(flow, src, deep.tls_client_hello(payload) if src is not None else None)

    def apply_hello(self, flow: Flow, src: MacState | None, hello: deep.ClientHello | None) -> None:
        """`inspect_hello` with the payload already parsed (``None``: it is not a ClientHello)."""
        flow.hello_checked = True
        if src is not None and hello is not None:
            if hello.sni:
                self.inventory.add_name(src.tls_sni, hello.sni)
            for v in hello.versions:
                src.tls_versions[v] = None

    def first_reply(self, flow: Flow, src: MacState | None, sender_ip: bytes, ts: float) -> None:
        """The responder's first UDP datagram: its port is a service, unless the flow was first seen mid-way
        (a well-known port talking to an ephemeral one: the "responder" is really the client)."""
        flow.b_seen = True
        if src is not None and not (flow.a_port < 1024 <= flow.b_port) and self.inventory.is_leaf_ip(sender_ip):
            self.inventory.add_service(src, "udp", flow.b_port, ts)

    # ----------------------------------------------------------------------------------------- observations

    def _emit(self, obs: Observation) -> None:
        if len(self._observations) == MAX_PENDING_OBSERVATIONS:
            # Nobody is draining: the deque drops the oldest; memory stays bounded and the loss is counted.
            self.stats.observations_dropped += 1
        self._observations.append(obs)

    def _leaf_sides(self, flow: Flow) -> Iterator[tuple[str, Direction, str, int, str, int]]:
        """Each side of a conversation that is a leaf: (MAC, direction, local address and port, remote ones)."""
        sides: tuple[tuple[bytes, int, bytes | None, bytes, int, Direction], ...] = (
            (flow.a_ip, flow.a_port, flow.a_mac, flow.b_ip, flow.b_port, "Out"),
            (flow.b_ip, flow.b_port, flow.b_mac, flow.a_ip, flow.a_port, "In"),
        )
        for leaf_ip, leaf_port, leaf_mac, peer_ip, peer_port, direction in sides:
            mac = self.inventory.leaf_mac_for(leaf_ip, leaf_mac)
            if mac is not None:
                yield mac_text(mac), direction, ip_text(leaf_ip), leaf_port, ip_text(peer_ip), peer_port

    def _observe_connection(self, flow: Flow, proto: str, ts: float) -> None:
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

    def _observe_login(self, flow: Flow, protocol: Any, outcome: LoginOutcome, ts: float) -> None:
        if not self._observe:
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

    def drain_observations(self) -> list[Observation]:
        """Observations since the last call, in packet order (the bulk step makes some after the walk)."""
        out = sorted(self._observations, key=_obs_time)
        self._observations.clear()
        return out

    # ----------------------------------------------------------------------------------------- output

    @property
    def macs(self) -> dict[bytes, MacState]:
        """The MAC table (`inventory`'s)."""
        return self.inventory.macs

    def is_leaf(self, st: MacState) -> bool:
        return self.inventory.is_leaf(st)

    def leaves(self) -> list[MacState]:
        return self.inventory.leaves()

    def leaf_views(self) -> list[LeafView]:
        return [leaf_view(st) for st in self.leaves()]

    def iter_conversations(self) -> Iterator[dict[str, Any]]:
        """Conversations in report order (first seen, then 5-tuple), built one at a time."""
        return conversation_rows(self.flows.values())

    def capture_report(self) -> dict[str, Any]:
        d = self.detectors
        return capture_json(self.stats, alerts_dropped=d.dropped_alerts, alerts_suppressed=d.suppressed_alerts)

    def leaf_report(self, mac: str) -> dict[str, Any] | None:
        """One leaf's entry of :meth:`report` (``mac`` as ``aa:bb:..``), or None when it is no leaf (now)."""
        st = self.macs.get(bytes.fromhex(mac.replace(":", "")))
        return leaf_json(st) if st is not None and self.is_leaf(st) else None

    def report(self, *, conversations: bool = True) -> dict[str, Any]:
        """The report so far (`finish` first, at the end of the input)."""
        leaves = [leaf_json(m) for m in self.leaves()]
        convs = list(self.iter_conversations()) if conversations else []
        return {
            "capture": self.capture_report(),
            "leaves": leaves,
            "conversations": convs,
            "alerts": self.alerts(),
        }

    def alerts(self) -> list[dict[str, Any]]:
        """Findings so far, in packet-time order."""
        return [a.to_json() for a in sorted(self.detectors.alerts, key=lambda a: (a.ts, a.type, a.summary))]


_THRESHOLD_FIELDS = frozenset(f.name for f in dataclasses.fields(Thresholds))


# What the conversation table's eviction order compares: when a conversation was first and last seen.
_flow_first_seen = attrgetter("first")
_flow_last_seen = attrgetter("last")


def _obs_time(obs: Observation) -> float:
    return obs.ts
