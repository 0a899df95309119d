"""Floods: a MAC that sends more than a set rate over a window of packet time.

Windows are fixed stretches of ``FLOOD_WINDOW_S`` seconds (packet time divided by the window length), so counts
only add up, whatever the batches. A window's count reaching the rate times the window is a finding, stamped with the
time of the frame that crossed it (in time order); after one, the same MAC is quiet for ``QUIET_S`` seconds, so a
flood that lasts raises one finding every five minutes, not one per window.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from leafguard.detect.sends import Sends

FLOOD_WINDOW_S = 10.0
QUIET_S = 300.0


class FloodTracker:
    """Frames per MAC in its current window (bounded by the caller's MAC table), and the floods found."""

    def __init__(self, rate_per_s: float, max_macs: int) -> None:
        self.rate_per_s = rate_per_s
        self.threshold = max(1, int(np.ceil(rate_per_s * FLOOD_WINDOW_S)))
        """Frames in one window that make a flood."""
        self._max_macs = max_macs
        self._windows: OrderedDict[int, tuple[int, int]] = OrderedDict()
        """MAC -> (its latest window, frames in it so far), oldest first: the oldest goes when full (an OrderedDict,
        whose oldest entry is found in O(1); a dict's ``next(iter())`` first skips every slot deleted before)."""
        self._alerted: dict[int, float] = {}

    def batch(self, sends: Sends) -> list[tuple[int, float, float]]:
        """The floods a batch completes, as (MAC, time of the frame that crossed the threshold, window start)."""
        m, t = sends.macs, sends.ts
        win = np.floor(t / FLOOD_WINDOW_S).astype(np.int64)
        starts = np.flatnonzero(np.concatenate(([True], (m[1:] != m[:-1]) | (win[1:] != win[:-1]))))
        sizes = np.diff(np.append(starts, m.size))
        found: list[tuple[int, float, float]] = []
        windows = self._windows
        groups = zip(m[starts].tolist(), win[starts].tolist(), starts.tolist(), sizes.tolist(), strict=True)
        for mac, w, at, n in groups:
            current = windows.get(mac)
            if current is None and len(windows) >= self._max_macs:
                forgotten, _ = windows.popitem(last=False)
                self._alerted.pop(forgotten, None)
            before = 0
            if current is not None:
                if current[0] > w:
                    continue  # a late frame of a window already past: counted nowhere
                if current[0] == w:
                    before = current[1]
            windows[mac] = (w, before + n)
            if before < self.threshold <= before + n:
                crossed = float(t[at + self.threshold - before - 1])
                last = self._alerted.get(mac)
                if last is None or crossed - last >= QUIET_S:
                    self._alerted[mac] = crossed
                    found.append((mac, crossed, w * FLOOD_WINDOW_S))
        return found
