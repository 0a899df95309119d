"""Leaves gone silent: a leaf that sends nothing for ``silent_after_s`` of packet time.

A silence is a gap between two frames a leaf sent, or between its last frame and the latest packet time, of at
least ``silent_after_s``; it is named by the time of the frame before it, and found once. Each batch's send
times (`sends.Sends`, sorted per MAC) are compared with the last time from earlier batches, so the gaps, and
therefore the findings, do not depend on how frames were split into batches. Silences still going on are
looked for at most once per second of packet time, and once more at the end of the input
(`SilenceTracker.silent_now`); one that ends later is the same finding.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from leafguard.detect.sends import Sends

CHECK_EVERY_S = 1.0


class SilenceTracker:
    """Last send time per MAC (bounded by the caller's MAC table), and the silences found."""

    def __init__(self, silent_after_s: float, max_macs: int) -> None:
        self.silent_after_s = silent_after_s
        self._max_macs = max_macs
        self._last: OrderedDict[int, float] = OrderedDict()
        """MAC -> the last time it sent, oldest entry first: the oldest goes when full (in O(1), unlike a dict's
        ``next(iter())``, which first skips every slot deleted before)."""
        self._reported: dict[int, float] = {}
        """MAC -> the start of the last silence found for it."""
        self._checked_at: float | None = None

    def batch(self, sends: Sends) -> list[tuple[int, float]]:
        """The silences that ended in a batch, as (MAC, start)."""
        m, t, starts = sends.macs, sends.ts, sends.starts
        found: list[tuple[int, float]] = []
        # Gaps inside the batch (rare: it takes a batch longer than the silence time).
        gap = np.flatnonzero((t[1:] - t[:-1] >= self.silent_after_s) & (m[1:] == m[:-1]))
        found += [(int(m[i]), float(t[i])) for i in gap.tolist()]
        # Gaps from earlier batches, and the new last times.
        ends = np.append(starts[1:], m.size) - 1
        last = self._last
        for mac, first, newest in zip(m[starts].tolist(), t[starts].tolist(), t[ends].tolist(), strict=True):
            before = last.get(mac)
            if before is not None:
                if first - before >= self.silent_after_s:
                    found.append((mac, before))
                last[mac] = max(newest, before)
                continue
            if len(last) >= self._max_macs:
                forgotten, _ = last.popitem(last=False)
                self._reported.pop(forgotten, None)
            last[mac] = newest
        found.sort()  # per MAC in time order: a gap from an earlier batch comes before those inside this one
        return [f for f in found if self._new(*f)]

    def silent_now(self, now: float, *, final: bool = False) -> list[tuple[int, float]]:
        """Silences still going on at packet time ``now``: at most once per `CHECK_EVERY_S`, unless ``final``."""
        if not final and self._checked_at is not None and now - self._checked_at < CHECK_EVERY_S:
            return []
        self._checked_at = now
        limit = now - self.silent_after_s
        return [(mac, t) for mac, t in self._last.items() if t <= limit and self._new(mac, t)]

    def _new(self, mac: int, start: float) -> bool:
        """A silence not found yet: later than the last one found for the MAC (they are found in time order)."""
        before = self._reported.get(mac)
        if before is not None and start <= before:
            return False
        self._reported[mac] = start
        return True
