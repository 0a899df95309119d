"""The operator's capture filter, changed live through the gateway settings; a bad one is reported and the
filter in force stays (real frames in namespaces the test creates)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from leafguard.demo import demo_capture
from leafguard.detect.thresholds import THRESHOLD_KEYS, Thresholds
from leafguard.errors import ConfigurationError
from leafguard.service.gateway import (
    CaptureDefaults,
    CaptureSection,
    apply_capture_section,
    parse_detection,
    parse_leaf_map,
)
from testkit.netns import Lab, Netns, needs_root
from testkit.wait import wait_for
from tests.service.helpers import read_stats, run_capturing

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


def _set(out: Path, section: object) -> None:
    _set_doc(out, {"capture": section})


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
        proc = run_capturing(gw, "gw0", out, tmp_path / "leafguard.log")
        wait_for(lambda: read_stats(out)["interfaces"]["gw0"]["state"] == "running")

        _set(out, {"extraFilter": "tcp port"})  # does not compile
        bad = wait_for(lambda: (s := read_stats(out)["capture_filter"])["error"] and s)
        assert "tcp port" in bad["error"] and bad["extraFilter"] == ""
        assert _sent_and_counted(gen, out) == 50  # everything still captured

        _set(out, {"extraFilter": "not arp"})
        wait_for(lambda: read_stats(out)["capture_filter"]
                 == {"extraFilter": "not arp", "interfaces": ["gw0"], "promiscuous": True, "error": None})
        time.sleep(0.3)  # the thread swaps the program on its socket
        assert _sent_and_counted(gen, out) == 30  # the 20 ARP frames are filtered out in the kernel
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, (tmp_path / "leafguard.log").read_text()


def _sent_and_counted(gen: Netns, out: Path) -> int:
    """Send 20 ARP and 30 UDP frames; how many the capture counted once the count stops moving."""
    before = read_stats(out)["interfaces"]["gw0"]["frames"]
    gen.python(SEND, "gen0")
    last = -1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)  # the stats file is rewritten every 0.2 s
        now = int(read_stats(out)["interfaces"]["gw0"]["frames"]) - before
        if now == last and now > 0:
            return now
        last = now
    raise AssertionError("the frame count did not settle")


def test_replay_reports_that_the_filter_needs_live_capture(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _set(out, {"extraFilter": "not arp"})
    with _demo_replay(out):
        status = wait_for(lambda: (s := read_stats(out)["capture_filter"])["error"] and s)
        assert "live capture only" in status["error"]


def test_leaf_map_names_leaves_and_a_bad_map_keeps_the_old(tmp_path: Path) -> None:
    assert parse_leaf_map({"5C-CF-7F-07-AE-FB": "sensor-7"}) == {"5c:cf:7f:07:ae:fb": "sensor-7"}
    for bad in (
        {"nope": "x"},
        {"5c:cf:7f:07:ae:fb": "has space"},
        {"00:00:00:00:00:01": "a", "00:00:00:00:00:02": "a"},
    ):
        with pytest.raises(ConfigurationError):
            parse_leaf_map(bad)

    out = tmp_path / "out"
    out.mkdir()
    (out / "gateway.json").write_text(json.dumps({"leafMap": {"5c:cf:7f:07:ae:fb": "plant1-sensor7"}}))
    with _demo_replay(out):
        assert wait_for(lambda: read_stats(out)["leaf_map"] == {"leaves": 1, "error": None})
        wait_for((out / "twins" / "plant1-sensor7.json").exists)
        _set_doc(out, {"leafMap": {"5c:cf:7f:07:ae:fb": "bad name!"}})
        status = wait_for(lambda: (s := read_stats(out)["leaf_map"])["error"] and s)
        assert "bad name!" in status["error"] and status["leaves"] == 1
    identities = {json.loads(line)["identity"] for line in (out / "messages.jsonl").read_text().splitlines()}
    assert "plant1-sensor7" in identities and "leaf-5ccf7f07aefb" not in identities
    assert "leaf-000e8caabb01" in identities  # a leaf the map does not name keeps its MAC-derived identity


@contextlib.contextmanager
def _demo_replay(out: Path) -> Iterator[None]:
    """``leafguard run`` replaying the demo capture into ``out``; stopped (cleanly) at the end of the block."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
         "--local-dir", str(out), "--write-interval", "0.2"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def _set_doc(out: Path, doc: object) -> None:
    _set_raw(out, json.dumps(doc))


def _set_raw(out: Path, text: str) -> None:
    tmp = out / "gateway.json.tmp"
    tmp.write_text(text)
    tmp.replace(out / "gateway.json")


def test_detection_section_parsing() -> None:
    assert parse_detection({"learningPeriodS": 3600, "floodRatePerS": None}) == {
        "learning_period_s": 3600.0,
        "flood_rate_per_s": None,
    }
    assert parse_detection(None) == {}
    # The module twin's way to turn one off: a null in a desired patch deletes the key (which keeps the value).
    assert parse_detection({"silentAfterS": "off"}) == {"silent_after_s": None}
    for bad in ({"silentAfter": 5}, {"silentAfterS": "5"}, {"floodRatePerS": True}, {"silentAfterS": "Off"}, [1]):
        with pytest.raises(ConfigurationError):
            parse_detection(bad)


def test_detection_changes_live_and_bad_settings_keep_those_in_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # In place before the first frame: the demo plant's sensors talk far slower than this "flood".
    _set_doc(out, {"detection": {"floodRatePerS": 0.5, "silentAfterS": 0.1}})
    with _demo_replay(out):
        status = wait_for(lambda: (s := read_stats(out)["detection"])["floodRatePerS"] == 0.5 and s)
        assert status == {"learningPeriodS": None, "silentAfterS": 0.1, "floodRatePerS": 0.5, "error": None} | DEFAULTS
        alerts = wait_for(lambda: (a := _alert_types(out)) >= {"flood", "leaf_silent"} and a)
        assert alerts >= {"flood", "leaf_silent"}
        _set_doc(out, {"detection": {"floodRatePerS": -3, "learningPeriodS": 60}})  # one bad value: none applies
        bad = wait_for(lambda: (s := read_stats(out)["detection"])["error"] and s)
        assert "flood rate" in bad["error"]
        assert (bad["floodRatePerS"], bad["learningPeriodS"]) == (0.5, None)
        _set_doc(out, {"detection": {"floodRatePerS": None, "learningPeriodS": 60}})
        good = wait_for(lambda: (s := read_stats(out)["detection"])["learningPeriodS"] == 60 and s)
        assert good == {"learningPeriodS": 60.0, "silentAfterS": 0.1, "floodRatePerS": None, "error": None} | DEFAULTS
        # The rules' thresholds are settings of the same section, validated with it: a count of 1 is refused.
        _set_doc(out, {"detection": {"portScanPorts": 1, "udpScanPorts": 20}})
        bad = wait_for(lambda: (s := read_stats(out)["detection"])["error"] and "port_scan_ports" in s["error"] and s)
        assert (bad["portScanPorts"], bad["udpScanPorts"]) == (15, 15)
        _set_doc(out, {"detection": {"portScanPorts": 30, "udpReplyTimeoutS": 5}})
        good = wait_for(lambda: (s := read_stats(out)["detection"])["portScanPorts"] == 30 and s)
        assert (good["udpReplyTimeoutS"], good["error"]) == (5.0, None)


DEFAULTS = {key: getattr(Thresholds(), field) for key, field in THRESHOLD_KEYS.items()}


def _alert_types(out: Path) -> set[str]:
    try:
        doc = json.loads((out / "alerts.json").read_text())
    except (OSError, ValueError):
        return set()
    return {a["type"] for a in doc.get("alerts", [])}


def _nested(depth: int) -> str:
    """A JSON object nested ``depth`` levels deep (written by hand: the json module itself would recurse)."""
    return '{"x":' * depth + '"leaf"' + "}" * depth


def test_a_deep_document_is_rejected_and_the_service_stays_up(tmp_path: Path) -> None:
    """Issue #12 defect 2: a leaf map nested 1000 levels deep, written twice with another key changed, used to
    end the service with RecursionError while the sections were compared."""
    out = tmp_path / "out"
    out.mkdir()
    _set_doc(out, {"leafMap": {"5c:cf:7f:07:ae:fb": "sensor-7"}})
    with _demo_replay(out):
        wait_for(lambda: read_stats(out)["leaf_map"] == {"leaves": 1, "error": None})
        _set_raw(out, '{"leafMap":' + _nested(1000) + "}")
        status = wait_for(lambda: (s := read_stats(out)["leaf_map"])["error"] and s)
        assert "deeper than 10 levels" in status["error"] and status["leaves"] == 1
        _set_raw(out, '{"detection": {"silentAfterS": 60}, "leafMap":' + _nested(1000) + "}")
        time.sleep(2.5)  # one poll of the settings file
        assert "deeper" in read_stats(out)["detection"]["error"]
    # _demo_replay asserted exit status 0 at SIGTERM; the messages were flushed.
    assert (out / "messages.jsonl").read_text().count("\n") > 0


def test_the_error_in_force_describes_the_document_in_force(tmp_path: Path) -> None:
    """Issue #12 defect 3: valid, then unreadable, then the same valid document: the errors are cleared."""
    out = tmp_path / "out"
    out.mkdir()
    good = {"leafMap": {"5c:cf:7f:07:ae:fb": "sensor-7"}, "detection": {"silentAfterS": 60}}
    _set_doc(out, good)
    with _demo_replay(out):
        wait_for(lambda: read_stats(out)["leaf_map"] == {"leaves": 1, "error": None})
        (out / "gateway.json").write_text("{not json")
        stats = wait_for(lambda: (s := read_stats(out))["leaf_map"]["error"] and s)
        assert all("not JSON" in stats[k]["error"] for k in ("leaf_map", "detection", "capture_filter"))
        _set_doc(out, good)
        stats = wait_for(lambda: (s := read_stats(out))["leaf_map"]["error"] is None and s)
        assert stats["detection"]["error"] is None and stats["capture_filter"]["error"] is None
        assert stats["detection"]["silentAfterS"] == 60 and stats["leaf_map"]["leaves"] == 1


def test_documents_past_their_caps_are_rejected_and_the_old_settings_stay(tmp_path: Path) -> None:
    """Issue #12 defect 5: a leaf map past its entry cap, and a file past the size cap, are reported errors."""
    out = tmp_path / "out"
    out.mkdir()
    _set_doc(out, {"leafMap": {"5c:cf:7f:07:ae:fb": "sensor-7"}})
    with _demo_replay(out):
        wait_for(lambda: read_stats(out)["leaf_map"] == {"leaves": 1, "error": None})
        many = {f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}": f"leaf{i}" for i in range(10_001)}
        _set_doc(out, {"leafMap": many})
        status = wait_for(lambda: (s := read_stats(out)["leaf_map"])["error"] and s)
        assert "10001 entries, over 10000" in status["error"] and status["leaves"] == 1
        _set_doc(out, {"leafMap": {"5c:cf:7f:07:ae:fb": "sensor-7"}, "padding": "x" * (1 << 20)})
        status = wait_for(lambda: (s := read_stats(out)["leaf_map"])["error"] and "larger than" in s["error"] and s)
        assert status["leaves"] == 1
        _set_doc(out, {"leafMap": {"5c:cf:7f:07:ae:fb": "sensor-7", "00:0e:8c:aa:bb:01": "plc-1"}})
        wait_for(lambda: read_stats(out)["leaf_map"] == {"leaves": 2, "error": None})


def test_a_capture_section_that_sets_nothing_clears_its_error() -> None:
    """Issue #12 defect 3 in edge mode: after a bad capture section, ``"capture": null`` is not an error."""
    status: dict[str, object] = {"extraFilter": "", "error": None}
    replay = CaptureDefaults("", (), promiscuous=True)
    apply_capture_section(None, {"extraFilter": 5}, status, replay)
    assert "must be a string" in str(status["error"])
    apply_capture_section(None, None, status, replay)
    assert status == {"extraFilter": "", "error": None}


def test_mute_and_learn_from_the_settings(tmp_path: Path) -> None:
    """Issue #14 point 3: ``mute`` (rules with an expiry, the list validated as a whole) and ``learn`` (a token)."""
    out = tmp_path / "out"
    out.mkdir()
    until_2100 = 4_102_444_800
    _set_doc(out, {"detection": {"floodRatePerS": 0.5, "silentAfterS": 0.1},
                   "mute": [{"type": "flood", "until": until_2100}]})  # fmt: skip
    with _demo_replay(out):
        triage = wait_for(lambda: (t := read_stats(out)["triage"])["muted"] > 0 and t)
        assert triage["mute"] == [{"type": "flood", "mac": None, "until": until_2100}] and triage["error"] is None
        alerts = wait_for(lambda: (a := _alert_types(out)) >= {"leaf_silent"} and a)
        assert "flood" not in alerts  # the demo's sensors do "flood" at this rate: muted
        # One bad rule: the list in force stays and the error says why.
        _set_doc(out, {"mute": [{"type": "flood", "until": until_2100}, {"mac": "not-a-mac", "forS": 60}]})
        bad = wait_for(lambda: (t := read_stats(out)["triage"])["error"] and t)
        assert "not a MAC" in bad["error"] and bad["mute"] == triage["mute"]
        _set_doc(out, {"learn": "after-commissioning"})
        learned = wait_for(lambda: (t := read_stats(out)["triage"])["learnToken"] and t)
        assert learned["learnToken"] == "after-commissioning" and learned["learnedLeaves"] >= 3
        assert learned["mute"] == [] and learned["error"] is None  # the document has no mute list any more
