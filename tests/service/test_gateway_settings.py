"""The operator's capture filter, changed live through the gateway settings; a bad one is reported and the
filter in force stays (real frames in namespaces the test creates)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from leafguard.demo import demo_capture
from leafguard.errors import ConfigurationError
from leafguard.service.gateway import CaptureSection
from tests.netns import Lab, Netns, needs_root

SEND = """
import sys
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.sendrecv import sendp
frames = [Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.9.0.1", pdst="10.9.0.2")] * 20
frames += [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.9.0.1", dst="10.9.0.2")
           / UDP(sport=5000, dport=6000) / b"x"] * 30
sendp(frames, iface=sys.argv[1], verbose=False)
"""


def _wait(what: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got = what()
        except (OSError, ValueError, KeyError):
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


def _stats(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "stats.json").read_text()))


def _set(out: Path, section: object) -> None:
    tmp = out / "gateway.json.tmp"
    tmp.write_text(json.dumps({"capture": section}))
    tmp.replace(out / "gateway.json")


def test_section_parsing() -> None:
    assert CaptureSection.parse({"extraFilter": "not arp"}).extra_filter == "not arp"
    assert CaptureSection.parse({"interfaces": ["eth1"]}).extra_filter is None
    for bad in ({"extraFilter": 5}, ["not arp"]):
        with pytest.raises(ConfigurationError):
            CaptureSection.parse(bad)


@needs_root
def test_filter_changes_live_and_a_bad_one_keeps_the_old(tmp_path: Path) -> None:
    with Lab() as lab:
        gen, gw = lab.netns("gen"), lab.netns("gw")
        lab.veth(gen, "gen0", gw, "gw0")
        out = tmp_path / "out"
        out.mkdir()
        with (tmp_path / "leafguard.log").open("wb") as log:
            proc = gw.popen(
                sys.executable, "-m", "leafguard", "run", "--interface", "gw0", "--local-dir", str(out),
                "--write-interval", "0.2", stderr=log,
            )  # fmt: skip
        _wait(lambda: _stats(out)["interfaces"]["gw0"]["state"] == "running")

        _set(out, {"extraFilter": "tcp port"})  # does not compile
        bad = _wait(lambda: (s := _stats(out)["capture_filter"])["error"] and s)
        assert "tcp port" in bad["error"] and bad["extraFilter"] == ""
        assert _sent_and_counted(gen, out) == 50  # everything still captured

        _set(out, {"extraFilter": "not arp"})
        _wait(lambda: _stats(out)["capture_filter"] == {"extraFilter": "not arp", "error": None})
        time.sleep(0.3)  # the thread swaps the program on its socket
        assert _sent_and_counted(gen, out) == 30  # the 20 ARP frames are filtered out in the kernel
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, (tmp_path / "leafguard.log").read_text()


def _sent_and_counted(gen: Netns, out: Path) -> int:
    """Send 20 ARP and 30 UDP frames; how many the capture counted once the count stops moving."""
    before = _stats(out)["interfaces"]["gw0"]["frames"]
    gen.python(SEND, "gen0")
    last = -1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)  # the stats file is rewritten every 0.2 s
        now = int(_stats(out)["interfaces"]["gw0"]["frames"]) - before
        if now == last and now > 0:
            return now
        last = now
    raise AssertionError("the frame count did not settle")


def test_replay_reports_that_the_filter_needs_live_capture(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _set(out, {"extraFilter": "not arp"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
         "--local-dir", str(out), "--write-interval", "0.2"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        status = _wait(lambda: (s := _stats(out)["capture_filter"])["error"] and s)
        assert "live capture only" in status["error"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
