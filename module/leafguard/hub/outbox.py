"""The uplink's outbound queue: messages waiting for the edge hub's acknowledgement, bounded in bytes.

Pure core (no asyncio, no SDK). An entry stays in the outbox from :meth:`Outbox.put` until :meth:`Outbox.ack`:
a message handed to the SDK but not acknowledged when the connection breaks is still here, and is sent again
(:meth:`Outbox.release_in_flight`). IoT Hub is at-least-once anyway; every entry keeps the message id it got on
arrival, so a re-send carries the same ``$.mid`` and a consumer can tell duplicates apart.

Storage: in memory (no data directory: lost with the process), or journalled in a
:class:`~leafguard.hub.spool.Spool` (``--data-dir``): then the bodies live on disk only, are read back when
sent, and :meth:`Outbox.recover` rebuilds the queue after a restart, in order, with the same message ids.

Overflow policy :attr:`OverflowPolicy.DROP_LOW_HIGH_OPERATIONAL_OLDEST`: when a new message does not fit in
``max_bytes``, the oldest Low-priority messages are evicted first, then the oldest High ones, then the oldest
of the rest (LeafGuard alerts), until it fits; messages never sent before those sent once whose acknowledgement a
broken connection lost (they may have arrived). A message in flight is never evicted (its fate is the SDK's
now); if evicting everything else still leaves no room, the new message itself is dropped. Every drop is
returned to the caller (who reports it to the leaf's agent as a send failure) and counted here (and in the
spool, per leaf, so the count survives a restart).
"""

from __future__ import annotations

import enum
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from leafguard.agent.messages import OutgoingMessage
from leafguard.hub.alerts import AlertMessage
from leafguard.hub.spool import Recovery, Spool

DEFAULT_OUTBOX_MAX_BYTES = 16 * 1024 * 1024


class OverflowPolicy(enum.Enum):
    DROP_LOW_HIGH_OPERATIONAL_OLDEST = "drop_low_high_operational_oldest"


class Tier(enum.IntEnum):
    """Eviction rank (lower goes first)."""

    LOW = 0
    HIGH = 1
    OPERATIONAL = 2
    """LeafGuard alerts: what the operator acts on, kept longest."""


def tier_of(priority: str, alert: bool) -> Tier:
    if alert:
        return Tier.OPERATIONAL
    return Tier.LOW if priority == "Low" else Tier.HIGH


@dataclass(slots=True)
class Pending:
    """One message in the outbox."""

    seq: int
    message_id: str
    identity: str
    priority: str
    tier: Tier
    size: int
    message: OutgoingMessage | None
    """The message; None while it is on disk only (spooled, not being sent)."""
    events: int = 1
    """Events (security messages) or alerts (alert messages) it carries."""
    attempts: int = 0
    in_flight: bool = False


@dataclass(slots=True)
class OutboxStats:
    accepted: int = 0
    acked: int = 0
    acked_bytes: int = 0
    dropped: int = 0
    dropped_bytes: int = 0
    resent: int = 0
    """Messages handed to the SDK again after a broken connection (possible duplicates upstream)."""
    alerts_dropped: int = 0
    """LeafGuard alerts inside the dropped alert messages."""


class Outbox:
    """FIFO of :class:`Pending` messages within ``max_bytes`` (the body bytes), with a drop policy."""

    policy = OverflowPolicy.DROP_LOW_HIGH_OPERATIONAL_OLDEST

    def __init__(self, max_bytes: int = DEFAULT_OUTBOX_MAX_BYTES, spool: Spool | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.spool = spool
        self._entries: OrderedDict[int, Pending] = OrderedDict()
        self._tiers: dict[Tier, OrderedDict[int, None]] = {t: OrderedDict() for t in Tier}
        """Sequence numbers per eviction tier, oldest first."""
        self.next_seq = spool.counters.next_seq if spool is not None else 0
        """The sequence number the next message gets (a saved state records it: see :meth:`bodies_since`)."""
        self.bytes = 0
        self._in_flight_bytes = 0
        self.in_flight = 0
        self.stats = OutboxStats()
        if spool is not None:
            c = spool.counters
            self.stats.accepted, self.stats.acked, self.stats.dropped = c.accepted, c.acked, c.dropped

    def __len__(self) -> int:
        return len(self._entries)

    def recover(self, recovery: Recovery) -> None:
        """The live messages a spool replay found, oldest first (their bodies stay on disk)."""
        for stored in recovery.messages:
            entry = Pending(
                stored.seq, stored.message_id, stored.identity, stored.priority,
                tier_of(stored.priority, stored.alert), stored.size, None, stored.events,
            )
            self._insert(entry)
        if self.spool is not None:
            self.stats.dropped = self.spool.counters.dropped  # includes what replay found lost
        # A restart with a smaller budget: the policy makes room now (the spool counts the drops).
        while self.bytes > self.max_bytes and (victim := self._victim()) is not None:
            self._remove(victim)
            self._count_drop(victim)

    def set_max_bytes(self, max_bytes: int) -> list[Pending]:
        """A new budget while running (gateway settings); returns what the drop policy removed to fit it (the
        messages in flight stay: they are the transport's until acknowledged)."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        if self.spool is not None:
            self.spool.set_max_bytes(max_bytes)
        dropped: list[Pending] = []
        while self.bytes > self.max_bytes and (victim := self._victim()) is not None:
            self._remove(victim)
            self._count_drop(victim)
            dropped.append(victim)
        return dropped

    def put(self, message: OutgoingMessage) -> list[Pending]:
        """Queue a message; returns the entries dropped to respect the byte bound (maybe this one)."""
        size = len(message.body)
        seq = self._take_seq()
        entry = Pending(
            seq, str(uuid.uuid4()), message.identity, message.priority,
            tier_of(message.priority, isinstance(message, AlertMessage)), size, message, message.event_count,
        )
        self.stats.accepted += 1
        if self._in_flight_bytes + size > self.max_bytes:
            self._count_drop(entry, stored=False)
            if self.spool is not None:
                self.spool.reject(seq, entry.identity)
            return [entry]
        dropped: list[Pending] = []
        while self.bytes + size > self.max_bytes:
            victim = self._victim()
            assert victim is not None  # guaranteed by the in-flight check above
            self._remove(victim)
            self._count_drop(victim)
            dropped.append(victim)
        if self.spool is not None:
            self.spool.append(seq, entry.message_id, message)
            entry.message = None  # on disk now; read back when sent
        self._insert(entry)
        return dropped

    def reject(self, message: OutgoingMessage) -> Pending:
        """A message that cannot be queued (shutting down without a data directory): counted as dropped."""
        alert = isinstance(message, AlertMessage)
        entry = Pending(
            self._take_seq(), "", message.identity, message.priority, tier_of(message.priority, alert),
            len(message.body), message, message.event_count,
        )
        self.stats.accepted += 1
        self._count_drop(entry, stored=False)
        if self.spool is not None:
            self.spool.reject(entry.seq, entry.identity)
        return entry

    def commit(self, now: float) -> None:
        """The end of a batch of puts/acks: the spool's fsync policy (``now``: monotonic seconds)."""
        if self.spool is not None:
            self.spool.commit(now)

    def next_to_send(self) -> Pending | None:
        """The oldest entry not in flight, now marked in flight (message loaded); None when there is none."""
        for entry in self._entries.values():
            if not entry.in_flight:
                if entry.message is None:
                    assert self.spool is not None
                    _mid, entry.message = self.spool.load(entry.seq)
                entry.in_flight = True
                self.in_flight += 1
                self._in_flight_bytes += entry.size
                if entry.attempts:
                    self.stats.resent += 1
                entry.attempts += 1
                return entry
        return None

    def ack(self, entry: Pending) -> None:
        """The hub acknowledged ``entry``: it leaves the outbox."""
        if self._entries.get(entry.seq) is entry:
            self._remove(entry)
            self.stats.acked += 1
            self.stats.acked_bytes += entry.size
            if self.spool is not None:
                self.spool.ack(entry.seq)

    def fail(self, entry: Pending) -> None:
        """``entry`` can never be sent (the SDK refused it outright): drop it and count it."""
        if self._entries.get(entry.seq) is entry:
            self._remove(entry)
            self._count_drop(entry)

    def release(self, entry: Pending) -> None:
        """One send was not acknowledged: the entry waits again, in its place."""
        if self._entries.get(entry.seq) is entry and entry.in_flight:
            entry.in_flight = False
            self.in_flight -= 1
            self._in_flight_bytes -= entry.size
            self._unload(entry)

    def release_in_flight(self) -> int:
        """The connection broke: every unacknowledged entry goes back to waiting, in its place."""
        released = 0
        for entry in self._entries.values():
            if entry.in_flight:
                entry.in_flight = False
                self._unload(entry)
                released += 1
        self._in_flight_bytes = 0
        self.in_flight = 0
        return released

    def bodies_since(self, seq: int) -> Iterator[tuple[str, bytes]]:
        """``(identity, body)`` of the waiting messages numbered ``seq`` or later, oldest first (read from the
        spool; nothing is marked in flight)."""
        for entry in self._entries.values():
            if entry.seq < seq:
                continue
            message = entry.message
            if message is None:
                assert self.spool is not None
                _mid, message = self.spool.load(entry.seq)
            yield entry.identity, message.body

    def _take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def has_waiting(self) -> bool:
        # In-flight entries are a prefix of the FIFO (they are taken oldest first), so this is O(window).
        return any(not e.in_flight for e in self._entries.values())

    def _unload(self, entry: Pending) -> None:
        if self.spool is not None:
            entry.message = None

    def _insert(self, entry: Pending) -> None:
        self._entries[entry.seq] = entry
        self._tiers[entry.tier][entry.seq] = None
        self.bytes += entry.size

    def _victim(self) -> Pending | None:
        # A message sent once whose acknowledgement the broken connection took may have arrived: dropping it could
        # count as lost what the hub has, so the policy takes messages never sent first (those sent are at most a
        # window's worth).
        for attempted in (False, True):
            for tier in Tier:
                for seq in self._tiers[tier]:
                    entry = self._entries[seq]
                    if not entry.in_flight and (entry.attempts > 0) == attempted:
                        return entry
        return None

    def _remove(self, entry: Pending) -> None:
        del self._entries[entry.seq]
        self._tiers[entry.tier].pop(entry.seq, None)
        self.bytes -= entry.size
        if entry.in_flight:
            entry.in_flight = False
            self.in_flight -= 1
            self._in_flight_bytes -= entry.size

    def _count_drop(self, entry: Pending, *, stored: bool = True) -> None:
        self.stats.dropped += 1
        self.stats.dropped_bytes += entry.size
        if entry.tier is Tier.OPERATIONAL:
            self.stats.alerts_dropped += entry.events
        if stored and self.spool is not None:
            self.spool.drop(entry.seq, entry.identity)
