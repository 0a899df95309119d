"""Replaying capture files as if they were live: ``leafguard run --pcap FILE --replay-speed X``.

Frames are released when the wall clock, scaled by ``speed``, reaches their capture time relative to the first
frame: at speed 2 a one-minute capture takes thirty seconds. Speed 0 (or infinity) means as fast as the consumer
takes them. A reader batch can span minutes of capture time, so each one is cut into slices of at most
``slice_s`` of replay time that share the batch's buffer; the timing decision (:func:`release_plan`) is a pure
function of the timestamps, and the clock and sleep are injectable, so the pacing is testable without waiting.

When the consumer falls behind, frames that are due are released at once (the schedule is absolute, as in
tcpreplay), so a replay never takes longer than the capture divided by the speed plus the consumer's lag.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

from leafguard.capture.batch import FrameBatch
from leafguard.capture.pcapfile import read_batches


def as_fast_as_possible(speed: float) -> bool:
    return speed <= 0 or math.isinf(speed)


def release_plan(
    timestamps: Sequence[float], *, origin_ts: float, speed: float, slice_s: float = 0.01
) -> list[tuple[int, int, float]]:
    """Cut frames into ``(start, end, due_s)`` slices; ``due_s`` is seconds after the replay started.

    A slice holds consecutive frames due within ``slice_s`` of its first frame. Frames out of time order are
    due no earlier than the frame before them, so a slice never waits for a frame that is already late.
    """
    if not timestamps:
        return []
    if as_fast_as_possible(speed):
        return [(0, len(timestamps), 0.0)]
    plan: list[tuple[int, int, float]] = []
    start = 0
    start_due = max(0.0, (timestamps[0] - origin_ts) / speed)
    due = start_due
    for i in range(1, len(timestamps)):
        due = max(due, (timestamps[i] - origin_ts) / speed)
        if due - start_due >= slice_s:
            plan.append((start, i, start_due))
            start, start_due = i, due
    plan.append((start, len(timestamps), start_due))
    return plan


def slice_batch(batch: FrameBatch, start: int, end: int) -> FrameBatch:
    """Frames ``start:end`` of ``batch``, sharing its buffer (no copy of frame bytes)."""
    if start == 0 and end == len(batch):
        return batch
    return FrameBatch(
        batch.linktype,
        batch.data,
        batch.offsets[start:end],
        batch.caplens[start:end],
        batch.wirelens[start:end],
        batch.timestamps[start:end],
        batch.source,
    )


class PcapReplay:
    """An async iterator of :class:`FrameBatch` from capture files, paced at capture speed times ``speed``."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        speed: float = 1.0,
        slice_s: float = 0.01,
        batch_frames: int = 8192,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        read: Callable[[Path, int], Iterator[FrameBatch]] | None = None,
    ) -> None:
        if math.isnan(speed):
            raise ValueError("replay speed must be a number")
        self.paths = [Path(p) for p in paths]
        self.speed = speed
        self.slice_s = slice_s
        self.batch_frames = batch_frames
        self._clock = clock
        self._sleep = sleep
        self._read = read or (lambda path, n: read_batches(path, batch_frames=n))
        self.frames = 0
        """Frames released so far."""

    def __aiter__(self) -> AsyncIterator[FrameBatch]:
        return self._run()

    async def _run(self) -> AsyncIterator[FrameBatch]:
        origin_ts: float | None = None
        started = self._clock()
        for path in self.paths:
            batches = self._read(path, self.batch_frames)
            try:
                while True:
                    # The reader blocks on disk; a thread keeps the loop (and its signal handlers) responsive.
                    batch = await asyncio.to_thread(next, batches, None)
                    if batch is None:
                        break
                    if not batch.timestamps:
                        continue
                    if origin_ts is None:
                        origin_ts = batch.timestamps[0]
                    for start, end, due in release_plan(
                        batch.timestamps, origin_ts=origin_ts, speed=self.speed, slice_s=self.slice_s
                    ):
                        wait = started + due - self._clock()
                        if wait > 0:
                            await self._sleep(wait)
                        self.frames += end - start
                        yield slice_batch(batch, start, end)
            finally:
                # An early exit (cancellation, consumer stops) must not leave the file open until GC.
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
