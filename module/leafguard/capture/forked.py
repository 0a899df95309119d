"""A capture file read in a second process, beside the analysis.

Walking the records of a pcap file is one sequential Python loop (each record's length says where the next
one starts), and so is the analysis; on a machine with two CPUs the two can overlap. A forked child runs
`read_batches` on the file, plus an optional ``prepare`` step that needs nothing but the batch (the stateless
half of the bulk plan), and sends each batch's record arrays and prepared result down a pipe. The frame bytes
do not travel: the parent reads the same stretch of the file itself (one ``pread`` per 8 MB chunk).

The parent sees the same batches, in the same order, as `read_batches` would give it, and the same errors
(a `CaptureFileError` raised in the child is raised again in the parent, with its message). The pipe is the
bounded queue between the two: the child blocks when the parent falls behind. A child that dies without
saying why is a bug and raises `ReaderProcessError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from array import array
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path

from leafguard.capture.batch import FrameBatch
from leafguard.capture.pcapfile import FileStats, read_batches
from leafguard.errors import CaptureFileError, LeafGuardError

MIN_FILE_BYTES = 8 << 20
"""Below this a file is read in-process: there is too little to overlap to pay for the child."""

RUN_AHEAD = 16
"""Batches the reader may be ahead of the parent (each message is about 300 kB for 8192 frames)."""

Prepare = Callable[[FrameBatch], object]


class ReaderProcessError(LeafGuardError):
    """The reader process failed other than on the file's content (a bug, or it was killed)."""


def worth_forking(path: str | Path) -> bool:
    """Whether reading ``path`` in a child process can help: a fork-capable OS, two CPUs, a large file."""
    if not hasattr(os, "fork"):
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
        size = os.stat(path).st_size
    except OSError:
        return False  # the in-process reader reports the problem
    return cpus >= 2 and size >= MIN_FILE_BYTES


def read_batches_forked(
    path: str | Path,
    *,
    batch_frames: int = 8192,
    stats: FileStats | None = None,
    prepare: Prepare | None = None,
) -> Iterator[FrameBatch]:
    """`read_batches`, with the reading (and ``prepare``, whose result lands in ``batch.prepared``) done by a
    forked child process."""
    path = Path(path)
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_child, args=(path, batch_frames, prepare, sender), name="leafguard-reader", daemon=True
    )
    child.start()
    sender.close()
    fd = -1
    chunk_at = -1
    chunk = b""
    try:
        while True:
            try:
                msg = receiver.recv()
            except EOFError:
                child.join()
                raise ReaderProcessError(
                    f"{path}: the reader process ended without finishing (exit code {child.exitcode})"
                ) from None
            tag = msg[0]
            if tag == "batch":
                _, linktype, data_at, data_len, offsets, caplens, wirelens, stamps, prepared = msg
                if data_at != chunk_at or len(chunk) != data_len:
                    if fd < 0:
                        fd = _open(path)
                    chunk = os.pread(fd, data_len, data_at)
                    chunk_at = data_at
                    if len(chunk) != data_len:
                        raise CaptureFileError(f"{path}: the file shrank while it was being read")
                yield FrameBatch(
                    linktype=linktype,
                    data=chunk,
                    offsets=_ints(offsets),
                    caplens=_ints(caplens),
                    wirelens=_ints(wirelens),
                    timestamps=_floats(stamps),
                    source=str(path),
                    file_offset=data_at,
                    prepared=prepared,
                )
            elif tag == "end":
                if stats is not None:
                    stats.truncated_records += msg[1]
                return
            elif tag == "error":
                raise CaptureFileError(msg[1])
            else:
                raise ReaderProcessError(f"{path}: the reader process failed:\n{msg[1]}")
    finally:
        receiver.close()
        if fd >= 0:
            os.close(fd)
        if child.is_alive():
            child.terminate()  # the parent stopped early (an error, or the consumer closed the generator)
        child.join()


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CaptureFileError(f"{path}: cannot open: {exc.strerror or exc}") from exc


def _ints(raw: bytes) -> array[int]:
    out = array("q")
    out.frombytes(raw)
    return out


def _floats(raw: bytes) -> array[float]:
    out = array("d")
    out.frombytes(raw)
    return out


def _child(path: Path, batch_frames: int, prepare: Prepare | None, out: Connection) -> None:
    # Ctrl-C is the parent's to handle; it then stops this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _widen(out)
    # A sender thread lets the reader run up to RUN_AHEAD batches ahead of the parent: writing to the pipe
    # releases the GIL, and a write blocked on a full pipe no longer stalls the record walk.
    outbox: queue.Queue[tuple[object, ...] | None] = queue.Queue(maxsize=RUN_AHEAD)
    sender = threading.Thread(target=_send_all, args=(outbox, out), name="leafguard-reader-send", daemon=True)
    sender.start()
    try:
        st = FileStats(str(path))
        for b in read_batches(path, batch_frames=batch_frames, stats=st):
            if b.file_offset < 0:
                raise AssertionError("a file reader's batch must say where its bytes are in the file")
            outbox.put(
                (
                    "batch", b.linktype, b.file_offset, len(b.data), _raw(b.offsets), _raw(b.caplens),
                    _raw(b.wirelens), _raw(b.timestamps), prepare(b) if prepare is not None else None,
                )
            )  # fmt: skip
        outbox.put(("end", st.truncated_records))
    except CaptureFileError as exc:
        outbox.put(("error", str(exc)))
    except BaseException:
        outbox.put(("crash", traceback.format_exc()))
    finally:
        outbox.put(None)
        sender.join()
        out.close()


def _send_all(outbox: queue.Queue[tuple[object, ...] | None], out: Connection) -> None:
    while (msg := outbox.get()) is not None:
        try:
            out.send(msg)
        except BrokenPipeError:
            return  # the parent stopped reading; it stops this process too


def _widen(conn: Connection) -> None:
    """A larger pipe (Linux allows 1 MB unprivileged) means fewer switches between the two processes."""
    with contextlib.suppress(OSError):  # the default size works, only slower
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)


def _raw(seq: object) -> bytes:
    if isinstance(seq, array):
        return seq.tobytes()
    raise AssertionError(f"reader arrays are array.array, not {type(seq).__name__}")
