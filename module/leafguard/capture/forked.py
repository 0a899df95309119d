"""A capture file read in a second process, beside the analysis.

Walking the records of a pcap file is one sequential Python loop (each record's length says where the next
one starts), and so is the analysis; on a machine with two CPUs the two can overlap. A forked child runs
`read_batches` on the file, plus an optional ``prepare`` step that needs nothing but the batch (the stateless
half of the bulk plan), and sends each batch's record arrays and prepared result down a pipe (pickle protocol 5,
numpy buffers out of band). The frame bytes do not travel: the parent reads the same stretch of the file itself,
one ``pread`` per 8 MB chunk, on a receiving thread (both copies are system calls that release the GIL).

The parent sees the same batches, in the same order, as `read_batches` would give it, and the same errors
(a `CaptureFileError` raised in the child is raised again in the parent, with its message). Every queue between
the two is bounded and blocks when full (nothing is dropped; the reader simply waits): the child's outbox of
``RUN_AHEAD`` batches, the pipe, and the parent's ``RECEIVED_AHEAD`` received batches. A child that dies without
saying why is a bug and raises `ReaderProcessError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import pickle
import queue
import signal
import struct
import threading
import traceback
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from leafguard.capture.batch import FrameBatch
from leafguard.errors import CaptureFileError

if TYPE_CHECKING:  # numpy and the file reader are imported where they run: see `start_reader`
    import numpy as np
    import numpy.typing as npt

    from leafguard.capture.pcapfile import FileStats

MIN_FILE_BYTES = 8 << 20
"""Below this a file is read in-process: there is too little to overlap to pay for the child."""

RUN_AHEAD = 8
"""Batches the reader process may have ready before the parent takes them (about 1.3 MB each for 16384 frames)."""
RECEIVED_AHEAD = 2
"""Batches (with their 8 MB chunk of frames) the parent may have received before the analysis takes them."""

Prepare = Callable[[FrameBatch], object]


class BatchRules(Protocol):
    """Stateful work on every batch of the file, in order, done in the reader process after ``prepare`` (the batch
    has its ``prepared`` result): what it returns for a batch lands in ``batch.found``, what `finish` returns at
    the end of the file in `ForkedReader.found_at_end`."""

    def __call__(self, batch: FrameBatch) -> object: ...

    def finish(self) -> object: ...

_Batch = tuple[str, int, int, int, "npt.NDArray[np.int64]", "npt.NDArray[np.int64]", "npt.NDArray[np.int64]",
               "npt.NDArray[np.float64]", object, object]  # fmt: skip


class ReaderProcessError(RuntimeError):
    """The reader process failed other than on the file's content: a bug, or it was killed. Not a
    `LeafGuardError`: nothing the user can fix, so it crashes with the child's traceback."""


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
    rules: BatchRules | None = None,
) -> Iterator[FrameBatch]:
    """`read_batches`, with the reading (and ``prepare``, whose result lands in ``batch.prepared``, and ``rules``)
    done by a forked child process."""
    reader = start_reader(path, batch_frames=batch_frames, prepare=prepare, rules=rules)
    try:
        yield from reader.batches(stats)
    finally:
        reader.close()


def start_reader(
    path: str | Path, *, batch_frames: int = 8192, prepare: Prepare | None = None, rules: BatchRules | None = None
) -> ForkedReader:
    """Fork the reader now. This module imports neither numpy nor the file reader, so a caller can start the
    child before its own heavy imports and let both processes import at once (``prepare`` and ``rules`` may
    import what they need on their first call, in the child)."""
    return ForkedReader(Path(path), batch_frames, prepare, rules)


class ForkedReader:
    """A running reader process, and the parent's end of it (a thread that receives its batches)."""

    def __init__(self, path: Path, batch_frames: int, prepare: Prepare | None, rules: BatchRules | None) -> None:
        self.path = path
        self.found_at_end: object = None
        """What the ``rules`` returned at the end of the file (once `batches` is done)."""
        ctx = multiprocessing.get_context("fork")
        self._read_fd, write_fd = os.pipe()
        self._child = ctx.Process(
            target=_child, args=(path, batch_frames, prepare, rules, (self._read_fd, write_fd)),
            name="leafguard-reader", daemon=True,
        )  # fmt: skip
        self._child.start()
        os.close(write_fd)
        self._receiver = _Receiver(path, self._read_fd)
        self._closed = False

    def batches(self, stats: FileStats | None = None) -> Iterator[FrameBatch]:
        """The file's batches, in order; its cut records are added to ``stats`` at the end."""
        path, child = self.path, self._child
        while True:
            item = self._receiver.get()
            if isinstance(item, FrameBatch):
                yield item
                continue
            tag, value = item
            if tag == "end":
                truncated, self.found_at_end = cast(tuple[int, object], value)
                if stats is not None:
                    stats.truncated_records += truncated
                return
            if tag == "error":
                raise CaptureFileError(cast(str, value))
            if tag == "raise":
                raise cast(BaseException, value)
            if tag == "eof":
                child.join()
                raise ReaderProcessError(
                    f"{path}: the reader process ended without finishing (exit code {child.exitcode})"
                )
            raise ReaderProcessError(f"{path}: the reader process failed:\n{value}")

    def close(self) -> None:
        """Stop the child if it still runs (the consumer stopped early, or an error), and reap it."""
        if self._closed:
            return
        self._closed = True
        self._receiver.stop()
        if self._child.is_alive():
            self._child.terminate()
        self._child.join()
        self._receiver.join()
        os.close(self._read_fd)


class _Receiver:
    """The parent's end: a thread that receives the child's messages and reads the frame bytes they refer to.

    Both are system calls that release the GIL (the copy from the pipe and from the page cache), so they overlap
    the analysis; the thread is at most ``RECEIVED_AHEAD`` batches ahead of it.
    """

    def __init__(self, path: Path, read_fd: int) -> None:
        self._path = path
        self._read_fd = read_fd
        self._ready: queue.Queue[FrameBatch | tuple[str, object]] = queue.Queue(maxsize=RECEIVED_AHEAD)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leafguard-reader-receive", daemon=True)
        self._thread.start()

    def get(self) -> FrameBatch | tuple[str, object]:
        return self._ready.get()

    def stop(self) -> None:
        self._stopping.set()

    def join(self) -> None:
        self._thread.join()

    def _put(self, item: FrameBatch | tuple[str, object]) -> None:
        while not self._stopping.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        fd = -1
        chunk_at = -1
        chunk = b""
        try:
            while not self._stopping.is_set():
                try:
                    msg = _receive(self._read_fd)
                except EOFError:
                    self._put(("eof", None))
                    return
                if msg[0] != "batch":
                    self._put((cast(str, msg[0]), msg[1]))
                    return
                _, linktype, data_at, data_len, offsets, caplens, wirelens, stamps, prepared, found = cast(_Batch, msg)
                if data_at != chunk_at or len(chunk) != data_len:
                    if fd < 0:
                        fd = _open(self._path)
                    chunk = os.pread(fd, data_len, data_at)
                    chunk_at = data_at
                    if len(chunk) != data_len:
                        raise CaptureFileError(f"{self._path}: the file shrank while it was being read")
                batch = FrameBatch(
                    linktype=linktype,
                    data=chunk,
                    offsets=_column("q", offsets),
                    caplens=_column("q", caplens),
                    wirelens=_column("q", wirelens),
                    timestamps=_column("d", stamps),
                    source=str(self._path),
                    file_offset=data_at,
                    prepared=prepared,
                    found=found,
                )
                self._put(batch)
        except BaseException as exc:  # raised again in the consuming thread
            self._put(("raise", exc))
        finally:
            if fd >= 0:
                os.close(fd)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CaptureFileError(f"{path}: cannot open: {exc.strerror or exc}") from exc


def _column(typecode: str, values: npt.NDArray[np.generic]) -> array[Any]:
    """A received numpy column as the `array` a `FrameBatch` holds (``q`` for integers, ``d`` for times)."""
    out = array(typecode)
    out.frombytes(values.tobytes() if not values.flags.c_contiguous else values.data.cast("B"))
    return out


def _child(
    path: Path, batch_frames: int, prepare: Prepare | None, rules: BatchRules | None, pipe: tuple[int, int]
) -> None:
    from leafguard.capture.pcapfile import FileStats, read_batches

    read_fd, write_fd = pipe
    os.close(read_fd)
    # Ctrl-C is the parent's to handle; it then stops this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _widen(write_fd)
    # A sender thread lets the reader run up to RUN_AHEAD batches ahead of the parent: writing to the pipe
    # releases the GIL, and a write blocked on a full pipe no longer stalls the record walk.
    outbox: queue.Queue[tuple[object, ...] | None] = queue.Queue(maxsize=RUN_AHEAD)
    sender = threading.Thread(target=_send_all, args=(outbox, write_fd), name="leafguard-reader-send", daemon=True)
    sender.start()
    try:
        st = FileStats(str(path))
        for b in read_batches(path, batch_frames=batch_frames, stats=st):
            if b.file_offset < 0:
                raise AssertionError("a file reader's batch must say where its bytes are in the file")
            b.prepared = prepare(b) if prepare is not None else None
            outbox.put(
                (
                    "batch", b.linktype, b.file_offset, len(b.data), _np(b.offsets, "int64"),
                    _np(b.caplens, "int64"), _np(b.wirelens, "int64"), _np(b.timestamps, "float64"),
                    b.prepared, rules(b) if rules is not None else None,
                )
            )  # fmt: skip
        outbox.put(("end", (st.truncated_records, rules.finish() if rules is not None else None)))
    except CaptureFileError as exc:
        outbox.put(("error", str(exc)))
    except BaseException:  # reported to the parent, which raises it
        outbox.put(("crash", traceback.format_exc()))
    finally:
        outbox.put(None)
        sender.join()
        os.close(write_fd)


def _send_all(outbox: queue.Queue[tuple[object, ...] | None], fd: int) -> None:
    while (msg := outbox.get()) is not None:
        try:
            _send(fd, msg)
        except BrokenPipeError:
            return  # the parent stopped reading; it stops this process too


# Messages are pickled with protocol 5 and their large buffers (numpy arrays) sent out of band, after the
# pickle: the parent reads each straight into its own buffer and unpickles arrays as views of it, no copy.
_HEAD = struct.Struct("<QI")
_SIZE = struct.Struct("<Q")


def _send(fd: int, msg: tuple[object, ...]) -> None:
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    parts: list[bytes | memoryview] = [_HEAD.pack(len(head), len(raws)), *(_SIZE.pack(r.nbytes) for r in raws)]
    parts += [head, *raws]
    for part in parts:
        view = memoryview(part).cast("B")
        while view.nbytes:
            view = view[os.write(fd, view) :]


def _receive(fd: int) -> tuple[object, ...]:
    head_len, count = _HEAD.unpack(_read_exact(fd, _HEAD.size))
    sizes = [_SIZE.unpack(_read_exact(fd, _SIZE.size))[0] for _ in range(count)]
    head = _read_exact(fd, head_len)
    buffers = [_read_exact(fd, n) for n in sizes]
    msg = pickle.loads(head, buffers=buffers)
    assert isinstance(msg, tuple)
    return msg


def _read_exact(fd: int, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError
        got += k
    return buf


def _widen(fd: int) -> None:
    """A larger pipe (Linux allows 1 MB unprivileged) means fewer switches between the two processes."""
    with contextlib.suppress(OSError):  # the default size works, only slower
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


def _np(seq: object, dtype: str) -> npt.NDArray[np.generic]:
    import numpy as np

    if isinstance(seq, array):
        return np.frombuffer(seq, dtype=dtype)
    raise AssertionError(f"reader arrays are array.array, not {type(seq).__name__}")
