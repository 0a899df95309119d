"""What the observation core costs a gateway: CPU-seconds per million frames beside argus (the C flow monitor)
and tcpdump, memory per tracked conversation and per leaf, and time per frame and RSS once every table is full.

    python3 -m benchmarks.footprint [--frames 1000000] [--leaves 10000] [--per-leaf 19] [--past-caps 3]

* **CPU**: ``leafguard analyze --json`` (its forked reader included: it is reaped, so its time is in the
  rusage), ``argus -r FILE -w /dev/null`` (Debian package ``argus-server``) and ``tcpdump -r FILE -w /dev/null``
  (the read floor) on the generated IoT capture of `testkit.gen_capture`, each run ``--runs`` times; user +
  system CPU of the best run.
* **Memory at scale**: captures of ``--leaves`` leaves, one with a single UDP exchange per leaf and one with
  ``--per-leaf`` TCP conversations per leaf kept open (handshake and one data segment, no teardown, all within a
  minute, so nothing is idle enough to evict); each fed to an `Analyzer` in a fresh process (its observations
  drained after every batch, as the service's pump does), RSS measured before and after, once with the image's
  allocator setting (`IMAGE_ENV`) and once with glibc's defaults. The difference between the two captures is the
  conversations; the first, less its conversations, is the leaves.
* **Steady state at the caps**: a capture with ``--past-caps`` times the MAC cap of leaves and that many times
  the conversation cap of conversations, fed in slices; time per frame and RSS of each slice, before and after
  the tables filled.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testkit.gen_capture import CACHE, START_TS, ensure_capture, ether, ipv4, tcp, udp, write_pcap

GATEWAY = bytes.fromhex("e4f4c6112233")
SERVER_IP = bytes([10, 99, 0, 1])


def _cpu(argv: list[str]) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, peak RSS MB) of one run, from the child's own rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed: {' '.join(argv)}")
    return usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss / 1024


def cpu_cost(frames: int, runs: int) -> None:
    path = ensure_capture(frames)
    tools = {
        "LeafGuard analyze --json": [sys.executable, "-m", "leafguard", "analyze", "--json", str(path)],
        "argus -r FILE -w /dev/null": ["argus", "-r", str(path), "-w", "/dev/null"],
        "tcpdump -r FILE -w /dev/null": ["tcpdump", "-r", str(path), "-w", "/dev/null"],
    }
    results: dict[str, tuple[float, float, float]] = {}
    for name, argv in tools.items():
        if shutil.which(argv[0]) is None:
            package = "argus-server" if argv[0] == "argus" else argv[0]
            print(f"  {name}: {argv[0]} is not installed (apt-get install {package})")
            continue
        results[name] = min((_cpu(argv) for _ in range(runs)), key=lambda r: r[0])
    print(f"\nCPU on {path.name} ({frames:,} frames), best of {runs}:")
    print(f"  {'tool':<32} {'CPU s':>7} {'CPU s / M frames':>17} {'wall s':>7} {'peak RSS MB':>12}")
    for name, (cpu, wall, rss) in results.items():
        print(f"  {name:<32} {cpu:7.2f} {cpu / frames * 1e6:17.2f} {wall:7.2f} {rss:12.0f}")
    ours = results.get("LeafGuard analyze --json")
    peer = results.get("argus -r FILE -w /dev/null")
    if ours and peer:
        print(f"  LeafGuard / argus CPU: {ours[0] / peer[0]:.2f}x (target <= 2x)")


# -- generated captures for memory ----------------------------------------------------------------------------


def _leaf(i: int) -> tuple[bytes, bytes]:
    mac = bytes([0x02, 0x10, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF, 0x01])
    ip = bytes([10, 100 + (i >> 16), (i >> 8) & 0xFF, i & 0xFF])
    return mac, ip


def _one_exchange(leaves: int) -> Iterator[tuple[float, bytes]]:
    """One UDP datagram each way per leaf (a conversation per leaf)."""
    ts = START_TS
    for i in range(leaves):
        mac, ip = _leaf(i)
        ts += 0.0001
        yield ts, ether(GATEWAY, mac, 0x0800, ipv4(ip, SERVER_IP, 17, udp(ip, SERVER_IP, 40000, 5683, b"p" * 16), i))
        yield ts, ether(mac, GATEWAY, 0x0800, ipv4(SERVER_IP, ip, 17, udp(SERVER_IP, ip, 5683, 40000, b"a" * 8), i))


def _open_conversations(leaves: int, per_leaf: int, first_leaf: int = 0) -> Iterator[tuple[float, bytes]]:
    """Per leaf: the UDP exchange, then ``per_leaf`` TCP conversations to distinct ports, each a handshake and
    one data segment, never closed."""
    ts = START_TS
    for i in range(first_leaf, first_leaf + leaves):
        mac, ip = _leaf(i)
        ts += 0.0001
        yield ts, ether(GATEWAY, mac, 0x0800, ipv4(ip, SERVER_IP, 17, udp(ip, SERVER_IP, 40000, 5683, b"p" * 16), i))
        yield ts, ether(mac, GATEWAY, 0x0800, ipv4(SERVER_IP, ip, 17, udp(SERVER_IP, ip, 5683, 40000, b"a" * 8), i))
        for k in range(per_leaf):
            conv = _Conversation(mac, ip, 41000 + k, 8000 + k)
            ts += 0.00001
            yield ts, conv.up(0x02, 1000, 0)
            yield ts, conv.down(0x12, 5000, 1001)
            yield ts, conv.up(0x10, 1001, 5001)
            yield ts, conv.up(0x18, 1001, 5001, b"hello")


@dataclass(frozen=True, slots=True)
class _Conversation:
    """A leaf's TCP conversation with the server behind the gateway."""

    mac: bytes
    ip: bytes
    sport: int
    dport: int

    def up(self, flags: int, seq: int, ack: int, data: bytes = b"") -> bytes:
        segment = tcp(self.ip, SERVER_IP, self.sport, self.dport, seq, ack, flags, data)
        return ether(GATEWAY, self.mac, 0x0800, ipv4(self.ip, SERVER_IP, 6, segment, seq))

    def down(self, flags: int, seq: int, ack: int) -> bytes:
        segment = tcp(SERVER_IP, self.ip, self.dport, self.sport, seq, ack, flags)
        return ether(self.mac, GATEWAY, 0x0800, ipv4(SERVER_IP, self.ip, 6, segment, seq))


def _cached(name: str, make: Iterator[tuple[float, bytes]]) -> Path:
    path = CACHE / f"footprint_{name}.pcap"
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        write_pcap(path, make)
    return path


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _feed(path: Path) -> tuple[float, int, int]:
    """RSS growth (MB) of a fresh analyzer fed ``path``, and its conversations and leaves."""
    from leafguard.capture.pcapfile import read_batches
    from leafguard.observe.analyzer import Analyzer

    gc.collect()
    analyzer = Analyzer()
    before = _rss_mb()
    for batch in read_batches(path):
        analyzer.feed(batch)
        # As the service's message pump does after every batch: undrained, the observations would be a queue of
        # up to 100,000 records (`conversations.MAX_PENDING_OBSERVATIONS`), not state kept per conversation.
        analyzer.drain_observations()
    gc.collect()
    grown = _rss_mb() - before
    return grown, len(analyzer.flows), len(analyzer.leaves())


IMAGE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""The allocator setting of the module's image (Dockerfile.*): glibc's mmap threshold fixed at its default."""


def memory_at_scale(leaves: int, per_leaf: int) -> None:
    one = _cached(f"{leaves}l_1udp", _one_exchange(leaves))
    many = _cached(f"{leaves}l_{per_leaf}tcp", _open_conversations(leaves, per_leaf))
    print(f"\nmemory at scale ({leaves:,} leaves; RSS growth of the analyzer in a fresh process):")
    for label, env in (("as the image runs it (MALLOC_MMAP_THRESHOLD_=131072)", IMAGE_ENV), ("glibc defaults", {})):
        # Each capture in its own process: the allocator keeps what a previous run freed.
        rows = [_subprocess_feed(p, env) for p in (one, many)]
        (a_mb, a_conv, a_leaves), (b_mb, b_conv, b_leaves) = rows
        per_conv = (b_mb - a_mb) * 2**20 / max(1, b_conv - a_conv)
        per_leaf_b = (a_mb * 2**20 - a_conv * per_conv) / max(1, a_leaves)
        print(f" {label}:")
        print(f"  {a_leaves:,} leaves, {a_conv:,} conversations: +{a_mb:.1f} MB")
        print(f"  {b_leaves:,} leaves, {b_conv:,} conversations: +{b_mb:.1f} MB")
        print(f"  per conversation {per_conv:.0f} B (target <= 200 B), per leaf {per_leaf_b:.0f} B (target <= 2 KB)")


def _subprocess_feed(path: Path, env: dict[str, str]) -> tuple[float, int, int]:
    code = f"from benchmarks.footprint import _feed; from pathlib import Path; print(*_feed(Path({str(path)!r})))"
    root = Path(__file__).resolve().parent.parent
    base = {k: v for k, v in os.environ.items() if k not in IMAGE_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env=base | env | {"PYTHONPATH": os.pathsep.join([str(root / "module"), str(root)])})
    mb, conv, leaves = out.stdout.split()
    return float(mb), int(conv), int(leaves)


def steady_state(multiple: int) -> None:
    from leafguard.capture.pcapfile import read_batches
    from leafguard.observe.analyzer import Analyzer
    from leafguard.observe.settings import AnalyzerSettings

    caps = AnalyzerSettings()
    leaves = caps.max_macs * multiple
    per_leaf = max(1, caps.max_flows * multiple // leaves)
    path = _cached(f"steady_{leaves}l_{per_leaf}tcp", _open_conversations(leaves, per_leaf))
    analyzer = Analyzer()
    slices: list[tuple[int, float, float, int]] = []
    frames_in_slice, t0 = 0, time.perf_counter()
    for batch in read_batches(path):
        analyzer.feed(batch)
        frames_in_slice += len(batch)
        if frames_in_slice >= 200_000:
            slices.append((frames_in_slice, time.perf_counter() - t0, _rss_mb(), len(analyzer.macs)))
            frames_in_slice, t0 = 0, time.perf_counter()
    print(f"\nsteady state past the caps ({leaves:,} leaves, {leaves * per_leaf:,} conversations; caps "
          f"{caps.max_macs:,} MACs, {caps.max_flows:,} conversations):")
    print(f"  {'slice':>5} {'us/frame':>9} {'RSS MB':>7} {'MACs':>7}")
    for i, (n, secs, rss, macs) in enumerate(slices):
        print(f"  {i:5d} {secs / n * 1e6:9.2f} {rss:7.0f} {macs:7,}")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; evicted "
          f"{analyzer.stats.evicted_macs:,} MACs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--leaves", type=int, default=10_000)
    ap.add_argument("--per-leaf", type=int, default=19, help="open conversations per leaf (19: under the cap)")
    ap.add_argument("--past-caps", type=int, default=3)
    ap.add_argument("--skip", action="append", default=[], choices=["cpu", "memory", "steady"])
    args = ap.parse_args()
    if "cpu" not in args.skip:
        cpu_cost(args.frames, args.runs)
    if "memory" not in args.skip:
        memory_at_scale(args.leaves, args.per_leaf)
    if "steady" not in args.skip:
        steady_state(args.past_caps)


if __name__ == "__main__":
    main()
