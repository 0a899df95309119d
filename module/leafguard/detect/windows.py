"""Distinct items per key within a window of packet time: the counting every scan and sweep rule shares."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
MAX_KEYS = 2048
MAX_ITEMS = 4096
"""Items kept per key: a threshold above this could never be reached, so `Thresholds` caps counts lower."""


class Window:
    __slots__ = ("alerted", "items", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.items: dict[Hashable, float] = {}
        self.alerted = False


class DistinctCounter(Generic[K]):
    """For each key, the distinct items seen since its window started (windows restart after ``window_s``).

    `add` answers the window the first time it holds ``threshold`` items; after that the key is quiet until its
    window ends, so one finding is raised per key and window (as Zeek's scan policy). The key table is capped
    (the oldest key is forgotten first).
    """

    def __init__(self) -> None:
        self._table: OrderedDict[K, Window] = OrderedDict()

    def add(self, key: K, item: Hashable, ts: float, threshold: int, window_s: float) -> Window | None:
        w = self._table.get(key)
        if w is None or ts - w.start > window_s:
            if w is None and len(self._table) >= MAX_KEYS:
                self._table.popitem(last=False)
            w = self._table[key] = Window(ts)
        if w.alerted or item in w.items or len(w.items) >= MAX_ITEMS:
            return None
        w.items[item] = ts
        if len(w.items) < threshold:
            return None
        w.alerted = True
        return w

    def clear(self) -> None:
        self._table.clear()
