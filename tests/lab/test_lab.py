"""The attack lab: real tools against the lab's own namespaces, LeafGuard judged on what they do.

One lab per module (`testkit/lab/topology.py`: a gateway bridge, leaves at work, services, an attacker). The whole
run is captured twice, live by ``leafguard run`` in the gateway namespace and to a pcap by tcpdump beside it: the
last test checks that ``leafguard analyze`` of that pcap raises the same alerts as the live service. Each case is
also captured to a pcap of its own and analysed afresh: it must raise the alerts of its class (recall), nothing
else (false alarms), and scans and brute force within 10 s of packet time from the attacker's first frame.

The leaves work through the whole module, cases or not, and a case analysed afresh is shorter than most rules'
windows (60 s, 300 s): the last test therefore also judges the live run, minutes of that work in one state, where
every alert must fall within a case of its class.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testkit.lab.cases import CASES, Case
from testkit.lab.runner import Tcpdump, cli_options, judge, record
from testkit.lab.topology import AttackLab, build, missing_tools
from testkit.netns import Lab, needs_root

pytestmark = [
    pytest.mark.netns,
    needs_root,
    pytest.mark.skipif(
        bool(missing_tools()), reason=f"needs the lab's tools (.ci/run installs them): {missing_tools()}"
    ),
    pytest.mark.timeout(120),
]

FAST_CLASSES = {"port_scan", "stealth_scan", "udp_scan", "icmp_sweep", "arp_sweep", "connection_brute_force",
                "brute_force"}  # fmt: skip
"""Scans and brute force: the issue's target is an alert within 10 s of packet time at the tools' default rates."""


@dataclass
class LabRun:
    al: AttackLab
    out: Path
    service: subprocess.Popen[bytes]
    log: Path
    whole: Tcpdump
    started: float
    windows: list[tuple[Case, float, float]] = field(default_factory=list)
    """Each case run, with the wall-clock times its capture started and ended (the live capture's packet time)."""


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def lab_run() -> Iterator[LabRun]:
    with tempfile.TemporaryDirectory(prefix="leafguard-lab-") as tmp, Lab() as lab:
        work = Path(tmp)
        al = build(lab, work)
        whole = Tcpdump(al, work / "whole.pcap")
        out = work / "out"
        log = work / "leafguard.log"
        with log.open("wb") as log_file:
            service = al.gw.popen(
                sys.executable, "-m", "leafguard", "run", "--interface", "br0", "--local-dir", str(out),
                "--write-interval", "0.3", *cli_options(al), stderr=log_file,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while _read(out / "stats.json").get("interfaces", {}).get("br0", {}).get("state") != "running":
            assert service.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield LabRun(al, work, service, log, whole, time.time())


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
def test_case_raises_its_class_and_nothing_else(lab_run: LabRun, case: Case) -> None:
    pcap = lab_run.out / f"{case.name}.pcap"
    start = time.time()
    wall = record(lab_run.al, case, pcap)
    lab_run.windows.append((case, start, time.time()))
    got = judge(lab_run.al, case, pcap, wall)
    assert not got.missed, f"{case.name}: no {sorted(got.missed)} alert; raised {dict(got.found)}"
    assert not got.false_alarms, f"{case.name}: false alarms {[a['summary'] for a in got.false_alarms]}"
    for kind in case.expect & FAST_CLASSES:
        delay = got.time_to_alert(kind)
        assert delay is not None and delay <= 10.0, f"{case.name}: {kind} after {delay} s of packet time"


def test_live_run_agrees_with_analyze_of_the_same_frames(lab_run: LabRun) -> None:
    """Runs last: ``leafguard run`` saw the whole module live; ``leafguard analyze`` reads tcpdump's copy."""
    out = lab_run.out / "out"
    time.sleep(1.0)  # the last frames reach both captures
    lab_run.service.send_signal(signal.SIGTERM)
    assert lab_run.service.wait(30) == 0, lab_run.log.read_text()
    assert lab_run.whole.stop() == 0, "tcpdump dropped frames"
    stats = _read(out / "stats.json")
    br0 = stats["interfaces"]["br0"]
    assert (br0["kernel_drops"], br0["queue_drops"]) == (0, 0), br0
    live = _read(out / "alerts.json")["alerts"]
    offline_run = subprocess.run(
        [sys.executable, "-m", "leafguard", "analyze", str(lab_run.out / "whole.pcap"), "--json",
         "--gateway-mac", lab_run.al.gw_mac, *cli_options(lab_run.al)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    offline = json.loads(offline_run.stdout)["alerts"]

    def key(a: dict[str, Any]) -> tuple[str, str | None, float, str]:
        return a["type"], a["mac"], round(a["ts"], 3), a["summary"]

    # tcpdump started before the service and stopped after it: it may hold a few more frames at both ends, with
    # no attack in them; every alert is stamped with the packet that completed it, which both saw.
    only_live = Counter(map(key, live)) - Counter(map(key, offline))
    only_offline = Counter(map(key, offline)) - Counter(map(key, live))
    assert not only_live and not only_offline, f"live only: {list(only_live)}; analyze only: {list(only_offline)}"
    assert {a["type"] for a in live} >= {c for case in CASES if not case.slow for c in case.expect}

    # False alarms over the whole run: the leaves' DHCP, DNS, NTP, MQTT, HTTP, mDNS, SSDP, RTP and Modbus traffic went
    # on for minutes in one analyzer (long enough to fill every 60 s window), with the cases in between.
    def explained(a: dict[str, Any]) -> bool:
        return any(
            start - 0.5 <= a["ts"] <= end + 0.5 and a["type"] in case.expect | case.allowed
            for case, start, end in lab_run.windows
        )

    unexplained = [f"{a['type']} at {a['ts']:.1f}: {a['summary']}" for a in live if not explained(a)]
    ran_s = time.time() - lab_run.started
    assert not unexplained, f"alerts outside any case of their class in {ran_s:.0f} s of the live run: {unexplained}"
