"""LiveCapture against real kernel frames on veth pairs inside throwaway network namespaces (root only)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from leafguard.capture.batch import FrameBatch
from leafguard.capture.live import (
    _FRAME_HDR,
    TP_STATUS_USER,
    TP_STATUS_VLAN_TPID_VALID,
    TP_STATUS_VLAN_VALID,
    CaptureSettings,
    InterfaceState,
    InterfaceStats,
    LiveCapture,
    OverflowPolicy,
    _Backoff,
    _parse_block,
    _Ring,
    cap_net_raw_message,
)
from leafguard.errors import CaptureError
from testkit import wait
from testkit.netns import Lab, Netns, needs_root

pytestmark = [pytest.mark.netns, needs_root, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
LEAF_MAC = bytes.fromhex("020000000a01")
BCAST = b"\xff" * 6

SENDER = textwrap.dedent(
    """
    import socket, sys
    frames = [bytes.fromhex(h) for h in sys.argv[3].split(",")]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((sys.argv[1], 0))
    for _ in range(int(sys.argv[2])):
        for f in frames:
            s.send(f)
    """
)


def frame(ethertype: int, size: int, *, tag: bytes = b"", fill: int = 0) -> bytes:
    head = BCAST + LEAF_MAC + tag + struct.pack("!H", ethertype)
    return head + bytes([fill]) * (size - len(head))


def udp_frame(dport: int, size: int) -> bytes:
    """An IPv4/UDP frame of exactly ``size`` bytes to a port of our choosing."""
    payload = size - 14 - 20 - 8
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + payload, 1, 0, 64, 17, 0, bytes([10, 77, 0, 2]),
                     bytes([10, 77, 0, 1]))
    udp = struct.pack("!HHHH", 40000, dport, 8 + payload, 0)
    return BCAST + LEAF_MAC + b"\x08\x00" + ip + udp + bytes(payload)


Start = Callable[[LiveCapture], None]


@dataclass
class Pair:
    lab: Lab
    gw: Netns
    leaf: Netns

    def send(self, frames: list[bytes], repeat: int = 1, ifname: str = "eth0") -> None:
        self.leaf.python(SENDER, ifname, str(repeat), ",".join(f.hex() for f in frames))


@pytest.fixture
def pair() -> Iterator[Pair]:
    with Lab() as lab:
        gw = lab.netns("gw")
        leaf = lab.netns("leaf")
        lab.veth(gw, "cap0", leaf, "eth0")
        yield Pair(lab, gw, leaf)


def settings_for(pair: Pair, **kw: object) -> CaptureSettings:
    base = CaptureSettings(
        interfaces=("cap0",),
        netns=pair.gw.name,
        block_size=1 << 16,
        block_count=8,
        block_timeout_ms=10,
        poll_timeout_s=0.05,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


until = functools.partial(wait.until, interval_s=0.02, timeout_s=5.0)
"""Every wait here is for the capture's own threads, on veth pairs: 5 s is ample."""


@pytest.fixture
async def running() -> AsyncIterator[Start]:
    tasks: list[asyncio.Task[None]] = []

    def start(cap: LiveCapture) -> None:
        tasks.append(asyncio.get_running_loop().create_task(cap.run()))

    yield start
    for t in tasks:
        t.cancel()
    for t in tasks:
        with pytest.raises(asyncio.CancelledError):
            await t


def blocks_are(cap: LiveCapture, n: int) -> Callable[[], bool]:
    return lambda: cap.stats()["cap0"].blocks == n


def drain(cap: LiveCapture) -> list[FrameBatch]:
    out = []
    while not cap.queue.empty():
        out.append(cap.queue.get_nowait())
    return out


async def collect(cap: LiveCapture, n: int, within: float = 5.0) -> list[FrameBatch]:
    """Batches from the queue until they hold ``n`` frames, then whatever else is already queued."""
    out: list[FrameBatch] = []
    async with asyncio.timeout(within):
        while sum(len(b) for b in out) < n:
            out.append(await cap.get())
    return out + drain(cap)


def frames_of(batches: list[FrameBatch]) -> list[tuple[bytes, int, int]]:
    return [(b.frame(i), b.caplens[i], b.wirelens[i]) for b in batches for i in range(len(b))]


async def test_frames_arrive_in_batches_cut_by_the_snap_length(pair: Pair, running: Start) -> None:
    cap = LiveCapture(settings_for(pair, snaplen=128))
    start_wall = time.time()
    running(cap)
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)
    bulk, dns = udp_frame(9999, 1000), udp_frame(53, 900)
    pair.send([bulk, dns, frame(0x88B5, 60)], repeat=10)
    batches = await collect(cap, 30)
    got = frames_of(batches)
    assert len(got) == 30
    assert all(b.source == "cap0" and b.linktype == 1 for b in batches)
    assert got[0] == (bulk[:128], 128, 1000)
    assert got[1] == (dns, 900, 900)
    assert got[2][1:] == (60, 60)
    ts = [t for b in batches for t in b.timestamps]
    assert ts == sorted(ts)
    assert start_wall - 1 < ts[0] <= ts[-1] < time.time() + 1
    st = cap.stats()["cap0"]
    assert (st.frames, st.bytes, st.captured_bytes) == (30, 10 * 1960, 10 * (128 + 900 + 60))
    assert st.opens == 1 and st.restarts == 0 and st.kernel_drops == 0 and st.queue_drops == 0


async def test_vlan_tags_reach_the_decoder_intact(pair: Pair, running: Start) -> None:
    cap = LiveCapture(settings_for(pair))
    running(cap)
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)
    tagged = frame(0x0800, 100, tag=b"\x81\x00\x20\x07", fill=0x45)
    qinq = frame(0x0800, 100, tag=b"\x88\xa8\x00\x05\x81\x00\x00\x06", fill=0x45)
    plain = frame(0x0800, 100, fill=0x45)
    pair.send([tagged, plain, qinq])
    got = frames_of(await collect(cap, 3))
    assert got == [(tagged, 100, 100), (plain, 100, 100), (qinq, 100, 100)]


async def test_extra_filter_changes_at_run_time_and_a_bad_one_keeps_the_old(
    pair: Pair, running: Start
) -> None:
    cap = LiveCapture(settings_for(pair, extra_filter="not udp port 7"))
    running(cap)
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)
    pair.send([udp_frame(7, 100), udp_frame(8, 100)])
    await asyncio.sleep(0.1)
    assert [f[0][36:38] for f in frames_of(await collect(cap, 1))] == [b"\x00\x08"]

    cap.set_extra_filter("not udp port 8")
    with pytest.raises(CaptureError, match="invalid capture filter 'udp prot 9'"):
        cap.set_extra_filter("udp prot 9")
    assert cap.settings.extra_filter == "not udp port 8"
    pair.send([udp_frame(7, 100), udp_frame(8, 100)])
    await asyncio.sleep(0.1)
    assert [f[0][36:38] for f in frames_of(await collect(cap, 1))] == [b"\x00\x07"]


def test_an_invalid_initial_filter_fails_at_construction() -> None:
    with pytest.raises(CaptureError, match="invalid capture filter"):
        LiveCapture(CaptureSettings(interfaces=("eth0",), extra_filter="port"))


async def test_missing_and_down_interfaces_are_retried_while_others_keep_going(
    pair: Pair, running: Start
) -> None:
    changes: list[InterfaceStats] = []
    cap = LiveCapture(settings_for(pair, interfaces=("cap0", "cap1")), on_state_change=changes.append)
    running(cap)
    await until(lambda: cap.stats()["cap1"].state is InterfaceState.MISSING)
    assert cap.stats()["cap0"].state is InterfaceState.RUNNING
    assert "does not exist" in cap.stats()["cap1"].last_error

    pair.lab.veth(pair.gw, "cap1", pair.leaf, "eth1", up=False)
    pair.leaf.up("eth1")
    await until(lambda: cap.stats()["cap1"].state is InterfaceState.DOWN)
    pair.gw.up("cap1")
    await until(lambda: cap.stats()["cap1"].state is InterfaceState.RUNNING)
    pair.send([udp_frame(9, 80)], ifname="eth1")
    pair.send([udp_frame(9, 80)], ifname="eth0")
    await until(lambda: cap.stats()["cap1"].frames == 1 and cap.stats()["cap0"].frames == 1)

    # Down while running: noticed through the socket error, reopened once it is up again.
    pair.gw.run("ip", "link", "set", "cap1", "down")
    await until(lambda: cap.stats()["cap1"].state is InterfaceState.DOWN)
    pair.gw.up("cap1")
    await until(lambda: cap.stats()["cap1"].state is InterfaceState.RUNNING)
    # Deleted while running: missing, then back when it reappears.
    pair.gw.run("ip", "link", "del", "cap1")
    await until(lambda: cap.stats()["cap1"].state is InterfaceState.MISSING)
    pair.lab.veth(pair.gw, "cap1", pair.leaf, "eth1")
    await until(lambda: cap.stats()["cap1"].state is InterfaceState.RUNNING)
    pair.send([udp_frame(9, 80)], ifname="eth1")
    await until(lambda: cap.stats()["cap1"].frames == 2)

    st0, st1 = cap.stats()["cap0"], cap.stats()["cap1"]
    assert (st0.opens, st0.restarts, st0.state) == (1, 0, InterfaceState.RUNNING)
    assert (st1.opens, st1.restarts) == (3, 2)
    seen = [c.state for c in changes if c.interface == "cap1"]
    # Reported on transitions only, however many retries each waiting state took.
    assert seen[:3] == [InterfaceState.OPENING, InterfaceState.MISSING, InterfaceState.DOWN]
    assert seen.count(InterfaceState.MISSING) == 2
    assert seen.count(InterfaceState.RUNNING) == 3


async def test_a_non_ethernet_interface_is_reported(pair: Pair, running: Start) -> None:
    pair.gw.run("ip", "tuntap", "add", "dev", "tun7", "mode", "tun")
    pair.gw.up("tun7")
    cap = LiveCapture(settings_for(pair, interfaces=("tun7", "cap0")))
    running(cap)
    await until(lambda: cap.stats()["tun7"].state is InterfaceState.FAILED)
    assert cap.stats()["tun7"].last_error == "interface tun7 is not Ethernet (ARPHRD 65534)"
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)


async def test_a_dead_capture_thread_is_noticed_restarted_and_counted(
    pair: Pair, running: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_next_block = _Ring.next_block
    fired = threading.Event()

    def next_block_or_die(self: _Ring) -> FrameBatch | None:
        batch = real_next_block(self)
        if batch is not None and not fired.is_set():
            fired.set()
            raise RuntimeError("injected fault in the ring walk")
        return batch

    monkeypatch.setattr(_Ring, "next_block", next_block_or_die)
    cap = LiveCapture(settings_for(pair))
    running(cap)
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)
    pair.send([udp_frame(9, 80)])
    await until(lambda: cap.stats()["cap0"].restarts == 1)
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)
    assert "injected fault" in cap.stats()["cap0"].last_error
    pair.send([udp_frame(9, 80)])
    assert len(await collect(cap, 1)) >= 1


@pytest.mark.parametrize("policy", [OverflowPolicy.DROP_OLDEST, OverflowPolicy.DROP_NEWEST])
async def test_queue_overflow_policy_counts_every_dropped_frame(
    pair: Pair, running: Start, policy: OverflowPolicy
) -> None:
    cap = LiveCapture(settings_for(pair, queue_maxsize=2, overflow=policy))
    running(cap)
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)
    for n in range(1, 6):
        # One frame per ring block (blocks time out after 10 ms); nothing consumes the queue meanwhile.
        pair.send([udp_frame(9, 60 + n)])
        await until(blocks_are(cap, n))
    await asyncio.sleep(0.1)  # the last hand-off runs on the loop after the thread counted the block
    st = cap.stats()["cap0"]
    kept = drain(cap)
    assert st.frames == 5
    assert (st.queue_drops, st.queue_dropped_batches) == (3, 3)
    sizes = [b.wirelens[0] for b in kept]
    assert sizes == ([64, 65] if policy is OverflowPolicy.DROP_OLDEST else [61, 62])


async def test_ring_overflow_is_counted_by_the_kernel(pair: Pair, running: Start) -> None:
    cap = LiveCapture(settings_for(pair, block_size=4096, block_count=2, max_pending_batches=1))
    running(cap)
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)
    sent = 3000
    # Block the loop while the leaf floods: the thread hands over one batch, then the ring fills and overflows.
    sender = pair.gw.lab.namespaces[1]
    proc = subprocess.Popen(  # noqa: ASYNC220 - the loop is meant to stall here
        ["ip", "netns", "exec", sender.name, sys.executable, "-c", SENDER, "eth0", str(sent),
         udp_frame(9, 200).hex()]
    )
    # The loop stays blocked until the flood is over, however slow the machine: starving it is the point.
    assert proc.wait(20) == 0
    await until(lambda: cap.stats()["cap0"].frames + cap.stats()["cap0"].kernel_drops >= sent)
    st = cap.stats()["cap0"]
    assert st.kernel_drops > 0
    assert st.ring_freezes > 0
    assert st.frames + st.kernel_drops == sent
    assert st.kernel_packets == sent


async def test_ring_policy_keeps_the_queue_and_lets_the_kernel_count(pair: Pair, running: Start) -> None:
    cap = LiveCapture(
        settings_for(pair, block_size=4096, block_count=4, queue_maxsize=2, overflow=OverflowPolicy.RING)
    )
    running(cap)
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)
    sent = 2000
    # Nothing consumes the queue: it fills to 2 batches, then the ring fills, then the kernel drops.
    pair.send([udp_frame(9, 200)], repeat=sent)
    await asyncio.sleep(1.2)  # one PACKET_STATISTICS read per second
    st = cap.stats()["cap0"]
    assert cap.queue.qsize() == 2
    assert (st.queue_drops, st.queue_dropped_batches) == (0, 0)
    assert st.kernel_drops > 0
    # Once the consumer is back, what the ring held arrives too: nothing is lost uncounted.
    got = 0
    async with asyncio.timeout(5):
        while got + cap.stats()["cap0"].kernel_drops < sent:
            with contextlib.suppress(TimeoutError):
                got += len(await asyncio.wait_for(cap.get(), 0.1))
    st = cap.stats()["cap0"]
    assert got + st.kernel_drops == sent == st.kernel_packets
    assert got == st.frames


async def test_stop_is_prompt_and_leaves_no_thread(pair: Pair) -> None:
    cap = LiveCapture(settings_for(pair, poll_timeout_s=0.1))
    task = asyncio.get_running_loop().create_task(cap.run())
    await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 0.5
    assert not [t for t in threading.enumerate() if t.name.startswith("leafguard.capture[")]
    assert cap.stats()["cap0"].state is InterfaceState.STOPPED


def test_without_cap_net_raw_the_error_names_the_fix() -> None:
    code = textwrap.dedent(
        """
        import asyncio, sys
        from leafguard.capture.live import CaptureSettings, LiveCapture
        from leafguard.errors import CaptureError
        try:
            asyncio.run(LiveCapture(CaptureSettings(interfaces=("eth0",))).run())
        except CaptureError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-net_raw", "--inh-caps=-net_raw", sys.executable, "-c", code],
        check=False, capture_output=True, text=True, timeout=30, cwd=REPO,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == cap_net_raw_message("eth0")
    assert "CAP_NET_RAW" in proc.stdout and "CapAdd" in proc.stdout


def test_backoff_is_capped_and_jittered() -> None:
    import random

    b = _Backoff(0.5, 4.0, random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, caps, strict=True))
    assert len(set(delays)) == len(delays)
    b.reset()
    assert b.next_delay() <= 0.5


def _block(
    frames: list[tuple[bytes, int, int, int]],
    first: int = 48,
    align: int = 16,
    nsec: int = 250_000_000,
    pads: list[int] | None = None,
) -> tuple[bytes, int]:
    """A TPACKET_V3 block as the kernel lays it out: (frame, status, vlan_tci, vlan_tpid) each; frame ``i`` is
    stamped ``nsec * i`` nanoseconds after the first. The kernel puts the first frame at 48 and aligns each to 16
    (``pads``: bytes added after each frame, which no kernel does)."""
    mac = 68
    parts = [bytes(first)]
    for i, (raw, status, tci, tpid) in enumerate(frames):
        total = (mac + len(raw) + align - 1) // align * align + (pads[i] if pads else 0)
        sec, ns = divmod(250_000_000 + nsec * i, 1_000_000_000)
        hdr = _FRAME_HDR.pack(
            total if i < len(frames) - 1 else 0, 1_700_000_000 + sec, ns, len(raw), len(raw) + 100,
            status, mac, mac + 14, 0, tci, tpid,
        )
        parts.append(hdr + bytes(mac - len(hdr)) + raw + bytes(total - mac - len(raw)))
    return b"".join(parts), first


@pytest.mark.parametrize(("first", "align"), [(48, 16), (50, 1), (48, 6)])
def test_block_parsing_follows_every_frame_whatever_the_alignment(first: int, align: int) -> None:
    # The kernel's layout (48, 16) is walked a word at a time; any other falls back to unpacking each header.
    raws = [BCAST + LEAF_MAC + b"\x08\x00" + bytes([i % 251]) * (i % 300) for i in range(2_000)]
    data, first = _block([(raw, TP_STATUS_USER, 0, 0) for raw in raws], first=first, align=align, nsec=1_234_567)
    batch = _parse_block(data, len(raws), first, "eth9")
    assert [batch.frame(i) for i in range(len(batch))] == raws
    assert list(batch.caplens) == [len(r) for r in raws]
    assert list(batch.wirelens) == [len(r) + 100 for r in raws]
    stamps = [1_700_000_000 + (250_000_000 + 1_234_567 * i) // 10**9 for i in range(len(raws))]
    nanos = [(250_000_000 + 1_234_567 * i) % 10**9 for i in range(len(raws))]
    assert list(batch.timestamps) == [s + ns * 1e-9 for s, ns in zip(stamps, nanos, strict=True)]


def test_block_parsing_of_a_frame_off_the_alignment() -> None:
    # The word-at-a-time walk finds the third frame off a word, so it would look for the fourth in the wrong
    # place: the slow way is taken instead.
    raws = [BCAST + LEAF_MAC + b"\x08\x00" + bytes(40 + i) for i in range(4)]
    data, first = _block([(raw, TP_STATUS_USER, 0, 0) for raw in raws], pads=[0, 2, 0, 0])
    batch = _parse_block(data, 4, first, "eth9")
    assert batch.offsets[2] % 4 and [batch.frame(i) for i in range(4)] == raws


def test_block_parsing_reinserts_stripped_vlan_tags() -> None:
    plain = BCAST + LEAF_MAC + b"\x08\x00" + b"\x45" * 50
    stripped = BCAST + LEAF_MAC + b"\x08\x06" + b"\x01" * 50
    data, first = _block([
        (plain, TP_STATUS_USER, 0, 0),
        (stripped, TP_STATUS_USER | TP_STATUS_VLAN_VALID, 0x2007, 0),
        (stripped, TP_STATUS_USER | TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID, 0x0005, 0x88A8),
    ])
    batch = _parse_block(data, 3, first, "eth9")
    assert batch.source == "eth9" and len(batch) == 3
    assert batch.frame(0) == plain
    assert batch.frame(1) == stripped[:12] + b"\x81\x00\x20\x07" + stripped[12:]
    assert batch.frame(2) == stripped[:12] + b"\x88\xa8\x00\x05" + stripped[12:]
    assert list(batch.caplens) == [64, 68, 68]
    # The ring's tp_len counts the frame without the stripped tag; the wire carried it.
    assert list(batch.wirelens) == [164, 168, 168]
    assert list(batch.timestamps) == pytest.approx([1_700_000_000.25] * 3)


def test_interface_macs_read_the_kernels_view(pair: Pair) -> None:
    # `ip netns exec` remounts /sys for the namespace: there, the interfaces are the namespace's own.
    code = textwrap.dedent(
        """
        import sys
        from leafguard.capture.live import interface_macs
        print(",".join(interface_macs(sys.argv[1:])))
        """
    )
    got = pair.gw.python(code, "cap0", "lo", "nope0").stdout.strip()
    assert got == pair.gw.mac("cap0")  # loopback has no address worth excluding; a missing one is skipped
    run_settings = textwrap.dedent(
        """
        import sys
        from leafguard.cli import _parser
        from leafguard.service.settings import ServiceSettings
        args = _parser().parse_args(["run", "--interface", "cap0", "--local-dir", sys.argv[1],
                                     "--gateway-mac", "02:00:00:00:00:AA"])
        print(",".join(sorted(ServiceSettings.from_args(args, {}).analyzer.gateway_macs)))
        """
    )
    macs = pair.gw.python(run_settings, "/tmp").stdout.strip().split(",")
    assert macs == sorted(["02:00:00:00:00:aa", pair.gw.mac("cap0")])
