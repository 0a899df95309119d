"""The three event queues of one agent, one byte budget, and the drop policy.

Events are stored already serialized (compact UTF-8 JSON), so an event's size is exactly the bytes it adds to a
message body (plus one comma). All three queues share ``maxLocalCacheSizeInBytes``, counted in those bytes.

Drop policy (ranks: low < high < operational):

1. An event larger than the largest event a message can carry (``maxMessageSizeInBytes`` minus the envelope) or
   than the whole cache is dropped on arrival and counted as *too large*; it never blocks its queue.
2. Otherwise, while the event does not fit, the **oldest event of the lowest-ranked non-empty queue whose rank
   is not above the new event's** is evicted: an incoming low event can only push out older low events; a high
   event pushes out low events first, then older high ones; an operational event can push out anything, older
   operational events last.
3. If even evicting all of those would not make room, nothing is evicted and the new event is dropped.

Every drop is counted against the queue the dropped event belonged to, per interval (reset when reported in
DroppedEventsStatistics) and cumulatively (for ``sent + dropped + pending == generated``).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

from leafguard.agent.events import QueueCounts


class RawEvents(list[bytes]):
    """Serialized events inside a state document: written as a JSON array of the events themselves (not strings),
    without parsing or escaping them (see `leafguard.service.state`)."""

    __slots__ = ()


def _event_bytes(saved: object) -> bytes:
    """An event from a saved state (an object, read back) as the exact bytes it was queued as: orjson writes a
    document it read back byte for byte (key order, numbers)."""
    if isinstance(saved, RawEvents | list):
        raise TypeError("an event must be an object")
    if isinstance(saved, bytes):
        return saved
    if not isinstance(saved, dict):
        raise TypeError("an event must be an object")
    return orjson.dumps(saved)


class QueueName(enum.IntEnum):
    """The queues, valued by rank in the drop policy (lower is dropped first)."""

    LOW = 0
    HIGH = 1
    OPERATIONAL = 2


_NAMES = {name: name.name for name in QueueName}
"""Enum names looked up once (``.name`` is a property: a cost at 10,000 agents)."""


@dataclass(slots=True)
class _Counters:
    collected: int = 0
    dropped: int = 0
    too_large: int = 0

    def snapshot(self) -> QueueCounts:
        return QueueCounts(self.collected, self.dropped, self.too_large)


@dataclass(slots=True)
class _Cumulative:
    generated: int = 0
    sent: int = 0
    dropped: int = 0


class QueueTotals:
    """Cumulative counters per queue, summed over every agent that shares this object (the fleet's), so that
    metrics read them in O(1) however many leaves there are. Pending events are generated - sent - dropped."""

    __slots__ = ("by_queue", "changes", "messages")

    def __init__(self) -> None:
        self.by_queue: dict[QueueName, _Cumulative] = {name: _Cumulative() for name in QueueName}
        self.messages = 0
        """Security messages built (counted by the agents)."""
        self.changes = 0
        """Bumped by every change to an agent's saved state: a state save with nothing new can be skipped."""

    def totals(self) -> dict[QueueName, Totals]:
        return {
            name: Totals(c.generated, c.sent, c.dropped, c.generated - c.sent - c.dropped)
            for name, c in self.by_queue.items()
        }


@dataclass(frozen=True, slots=True)
class Totals:
    """Cumulative counters of one agent's queues (never reset)."""

    generated: int
    sent: int
    dropped: int
    pending: int


class EventQueues:
    """Operational, high and low FIFO queues within one byte budget."""

    def __init__(self, cache_bytes: int, max_event_bytes: int, shared: QueueTotals | None = None) -> None:
        self.cache_bytes = cache_bytes
        self.max_event_bytes = max_event_bytes
        self._q: dict[QueueName, deque[bytes]] = {name: deque() for name in QueueName}
        self._bytes: dict[QueueName, int] = dict.fromkeys(QueueName, 0)
        self.total_bytes = 0
        self._interval: dict[QueueName, _Counters] = {name: _Counters() for name in QueueName}
        self._generated = 0
        self._sent = 0
        self._dropped = 0
        self._shared = (shared or QueueTotals()).by_queue
        """Cumulative counters per queue (metrics by priority), shared with the other agents of a fleet."""

    # -- inspection ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(q) for q in self._q.values())

    def count(self, name: QueueName) -> int:
        return len(self._q[name])

    def bytes_in(self, name: QueueName) -> int:
        return self._bytes[name]

    def head_size(self, name: QueueName) -> int | None:
        q = self._q[name]
        return len(q[0]) if q else None

    def totals(self) -> Totals:
        return Totals(self._generated, self._sent, self._dropped, len(self))

    def take_counts(self) -> tuple[QueueCounts, QueueCounts, QueueCounts]:
        """The (high, low, operational) counters of the interval just ended; they start again at 0."""
        out = tuple(self._interval[n].snapshot() for n in (QueueName.HIGH, QueueName.LOW, QueueName.OPERATIONAL))
        self._interval = {name: _Counters() for name in QueueName}
        return out[0], out[1], out[2]

    def has_interval_activity(self) -> bool:
        return any(c.collected or c.dropped for c in self._interval.values())

    # -- mutation ------------------------------------------------------------------------------------------

    def push(self, name: QueueName, data: bytes) -> bool:
        """Offer one serialized event; returns whether it was queued (a drop is counted either way)."""
        size = len(data)
        self._generated += 1
        self._shared[name].generated += 1
        self._interval[name].collected += 1
        if size > self.max_event_bytes or size > self.cache_bytes:
            self._interval[name].too_large += 1
            self._count_drop(name)
            return False
        if self.total_bytes + size > self.cache_bytes:
            evictable = sum(self._bytes[n] for n in QueueName if n <= name)
            if self.total_bytes - evictable + size > self.cache_bytes:
                self._count_drop(name)
                return False
            for victim in QueueName:  # ascending rank: low, high, operational
                while victim <= name and self._q[victim] and self.total_bytes + size > self.cache_bytes:
                    self._evict(victim)
        self._q[name].append(data)
        self._bytes[name] += size
        self.total_bytes += size
        return True

    def pop(self, name: QueueName) -> bytes:
        """Remove the oldest event of a queue, as sent."""
        data = self._q[name].popleft()
        self._bytes[name] -= len(data)
        self.total_bytes -= len(data)
        self._sent += 1
        self._shared[name].sent += 1
        return data

    def resize(self, cache_bytes: int, max_event_bytes: int) -> None:
        """Apply a new budget: too-large events are dropped, then the oldest by rank until the cache fits."""
        self.cache_bytes = cache_bytes
        self.max_event_bytes = max_event_bytes
        for name in QueueName:
            q = self._q[name]
            if any(len(d) > max_event_bytes for d in q):
                keep: deque[bytes] = deque()
                for d in q:
                    if len(d) > max_event_bytes:
                        self._bytes[name] -= len(d)
                        self.total_bytes -= len(d)
                        self._interval[name].too_large += 1
                        self._count_drop(name)
                    else:
                        keep.append(d)
                self._q[name] = keep
        for victim in QueueName:
            while self._q[victim] and self.total_bytes > cache_bytes:
                self._evict(victim)

    # -- state that survives a restart ---------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """The queued events (oldest first, as :class:`RawEvents`: a cheap copy, serialized later), this interval's
        counters and the cumulative ones."""
        return {
            "events": {_NAMES[name]: RawEvents(self._q[name]) for name in QueueName},
            "interval": {_NAMES[name]: [c.collected, c.dropped, c.too_large] for name, c in self._interval.items()},
            "totals": [self._generated, self._sent, self._dropped],
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Queue contents and counters from :meth:`export_state` (the fleet restores the shared totals itself)."""
        queues = {name: deque(_event_bytes(e) for e in state["events"][_NAMES[name]]) for name in QueueName}
        interval = {name: _Counters(*(int(v) for v in state["interval"][_NAMES[name]])) for name in QueueName}
        generated, sent, dropped = (int(v) for v in state["totals"])
        self._q = queues
        self._bytes = {name: sum(len(d) for d in q) for name, q in queues.items()}
        self.total_bytes = sum(self._bytes.values())
        self._interval = interval
        self._generated, self._sent, self._dropped = generated, sent, dropped

    def forget(self, ids: set[str]) -> int:
        """Remove the events whose ``Id`` is in ``ids`` (already output), counting them as sent."""
        removed = 0
        for name in QueueName:
            q = self._q[name]
            keep: deque[bytes] = deque()
            for data in q:
                if orjson.loads(data).get("Id") in ids:
                    self._bytes[name] -= len(data)
                    self.total_bytes -= len(data)
                    self._sent += 1
                    self._shared[name].sent += 1
                    removed += 1
                else:
                    keep.append(data)
            self._q[name] = keep
        return removed

    def _evict(self, name: QueueName) -> None:
        data = self._q[name].popleft()
        self._bytes[name] -= len(data)
        self.total_bytes -= len(data)
        self._count_drop(name)

    def _count_drop(self, name: QueueName) -> None:
        self._interval[name].dropped += 1
        self._dropped += 1
        self._shared[name].dropped += 1
