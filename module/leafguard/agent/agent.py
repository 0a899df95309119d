"""One Defender security agent per leaf identity: a pure state machine driven by packet time.

:class:`LeafAgent` ties the configuration, the event builders, ConnectionCreate aggregation, the three queues and
the message builder together. It never reads a clock: every call takes ``now`` (epoch seconds; packet time offline,
wall-clock time live), so replaying a capture yields the same messages as watching it live.

Schedule (all timers start when the agent is created, at its first ``now``):

* periodic events (ListeningPorts, SystemInformation, DroppedEventsStatistics, MessageStatistics) at the first
  tick and then whenever ``snapshotFrequency`` has elapsed since the previous snapshot;
* the aggregation window is flushed when strictly more than its interval has passed since the previous flush;
* a message is built when ``highPriorityMessageFrequency`` has elapsed since the previous high send (main queue
  High, padding Low), when ``lowPriorityMessageFrequency`` has elapsed since the previous low send (main Low,
  padding High), and, repeatedly, while the cache holds more than one message's worth (main High if it has events,
  else Low). A timed send happens only if the operational or the main queue holds something;
* while the uplink is down or behind (``tick(hold=True)``) the timed sends wait: events stay in the cache and only
  full messages are built; when the hold ends after a timed send came due, everything queued goes at once.

:meth:`LeafAgent.export_state` and :meth:`LeafAgent.restore_state` carry all of this across a restart
(`leafguard.service.state`).

:meth:`LeafAgent.tick` costs two comparisons when nothing is due.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leafguard import __version__
from leafguard.agent import events as ev
from leafguard.agent.aggregation import DEFAULT_MAX_ENTRIES, ConnectionAggregator
from leafguard.agent.config import AgentConfig, ConfigIssue, ConfigOutcome, Priority
from leafguard.agent.messages import MessageBuilder, OutgoingMessage
from leafguard.agent.queues import EventQueues, QueueName, QueueTotals, Totals
from leafguard.observe.model import ConnectionSeen, LeafView, LoginSeen

_QUEUE_OF = {Priority.HIGH: QueueName.HIGH, Priority.LOW: QueueName.LOW}

_MESSAGES_UNDER_BYTES = 4096
"""MessagesUnder4KB counts bodies smaller than IoT Hub's 4 KB metering unit (as the C agent does)."""


@dataclass(frozen=True, slots=True)
class AgentStats:
    """Cumulative counters of one agent (metrics; the ``sent + dropped + pending == generated`` rule)."""

    generated: int
    sent: int
    dropped: int
    pending: int
    messages: int
    aggregation_overflow: int


class LeafAgent:
    """The Defender agent of one leaf."""

    def __init__(
        self,
        identity: str,
        config: AgentConfig,
        now: float,
        *,
        agent_version: str = __version__,
        max_aggregation_entries: int = DEFAULT_MAX_ENTRIES,
        totals: QueueTotals | None = None,
    ) -> None:
        self._config = config
        self._builder = MessageBuilder(identity, agent_version, config.max_message_size_bytes)
        self._totals = totals or QueueTotals()
        """Fleet-wide counters this agent adds to (metrics)."""
        self._queues = EventQueues(config.max_local_cache_size_bytes, self._builder.max_event_bytes, self._totals)
        self._agg = ConnectionAggregator(config.aggregation_interval_connection_create_s, now, max_aggregation_entries)
        self._agg_overflow_reported = 0
        self._seq = 0
        self._last_high = now
        self._last_low = now
        self._last_snapshot: float | None = None
        self._messages = 0
        self._interval_sent = 0
        self._interval_under_4kb = 0
        self._interval_failed = 0
        self._interval_capture_drops = 0
        self._next_due = now
        self._size_threshold = self._builder.max_event_bytes
        self._held = False
        """The last tick was told to hold (the uplink is down or behind): timed sends wait, events stay queued."""

    # -- properties ----------------------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        return self._builder.identity

    @property
    def config(self) -> AgentConfig:
        return self._config

    def reported(self) -> dict[str, Any]:
        """The reported-properties document for the configuration in force."""
        return self._config.reported()

    def stats(self) -> AgentStats:
        t: Totals = self._queues.totals()
        return AgentStats(t.generated, t.sent, t.dropped, t.pending, self._messages, self._agg.overflowed)

    def rename(self, identity: str) -> None:
        """Continue under another identity (the leaf map named the leaf); later messages carry its AgentId."""
        self._totals.changes += 1
        self._builder = MessageBuilder(identity, self._builder.agent_version, self._config.max_message_size_bytes)

    # -- inputs --------------------------------------------------------------------------------------------

    def observe(self, obs: ConnectionSeen | LoginSeen) -> None:
        """Turn one triggered observation into events (or aggregation hits), per the configured priorities."""
        self._totals.changes += 1
        if isinstance(obs, ConnectionSeen):
            prio = self._config.priority_connection_create
            if prio is Priority.OFF:
                return
            if self._config.aggregation_enabled_connection_create:
                if len(self._agg) and self._agg.is_due(obs.ts):
                    # Close the window at packet time, so a window's contents never depend on tick timing.
                    self._flush_aggregation(obs.ts)
                overflow = self._agg.add(obs)
                if overflow is not None:
                    self._enqueue(overflow, prio)
                self._next_due = min(self._next_due, self._agg.due_at())
            else:
                self._enqueue(ev.connection_create(obs), prio)
        else:
            self._enqueue(ev.login(obs), self._config.priority_login)

    def diagnostic(self, severity: ev.Severity, message: str, now: float) -> None:
        """Queue a Diagnostic event about this agent (per ``eventPriorityDiagnostic``)."""
        self._enqueue(ev.diagnostic(severity, message, now), self._config.priority_diagnostic)

    def record_capture_drops(self, frames: int) -> None:
        """Live capture lost frames before analysis (kernel or queue drops), so this leaf's events may be
        incomplete: reported in the next DroppedEventsStatistics (``CaptureDroppedFrames``), per interval."""
        self._totals.changes += 1
        self._interval_capture_drops += frames
        self._schedule()

    def record_send_failures(self, count: int = 1) -> None:
        """The transport failed to send messages this agent built (MessageStatistics ``TotalFailed``)."""
        self._totals.changes += 1
        self._interval_failed += count

    def apply_desired(self, desired: object, now: float) -> ConfigOutcome:
        """Recompute the configuration from the *whole* desired-properties document.

        Rejected (any type mismatch): the previous configuration stays, a ConfigurationError (TypeMismatch)
        names the bad keys. Accepted: the new configuration takes effect now (cache and message size,
        aggregation switch and interval, priorities) and its advisory issues, if any, are reported — only when
        the configuration changed, so re-applying the same document (a patch to another section) is silent.
        Either way the caller reports ``outcome.reported``.
        """
        outcome = self._config.apply_desired(desired)
        if not outcome.accepted:
            self._report_issues(outcome.issues, now)
        elif outcome.config != self._config:
            self._set_config(outcome.config, now)
            self._report_issues(outcome.issues, now)
        return outcome

    def use_config(self, config: AgentConfig, now: float) -> None:
        """Put ``config`` in force as it is (a restored agent's: the one it had, whatever documents led to it)."""
        if config != self._config:
            self._set_config(config, now)

    def _report_issues(self, issues: tuple[ConfigIssue, ...], now: float) -> None:
        event = ev.configuration_error(issues, now)
        if event is not None:
            self._enqueue(event, self._config.priority_configuration_error, operational=True)

    def _set_config(self, new: AgentConfig, now: float) -> None:
        old, self._config = self._config, new
        self._totals.changes += 1
        if new.max_message_size_bytes != old.max_message_size_bytes:
            self._builder = MessageBuilder(self.identity, self._builder.agent_version, new.max_message_size_bytes)
            self._size_threshold = self._builder.max_event_bytes
        self._queues.resize(new.max_local_cache_size_bytes, self._builder.max_event_bytes)
        self._agg.interval_s = new.aggregation_interval_connection_create_s
        switched_off = not new.aggregation_enabled_connection_create or (new.priority_connection_create is Priority.OFF)
        if switched_off and len(self._agg):
            # What was counted so far is reported now (as the reference agents do), unless the events are Off.
            for event in self._agg.flush(now):
                self._enqueue(event, new.priority_connection_create)
        self._next_due = now  # recompute the schedule at the next tick

    # -- the clock -----------------------------------------------------------------------------------------

    @property
    def next_due(self) -> float:
        """The earliest time a timer of this agent is due (an observation or config change may lower it)."""
        if self._queues.total_bytes > self._size_threshold:
            return float("-inf")
        return self._next_due

    def needs_view(self, now: float) -> bool:
        """Whether the next :meth:`tick` at ``now`` will take a snapshot (and so wants the leaf's view)."""
        last = self._last_snapshot
        return last is None or now - last >= self._config.snapshot_frequency_s

    def tick(self, now: float, view: LeafView | None = None, *, hold: bool = False) -> list[OutgoingMessage]:
        """Advance to ``now``: flush aggregation, take snapshots, build the messages that are due.

        ``hold`` (the uplink is down or cannot keep up): the timed sends wait and their events stay in the cache,
        so only full messages are built (while the cache holds more than one message's worth) and the cache's drop
        policy decides what goes first; when the hold ends after a timed send came due, everything queued goes at
        once, in full messages.
        """
        released = self._held and not hold
        if hold != self._held:
            self._held = hold
            self._totals.changes += 1
            self._schedule()
        if not released and now < self._next_due and self._queues.total_bytes <= self._size_threshold:
            return []
        self._totals.changes += 1
        cfg = self._config
        if cfg.aggregation_enabled_connection_create and len(self._agg) and self._agg.is_due(now):
            self._flush_aggregation(now)
        if self.needs_view(now):
            self._snapshot(now, view)
        out: list[OutgoingMessage] = []
        while self._queues.total_bytes > self._size_threshold:
            main = QueueName.HIGH if self._queues.count(QueueName.HIGH) else QueueName.LOW
            if not self._send(out, main):
                break
        if hold:
            self._schedule()
            return out
        if released and (
            now - self._last_high >= cfg.high_priority_message_frequency_s
            or now - self._last_low >= cfg.low_priority_message_frequency_s
        ):
            # A timed send came due during the hold: what waited for the link is overdue, and all of it goes now,
            # in full messages (a hold shorter than the timers changes nothing).
            self._drain(out)
        if now - self._last_high >= cfg.high_priority_message_frequency_s:
            self._last_high = now
            self._send(out, QueueName.HIGH)
        if now - self._last_low >= cfg.low_priority_message_frequency_s:
            self._last_low = now
            self._send(out, QueueName.LOW)
        self._schedule()
        return out

    def flush(self, now: float) -> list[OutgoingMessage]:
        """Send what is queued now (the ``flush`` direct method): aggregation closed, every queued event packed
        into messages within the size limit. The timers are not reset; the next periodic message comes as due."""
        if len(self._agg):
            self._flush_aggregation(now)
        out: list[OutgoingMessage] = []
        self._drain(out)
        self._schedule()
        return out

    def shutdown(self, now: float) -> list[OutgoingMessage]:
        """The final flush: report aggregation and last statistics, send everything left within the size
        limit.

        Used at the end of an offline run and on a graceful stop. Afterwards every generated event is either
        sent or counted as dropped (``pending == 0``).
        """
        if len(self._agg):
            self._flush_aggregation(now)
        out: list[OutgoingMessage] = []
        self._drain(out)
        # Statistics for the last interval, sent last, so that drops since the last snapshot are reported too.
        if (
            self._queues.has_interval_activity()
            or self._interval_sent
            or self._interval_failed
            or self._interval_capture_drops
        ):
            self._statistics(now)
            self._drain(out)
        return out

    # -- state that survives a restart ---------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Everything a restart needs to continue as this agent (JSON-ready): the events waiting in its cache and
        aggregation map, its event counter (so event Ids do not repeat), its timers and its counters."""
        return {
            "identity": self.identity,
            "seq": self._seq,
            "lastHigh": self._last_high,
            "lastLow": self._last_low,
            "lastSnapshot": self._last_snapshot,
            "messages": self._messages,
            "interval": [self._interval_sent, self._interval_under_4kb, self._interval_failed,
                         self._interval_capture_drops],
            "aggOverflowReported": self._agg_overflow_reported,
            "held": self._held,
            "queues": self._queues.export_state(),
            "aggregation": self._agg.export_state(),
        }

    def restore_state(self, state: dict[str, Any], now: float) -> None:
        """Continue from :meth:`export_state` of an earlier run (raises KeyError/TypeError/ValueError on a state
        of another shape; the caller then starts this agent afresh). The cache is held to the configuration in
        force, by the drop policy (counted)."""
        interval = [int(v) for v in state["interval"]]
        seq, messages = int(state["seq"]), int(state["messages"])
        last_snapshot = state["lastSnapshot"]
        self._queues.restore_state(state["queues"])
        self._agg.restore_state(state["aggregation"])
        self._seq, self._messages = seq, messages
        self._last_high, self._last_low = float(state["lastHigh"]), float(state["lastLow"])
        self._last_snapshot = float(last_snapshot) if last_snapshot is not None else None
        self._interval_sent, self._interval_under_4kb, self._interval_failed, self._interval_capture_drops = interval
        self._agg_overflow_reported = int(state["aggOverflowReported"])
        # Whether the uplink held the sends decides what the next tick releases (an older state has no key).
        self._held = bool(state.get("held", False))
        self._totals.changes += 1
        self._queues.resize(self._config.max_local_cache_size_bytes, self._builder.max_event_bytes)
        self._next_due = now

    def forget_events(self, ids: set[str]) -> int:
        """Remove queued events whose ``Id`` is in ``ids`` (they reached the output after the state was saved);
        returns how many. They count as sent."""
        self._totals.changes += 1
        return self._queues.forget(ids)

    # -- internals -----------------------------------------------------------------------------------------

    def _drain(self, out: list[OutgoingMessage]) -> None:
        while len(self._queues):
            main = QueueName.HIGH if self._queues.count(QueueName.HIGH) else QueueName.LOW
            if not self._send(out, main, force=True):
                break  # unreachable: every queued event fits in an empty message

    def _send(self, out: list[OutgoingMessage], main: QueueName, *, force: bool = False) -> bool:
        q = self._queues
        if not force and not (q.count(QueueName.OPERATIONAL) or q.count(main)):
            return False
        other = QueueName.LOW if main == QueueName.HIGH else QueueName.HIGH
        msg = self._builder.build(q, main, other, self._config.hub_resource_id)
        if msg is None:
            return False
        self._totals.changes += 1
        self._messages += 1
        self._totals.messages += 1
        self._interval_sent += 1
        if len(msg.body) < _MESSAGES_UNDER_BYTES:
            self._interval_under_4kb += 1
        out.append(msg)
        return True

    def _flush_aggregation(self, now: float) -> None:
        prio = self._config.priority_connection_create
        self._totals.changes += 1
        for event in self._agg.flush(now):
            self._enqueue(event, prio)
        if self._agg.overflowed != self._agg_overflow_reported:
            n = self._agg.overflowed - self._agg_overflow_reported
            self._agg_overflow_reported = self._agg.overflowed
            self.diagnostic(
                "Warning",
                f"aggregation map full ({self._agg.max_entries} entries): {n} connections reported unaggregated",
                now,
            )

    def _snapshot(self, now: float, view: LeafView | None) -> None:
        self._last_snapshot = now
        cfg = self._config
        if view is not None:
            self._enqueue(ev.listening_ports(view, now), cfg.priority_listening_ports)
            self._enqueue(ev.system_information(view, now), cfg.priority_system_information)
        self._statistics(now)

    def _statistics(self, now: float) -> None:
        cfg = self._config
        # Counters are taken (and reset) before the statistics events are queued, so those events count in the
        # next interval.
        high, low, op = self._queues.take_counts()
        sent, under, failed = self._interval_sent, self._interval_under_4kb, self._interval_failed
        capture_drops = self._interval_capture_drops
        self._interval_sent = self._interval_under_4kb = self._interval_failed = self._interval_capture_drops = 0
        dropped_stats = ev.dropped_events_statistics(high, low, op, now, capture_dropped=capture_drops)
        self._enqueue(dropped_stats, cfg.priority_dropped_events_statistics, operational=True)
        self._enqueue(
            ev.message_statistics(sent, under, failed, now), cfg.priority_message_statistics, operational=True
        )

    def _enqueue(self, event: ev.Event | None, prio: Priority, *, operational: bool = False) -> None:
        if event is None or prio is Priority.OFF:
            return
        name = _QUEUE_OF[prio] if not operational else QueueName.OPERATIONAL
        data = ev.encode_event(event, ev.event_id(self.identity, self._seq, event))
        self._seq += 1
        self._totals.changes += 1
        self._queues.push(name, data)

    def _schedule(self) -> None:
        cfg = self._config
        due = (self._last_snapshot or 0.0) + cfg.snapshot_frequency_s
        if not self._held:
            due = min(
                due,
                self._last_high + cfg.high_priority_message_frequency_s,
                self._last_low + cfg.low_priority_message_frequency_s,
            )
        if len(self._agg):
            # The flush is strictly after the window; a tick exactly at due_at() checks and finds nothing yet.
            due = min(due, self._agg.due_at())
        self._next_due = due
