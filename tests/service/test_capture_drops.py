"""Frames live capture loses reach every leaf's Defender agent as operational events, counted exactly.

The service captures a veth pair in a namespace; the test primes it with the demo traffic (so the leaves'
agents exist), freezes the process with SIGSTOP while a flood overruns the kernel ring, lets it go on, and
stops it. Every leaf's DroppedEventsStatistics must add up to the drops the kernel and the queue counted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from leafguard.demo import demo_capture
from testkit.netns import Lab, needs_root
from testkit.wait import wait_for
from tests.service.helpers import read_stats, run_capturing

pytestmark = [
    needs_root,
    pytest.mark.skipif(shutil.which("tcpreplay") is None, reason="needs tcpreplay (apt-get install tcpreplay)"),
]


def test_capture_drops_become_operational_events(tmp_path: Path) -> None:
    with Lab() as lab:
        _run(lab, tmp_path)


def _run(lab: Lab, tmp_path: Path) -> None:
    gen = lab.netns("gen")
    gw = lab.netns("gw")
    lab.veth(gen, "gen0", gw, "gw0")
    out = tmp_path / "out"
    proc = run_capturing(gw, "gw0", out, tmp_path / "leafguard.log")
    wait_for(lambda: read_stats(out)["interfaces"]["gw0"]["state"] == "running")
    demo = str(demo_capture())
    gen.run("tcpreplay", "-q", "-i", "gen0", "--topspeed", demo)
    wait_for(lambda: read_stats(out)["capture"]["packets"] >= 73)

    os.kill(proc.pid, signal.SIGSTOP)
    try:
        # 73 frames x 3000 loops, far more than the 16 MiB ring holds while nobody reads it.
        gen.run("tcpreplay", "-q", "-i", "gen0", "--topspeed", "--loop", "3000", demo, timeout=60)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    stats = wait_for(lambda: (s := read_stats(out)) and s["interfaces"]["gw0"]["kernel_drops"] > 0 and s)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, (tmp_path / "leafguard.log").read_text()

    iface = read_stats(out)["interfaces"]["gw0"]
    lost = iface["kernel_drops"] + iface["queue_drops"]
    assert lost >= stats["interfaces"]["gw0"]["kernel_drops"] > 10_000
    per_leaf: dict[str, int] = {}
    for line in (out / "messages.jsonl").read_text().splitlines():
        msg = json.loads(line)
        for event in msg["body"]["Events"]:
            if event["Name"] == "DroppedEventsStatistics":
                assert event["EventType"] == "Operational"
                high = next(i for i in event["Payload"] if i["Queue"] == "High")
                dropped = int(high["ExtraDetails"]["CaptureDroppedFrames"])
                per_leaf[msg["identity"]] = per_leaf.get(msg["identity"], 0) + dropped
    # The demo's sensor and PLC had agents before the flood: each is told of every lost frame, once.
    assert per_leaf["leaf-5ccf7f07aefb"] == lost
    assert per_leaf["leaf-000e8caabb01"] == lost
    diagnostics = [
        e for line in (out / "messages.jsonl").read_text().splitlines()
        for e in json.loads(line)["body"]["Events"] if e["Name"] == "Diagnostic"
    ]  # fmt: skip
    assert any("capture dropped" in e["Payload"][0]["Message"] for e in diagnostics)
