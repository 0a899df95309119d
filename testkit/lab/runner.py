"""Running a lab case: capture it to pcap in the gateway namespace, and judge what LeafGuard finds in it offline.

Shared by the lab tests (`tests/lab/test_lab.py`) and the scorecard (`benchmarks/detections.py`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leafguard.capture.pcapfile import read_batches
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from testkit.lab.cases import Case
from testkit.lab.topology import HOSTS, LEAF_NET, LEAF_NET6, AttackLab

FLOOD_RATE_PER_S = 200.0
"""The lab's flood setting (off by default in LeafGuard): the camera's 25 frames/s stay far below it."""


def settings(al: AttackLab) -> AnalyzerSettings:
    return AnalyzerSettings.from_cli([LEAF_NET, LEAF_NET6], [al.gw_mac], flood_rate_per_s=FLOOD_RATE_PER_S)


def cli_options(al: AttackLab) -> list[str]:
    """The same settings as command-line options (``leafguard run`` adds its capture interface's MAC itself)."""
    return ["--leaf-net", LEAF_NET, "--leaf-net", LEAF_NET6, "--flood-rate", str(FLOOD_RATE_PER_S)]


class Tcpdump:
    """tcpdump on the gateway's bridge, writing every frame to ``pcap`` until stopped."""

    def __init__(self, al: AttackLab, pcap: Path) -> None:
        # Immediate mode: otherwise frames in libpcap's last unretired ring block are lost when it stops. It uses
        # ring slots of the snap length: with -s 0 (256 KiB) the default 2 MiB ring holds 8 frames and a scan's
        # burst overflows it; 1600 bytes hold any frame of this 1500-byte MTU segment, 8 MiB thousands of them.
        self.proc = al.gw.popen(
            "tcpdump", "-i", "br0", "-n", "-U", "--immediate-mode", "-s", "1600", "-B", "8192", "-w", str(pcap),
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self.pcap = pcap
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert b"listening on br0" in line, line

    def stop(self) -> int:
        """Stop it; the number of frames the kernel dropped (tcpdump's own count)."""
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.stderr is not None
        summary = self.proc.stderr.read().decode()
        self.proc.wait(10)
        m = re.search(r"(\d+) packets? dropped by kernel", summary)
        return int(m.group(1)) if m else 0


@dataclass
class Judged:
    case: Case
    alerts: list[dict[str, Any]]
    first_attack_ts: float | None
    wall_s: float
    found: Counter[str] = field(default_factory=Counter)

    @property
    def missed(self) -> set[str]:
        return set(self.case.expect) - set(self.found)

    @property
    def false_alarms(self) -> list[dict[str, Any]]:
        ok = self.case.expect | self.case.allowed
        return [a for a in self.alerts if a["type"] not in ok]

    def time_to_alert(self, kind: str) -> float | None:
        """Packet time from the attacker's first frame to the first alert of ``kind``."""
        times = [float(a["ts"]) for a in self.alerts if a["type"] == kind]
        if not times or self.first_attack_ts is None:
            return None
        return min(times) - self.first_attack_ts


def record(al: AttackLab, case: Case, pcap: Path) -> float:
    """Run ``case`` with tcpdump on br0 writing ``pcap``; returns the wall time the tool took."""
    dump = Tcpdump(al, pcap)
    start = time.monotonic()
    try:
        case.run(al)
        took = time.monotonic() - start
        time.sleep(case.settle_s)
    finally:
        dropped = dump.stop()
    # A capture that lost frames would judge LeafGuard on traffic it never saw.
    assert dropped == 0, f"{case.name}: tcpdump dropped {dropped} frames"
    return took


def analyze(pcap: Path, al: AttackLab) -> tuple[list[dict[str, Any]], float | None]:
    """LeafGuard's alerts on ``pcap`` (as ``leafguard analyze`` finds them), and the attacker's first frame time."""
    an = Analyzer(settings(al))
    attacker = bytes.fromhex(HOSTS["attacker"][0].replace(":", ""))
    first: float | None = None
    for batch in read_batches(pcap):
        an.feed(batch)
        if first is None:
            for i in range(len(batch)):
                off = batch.offsets[i]
                if batch.data[off + 6 : off + 12] == attacker:
                    first = batch.timestamps[i]
                    break
    an.finish()
    return an.alerts(), first


def judge(al: AttackLab, case: Case, pcap: Path, wall_s: float) -> Judged:
    alerts, first = analyze(pcap, al)
    return Judged(case, alerts, first, wall_s, Counter(a["type"] for a in alerts))
