"""A capped table of TCP port pairs in the order they were added, with no Python object per entry.

The TCP rules remember up to 65,536 port pairs each (`scans`: pairs whose SYN was seen; `bruteforce`: connections
from their SYN to their end), and forget the pair added first when full. As a dict of packed ints with an order
deque, an entry cost about 150 bytes (the int key, a dict entry, a deque slot, a record object with its float);
here it is a position in a few numpy columns (an IPv4 pair's key is its two addresses as one 64-bit number and
its two ports as one 32-bit number) and an int32 slot in an open-addressing index (linear probing, backward-shift
deletion; at most half full), about 20 bytes plus the owner's own columns.

Positions are handed out in order of addition, so the oldest entry is the first live position; an entry removed
out of order leaves a hole, skipped when the oldest is looked for. When the positions run out, the live entries
move to the front in order (`_compact`, vectorised; the index's slots are renumbered, not rebuilt), at most once
per ``slack`` additions (an eighth of the cap by default). Non-IPv4 pairs (IPv6, rare here) are kept in a dict
beside the columns, in the same order of positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from leafguard.observe.rowindex import close_gap

_V4 = 1
_OTHER = 2
"""`_live` codes: an IPv4 pair (in the index) or another (in `PairTable._others`); 0 is a free or removed position."""


def wide_pair(src: bytes, sport: int, dst: bytes, dport: int) -> int:
    """A non-IPv4 (source, source port, destination, destination port) as one int (the leading 1 keeps the
    address lengths apart)."""
    return (int.from_bytes(b"\x01" + src + dst, "big") << 32) | (sport << 16) | dport


class PairTable:
    """Port pairs (source, source port, destination, destination port) -> positions, oldest first; at most ``cap``
    at once (the owner removes the oldest before adding to a full table). Owners keep what they know of each
    pair in columns of their own made by `column`, read and written at the pair's position."""

    __slots__ = (
        "_capacity", "_columns", "_head", "_k1", "_k1c", "_k2", "_k2c", "_lc", "_live", "_mask", "_others",
        "_others_at", "_sc", "_slots", "_tail", "cap", "count",
    )  # fmt: skip

    def __init__(self, cap: int, slack: int | None = None) -> None:
        self.cap = cap
        self.count = 0
        self._capacity = cap + (slack if slack is not None else max(1024, cap // 8))
        # numpy's zeros come from calloc: pages not yet written to take no memory, so a table that never fills
        # costs only what it holds.
        self._k1: npt.NDArray[np.uint64] = np.zeros(self._capacity, dtype=np.uint64)
        self._k2: npt.NDArray[np.uint32] = np.zeros(self._capacity, dtype=np.uint32)
        self._live: npt.NDArray[np.uint8] = np.zeros(self._capacity, dtype=np.uint8)
        self._columns: list[npt.NDArray[Any]] = [self._k1, self._k2, self._live]
        self._k1c = self._k1.data
        self._k2c = self._k2.data
        self._lc = self._live.data
        size = 16
        while size < 2 * cap:
            size *= 2
        self._slots: npt.NDArray[np.int32] = np.zeros(size, dtype=np.int32)
        self._sc = self._slots.data
        self._mask = size - 1
        self._head = 0
        """No live position lies before it."""
        self._tail = 0
        """The next position to hand out."""
        self._others: dict[int, int] = {}
        """Non-IPv4 pairs (`wide_pair`) -> position."""
        self._others_at: dict[int, int] = {}
        """The same, position -> pair."""

    def __len__(self) -> int:
        return self.count

    def column(self, dtype: npt.DTypeLike) -> Any:
        """A column of the owner's, indexed by position (kept in step when entries move); as a memoryview, whose
        single cells are the cheapest to read and write from Python."""
        col = np.zeros(self._capacity, dtype=dtype)
        self._columns.append(col)
        return col.data

    # The probes are written out in each method rather than shared: a call costs as much as the probe itself, and
    # the TCP rules look a pair up for nearly every control segment. The hash is Python's own of the two key ints
    # (a tuple's mixes them well), so a slot costs no arithmetic on big ints.

    def find(self, src: bytes, sport: int, dst: bytes, dport: int) -> int:
        """The pair's position, -1 if it is not in the table."""
        if len(src) != 4:
            return self._others.get(wide_pair(src, sport, dst, dport), -1)
        k1 = int.from_bytes(src + dst, "big")
        k2 = (sport << 16) | dport
        sc, k1c, k2c, mask = self._sc, self._k1c, self._k2c, self._mask
        i = hash((k1, k2)) & mask
        while r := sc[i]:
            r -= 1
            if k2c[r] == k2 and k1c[r] == k1:
                return r
            i = (i + 1) & mask
        return -1

    def find_v4(self, k1: int, k2: int) -> int:
        """`find` for an IPv4 pair given as its addresses (source << 32 | destination) and ports (source << 16 |
        destination)."""
        sc, k1c, k2c, mask = self._sc, self._k1c, self._k2c, self._mask
        i = hash((k1, k2)) & mask
        while r := sc[i]:
            r -= 1
            if k2c[r] == k2 and k1c[r] == k1:
                return r
            i = (i + 1) & mask
        return -1

    def put(self, src: bytes, sport: int, dst: bytes, dport: int) -> tuple[int, bool]:
        """The pair's position, and whether it was added now (as the newest; the table must not be full)."""
        if len(src) != 4:
            key = wide_pair(src, sport, dst, dport)
            pos = self._others.get(key)
            if pos is not None:
                return pos, False
            pos = self._next()
            self._others[key] = pos
            self._others_at[pos] = key
            self._lc[pos] = _OTHER
            return pos, True
        return self.put_v4(int.from_bytes(src + dst, "big"), (sport << 16) | dport)

    def put_v4(self, k1: int, k2: int) -> tuple[int, bool]:
        """`put` for an IPv4 pair given as in `find_v4`."""
        sc, k1c, k2c, mask = self._sc, self._k1c, self._k2c, self._mask
        i = hash((k1, k2)) & mask
        while r := sc[i]:
            r -= 1
            if k2c[r] == k2 and k1c[r] == k1:
                return r, False
            i = (i + 1) & mask
        pos = self._next()  # a compaction renumbers the slots' positions, not where they are: slot i stays free
        k1c[pos] = k1
        k2c[pos] = k2
        self._lc[pos] = _V4
        sc[i] = pos + 1
        return pos, True

    def _next(self) -> int:
        if self.count >= self.cap:
            raise OverflowError("the table is full: remove its oldest entry first")
        if self._tail == self._capacity:
            self._compact()
        pos = self._tail
        self._tail += 1
        self.count += 1
        return pos

    def oldest(self) -> int:
        """The position of the entry added first of those in the table (it has one)."""
        lc, h = self._lc, self._head
        while not lc[h]:
            h += 1
        self._head = h
        return h

    def remove(self, pos: int) -> None:
        """Take the entry at ``pos`` (a live one) out of the table."""
        lc = self._lc
        if lc[pos] == _OTHER:
            del self._others[self._others_at.pop(pos)]
        else:
            self._unindex(pos)
        lc[pos] = 0
        self.count -= 1

    def _unindex(self, pos: int) -> None:
        sc, k1c, k2c, mask = self._sc, self._k1c, self._k2c, self._mask
        i = hash((k1c[pos], k2c[pos])) & mask
        while sc[i] != pos + 1:
            i = (i + 1) & mask
        close_gap(sc, mask, i, lambda r: hash((k1c[r], k2c[r])) & mask)

    def _compact(self) -> None:
        """Move the live entries to the front, in order, with their columns; renumber the index and the others."""
        live = np.flatnonzero(self._live[self._head : self._tail]) + self._head
        n = int(live.size)
        for col in self._columns:
            col[:n] = col[live]
        self._live[n:] = 0
        new_at = np.zeros(self._capacity + 1, dtype=np.int32)
        new_at[live + 1] = np.arange(1, n + 1, dtype=np.int32)
        self._slots[:] = new_at[self._slots]
        if self._others_at:
            moved = dict(zip(live.tolist(), range(n), strict=True))
            self._others_at = {moved[p]: key for p, key in self._others_at.items()}
            self._others = {key: p for p, key in self._others_at.items()}
        self._head = 0
        self._tail = n

    def positions(self) -> npt.NDArray[np.int64]:
        """The live positions, oldest first."""
        return np.flatnonzero(self._live[self._head : self._tail]) + self._head
