"""The conversation table's index of IPv4 conversations: key -> row, with no Python object per conversation.

An IPv4 conversation's key is the pair the bulk step groups frames by (`fastpath.classify`): ``k1``, its two
addresses (lower, higher) as one unsigned 64-bit number, and ``k2``, its ports and protocol (``lo << 24 | hi << 8
| proto``, never 0). The keys themselves live in the table's row columns (`ConversationTable.k1`, ``k2``); the
index is one int32 array of slots, each 0 (empty) or a row + 1, searched by linear probing from the key's hash
(multiply-shift), kept at most half full and doubled when it would be fuller. A slot costs 4 bytes, so an indexed
conversation costs 8 to 16 bytes, against about 120 in a dict (its entry, an int key and an int row).

Lookups of a whole batch are vectorised (`get_many`); single lookups, insertions and removals (backward-shift
deletion, so no tombstones) read and write single cells through memoryviews, at the cost of a dict operation or
a few.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

_M1 = 0x9E3779B97F4A7C15
_M2 = 0xC2B2AE3D27D4EB4F
_MASK64 = (1 << 64) - 1
MIN_SLOTS = 1024


def close_gap(slots: Any, mask: int, i: int, home: Callable[[int], int]) -> None:
    """Empty slot ``i`` of an open-addressing table with linear probing (``slots`` hold entry + 1, 0 when free;
    ``home(entry)`` is an entry's first slot): the entries after it move back so that no probe stops short."""
    j = i
    while True:
        j = (j + 1) & mask
        r = slots[j]
        if not r:
            break
        h = home(r - 1)
        # The entry at j may fill the hole at i unless its home lies cyclically in (i, j].
        if (i < h <= j) if i <= j else (h > i or h <= j):
            continue
        slots[i] = r
        i = j
    slots[i] = 0


class RowIndex:
    """IPv4 keys -> rows, for keys held in the columns ``k1`` (uint64) and ``k2`` (int64) of the rows."""

    def __init__(self, k1: npt.NDArray[np.uint64], k2: npt.NDArray[np.int64]) -> None:
        self._k1 = k1
        self._k2 = k2
        self._k1c: Any = k1.data
        self._k2c: Any = k2.data
        self.count = 0
        self._alloc(MIN_SLOTS)

    def _alloc(self, size: int) -> None:
        self._slots: npt.NDArray[np.int32] = np.zeros(size, dtype=np.int32)
        self._sc: Any = self._slots.data
        self._mask = size - 1
        self._shift = 64 - (size.bit_length() - 1)

    def __len__(self) -> int:
        return self.count

    @property
    def size(self) -> int:
        """Its slots (at least twice `count`)."""
        return int(self._slots.size)

    def _home(self, k1: int, k2: int) -> int:
        return ((k1 * _M1 + k2 * _M2) & _MASK64) >> self._shift

    def _homes(self, k1: npt.NDArray[np.uint64], k2: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        # uint64 arithmetic wraps as the scalar `_home` masks: the same slot either way.
        h = k1 * np.uint64(_M1) + k2.astype(np.uint64) * np.uint64(_M2)
        return (h >> np.uint64(self._shift)).astype(np.int64)

    def get(self, k1: int, k2: int) -> int | None:
        """The row of key (k1, k2), if indexed."""
        sc, k1c, k2c, mask = self._sc, self._k1c, self._k2c, self._mask
        i = self._home(k1, k2)
        while True:
            r = sc[i]
            if not r:
                return None
            r -= 1
            if k2c[r] == k2 and k1c[r] == k1:
                return int(r)
            i = (i + 1) & mask

    def get_many(self, k1: npt.NDArray[np.uint64], k2: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The rows of many keys at once, -1 where a key is not indexed."""
        out = np.full(k1.size, -1, dtype=np.int64)
        if not self.count or not k1.size:
            return out
        at = self._homes(k1, k2)
        todo = np.arange(k1.size)
        slots, mask = self._slots, self._mask
        while todo.size:
            s = at[todo]
            r = slots[s].astype(np.int64) - 1
            used = r >= 0
            rr = np.where(used, r, 0)
            hit = used & (self._k2[rr] == k2[todo]) & (self._k1[rr] == k1[todo])
            out[todo[hit]] = r[hit]
            go_on = used & ~hit
            todo = todo[go_on]
            at[todo] = (s[go_on] + 1) & mask
        return out

    def add(self, row: int, k1: int, k2: int) -> None:
        """Index ``row`` by its key, ``(k1, k2)`` (in the columns already; not indexed yet)."""
        if 2 * (self.count + 1) > self._slots.size:
            self._grow()
        sc, mask = self._sc, self._mask
        i = ((k1 * _M1 + k2 * _M2) & _MASK64) >> self._shift
        while sc[i]:
            i = (i + 1) & mask
        sc[i] = row + 1
        self.count += 1

    def remove(self, row: int) -> None:
        """Stop indexing ``row`` (it is indexed); the entries after it move back so no probe stops short."""
        sc, k1c, k2c, mask = self._sc, self._k1c, self._k2c, self._mask
        i = self._home(k1c[row], k2c[row])
        while sc[i] != row + 1:
            i = (i + 1) & mask
        close_gap(sc, mask, i, lambda r: self._home(k1c[r], k2c[r]))
        self.count -= 1

    def rows(self) -> npt.NDArray[np.int64]:
        """Every indexed row (in no particular order)."""
        used: npt.NDArray[np.int64] = self._slots[self._slots != 0].astype(np.int64)
        used -= 1
        return used

    def _grow(self) -> None:
        rows = self.rows()
        self._alloc(self._slots.size * 2)
        at = self._homes(self._k1[rows], self._k2[rows])
        slots, mask = self._slots, self._mask
        todo = np.arange(rows.size)
        while todo.size:
            s = at[todo]
            free = slots[s] == 0
            # Of the entries that reach the same free slot, the first takes it; the others look again there.
            _, first = np.unique(s[free], return_index=True)
            won = todo[free][first]
            slots[at[won]] = rows[won] + 1
            placed = np.zeros(rows.size, dtype=bool)
            placed[won] = True
            todo = todo[~placed[todo]]
            busy = slots[at[todo]] != 0
            at[todo[busy]] = (at[todo[busy]] + 1) & mask
