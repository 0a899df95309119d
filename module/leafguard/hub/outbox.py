"""The uplink's outbound queue: security messages waiting for the edge hub's acknowledgement, bounded in bytes.

Pure core (no asyncio, no SDK). An entry stays in the outbox from :meth:`Outbox.put` until :meth:`Outbox.ack`:
a message handed to the SDK but not acknowledged when the connection breaks is still here, and is sent again
(:meth:`Outbox.release_in_flight`). IoT Hub is at-least-once anyway; every entry keeps the message id it got on
arrival, so a re-send carries the same ``$.mid`` and a consumer can tell duplicates apart.

Overflow policy :attr:`OverflowPolicy.DROP_LOW_THEN_OLDEST`: when a new message does not fit in
``max_bytes``, the oldest Low-priority messages are evicted first, then the oldest messages of any priority,
until it fits. A message in flight is never evicted (its fate is the SDK's now); if evicting everything else
still leaves no room, the new message itself is dropped. Every drop is returned to the caller (who reports it
to the leaf's agent as a send failure) and counted here.
"""

from __future__ import annotations

import enum
import itertools
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from leafguard.agent.messages import OutgoingMessage

DEFAULT_OUTBOX_MAX_BYTES = 16 * 1024 * 1024


class OverflowPolicy(enum.Enum):
    DROP_LOW_THEN_OLDEST = "drop_low_then_oldest"


@dataclass(slots=True)
class Pending:
    """One message in the outbox."""

    seq: int
    message: OutgoingMessage
    message_id: str
    size: int
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


class Outbox:
    """FIFO of :class:`Pending` messages within ``max_bytes`` (the body bytes), with a drop policy."""

    policy = OverflowPolicy.DROP_LOW_THEN_OLDEST

    def __init__(self, max_bytes: int = DEFAULT_OUTBOX_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Pending] = OrderedDict()
        self._low: OrderedDict[int, None] = OrderedDict()
        """Sequence numbers of the Low-priority entries, oldest first (the first eviction candidates)."""
        self._seq = itertools.count()
        self.bytes = 0
        self._in_flight_bytes = 0
        self.stats = OutboxStats()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, message: OutgoingMessage) -> list[OutgoingMessage]:
        """Queue a message; returns the messages dropped to respect the byte bound (maybe this one)."""
        size = len(message.body)
        entry = Pending(next(self._seq), message, str(uuid.uuid4()), size)
        self.stats.accepted += 1
        if self._in_flight_bytes + size > self.max_bytes:
            self._count_drop(entry)
            return [message]
        dropped: list[OutgoingMessage] = []
        while self.bytes + size > self.max_bytes:
            victim = self._victim()
            assert victim is not None  # guaranteed by the evictable check above
            self._remove(victim)
            self._count_drop(victim)
            dropped.append(victim.message)
        self._entries[entry.seq] = entry
        if message.priority == "Low":
            self._low[entry.seq] = None
        self.bytes += size
        return dropped

    def next_to_send(self) -> Pending | None:
        """The oldest entry not in flight, now marked in flight; None when there is none."""
        for entry in self._entries.values():
            if not entry.in_flight:
                entry.in_flight = True
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

    def fail(self, entry: Pending) -> None:
        """``entry`` can never be sent (the SDK refused it outright): drop it and count it."""
        if self._entries.get(entry.seq) is entry:
            self._remove(entry)
            self._count_drop(entry)

    def release_in_flight(self) -> int:
        """The connection broke: every unacknowledged entry goes back to waiting, in its place."""
        released = 0
        for entry in self._entries.values():
            if entry.in_flight:
                entry.in_flight = False
                released += 1
        self._in_flight_bytes = 0
        return released

    def has_waiting(self) -> bool:
        # In-flight entries are a prefix of the FIFO (they are taken oldest first), so this is O(window).
        return any(not e.in_flight for e in self._entries.values())

    def _victim(self) -> Pending | None:
        for seq in self._low:
            entry = self._entries[seq]
            if not entry.in_flight:
                return entry
        for entry in self._entries.values():
            if not entry.in_flight:
                return entry
        return None

    def _remove(self, entry: Pending) -> None:
        del self._entries[entry.seq]
        self._low.pop(entry.seq, None)
        self.bytes -= entry.size
        if entry.in_flight:
            self._in_flight_bytes -= entry.size

    def _count_drop(self, entry: Pending) -> None:
        self.stats.dropped += 1
        self.stats.dropped_bytes += entry.size
