"""Throughput of `leafguard analyze` against its peers, on one generated IoT-like capture.

    python3 -m benchmarks.analyze_throughput [--frames 1000000] [--runs 3] [--json | --markdown]

Every tool runs as a child process of this one, on the same file (generated once by
testkit/gen_capture.py and cached under benchmarks/.cache/). For each child, wall time comes from a
monotonic clock around spawn-to-reap; peak RSS from GNU time's %M when /usr/bin/time exists (see
_child for why not os.wait4's ru_maxrss alone), else from wait4 -- or, when the tool runs helper processes
(LeafGuard reads large files in a forked reader), the sum of every process's own peak, sampled from /proc.
With --runs K each tool runs K times and its best (shortest) run is reported; peak RSS is the largest
seen over the K runs.

* LeafGuard:  `python -m leafguard analyze FILE --json > /dev/null`
* tshark:     `tshark -q -n -r FILE -z conv,tcp -z conv,udp -z endpoints,eth` (the same counters)
* tcpdump:    `tcpdump -n -r FILE -w /dev/null` (libpcap read floor: no decoding at all)
* scapy:      a naive `PcapReader` loop doing the same per-MAC in/out counting, on the first 50,000
              frames only (full dissection is ~100x slower); its rate is measured inside the loop and
              extrapolated to the whole file, which the output says.

Targets (issue #13): LeafGuard's rate >= 5x tshark's (the design's first target was 3x), LeafGuard's peak RSS
<= 300 MB (printed as PASS/FAIL).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is sys.path[0]
    sys.path.insert(0, str(REPO))

from testkit.gen_capture import ensure_capture  # noqa: E402

TARGET_RATIO_TSHARK = 5.0
TARGET_RSS_MB = 300.0
SCAPY_PREFIX = 50_000

SCAPY_LOOP = r"""
import json, sys, time
from collections import Counter
from scapy.all import Ether, PcapReader
limit = int(sys.argv[2])
out_p, out_b, in_p, in_b = Counter(), Counter(), Counter(), Counter()
n = 0
t0 = time.perf_counter()
with PcapReader(sys.argv[1]) as reader:
    for pkt in reader:
        if n >= limit:
            break
        n += 1
        size = pkt.wirelen or len(pkt)
        if Ether in pkt:
            eth = pkt[Ether]
            out_p[eth.src] += 1
            out_b[eth.src] += size
            in_p[eth.dst] += 1
            in_b[eth.dst] += size
took = time.perf_counter() - t0
print(json.dumps({"frames": n, "seconds": took, "macs": len(out_p)}))
"""


@dataclass
class Run:
    tool: str
    command: str
    frames: int
    wall_s: float
    peak_rss_mb: float
    rate_pps: float
    ok: bool = True
    note: str = ""
    runs: list[float] = field(default_factory=list)


GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None


def _child(
    argv: list[str], env: dict[str, str] | None = None, keep_stdout: bool = False
) -> tuple[int, float, float, bytes, bytes]:
    """Run argv; return (exit status, wall seconds, peak RSS MB, stdout, stderr).

    Peak RSS: a child forked from this Python process starts with this process's resident pages
    counted in its high-water mark (Linux keeps ru_maxrss across exec), so os.wait4's ru_maxrss would
    include the parent. When GNU time is present, the tool runs under `/usr/bin/time -f %M`, whose
    own fork starts from a ~2 MB process, and its report is used; otherwise wait4's value is used.
    stdout goes to /dev/null unless keep_stdout; kept streams go to temporary files, so the child
    never blocks on a pipe and this process does no work while the child runs.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss:
        cmd = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv] if GNU_TIME else argv
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out if keep_stdout else subprocess.DEVNULL, stderr=err, env=env)
        tree = _TreePeak(proc.pid, skip_root=bool(GNU_TIME))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        tree.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        peak_kb = float(usage.ru_maxrss)
        reported = Path(rss.name).read_text().split()
        if GNU_TIME and reported and reported[-1].isdigit():
            peak_kb = float(reported[-1])
        # A tool with helper processes (LeafGuard's reader) counts them too.
        peak_kb = tree.total_kb(peak_kb)
        out.seek(0)
        err.seek(0)
        return proc.returncode, wall, peak_kb / 1024.0, out.read(), err.read()


class _TreePeak:
    """The high-water marks (VmHWM, kept by the kernel) of the processes under ``root``, read every 50 ms.

    GNU time and wait4 report the largest single process of a tree, not its total. `total_kb` adds the other
    processes' own peaks to that largest one: an upper bound of the tree's resident memory at any moment (pages
    shared between a parent and its forked child count twice).
    """

    def __init__(self, root: int, *, skip_root: bool) -> None:
        self._root = root
        self._skip_root = skip_root
        self._peaks: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def total_kb(self, largest_kb: float) -> float:
        """``largest_kb``: the peak of the largest process, as GNU time or wait4 measured it."""
        peaks = sorted(self._peaks.values())
        return largest_kb + float(sum(peaks[:-1]))

    def _run(self) -> None:
        while not self._done.wait(0.05):
            for pid in _descendants(self._root, include_root=not self._skip_root):
                hwm = _vm_hwm_kb(pid)
                if hwm is not None:
                    self._peaks[pid] = max(self._peaks.get(pid, 0), hwm)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass  # gone already
    return out


def _descendants(root: int, *, include_root: bool) -> list[int]:
    found = [root] if include_root else []
    frontier = [root]
    while frontier:
        frontier = [kid for pid in frontier for kid in _children(pid)]
        found += frontier
    return found


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _leafguard_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "module"), env.get("PYTHONPATH")]))
    return env


def _best(
    tool: str, argv: list[str], frames: int, runs: int, env: dict[str, str] | None = None, shown: str | None = None
) -> Run:
    walls: list[float] = []
    peak = 0.0
    for _ in range(runs):
        code, wall, rss, _out, err = _child(argv, env)
        if code != 0:
            msg = err.decode(errors="replace").strip().splitlines()[-3:]
            return Run(tool, shown or " ".join(argv), frames, wall, rss, 0.0, False, f"exit {code}: {' | '.join(msg)}")
        walls.append(wall)
        peak = max(peak, rss)
    best = min(walls)
    return Run(tool, shown or " ".join(argv), frames, best, peak, frames / best, runs=walls)


def _scapy(path: Path, frames: int, runs: int) -> Run:
    argv = [sys.executable, "-c", SCAPY_LOOP, str(path), str(SCAPY_PREFIX)]
    rates: list[float] = []
    peak = 0.0
    counted = 0
    for _ in range(runs):
        code, _wall, rss, out, err = _child(argv, keep_stdout=True)
        if code != 0:
            return Run("scapy", "PcapReader loop", frames, 0.0, rss, 0.0, False, err.decode(errors="replace")[-300:])
        result = json.loads(out)
        counted = result["frames"]
        rates.append(result["frames"] / result["seconds"])
        peak = max(peak, rss)
    rate = max(rates)
    note = f"measured on the first {counted:,} frames, time extrapolated to {frames:,}"
    return Run(
        "scapy",
        f"PcapReader loop, per-MAC counting ({SCAPY_PREFIX:,}-frame prefix)",
        frames,
        frames / rate,
        peak,
        rate,
        True,
        note,
        [counted / r for r in rates],
    )


def _version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except OSError:
        return "absent"
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def _shown(argv: list[str], path: Path) -> str:
    return " ".join(path.name if arg == str(path) else arg for arg in argv)


def measure(frames: int, runs: int, seed: int) -> dict[str, Any]:
    path = ensure_capture(frames, seed)
    size = path.stat().st_size
    results: dict[str, Run] = {}
    results["leafguard"] = _best(
        "leafguard",
        [sys.executable, "-m", "leafguard", "analyze", str(path), "--json"],
        frames,
        runs,
        _leafguard_env(),
        f"python -m leafguard analyze {path.name} --json > /dev/null",
    )
    if shutil.which("tshark"):
        argv = ["tshark", "-q", "-n", "-r", str(path), "-z", "conv,tcp", "-z", "conv,udp", "-z", "endpoints,eth"]
        results["tshark"] = _best("tshark", argv, frames, runs, shown=_shown(argv, path))
    if shutil.which("tcpdump"):
        argv = ["tcpdump", "-n", "-r", str(path), "-w", "/dev/null"]
        results["tcpdump"] = _best("tcpdump", argv, frames, runs, shown=_shown(argv, path))
    results["scapy"] = _scapy(path, frames, runs)

    lg = results["leafguard"]
    ratios = {
        f"leafguard/{name}": (lg.rate_pps / run.rate_pps if lg.ok and run.ok and run.rate_pps else None)
        for name, run in results.items()
        if name != "leafguard"
    }
    vs_tshark = ratios.get("leafguard/tshark")
    checks = {
        f"rate >= {TARGET_RATIO_TSHARK:g}x tshark": bool(vs_tshark is not None and vs_tshark >= TARGET_RATIO_TSHARK),
        f"peak RSS <= {TARGET_RSS_MB:g} MB": bool(lg.ok and lg.peak_rss_mb <= TARGET_RSS_MB),
    }
    return {
        "capture": {"path": str(path), "frames": frames, "bytes": size, "seed": seed},
        "machine": {
            "cpu": _cpu(),
            "python": platform.python_version(),
            "tshark": _version(["tshark", "-v"]),
            "tcpdump": _version(["tcpdump", "--version"]),
        },
        "runs_per_tool": runs,
        "results": {name: asdict(run) for name, run in results.items()},
        "ratios": ratios,
        "targets": checks,
        "pass": all(checks.values()),
    }


def _print(report: dict[str, Any]) -> None:
    cap = report["capture"]
    print(f"capture: {cap['path']} ({cap['frames']:,} frames, {cap['bytes'] / 1e6:.1f} MB, seed {cap['seed']})")
    m = report["machine"]
    print(f"machine: {m['cpu']}; Python {m['python']}; {m['tshark']}; {m['tcpdump']}")
    print(f"best of {report['runs_per_tool']} run(s) per tool; peak RSS = max over runs\n")
    print(f"{'tool':<10} {'wall s':>9} {'pkt/s':>12} {'peak RSS MB':>12}  command")
    for name, run in report["results"].items():
        if not run["ok"]:
            print(f"{name:<10} {'FAILED':>9} {'-':>12} {run['peak_rss_mb']:>12.1f}  {run['command']}  [{run['note']}]")
            continue
        line = (
            f"{name:<10} {run['wall_s']:>9.3f} {run['rate_pps']:>12,.0f} {run['peak_rss_mb']:>12.1f}  {run['command']}"
        )
        print(line + (f"  [{run['note']}]" if run["note"] else ""))
    print()
    for key, value in report["ratios"].items():
        print(f"{key:<20} {'n/a' if value is None else f'{value:.2f}x'}")
    lg = report["results"]["leafguard"]
    print(f"leafguard peak RSS   {lg['peak_rss_mb']:.1f} MB")
    print()
    for name, ok in report["targets"].items():
        print(f"{'PASS' if ok else 'FAIL'}  leafguard {name}")


def markdown(report: dict[str, Any]) -> str:
    """The README/docs table: one row per tool, then the ratios and the targets."""
    cap, m = report["capture"], report["machine"]
    lines = [
        f"{cap['frames']:,} frames ({cap['bytes'] / 1e6:.0f} MB, seed {cap['seed']}); {m['cpu']}; "
        f"Python {m['python']}; best of {report['runs_per_tool']} run(s).",
        "",
        "| Tool | Command | Wall (s) | Packets/s | Peak RSS (MB) | LeafGuard speed-up |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, run in report["results"].items():
        ratio = report["ratios"].get(f"leafguard/{name}")
        speed = "—" if name == "leafguard" else ("n/a" if ratio is None else f"{ratio:.2f}x")
        wall = f"{run['wall_s']:.2f}" + (" (extrapolated)" if name == "scapy" else "")
        rate = f"{run['rate_pps']:,.0f}" if run["ok"] else "failed"
        lines.append(f"| {name} | `{run['command']}` | {wall} | {rate} | {run['peak_rss_mb']:.0f} | {speed} |")
    lines.append("")
    lines += [f"- {'PASS' if ok else 'FAIL'}: LeafGuard {name}" for name, ok in report["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames in the generated capture")
    ap.add_argument("--runs", type=int, default=1, help="runs per tool; the best is reported")
    ap.add_argument("--seed", type=int, default=7)
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    out.add_argument("--markdown", action="store_true", help="print the Markdown table for the docs/README")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.frames < 1:
        ap.error("--runs and --frames must be positive")
    report = measure(args.frames, args.runs, args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.markdown:
        print(markdown(report))
    else:
        _print(report)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
