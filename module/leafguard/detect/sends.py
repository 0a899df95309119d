"""The send times of one batch, per source MAC, for the detectors that watch rates over time (silence, floods).

Frames reach the log from both halves of the core: the bulk step hands over arrays, the per-frame walk one frame
at a time. `SendLog.take` merges them and sorts by MAC, then time, so that what the trackers find does not depend
on which half counted a frame, or on where batches begin and end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Sends:
    """A batch's frames sorted by (MAC, time); ``starts``: where each MAC's run begins."""

    macs: npt.NDArray[np.int64]
    ts: npt.NDArray[np.float64]
    starts: npt.NDArray[np.int64]


class SendLog:
    def __init__(self) -> None:
        self._walked_macs: list[int] = []
        self._walked_ts: list[float] = []
        self._bulk: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]] = []

    def sent(self, mac: bytes, ts: float) -> None:
        """One frame sent by ``mac``, from the per-frame path."""
        self._walked_macs.append(int.from_bytes(mac, "big"))
        self._walked_ts.append(ts)

    def sent_many(self, macs: npt.NDArray[np.int64], ts: npt.NDArray[np.float64]) -> None:
        """Frames counted in bulk: their source MACs as integers, and their times."""
        self._bulk.append((macs, ts))

    def take(self) -> Sends | None:
        """Everything sent since the last call, sorted; None if nothing was."""
        parts = self._bulk
        if self._walked_macs:
            parts.append((np.asarray(self._walked_macs, dtype=np.int64), np.asarray(self._walked_ts, dtype=np.float64)))
            self._walked_macs = []
            self._walked_ts = []
        self._bulk = []
        if not parts:
            return None
        macs = np.concatenate([p[0] for p in parts])
        ts = np.concatenate([p[1] for p in parts])
        if not macs.size:
            return None
        order = np.lexsort((ts, macs))
        m = macs[order]
        starts = np.flatnonzero(np.concatenate(([True], m[1:] != m[:-1])))
        return Sends(m, ts[order], starts)
