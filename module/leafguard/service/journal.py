"""The event journal beside the saved state: the fleet's inputs since the last save, on disk.

The saved state (`leafguard.service.state`) is taken every ``LEAFGUARD_STATE_INTERVAL_S``; what the agents took in
after it (`leafguard.agent.journal`: observations, ticks, settings) is appended here, so a kill -9 or a power cut
between two saves loses none of the events waiting in the agents' caches and aggregation windows: a restart loads
the state, then applies the journal again.

Layout: ``DATA_DIR/journal/NNNNNNNNNNNNNNNN.jnl``, one segment per saved state. Records are framed as the spool's are
(`leafguard.hub.spool.frame`: magic, kind, length, CRC32): a ``S`` record first, naming the generation of the state
the segment continues (0: a fleet that started empty), then one ``J`` record per input, and in a replay of a
capture an ``F`` record after each batch's inputs with the frames analysed so far (where a restart of the same
replay resumes). Taking a state opens the
next segment; once that state is written, the older segments are deleted. Inputs are collected in memory and
written with one ``write(2)`` per batch of frames and per service tick (:meth:`EventJournal.commit`), before the
output's next step: a kill -9 loses at most the inputs of the batch being analysed when it came (whose frames die
with the process anyway). ``fsync`` follows the spool's policy (what survives a power cut: README, "Data directory").

A restart replays the segments from the loaded state's generation on, in order, and stops at the first record that
is corrupt, torn or undecodable (inputs apply only in sequence): that is counted and reported, and the events the
rest would have restored are missing, not invented. Without a usable state file, only a journal that starts from an
empty fleet is replayed; one that continues a lost state is reported and deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from leafguard.agent import journal as j
from leafguard.hub.spool import FRAME_BYTES, FsyncPolicy, Kind, Record, frame, scan

log = logging.getLogger("leafguard.state")

JOURNAL_DIR = "journal"
SUFFIX = ".jnl"
_FRAMES = struct.Struct("<Q")
SAVE_AFTER_BYTES = 8 * 1024 * 1024
"""A segment this large asks for a state save before the interval ends: a restart replays at most about this."""


@dataclass(slots=True)
class JournalRead:
    """What a restart found in the journal."""

    ops: list[j.FleetOp] = field(default_factory=list)
    segments: int = 0
    corrupt: int = 0
    torn: int = 0
    error: str | None = None
    """Why the replay stopped early, or why the journal was ignored."""
    frames: int | None = None
    """Frames of a replayed capture that the inputs read came from (the last mark among them; None: none)."""
    ops_at_frames: int = 0
    """How many of ``ops`` came before that mark (a replay resumed at it applies only those after damage)."""


class EventJournal:
    """The journal's segments in one folder. Single-threaded (the loop), except :meth:`drop_before`, which only
    deletes segments older than the one being written."""

    def __init__(self, directory: Path, fsync: FsyncPolicy = FsyncPolicy.INTERVAL, fsync_interval_s: float = 1.0
                 ) -> None:
        self.dir = directory
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._fd: int | None = None
        self.segment: int | None = None
        self._buf = bytearray()
        self._last_sync = time.monotonic()
        self._dirty = False
        self.segment_bytes = 0
        """Bytes written to the open segment (a large one asks for an early save)."""
        self.inputs = 0
        """Inputs journalled by this process."""
        self.write_failures = 0
        self.error: str | None = None

    # -- reading (start-up) --------------------------------------------------------------------------------

    def segments(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(int(n[: -len(SUFFIX)]) for n in names if n.endswith(SUFFIX) and n[: -len(SUFFIX)].isdigit())

    def _path(self, segment: int) -> Path:
        return self.dir / f"{segment:016d}{SUFFIX}"

    def read(self, generation: int | None) -> JournalRead:
        """The inputs that continue the state of ``generation`` (None: no state was loaded), in order."""
        out = JournalRead()
        segments = self.segments()
        if generation is not None:
            segments = [s for s in segments if s >= generation]
        for n, segment in enumerate(segments):
            try:
                data = self._path(segment).read_bytes()
            except OSError as exc:
                out.error = f"journal segment {segment} unreadable: {exc.strerror or exc}"
                break
            found = scan(data)
            out.segments += 1
            records = found.records
            if not records or records[0].kind != Kind.JOURNAL_START:
                out.error = f"journal segment {segment} has no start record"
                break
            if n == 0 and generation is None and orjson.loads(records[0].payload).get("after") != 0:
                out.error = "journal continues a saved state that is gone; ignored"
                break
            ops, marked, intact = _inputs(records)
            if marked is not None:
                out.frames, out.ops_at_frames = marked[0], len(out.ops) + marked[1]
            out.ops.extend(ops)
            if not intact or found.corrupt or found.torn:
                out.corrupt, out.torn = found.corrupt, found.torn
                # Inputs apply in sequence: nothing after a damaged or unreadable record can be applied.
                out.error = f"journal segment {segment}: damaged ({found.corrupt} corrupt, {found.torn} torn records)"
                break
        return out

    # -- writing -------------------------------------------------------------------------------------------

    def start(self, segment: int, after: int) -> None:
        """Open segment ``segment``, continuing the state of generation ``after`` (0: an empty fleet)."""
        self.commit(time.monotonic())
        self._close_fd()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = os.open(self._path(segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            self._failed(exc)
            return
        self.segment = segment
        self.segment_bytes = 0
        self._buf += frame(Kind.JOURNAL_START, orjson.dumps({"after": after}))
        self.commit(time.monotonic(), sync=True)

    def record(self, op: j.FleetOp) -> None:
        """One input, in memory until the next :meth:`commit`."""
        self._buf += frame(Kind.JOURNAL_INPUT, j.encode(op))
        self.inputs += 1

    def mark_frames(self, frames: int) -> None:
        """The inputs recorded so far came from the first ``frames`` frames of the capture being replayed: a
        restart of the same replay resumes after them."""
        self._buf += frame(Kind.JOURNAL_FRAMES, _FRAMES.pack(frames))

    def commit(self, mono: float, *, sync: bool = False) -> None:
        """Write what was recorded (one ``write(2)``), and fsync as the policy says."""
        if self._buf and self._fd is not None:
            data, self._buf = bytes(self._buf), bytearray()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self._failed(exc)
                return
            self.segment_bytes += len(data)
            self._dirty = True
        elif self._fd is None:
            self._buf.clear()  # no segment could be opened: reported, nothing to keep it for
        if self._dirty and self._fd is not None and (
            sync or self.fsync is FsyncPolicy.ALWAYS
            or (self.fsync is FsyncPolicy.INTERVAL and mono - self._last_sync >= self.fsync_interval_s)
        ):
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            self._dirty = False
            self._last_sync = mono

    def save_wanted(self) -> bool:
        """The open segment has grown past :data:`SAVE_AFTER_BYTES`."""
        return self.segment_bytes + len(self._buf) > SAVE_AFTER_BYTES

    def drop_before(self, segment: int) -> None:
        """Delete the segments older than ``segment`` (a state that covers them was written)."""
        for old in self.segments():
            if old >= segment:
                break
            with contextlib.suppress(FileNotFoundError):
                self._path(old).unlink()

    def delete_all(self) -> None:
        """Forget every segment (a journal that cannot be applied)."""
        self._close_fd()
        self.segment = None
        self.drop_before(2**63)

    def close(self) -> None:
        self.commit(time.monotonic(), sync=True)
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _failed(self, exc: OSError) -> None:
        self.write_failures += 1
        self.error = f"cannot write the journal in {self.dir}: {exc.strerror or exc}"
        log.warning("%s", self.error)
        self._close_fd()
        self._buf.clear()


def _inputs(records: list[Record]) -> tuple[list[j.FleetOp], tuple[int, int] | None, bool]:
    """The inputs of one segment's records up to the first damage (a gap between records, where the scan skipped
    a corrupt region, or an undecodable record); the last frames mark among them (frames, inputs before it); and
    whether there was no damage."""
    ops: list[j.FleetOp] = []
    frames: tuple[int, int] | None = None
    expected = records[0].offset + len(records[0].payload)
    for rec in records[1:]:
        if rec.offset - FRAME_BYTES != expected:
            return ops, frames, False
        if rec.kind == Kind.JOURNAL_FRAMES and len(rec.payload) == _FRAMES.size:
            frames = (_FRAMES.unpack(rec.payload)[0], len(ops))
        elif rec.kind == Kind.JOURNAL_INPUT:
            try:
                ops.append(j.decode(rec.payload))
            except j.JournalError:
                return ops, frames, False
        else:
            return ops, frames, False
        expected = rec.offset + len(rec.payload)
    return ops, frames, True
