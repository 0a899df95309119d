"""The order in which a capped table gives up entries, at a cost per eviction that does not depend on its size.

The conversation and MAC tables are plain dicts, for lookup speed. Their eviction order lives beside them in two
deques of their entries: taking the oldest entry of a dict itself (``next(iter(d))``) looks cheap but is not in
CPython, where a dict keeps the slots of deleted entries until it is resized and iteration starts by skipping all
of them: with entries evicted from the front, every eviction walks past every one evicted before it (hundreds of
thousands once a burst of new conversations fills a 200,000-entry table; issue #12, defect 6).

An entry is *quiet* when it has not been active for the idle time (5 minutes for conversations and MACs), and
*proven* when it was still active in the second half of its time in the table so far (a conversation that outlasts
its wait in the queue, a leaf that keeps talking): a scan probe, a flood's short conversation or a spoofed MAC, all
active only around when they were admitted, are not. New entries wait in a *probation* queue, proven ones in a
*protected* queue. When the table is full, one eviction:

1. looks at the protected entry promoted longest ago: if it is quiet it goes; if not it goes to the back of its
   queue (so that, over time, every protected entry is looked at and the quiet ones leave);
2. looks at probation entries, oldest first: a quiet one goes; a proven one moves to the protected queue and the
   next is looked at; the first that is neither (recent, but active only around its admission: what a burst of new
   conversations, a scan or a MAC flood is made of) goes;
3. when nothing waits in probation (every entry is proven), or after `MAX_PROMOTED` promotions in one eviction,
   goes back to the protected queue: of its `SAMPLE` oldest, the first quiet one goes, and if none is, the least
   recently active of them (on a tie, the one promoted last); the others go to the back.

So a flood evicts its own oldest entries and the quiet ones, not an established conversation or a leaf that is
still active; what it costs is the short conversations of others that started while it lasts. An eviction in a
flood looks at two entries at most; any eviction at ``1 + MAX_PROMOTED + SAMPLE`` at most, and as an entry is promoted
once at most, at three on average per admission.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

V = TypeVar("V")

SAMPLE = 4
"""Protected entries compared when every entry is proven."""
MAX_PROMOTED = 64
"""Probation entries promoted in one eviction, at most (each entry once in its life)."""


class Queue(Protocol[V]):
    """What the eviction order needs of a queue: `collections.deque`'s methods of these names."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> V: ...
    def append(self, entry: V, /) -> None: ...
    def extend(self, entries: Iterable[V], /) -> None: ...
    def popleft(self) -> V: ...
    def rotate(self, n: int, /) -> None: ...


class RowQueue:
    """A queue of row numbers (ints below 2**31) in a ring of machine ints: 4 to 8 bytes an entry where a deque
    holds an int object of 28 bytes (and 8 for its reference) per row number above 256."""

    __slots__ = ("_head", "_mask", "_ring", "_size")

    def __init__(self) -> None:
        self._ring = array("i", bytes(4 * 16))
        self._mask = 15
        self._head = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: int) -> int:
        if i != 0 or not self._size:
            raise IndexError("only the front of a RowQueue is read")
        return self._ring[self._head]

    def append(self, row: int) -> None:
        if self._size > self._mask:
            # Full: unroll into a ring twice the size.
            ring, head = self._ring, self._head
            self._ring = ring[head:] + ring[:head] + array("i", bytes(4 * len(ring)))
            self._head = 0
            self._mask = 2 * len(ring) - 1
        self._ring[(self._head + self._size) & self._mask] = row
        self._size += 1

    def extend(self, rows: Iterable[int]) -> None:
        for row in rows:
            self.append(row)

    def popleft(self) -> int:
        if not self._size:
            raise IndexError("pop from an empty RowQueue")
        row = self._ring[self._head]
        self._head = (self._head + 1) & self._mask
        self._size -= 1
        return row

    def rotate(self, n: int) -> None:
        if n != -1:
            raise ValueError("a RowQueue rotates by -1 only (its front to its back)")
        if self._size:
            self.append(self.popleft())


class EvictionQueue(Generic[V]):
    """The entries of one capped table. The table's owner calls `admit` for every entry it adds and removes entries
    only when `victim` names them, so the queues hold exactly the table's entries (the entries themselves, not their
    keys: looking at one costs no lookup in the table)."""

    __slots__ = ("_admitted", "_last_active", "_probation", "_protected", "looked_at")

    def __init__(
        self,
        last_active: Callable[[V], float],
        admitted: Callable[[V], float],
        queue: Callable[[], Queue[V]] = deque,
    ) -> None:
        """``last_active``: when an entry was last active; ``admitted``: when it entered the table; ``queue``:
        makes the two queues (`RowQueue` for a table whose entries are row numbers)."""
        self._last_active = last_active
        self._admitted = admitted
        self._probation: Queue[V] = queue()
        self._protected: Queue[V] = queue()
        self.looked_at = 0
        """Entries looked at by `victim`, in total."""

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def admit(self, entry: V) -> None:
        self._probation.append(entry)

    def victim(self, now: float, idle_s: float) -> V:
        """The entry to evict at packet time ``now``; it leaves the queue, and the owner removes it from the table."""
        last_active = self._last_active
        protected = self._protected
        probation = self._probation
        if protected:
            self.looked_at += 1
            if now - last_active(protected[0]) >= idle_s:
                return protected.popleft()
            protected.rotate(-1)
        admitted = self._admitted
        for _ in range(MAX_PROMOTED):
            if not probation:
                break
            entry = probation[0]
            self.looked_at += 1
            t = last_active(entry)
            # Active in the second half of its time here (strictly: not an entry active at one instant only).
            if now - t >= idle_s or not 2.0 * t > now + admitted(entry):
                return probation.popleft()
            protected.append(probation.popleft())
        return self._least_recent(now, idle_s)

    def _least_recent(self, now: float, idle_s: float) -> V:
        protected = self._protected
        if not protected:
            raise LookupError("no entry to evict")
        last_active = self._last_active
        seen: list[V] = []
        oldest = 0
        oldest_t = 0.0
        for i in range(min(SAMPLE, len(protected))):
            entry = protected.popleft()
            self.looked_at += 1
            t = last_active(entry)
            if now - t >= idle_s:
                protected.extend(seen)
                return entry
            seen.append(entry)
            if not i or t <= oldest_t:
                oldest, oldest_t = i, t
        victim = seen.pop(oldest)
        protected.extend(seen)
        return victim
