"""Live capture: AF_PACKET sockets, a kernel BPF filter and a TPACKET_V3 ring, one owned thread per interface.

Shape (see docs/live-capture.md for the measurements behind the choices):

* **Kernel side.** Each interface gets its own ``AF_PACKET`` socket. The classic BPF program from
  :mod:`leafguard.capture.bpf` is attached *before* the socket is bound, so no unfiltered frame ever lands
  in the ring. The program passes every frame and only chooses its snap length, which keeps the core's
  packet and byte counters exact. Frames go into a memory-mapped TPACKET_V3 ring of ``block_count`` blocks;
  the kernel hands over a whole block when it is full or after ``block_timeout_ms``.
* **Capture thread.** A thread polls the ring with a timeout (so a stop request is seen within
  ``poll_timeout_s``), copies each retired block into one ``bytes`` object (one copy per block, none per
  frame), turns it into a :class:`~leafguard.capture.batch.FrameBatch` and gives the block back to the
  kernel at once. The batch crosses to the event loop with ``loop.call_soon_threadsafe``.
* **Loop side.** Batches go into one bounded ``asyncio.Queue`` shared by all interfaces. When it is full the
  named overflow policy applies (``drop_oldest`` by default: fresh traffic matters more than a stale
  backlog) and the dropped frames are counted against the interface they came from.
* **Back-pressure before the queue.** Callbacks scheduled with ``call_soon_threadsafe`` sit in the loop's
  own unbounded ready list, so the thread stops taking blocks from the ring while ``max_pending_batches``
  are in flight. The ring then absorbs the burst, and if it overflows the kernel drops and counts
  (PACKET_STATISTICS).
* **Supervision.** One asyncio task per interface runs an explicit state machine (:class:`InterfaceState`):
  a missing or down interface, or a thread that dies, leads to a capped, jittered backoff and a reopen,
  while the other interfaces keep going. A missing capability (CAP_NET_RAW) is the one fatal error.

Every drop is visible in :meth:`LiveCapture.stats`: ``kernel_drops`` (ring full, counted by the kernel),
``ring_freezes`` (how often the ring was full) and ``queue_drops`` (frames dropped by the overflow policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import errno
import fcntl
import logging
import mmap
import os
import random
import select
import socket
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from leafguard.capture.batch import LINKTYPE_ETHERNET, FrameBatch
from leafguard.capture.bpf import DEFAULT_INVENTORY_SNAPLEN, DEFAULT_SNAPLEN, BpfProgram, capture_program
from leafguard.errors import CaptureError

log = logging.getLogger(__name__)

# <linux/if_packet.h>, <linux/if_ether.h>, <linux/sockios.h>
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_DROP_MEMBERSHIP = 2
PACKET_MR_PROMISC = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
ETH_P_ALL = 0x0003
SIOCGIFFLAGS = 0x8913
SIOCGIFINDEX = 0x8933
SIOCGIFHWADDR = 0x8927
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
ETH_P_8021Q = 0x8100

# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1 {block_status, num_pkts,
# offset_to_first_pkt, blk_len, ...}. blk_len counts from the start of the block.
_BLOCK_STATUS_OFF = 8
_BLOCK_HDR = struct.Struct("=III")  # num_pkts, offset_to_first_pkt, blk_len at offset 12
# struct tpacket3_hdr up to hv1.tp_vlan_tpid: next_offset, sec, nsec, snaplen, len, status, mac, net,
# rxhash, vlan_tci, vlan_tpid.
_FRAME_HDR = struct.Struct("=IIIIIIHHIIH")
_FRAME_HDR_BYTES = np.arange(_FRAME_HDR.size)
_FRAME_HDR_DTYPE = np.dtype([("next", "=u4"), ("sec", "=u4"), ("nsec", "=u4"), ("snaplen", "=u4"), ("len", "=u4"),
                    ("status", "=u4"), ("mac", "=u2"), ("net", "=u2"), ("rxhash", "=u4"), ("tci", "=u4"),
                    ("tpid", "=u2")])  # fmt: skip
"""The same header as a numpy record (packed, native byte order), for all frames of a block at once."""
_TPACKET_REQ3 = struct.Struct("=IIIIIII")
_TPACKET_STATS_V3 = struct.Struct("=III")
_U32 = struct.Struct("=I")


class OverflowPolicy(enum.StrEnum):
    """What the bounded capture queue does when it is full."""

    DROP_OLDEST = "drop_oldest"
    """Evict the oldest queued batch to make room: the core sees the freshest traffic."""
    DROP_NEWEST = "drop_newest"
    """Discard the arriving batch: the core sees a contiguous prefix of the traffic."""
    RING = "ring"
    """Never drop in the queue: while it is full the thread leaves blocks in the kernel ring, which becomes the
    overflow buffer (no extra memory); when the ring is full too the kernel drops the newest frames and counts
    them in ``kernel_drops``."""


class InterfaceState(enum.StrEnum):
    """Where one interface's capture is; transitions are logged and reported."""

    STOPPED = "stopped"
    OPENING = "opening"
    RUNNING = "running"
    MISSING = "missing"
    """The interface does not exist (yet); retried with backoff."""
    DOWN = "down"
    """The interface exists but is administratively down, or went down; retried with backoff."""
    FAILED = "failed"
    """Opening failed for another reason, or the capture thread died; retried with backoff."""


_WAITING = frozenset({InterfaceState.MISSING, InterfaceState.DOWN, InterfaceState.FAILED})


@dataclass(frozen=True, slots=True)
class CaptureSettings:
    """Live capture settings (the gateway twin's capture section)."""

    interfaces: tuple[str, ...]
    promiscuous: bool = True
    extra_filter: str = ""
    """An operator's pcap filter expression that narrows what is captured (empty: everything)."""
    snaplen: int = DEFAULT_SNAPLEN
    """Bytes kept of frames that are not inventory protocols; enough for headers and first payload bytes."""
    inventory_snaplen: int = DEFAULT_INVENTORY_SNAPLEN
    block_size: int = 1 << 20
    block_count: int = 16
    block_timeout_ms: int = 50
    queue_maxsize: int = 32
    """Batches, across all interfaces. A batch is at most one block, so with ``max_pending_batches`` this bounds
    user-space buffering to (queue_maxsize + max_pending_batches) x block_size, on top of the ring."""
    overflow: OverflowPolicy = OverflowPolicy.DROP_OLDEST
    max_pending_batches: int = 16
    poll_timeout_s: float = 0.1
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 10.0
    """A thread that ran this long before failing restarts after the initial backoff again."""
    netns: str = ""
    """Capture inside this network namespace (a name under /run/netns, or a path); empty: our own."""

    def __post_init__(self) -> None:
        if not self.interfaces:
            raise ValueError("capture needs at least one interface")
        if len(set(self.interfaces)) != len(self.interfaces):
            raise ValueError(f"capture interfaces repeat: {', '.join(self.interfaces)}")
        page = mmap.PAGESIZE
        if self.block_size < page or self.block_size % page:
            raise ValueError(f"block_size must be a multiple of the page size ({page})")
        if self.block_count < 2:
            raise ValueError("block_count must be at least 2")
        if not 64 <= self.snaplen <= 65535 or not 64 <= self.inventory_snaplen <= 65535:
            raise ValueError("snap lengths must be within 64..65535")
        if self.queue_maxsize < 1 or self.max_pending_batches < 1:
            raise ValueError("queue_maxsize and max_pending_batches must be positive")
        OverflowPolicy(self.overflow)


@dataclass(slots=True)
class InterfaceStats:
    """Counters of one interface since the capture started (they survive restarts)."""

    interface: str
    state: InterfaceState = InterfaceState.STOPPED
    since: float = 0.0
    """Wall-clock time of the last state change."""
    last_error: str = ""
    frames: int = 0
    """Frames read from the ring."""
    bytes: int = 0
    """Their original (wire) length."""
    captured_bytes: int = 0
    """What the snap lengths let through."""
    blocks: int = 0
    kernel_packets: int = 0
    """Frames the kernel filter accepted (PACKET_STATISTICS tp_packets, drops included)."""
    kernel_drops: int = 0
    """Frames the kernel dropped because the ring was full (tp_drops)."""
    ring_freezes: int = 0
    """Times the ring was full (tp_freeze_q_cnt)."""
    queue_drops: int = 0
    """Frames dropped by the queue's overflow policy."""
    queue_dropped_batches: int = 0
    opens: int = 0
    restarts: int = 0
    """Reopens after a running capture ended in an error (thread died, interface vanished or went down)."""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = str(self.state)
        return d


class _InterfaceMissing(OSError):
    pass


class _InterfaceDown(OSError):
    pass


def interface_macs(names: Iterable[str], sysfs: Path = Path("/sys/class/net")) -> list[str]:
    """The hardware addresses of the named interfaces that exist now (the gateway's own MACs on the segments it
    watches); interfaces without one (loopback, tunnels) are left out."""
    found: list[str] = []
    for name in names:
        try:
            mac = (sysfs / name / "address").read_text().strip().lower()
        except OSError:
            continue  # not there (yet): capture reports it
        if len(mac) == 17 and mac != "00:00:00:00:00:00":
            found.append(mac)
    return found


def cap_net_raw_message(interface: str) -> str:
    return (
        f"capture on {interface} needs CAP_NET_RAW: add NET_RAW to HostConfig.CapAdd in the module's createOptions "
        "in the deployment manifest (outside a container: run as root)"
    )


def check_capability(interface: str = "any interface") -> None:
    """Raise :class:`CaptureError` with the fix when the process may not open packet sockets."""
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    except PermissionError as exc:
        raise CaptureError(cap_net_raw_message(interface)) from exc


def _ifreq(name: str) -> bytearray:
    raw = name.encode()
    if len(raw) >= 16:
        raise _InterfaceMissing(errno.ENODEV, f"interface name too long: {name!r}")
    return bytearray(struct.pack("16s16s", raw, b""))


def _interface_index_and_up(sock: socket.socket, name: str) -> tuple[int, bool]:
    try:
        req = _ifreq(name)
        fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, req)
        index = struct.unpack_from("i", req, 16)[0]
        req = _ifreq(name)
        fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, req)
        flags = struct.unpack_from("H", req, 16)[0]
        req = _ifreq(name)
        fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, req)
        hwtype = struct.unpack_from("H", req, 16)[0]
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise _InterfaceMissing(errno.ENODEV, f"interface {name} does not exist") from exc
        raise
    if hwtype not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        # Frames of a tun or PPP link carry no Ethernet header; the filter and the batches assume one.
        raise OSError(errno.EPROTONOSUPPORT, f"interface {name} is not Ethernet (ARPHRD {hwtype})")
    return int(index), bool(flags & IFF_UP)


def _enter_netns(netns: str) -> None:
    """Move the calling thread (only) into a network namespace."""
    path = netns if "/" in netns else f"/run/netns/{netns}"
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class _Ring:
    """One AF_PACKET socket with its TPACKET_V3 ring; used only by its capture thread (and filter swaps)."""

    def __init__(self, interface: str, settings: CaptureSettings, program: BpfProgram) -> None:
        self.interface = interface
        self._block_size = settings.block_size
        self._block_count = settings.block_count
        self._next = 0
        # Protocol 0 receives nothing until bind(), so the filter is in place before the first frame.
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as exc:
            raise CaptureError(cap_net_raw_message(interface)) from exc
        self.mm: mmap.mmap | None = None
        try:
            self.ifindex, up = _interface_index_and_up(self.sock, interface)
            if not up:
                raise _InterfaceDown(errno.ENETDOWN, f"interface {interface} is down")
            program.attach(self.sock)
            self.sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            frame_size = 2048
            req = _TPACKET_REQ3.pack(
                settings.block_size,
                settings.block_count,
                frame_size,
                settings.block_size // frame_size * settings.block_count,
                settings.block_timeout_ms,
                0,
                0,
            )
            self.sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.mm = mmap.mmap(
                self.sock.fileno(),
                settings.block_size * settings.block_count,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
            )
            self.promiscuous = False
            self.set_promiscuous(settings.promiscuous)
            self.sock.bind((interface, ETH_P_ALL))
        except BaseException:
            self.close()
            raise

    def set_filter(self, program: BpfProgram) -> None:
        program.attach(self.sock)

    def set_promiscuous(self, on: bool) -> None:
        # A packet-socket membership, not the interface flag: the kernel counts memberships, so turning ours
        # off leaves promiscuous mode that another program asked for, and closing the socket drops ours.
        if on == self.promiscuous:
            return
        mreq = struct.pack("iHH8s", self.ifindex, PACKET_MR_PROMISC, 0, b"")
        self.sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP if on else PACKET_DROP_MEMBERSHIP, mreq)
        self.promiscuous = on

    def kernel_stats(self) -> tuple[int, int, int]:
        """(packets, drops, freezes) since the last call; the kernel resets them on each read."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS_V3.size)
        packets, drops, freezes = _TPACKET_STATS_V3.unpack(raw)
        return packets, drops, freezes

    def pending_error(self) -> int:
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

    def next_block(self) -> FrameBatch | None:
        """Copy out and release the next retired block, or None if the kernel still owns it."""
        mm = self.mm
        assert mm is not None
        base = self._next * self._block_size
        if not _U32.unpack_from(mm, base + _BLOCK_STATUS_OFF)[0] & TP_STATUS_USER:
            return None
        num, first, blk_len = _BLOCK_HDR.unpack_from(mm, base + 12)
        data = mm[base : base + blk_len]
        # The block goes back to the kernel before parsing, so the ring never waits on Python.
        _U32.pack_into(mm, base + _BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
        self._next = (self._next + 1) % self._block_count
        return _parse_block(data, num, first, self.interface)

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        self.sock.close()


def _parse_block(data: bytes, num: int, first: int, source: str) -> FrameBatch:
    """The block's frames as a batch. The walk from frame to frame (each header says where the next one starts)
    is the one step per frame in Python; the header fields are then gathered for all frames at once."""
    starts = _frame_starts(data, num, first)
    at = np.frombuffer(starts, dtype=np.int64)
    h = np.frombuffer(data, dtype=np.uint8)[at[:, None] + _FRAME_HDR_BYTES].view(_FRAME_HDR_DTYPE).reshape(-1)
    # array.array rather than lists: the core's numpy fast path views them without a per-element conversion.
    batch = FrameBatch(
        LINKTYPE_ETHERNET,
        data,
        array("q", (at + h["mac"]).tobytes()),
        array("q", h["snaplen"].astype(np.int64).tobytes()),
        array("q", h["len"].astype(np.int64).tobytes()),
        array("d", (h["sec"].astype(np.float64) + h["nsec"].astype(np.float64) * 1e-9).tobytes()),
        source,
    )
    status = h["status"]
    tagged = np.flatnonzero(status & TP_STATUS_VLAN_VALID)
    if tagged.size:
        tpid = np.where(status[tagged] & TP_STATUS_VLAN_TPID_VALID, h["tpid"][tagged], ETH_P_8021Q)
        tci = h["tci"][tagged] & 0xFFFF
        _reinsert_vlan_tags(batch, list(zip(tagged.tolist(), tpid.tolist(), tci.tolist(), strict=True)))
    return batch


def _frame_starts(data: bytes, num: int, first: int) -> array[int]:
    """Where each of the block's ``num`` frame headers starts."""
    starts = array("q")
    append = starts.append
    off = first
    if not first & 3:
        # The kernel aligns every frame to 16 bytes: the next-offset field is then a word of the block, and
        # reading it as one is about three times as fast as unpacking it. A frame off the alignment (never seen)
        # makes the walk start again the slow way.
        words = memoryview(data)[: len(data) & ~3].cast("I")
        with contextlib.suppress(IndexError):
            for _ in range(num):
                append(off)
                off += words[off >> 2]
            if not any(x & 3 for x in starts):
                return starts
        starts = array("q")
        append = starts.append
        off = first
    unpack = _U32.unpack_from
    for _ in range(num):
        append(off)
        off += unpack(data, off)[0]
    return starts


def _reinsert_vlan_tags(batch: FrameBatch, vlans: list[tuple[int, int, int]]) -> None:
    """Put back the outer 802.1Q tag the kernel moved into the ring header, so the decoder sees it."""
    tags = {i: struct.pack("!HH", tpid, tci) for i, tpid, tci in vlans}
    data = batch.data
    parts: list[bytes] = []
    pos = 0
    for i, (off, caplen) in enumerate(zip(batch.offsets, batch.caplens, strict=True)):
        tag = tags.get(i)
        batch.offsets[i] = pos
        if tag is None or caplen < 12:
            parts.append(data[off : off + caplen])
            pos += caplen
            continue
        parts += (data[off : off + 12], tag, data[off + 12 : off + caplen])
        batch.caplens[i] = caplen + 4
        batch.wirelens[i] += 4
        pos += caplen + 4
    batch.data = b"".join(parts)


class _CaptureThread(threading.Thread):
    """Owns one ring: opens it, polls it, hands blocks to the loop, closes it."""

    def __init__(self, capture: LiveCapture, interface: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name=f"leafguard.capture[{interface}]", daemon=True)
        self._capture = capture
        self.interface = interface
        self._loop = loop
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._ring: _Ring | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        for fut in (self.opened, self.done):
            # A supervisor cancelled mid-wait no longer reads the outcome; don't let asyncio log it as lost.
            fut.add_done_callback(_consume)
        # Batches in flight = handed - delivered. Each counter has one writer (`+=` is not atomic across
        # threads, even under the GIL), so the difference never drifts.
        self.handed = 0
        self.delivered = 0

    @property
    def pending(self) -> int:
        return self.handed - self.delivered

    def request_stop(self) -> None:
        self._stop_requested.set()

    def set_filter(self, program: BpfProgram) -> None:
        with self._lock:
            if self._ring is not None:
                self._ring.set_filter(program)

    def set_promiscuous(self, on: bool) -> None:
        with self._lock:
            if self._ring is not None:
                self._ring.set_promiscuous(on)

    def _resolve(self, fut: asyncio.Future[None], exc: BaseException | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(settle)

    def run(self) -> None:
        exc: BaseException | None = None
        program = self._capture.program
        try:
            if self._capture.settings.netns:
                _enter_netns(self._capture.settings.netns)
            ring = _Ring(self.interface, self._capture.settings, program)
        except BaseException as e:  # reported to the supervisor, which decides
            self._resolve(self.opened, e)
            self._resolve(self.done, None)
            return
        try:
            with self._lock:
                self._ring = ring
                # set_extra_filter() / set_promiscuous() may have run while the ring was opening.
                if self._capture.program is not program:
                    ring.set_filter(self._capture.program)
                ring.set_promiscuous(self._capture.settings.promiscuous)
        except BaseException as e:
            ring.close()
            self._resolve(self.opened, e)
            self._resolve(self.done, None)
            return
        self._resolve(self.opened, None)
        try:
            self._poll(ring)
        except BaseException as e:  # a dead thread is the supervisor's business
            exc = e
        finally:
            with self._lock:
                self._ring = None
                with contextlib.suppress(OSError):
                    self._account_kernel_stats(ring)
                ring.close()
            self._resolve(self.done, exc)

    def _account_kernel_stats(self, ring: _Ring) -> None:
        packets, drops, freezes = ring.kernel_stats()
        st = self._capture._stats[self.interface]
        st.kernel_packets += packets
        st.kernel_drops += drops
        st.ring_freezes += freezes

    def _poll(self, ring: _Ring) -> None:
        settings = self._capture.settings
        st = self._capture._stats[self.interface]
        poller = select.poll()
        poller.register(ring.sock.fileno(), select.POLLIN | select.POLLERR)
        timeout_ms = max(1, int(settings.poll_timeout_s * 1000))
        next_stats = time.monotonic() + 1.0
        ring_policy = settings.overflow is OverflowPolicy.RING
        while not self._stop_requested.is_set():
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + 1.0
                self._account_kernel_stats(ring)
            if self.pending >= settings.max_pending_batches or (
                ring_policy and self._capture.queue.qsize() + self.pending >= settings.queue_maxsize
            ):
                # The loop is behind: leave blocks in the ring; it absorbs the burst, or the kernel counts drops.
                self._stop_requested.wait(0.002)
                continue
            batch = ring.next_block()
            if batch is None:
                for _fd, events in poller.poll(timeout_ms):
                    if events & select.POLLERR:
                        err = ring.pending_error()
                        if err:
                            cls = _InterfaceDown if err == errno.ENETDOWN else OSError
                            raise cls(err, f"{self.interface}: {os.strerror(err)}")
            elif not self._hand_over(batch, st):
                return
        # Blocks the kernel already retired are handed over on a clean stop; only the block still open
        # (at most block_timeout_ms of traffic) is left, and it shows as kernel_packets - kernel_drops - frames.
        while (batch := ring.next_block()) is not None:
            if not self._hand_over(batch, st):
                return

    def _hand_over(self, batch: FrameBatch, st: InterfaceStats) -> bool:
        """Count a batch and schedule it onto the loop; False once the loop is closed."""
        st.blocks += 1
        st.frames += len(batch)
        st.bytes += sum(batch.wirelens)
        st.captured_bytes += sum(batch.caplens)
        self.handed += 1
        try:
            self._loop.call_soon_threadsafe(self._capture._deliver, self, batch)
        except RuntimeError:  # the loop closed under us: nothing left to deliver to
            return False
        return True


class _Backoff:
    """Capped exponential backoff with jitter (so restarting interfaces don't retry in lockstep)."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self._initial = initial_s
        self._max = max_s
        self._tries = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._tries = 0

    def next_delay(self) -> float:
        cap = min(self._max, self._initial * (2**self._tries))
        self._tries = min(self._tries + 1, 30)
        return float(cap * self._rng.uniform(0.5, 1.0))


@dataclass(slots=True)
class _Supervised:
    thread: _CaptureThread | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class LiveCapture:
    """Live capture on one or more interfaces into one bounded queue of :class:`FrameBatch`.

    Usage (inside the service's TaskGroup)::

        capture = LiveCapture(CaptureSettings(interfaces=("eth1",)))
        check_capability("eth1")                  # optional early, one-line failure
        tg.create_task(capture.run(), name="capture")
        while True:
            analyzer.feed(await capture.get())

    ``run()`` supervises every interface until it is cancelled; on cancellation it stops the threads (each
    within ``poll_timeout_s``) and returns the cancellation. It raises :class:`CaptureError` only for what no
    retry can fix: a missing CAP_NET_RAW, or an invalid extra filter in the initial settings.
    """

    def __init__(
        self,
        settings: CaptureSettings,
        *,
        on_state_change: Callable[[InterfaceStats], None] | None = None,
    ) -> None:
        self.settings = settings
        self.program = capture_program(
            settings.extra_filter, snaplen=settings.snaplen, inventory_snaplen=settings.inventory_snaplen
        )
        self.queue: asyncio.Queue[FrameBatch] = asyncio.Queue(settings.queue_maxsize)
        self._on_state_change = on_state_change
        self._stats = {name: InterfaceStats(name) for name in settings.interfaces}
        self._threads: dict[str, _CaptureThread] = {}
        self._running = False
        self._group: asyncio.TaskGroup | None = None
        self._supervisors: dict[str, asyncio.Task[None]] = {}
        self._retired_drops = 0
        """Kernel and queue drops of interfaces no longer captured (so drop totals never go backwards)."""

    # -- the consumer side ---------------------------------------------------------------------------------

    async def get(self) -> FrameBatch:
        """The next batch, from whichever interface."""
        return await self.queue.get()

    def stats(self) -> dict[str, InterfaceStats]:
        """A snapshot of every interface's counters and state (the interfaces captured now)."""
        return {name: replace(st) for name, st in self._stats.items()}

    def dropped_total(self) -> int:
        """Frames lost before the analyzer since the start, on every interface ever captured: never decreases."""
        return self._retired_drops + sum(st.kernel_drops + st.queue_drops for st in self._stats.values())

    def set_interfaces(self, interfaces: tuple[str, ...]) -> None:
        """Capture on these interfaces from now on: new ones are opened (supervised as at start), removed ones
        are stopped and leave the statistics; the counters of those that stay go on.

        Raises:
            CaptureError: the list is empty or repeats a name; nothing changes.
        """
        try:
            settings = replace(self.settings, interfaces=tuple(interfaces))
        except ValueError as exc:
            raise CaptureError(str(exc)) from exc
        old = self.settings.interfaces
        self.settings = settings
        for name in old:
            if name not in settings.interfaces:
                task = self._supervisors.get(name)
                if task is not None:
                    task.cancel()  # its finally stops the thread; _retire drops the stats once it is done
                else:
                    self._retire(name)
        for name in settings.interfaces:
            if name not in old:
                self._stats.setdefault(name, InterfaceStats(name))
                if self._group is not None:
                    self._start_supervisor(self._group, name)
        log.info("capture interfaces are now %s", ", ".join(settings.interfaces))

    def set_promiscuous(self, on: bool) -> None:
        """Turn promiscuous mode on or off on every open socket and on those opened later."""
        self.settings = replace(self.settings, promiscuous=on)
        for thread in list(self._threads.values()):
            thread.set_promiscuous(on)
        log.info("promiscuous mode is now %s", "on" if on else "off")

    def set_extra_filter(self, expression: str) -> None:
        """Compile and apply a new operator filter on every open socket.

        Raises:
            CaptureError: the expression does not compile; the previous filter stays in force.
        """
        program = capture_program(
            expression, snaplen=self.settings.snaplen, inventory_snaplen=self.settings.inventory_snaplen
        )
        self.program = program
        self.settings = replace(self.settings, extra_filter=expression)
        for thread in self._threads.values():
            thread.set_filter(program)
        log.info("capture filter is now %s", program.expression)

    # -- the loop side of the thread hand-off -------------------------------------------------------------

    def _deliver(self, thread: _CaptureThread, batch: FrameBatch) -> None:
        thread.delivered += 1
        q = self.queue
        if q.full():
            # Under RING the threads keep the queue from filling; only several interfaces racing for its last
            # slots get here, and then the oldest batch goes, as under DROP_OLDEST.
            if self.settings.overflow is OverflowPolicy.DROP_NEWEST:
                self._count_drop(batch)
                return
            self._count_drop(q.get_nowait())
        q.put_nowait(batch)

    def _count_drop(self, batch: FrameBatch) -> None:
        st = self._stats.get(batch.source)
        if st is not None:
            st.queue_drops += len(batch)
            st.queue_dropped_batches += 1

    # -- supervision -----------------------------------------------------------------------------------------

    def _set_state(self, st: InterfaceStats, state: InterfaceState, error: str = "") -> None:
        if st.state is state:
            if error:
                st.last_error = error
            return
        previous = st.state
        st.state = state
        st.since = time.time()
        if error:
            st.last_error = error
        if state in _WAITING:
            log.warning("capture on %s: %s (%s)", st.interface, state, error)
        elif state is InterfaceState.RUNNING and previous in _WAITING:
            log.info("capture on %s recovered", st.interface)
        if self._on_state_change is not None:
            self._on_state_change(replace(st))

    async def run(self) -> None:
        """Capture until cancelled. Raises :class:`CaptureError` when CAP_NET_RAW is missing."""
        if self._running:
            raise RuntimeError("LiveCapture.run() is already running")
        self._running = True
        try:
            check_capability(", ".join(self.settings.interfaces))
            async with asyncio.TaskGroup() as tg:
                self._group = tg
                for name in self.settings.interfaces:
                    self._start_supervisor(tg, name)
                # The group stays open for interfaces added later, until the capture is cancelled.
                await asyncio.get_running_loop().create_future()
        except BaseExceptionGroup as group:
            # Callers expect the one-line CaptureError itself; anything else (a bug) keeps its group.
            fatal, rest = group.split(CaptureError)
            if fatal is not None and rest is None:
                raise _first_leaf(fatal) from None
            raise
        finally:
            self._group = None
            self._running = False

    def _start_supervisor(self, tg: asyncio.TaskGroup, name: str) -> None:
        previous = self._supervisors.get(name)
        task = tg.create_task(self._supervise(name, previous), name=f"leafguard.capture[{name}].supervisor")
        self._supervisors[name] = task
        task.add_done_callback(lambda done: self._supervisor_done(name, done))

    def _supervisor_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._supervisors.get(name) is task:
            del self._supervisors[name]
            if name not in self.settings.interfaces:
                self._retire(name)

    def _retire(self, name: str) -> None:
        st = self._stats.pop(name, None)
        if st is not None:
            self._retired_drops += st.kernel_drops + st.queue_drops

    async def _supervise(self, interface: str, previous: asyncio.Task[None] | None = None) -> None:
        if previous is not None and not previous.done():
            # Removed and added again before its old supervisor stopped: one thread per interface at a time.
            await asyncio.wait({previous})
        loop = asyncio.get_running_loop()
        st = self._stats[interface]
        backoff = _Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        was_running = False
        try:
            while True:
                if st.state not in _WAITING:
                    # A retry keeps the waiting state, so a missing interface is reported once, not per attempt.
                    self._set_state(st, InterfaceState.OPENING)
                thread = _CaptureThread(self, interface, loop)
                self._threads[interface] = thread
                thread.start()
                try:
                    await _await_shielded(thread.opened)
                except CaptureError:
                    raise
                except OSError as exc:
                    self._threads.pop(interface, None)
                    state = (
                        InterfaceState.MISSING
                        if isinstance(exc, _InterfaceMissing)
                        else InterfaceState.DOWN
                        if isinstance(exc, _InterfaceDown)
                        else InterfaceState.FAILED
                    )
                    self._set_state(st, state, _describe(exc))
                    await asyncio.sleep(backoff.next_delay())
                    continue
                if was_running:
                    st.restarts += 1
                st.opens += 1
                self._set_state(st, InterfaceState.RUNNING)
                started = loop.time()
                try:
                    await _await_shielded(thread.done)
                    error = "capture thread ended"
                    state = InterfaceState.FAILED
                except _InterfaceDown as exc:
                    error, state = _describe(exc), InterfaceState.DOWN
                except Exception as exc:  # a dead thread, whatever killed it, is restarted
                    error, state = _describe(exc), InterfaceState.FAILED
                    if not isinstance(exc, OSError):
                        log.error("capture thread for %s died", interface, exc_info=exc)
                # Only a thread that has ended leaves the registry; on cancellation the finally below stops it.
                self._threads.pop(interface, None)
                was_running = True
                if loop.time() - started >= self.settings.stable_after_s:
                    backoff.reset()
                self._set_state(st, state, error)
                await asyncio.sleep(backoff.next_delay())
        finally:
            left = self._threads.pop(interface, None)
            if left is not None:
                left.request_stop()
                await _join(left, self.settings.poll_timeout_s * 20)
            self._set_state(st, InterfaceState.STOPPED)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


async def _await_shielded(fut: asyncio.Future[None]) -> None:
    await asyncio.shield(fut)


async def _join(thread: _CaptureThread, timeout_s: float) -> None:
    """Wait for a stopping thread without blocking the loop, even while our task is being cancelled."""
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline:
        # A plain sleep: a second cancellation must not leave the thread behind unawaited in silence.
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            thread.join(max(0.0, deadline - time.monotonic()))
            raise
    if thread.is_alive():
        log.error("capture thread for %s did not stop within %.1f s", thread.interface, timeout_s)
