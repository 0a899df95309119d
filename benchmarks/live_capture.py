"""Live capture loss at increasing packet rates: LeafGuard (capture + analysis) against tcpdump, same run.

    sudo python3 benchmarks/live_capture.py [--rates 10000,25000,50000,100000,200000] [--seconds 3]

A generator namespace replays an IoT-like capture with tcpreplay (``--pps``) into a veth pair; in the capture
namespace LeafGuard (LiveCapture -> Analyzer.feed, in this process) and tcpdump (``-w /dev/null``) watch the
same interface at the same time, on the same two cores as the generator. For each rate the script prints the
rate tcpreplay actually reached and, per consumer, the fraction of the frames the generator's interface sent
that it captured (LeafGuard: captured *and* analysed), LeafGuard's kernel and queue drops, and the share of the
wire bytes its snap lengths copied to user space, and LeafGuard's CPU time per frame processed: the whole
process (``cpu µs``) and its capture thread alone (``ring µs``), and the share of one core LeafGuard and tcpdump
each used while the generator replayed (``lg cpu%``, ``td cpu%``; at a steady rate such as the default 10k
frames/s, this is what a gateway pays for watching its leaves). CPU per frame does not depend on what else runs
on the machine; the loss columns do. Nothing leaves the two namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from leafguard.capture.live import CaptureSettings, InterfaceState, LiveCapture, OverflowPolicy
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from testkit.netns import Lab, Netns
from testkit.wait import until


def _ip_header(src: bytes, dst: bytes, proto: int, payload_len: int) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0, 0x4000, 64, proto, 0, src, dst)


def synthetic_capture(path: Path, frames: int, leaves: int = 50, seed: int = 7, bulk: bool = False) -> None:
    """An IoT-like mix: ARP, DNS, TCP sessions (handshake, small payloads, FIN) to 1883/8883/443, UDP telemetry.

    ``bulk``: TCP data segments are full-size (1448 bytes of payload), like a camera's stream.
    """
    rng = random.Random(seed)
    srv_mac, srv_ip = bytes.fromhex("027700000001"), bytes([10, 77, 0, 1])
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    t = 1_700_000_000.0
    n = 0

    def emit(frame: bytes) -> None:
        nonlocal t, n
        t += 0.00001
        sec = int(t)
        out.append(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)) + frame)
        n += 1

    while n < frames:
        i = rng.randrange(leaves)
        mac, ip = bytes([2, 0x10, 0, 0, 0, i + 1]), bytes([10, 77, 1, i + 1])
        kind = rng.random()
        if kind < 0.05:
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip, bytes(6), srv_ip)
            emit(b"\xff" * 6 + mac + b"\x08\x06" + arp)
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, srv_mac, srv_ip, mac, ip)
            emit(mac + srv_mac + b"\x08\x06" + arp)
        elif kind < 0.15:
            sport = rng.randrange(20000, 60000)
            q = struct.pack("!HHHHHH", rng.randrange(65536), 0x0100, 1, 0, 0, 0)
            q += b"\x03hub\x03lab\x04test\x00\x00\x01\x00\x01"
            for src_m, dst_m, src_i, dst_i, sp, dp, body in (
                (mac, srv_mac, ip, srv_ip, sport, 53, q),
                (srv_mac, mac, srv_ip, ip, 53, sport, q + bytes(16)),
            ):
                udp = struct.pack("!HHHH", sp, dp, 8 + len(body), 0) + body
                emit(dst_m + src_m + b"\x08\x00" + _ip_header(src_i, dst_i, 17, len(udp)) + udp)
        elif kind < 0.35:
            sport = rng.randrange(20000, 60000)
            body = bytes(rng.randrange(20, 300))
            udp = struct.pack("!HHHH", sport, 5683, 8 + len(body), 0) + body
            emit(srv_mac + mac + b"\x08\x00" + _ip_header(ip, srv_ip, 17, len(udp)) + udp)
        else:
            sport, dport = rng.randrange(20000, 60000), rng.choice((1883, 8883, 443))
            seq_c, seq_s = rng.randrange(1 << 32), rng.randrange(1 << 32)

            def tcp(
                to_server: bool,
                flags: int,
                payload: bytes,
                seq_c: int = seq_c,
                seq_s: int = seq_s,
                sport: int = sport,
                dport: int = dport,
                mac: bytes = mac,
                ip: bytes = ip,
            ) -> None:
                sp, dp = (sport, dport) if to_server else (dport, sport)
                seq, ack = (seq_c, seq_s) if to_server else (seq_s, seq_c)
                seg = struct.pack("!HHIIBBHHH", sp, dp, seq, ack, 0x50, flags, 64240, 0, 0) + payload
                src_m, dst_m, src_i, dst_i = (mac, srv_mac, ip, srv_ip) if to_server else (srv_mac, mac, srv_ip, ip)
                emit(dst_m + src_m + b"\x08\x00" + _ip_header(src_i, dst_i, 6, len(seg)) + seg)

            tcp(True, 0x02, b"")
            tcp(False, 0x12, b"")
            tcp(True, 0x10, b"")
            for _ in range(rng.randrange(1, 6)):
                tcp(True, 0x18, bytes(1448 if bulk else rng.randrange(20, 600)))
                tcp(False, 0x10, b"")
                tcp(False, 0x18, bytes(rng.randrange(4, 200)))
                tcp(True, 0x10, b"")
            tcp(True, 0x11, b"")
            tcp(False, 0x11, b"")
            tcp(True, 0x10, b"")
    path.write_bytes(b"".join(out))


HEADER = (
    f"{'rate':>8} {'achieved':>10} {'sent':>9} {'leafguard':>10} {'tcpdump':>9} {'k-drops':>8} {'q-drops':>8}"
    f" {'copied':>7} {'cpu µs':>7} {'ring µs':>7} {'lg cpu%':>7} {'td cpu%':>7}"
)


@dataclass
class Result:
    rate: int
    sent: int
    seconds: float
    leafguard: int
    tcpdump: int
    kernel_drops: int
    queue_drops: int
    wire_bytes: int
    captured_bytes: int
    cpu_s: float
    """CPU time of this process (capture thread + loop + analyzer) while the rate was offered and drained."""
    thread_cpu_s: float
    """CPU time of the capture thread over its life."""
    replay_cpu_s: float
    """CPU time of this process while the generator replayed (``cpu_s`` less the drain)."""
    tcpdump_cpu_s: float
    """CPU time of tcpdump over the same interval."""
    interval_s: float
    """Wall time of the replay."""

    @property
    def cpu_share(self) -> float:
        """LeafGuard's CPU over the interval, as a share of one core."""
        return self.replay_cpu_s / self.interval_s if self.interval_s else 0.0

    @property
    def tcpdump_cpu_share(self) -> float:
        return self.tcpdump_cpu_s / self.interval_s if self.interval_s else 0.0

    @property
    def achieved(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def row(self) -> str:
        lg, td = self.leafguard / self.sent, self.tcpdump / self.sent
        return (
            f"{self.rate:>8} {self.achieved:>10.0f} {self.sent:>9} {lg:>10.2%} {td:>9.2%} "
            f"{self.kernel_drops:>8} {self.queue_drops:>8} {self.captured_bytes / max(1, self.wire_bytes):>7.1%}"
            f" {self.cpu_s / max(1, self.leafguard) * 1e6:>7.2f}"
            f" {self.thread_cpu_s / max(1, self.leafguard) * 1e6:>7.2f}"
            f" {self.cpu_share:>7.1%} {self.tcpdump_cpu_share:>7.1%}"
        )


def tx_packets(ns: Netns) -> int:
    return ns.sysfs_counter("eth0", "tx_packets")


def start_tcpdump(ns: Netns) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, "tcpdump", "-i", "cap0", "-n", "-w", "/dev/null"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    proc.stderr.readline()  # "listening on cap0 ...": its socket is open
    return proc


def stop_tcpdump(proc: subprocess.Popen[str]) -> int:
    """Frames tcpdump captured (its own report at exit)."""
    time.sleep(1.2)  # libpcap hands over its last ring block after its 1 s timeout
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=10)[1]
    m = re.search(r"(\d+) packets? captured", err)
    return int(m.group(1)) if m else 0


def process_cpu(pid: int) -> float:
    """CPU seconds another process has run so far, all its threads: the scheduler's nanoseconds
    (/proc/PID/task/*/schedstat), as /proc/PID/stat's clock ticks (10 ms) are coarser than tcpdump's whole run."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "schedstat") as fh:
            total += int(fh.read().split()[0])
    return total / 1e9


def capture_thread_cpu(interface: str) -> float:
    for t in threading.enumerate():
        if t.name == f"leafguard.capture[{interface}]" and t.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    return 0.0


async def measure(gen: Netns, cap_ns: Netns, pcap: Path, rate: int, seconds: float, args: argparse.Namespace) -> Result:
    analyzer = Analyzer(AnalyzerSettings())
    settings = CaptureSettings(interfaces=("cap0",), netns=cap_ns.name, snaplen=args.snaplen)
    if args.ring_blocks:
        settings = replace(settings, block_count=args.ring_blocks)
    if args.queue:
        settings = replace(settings, queue_maxsize=args.queue)
    settings = replace(settings, overflow=OverflowPolicy(args.overflow))
    cap = LiveCapture(settings)

    async def feed() -> None:
        while True:
            analyzer.feed(await cap.get())
            await asyncio.sleep(0)  # as the service's pipeline does: hand-offs run between batches

    tcpdump = await asyncio.to_thread(start_tcpdump, cap_ns)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(cap.run(), name="capture")
        feeder = tg.create_task(feed(), name="feed")
        await until(lambda: cap.stats()["cap0"].state is InterfaceState.RUNNING, interval_s=0.02)
        before = tx_packets(gen)
        cpu0, td_cpu0, wall0 = time.process_time(), process_cpu(tcpdump.pid), time.perf_counter()
        limit = int(rate * seconds)
        replay = await asyncio.to_thread(
            gen.run,
            "tcpreplay",
            "-K",
            f"--pps={rate}",
            f"--limit={limit}",
            "--loop=0",
            "-i",
            "eth0",
            str(pcap),
            timeout=seconds * 10 + 30,
        )
        # The CPU shares are taken over the replay alone: at a rate the consumers keep up with, that is the steady cost.
        lg_cpu, td_cpu = time.process_time() - cpu0, process_cpu(tcpdump.pid) - td_cpu0
        interval = time.perf_counter() - wall0
        sent = tx_packets(gen) - before
        m_time = re.search(r"Actual: \d+ packets .* sent in ([\d.]+) seconds", replay.stdout)
        elapsed = float(m_time.group(1)) if m_time else 0.0
        # Drain: the ring's last block retires within 50 ms; then the loop catches up.
        last = -1
        while True:
            if analyzer.stats.packets == last and cap.queue.empty():
                break
            last = analyzer.stats.packets
            await asyncio.sleep(0.3)
        cpu = time.process_time() - cpu0
        thread_cpu = capture_thread_cpu("cap0")
        runner.cancel()
        feeder.cancel()
    st = cap.stats()["cap0"]
    return Result(
        rate,
        sent,
        elapsed,
        analyzer.stats.packets,
        await asyncio.to_thread(stop_tcpdump, tcpdump),
        st.kernel_drops,
        st.queue_drops,
        st.bytes,
        st.captured_bytes,
        cpu,
        thread_cpu,
        lg_cpu,
        td_cpu,
        interval,
    )


async def main_async(args: argparse.Namespace) -> list[Result]:
    results = []
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        pcap = Path(tmp) / "iot.pcap"
        synthetic_capture(pcap, args.frames, bulk=args.bulk)
        gen, cap_ns = lab.netns("gen"), lab.netns("cap")
        lab.veth(gen, "eth0", cap_ns, "cap0")
        print(HEADER)
        for rate in args.rates:
            r = await measure(gen, cap_ns, pcap, rate, args.seconds, args)
            print(r.row(), flush=True)
            results.append(r)
    return results


def lossless(results: list[Result], attr: str) -> float:
    """The highest rate (as reached by the generator) at which the consumer lost no frame."""
    ok = [r.achieved for r in results if getattr(r, attr) >= r.sent]
    return max(ok, default=0.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="10000,25000,50000,100000,200000", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--frames", type=int, default=50_000, help="frames in the synthetic capture (looped)")
    p.add_argument("--snaplen", type=int, default=512, help="LeafGuard's snap length for non-inventory frames")
    p.add_argument("--ring-blocks", type=int, default=0, help="ring blocks of 1 MiB (default: the setting's)")
    p.add_argument("--queue", type=int, default=0, help="queue size in batches (default: the setting's)")
    p.add_argument("--overflow", default="drop_oldest", choices=[str(x) for x in OverflowPolicy])
    p.add_argument("--bulk", action="store_true", help="full-size TCP data segments (a camera-like stream)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    # Other work on the same two cores changes these numbers a lot; say so next to them.
    load_before = os.getloadavg()[0]
    results = asyncio.run(main_async(args))
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    lg, td = lossless(results, "leafguard"), lossless(results, "tcpdump")
    at50 = [r for r in results if r.rate == 50_000]
    ratio = lg / td if td else float("nan")
    print(f"highest lossless rate (pps reached): leafguard {lg:.0f}, tcpdump {td:.0f} (ratio {ratio:.2f})")
    if at50:
        print(f"leafguard loss at 50k/s: {1 - at50[0].leafguard / at50[0].sent:.2%}")
    for r in results:
        if r.rate == 10_000:
            ratio = r.cpu_share / r.tcpdump_cpu_share if r.tcpdump_cpu_share else float("nan")
            print(
                f"CPU at a steady 10k frames/s: leafguard {r.cpu_share:.1%} of one core,"
                f" tcpdump {r.tcpdump_cpu_share:.1%} (ratio {ratio:.1f})"
            )
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
