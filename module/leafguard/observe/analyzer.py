"""The observation core: frames in, leaves, conversations and observations out.

Pure and synchronous: `Analyzer.feed` takes a `FrameBatch` and updates bounded state; packet time is the only
clock. Frames that can change state (handshakes, teardown, first payloads, discovery protocols, ARP, DHCP,
fragments, anything unusual) are walked one by one; the bulk of a busy capture, mid-flow TCP and UDP
frames of conversations that are already settled, is counted per batch with numpy (`observe.fastpath`).

The analyzer coordinates: the state is the leaf inventory's (`observe.inventory`) and the conversation table's
(`observe.conversations`), discovery datagrams are `observe.discovery`'s, the report `observe.report`'s; the
detectors (`leafguard.detect`) get the batch's evidence when the batch is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from leafguard.capture.batch import LINKTYPE_NAMES, FrameBatch
from leafguard.decode.frames import (
    Packet,
    decode,
)
from leafguard.detect import detectors as det
from leafguard.detect.alerts import Alert
from leafguard.detect.attacks import AttackDetectors
from leafguard.detect.evidence import Evidence, FloodSeen, LeafSilent
from leafguard.detect.floods import FLOOD_WINDOW_S, FloodTracker
from leafguard.detect.sends import SendLog
from leafguard.detect.silence import SilenceTracker
from leafguard.detect.thresholds import Thresholds
from leafguard.errors import ConfigurationError
from leafguard.observe import fastpath
from leafguard.observe.addresses import is_unicast_mac, mac_text
from leafguard.observe.conversations import ConversationTable, ObservationLog
from leafguard.observe.discovery import Discovery
from leafguard.observe.inventory import LeafInventory
from leafguard.observe.model import LeafView, Observation
from leafguard.observe.report import capture_json, conversation_rows, leaf_json, leaf_view
from leafguard.observe.settings import AnalyzerSettings, Network
from leafguard.observe.state import CaptureStats, MacState

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
        self.stats = CaptureStats()
        self._evidence: list[Evidence] = []
        """The batch's evidence for the detectors (the inventory adds to it too); emptied after every batch."""
        self.inventory = LeafInventory(self.settings, self.stats, self._evidence)
        self.discovery = Discovery(self.inventory, self._evidence)
        self.observations = ObservationLog(self.inventory, self.stats, enabled=observations)
        self.conversations = ConversationTable(
            self.settings, self.stats, self.inventory, self.discovery, self._evidence, self.observations
        )
        self.detectors = det.Detectors(self.settings.learning_period_s, self.settings.thresholds)
        self.silence: SilenceTracker | None = None
        self.floods: FloodTracker | None = None
        self.received_floods: FloodTracker | None = None
        self.sends: SendLog | None = None
        """Send times per MAC, when silences or floods are watched (the bulk step feeds it too)."""
        self.receives: SendLog | None = None
        """Receive times per unicast destination MAC, when floods are watched."""
        self._watch_time(self.settings)
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
        batch, plan = self._attacks_and_plan(batch)
        data = batch.data
        offsets = batch.offsets
        caplens = batch.caplens
        wirelens = batch.wirelens
        linktype = batch.linktype
        if plan is None:
            for i in range(n):
                self.frame(decode(data, offsets[i], caplens[i], linktype), data, ts[i], wirelens[i])
            self._detect()
            return
        fastpath.create_new(self.conversations, batch, plan)
        # Walk, in order, what the plan left to the per-frame path. A frame of a conversation that settles during
        # the walk (nothing left to inspect but deep datagrams) is deferred to the bulk step from then on.
        frame_key, settled, known, bare, deep = plan.frame_key, plan.settled, plan.known, plan.bare, plan.deep
        rows, gens, logins = plan.rows, plan.gens, self.conversations.logins
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
            row = self.frame(
                decode(data, offsets[i], caplens[i], linktype), data, ts[i], wirelens[i], macs_counted=u >= 0
            )
            if u >= 0 and row is not None:
                known[u] = True
                rows[u] = row
                gens[u] = self.conversations.generation(row)
                if row not in logins:
                    settled[u] = True
        self._log_bulk_sends(plan.pre)
        fastpath.count_settled(self.inventory, self.conversations, batch, plan, deferred)
        self._detect()

    def _attacks_and_plan(self, batch: FrameBatch) -> tuple[FrameBatch, fastpath.Plan | None]:
        """The attack rules read the batch, then the bulk step plans it (None: every frame is walked). Both read
        one classification of it: a file's reader process has made it; live batches arrive without, and are
        classified here, on a copy (the caller's batch keeps nothing)."""
        bulk = self._fast and len(batch) >= 64 and batch.linktype == 1
        if bulk and batch.prepared is None:
            batch = dataclasses.replace(batch, prepared=fastpath.classify(batch))
        if isinstance(batch.found, list):
            self.take_findings(batch.found)  # the reader process ran the rules (`detect.reader_rules`)
        else:
            self.attacks.feed(batch)
        return batch, fastpath.plan_batch(self.conversations, batch) if bulk else None

    def take_findings(self, alerts: list[Alert]) -> None:
        """Findings of attack rules run elsewhere on this input, configured as this analyzer's own
        (`detect.reader_rules`): raised as the rules raise theirs."""
        for alert in alerts:
            self.detectors.raise_alert(alert)

    def _log_bulk_sends(self, pre: fastpath.Classified) -> None:
        """The send (and receive) times of every frame the bulk step counts, for the trackers watching them."""
        if self.sends is None:
            return
        ts = np.concatenate((pre.ts, pre.m_ts))
        self.sends.sent_many(np.concatenate((pre.smac, pre.m_smac)), ts)
        if self.receives is not None:
            dst = np.concatenate((pre.dmac, pre.m_dmac))
            unicast = (dst >> 40) & 1 == 0
            self.receives.sent_many(dst[unicast], ts[unicast])

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

    def _floods(
        self, floods: FloodTracker, found: list[tuple[int, float, float]], direction: Literal["sent", "received"]
    ) -> None:
        for mac_i, ts, window_start in found:
            if (mac := self.inventory.leaf_of(mac_i)) is not None:
                found_flood = FloodSeen(
                    ts, mac, floods.threshold, window_start, FLOOD_WINDOW_S, floods.rate_per_s, direction
                )
                self._evidence.append(found_flood)

    def _silent_leaves(self, found: list[tuple[int, float]]) -> None:
        assert self.silence is not None
        after = self.silence.silent_after_s
        for mac_i, start in found:
            if (mac := self.inventory.leaf_of(mac_i)) is not None:
                self._evidence.append(LeafSilent(start + after, mac, start, after))

    def frame(self, p: Packet, data: bytes, ts: float, wirelen: int, *, macs_counted: bool = False) -> int | None:
        """Account for one decoded frame (its bytes are ``data``, the batch buffer); ``macs_counted``: its MAC
        counters and source address are taken care of by the bulk step. The row of its conversation, if any."""
        if p.truncated:
            self.stats.truncated += 1
        elif p.malformed:
            self.stats.decode_errors += 1
        if macs_counted:
            assert p.src_mac is not None
            return self.conversations.segment(p, data, ts, wirelen, self.inventory.touch(p.src_mac, ts))
        if self.sends is not None and p.src_mac is not None:
            self.sends.sent(p.src_mac, ts)
        if self.receives is not None and p.dst_mac is not None and is_unicast_mac(p.dst_mac):
            self.receives.sent(p.dst_mac, ts)
        src = self.inventory.frame(p, ts, wirelen)
        if p.sport >= 0 or p.fragment:
            return self.conversations.segment(p, data, ts, wirelen, src)
        return None

    # ----------------------------------------------------------------------------------------- state

    # ----------------------------------------------------------------------------------------- flows

    def drain_observations(self) -> list[Observation]:
        """Observations since the last call, in packet order (the bulk step makes some after the walk)."""
        return self.observations.drain()

    # ----------------------------------------------------------------------------------------- output

    @property
    def flows(self) -> ConversationTable:
        """The conversation table (`conversations`; its length is the number of conversations)."""
        return self.conversations

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
        return conversation_rows(self.conversations.records())

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

