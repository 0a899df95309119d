"""Floods: windows of packet time, the frame that crossed the threshold, one finding per five minutes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from leafguard.capture.batch import FrameBatch
from leafguard.detect.floods import FloodTracker
from leafguard.detect.sends import SendLog
from leafguard.errors import ConfigurationError
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from tests.detect.test_detectors import VALIDATOR
from tests.detect.test_silence import T0, alerts_in_batches, udp_frame


def _batch(tracker: FloodTracker, sends: list[tuple[int, float]]) -> list[tuple[int, float, float]]:
    log = SendLog()
    log.sent_many(np.asarray([m for m, _ in sends], dtype=np.int64), np.asarray([t for _, t in sends]))
    got = log.take()
    assert got is not None
    return tracker.batch(got)


def test_the_frame_that_crosses_the_threshold_names_the_flood() -> None:
    tr = FloodTracker(2.0, max_macs=100)  # 20 frames in one 10 s window
    assert tr.threshold == 20
    # MAC 1: 15 frames in [0, 10), then 10 in the next window: no window has 20.
    assert _batch(tr, [(1, i * 0.5) for i in range(15)]) == []
    assert _batch(tr, [(1, 10.0 + i * 0.1) for i in range(10)]) == []
    # Ten more in [10, 20), in reverse order in the batch: the 20th of the window, in time order, is at 19.0.
    assert _batch(tr, [(1, 19.0 - i * 0.1) for i in range(10)]) == [(1, 19.0, 10.0)]
    # The flood goes on: quiet for five minutes, then found again.
    assert _batch(tr, [(1, 20.0 + i * 0.01) for i in range(40)]) == []
    late = 19.0 + 300.0
    assert _batch(tr, [(1, 300.0 + i * 0.01) for i in range(30)]) == []  # a crossing at 300.19: still quiet
    window = np.ceil(late / 10.0) * 10.0  # the first whole window after the quiet time
    assert _batch(tr, [(1, window + i * 0.01) for i in range(30)]) == [(1, window + 0.19, window)]
    # Another MAC is counted on its own.
    assert _batch(tr, [(2, 5.0 + i * 0.001) for i in range(19)]) == []


def _run(frames: list[tuple[float, bytes, int]], batch: int, fast: bool = True) -> list[dict[str, Any]]:
    return alerts_in_batches(AnalyzerSettings(flood_rate_per_s=50.0), frames, batch, fast)


def test_a_flooding_leaf_is_found_whatever_the_batches() -> None:
    frames = [udp_frame("00:17:88:00:00:01", "10.5.0.2", t * 0.5) for t in range(100)]  # 2 frames/s: fine
    frames += [udp_frame("00:17:88:00:00:02", "10.5.0.3", 30 + t * 0.01) for t in range(700)]  # 100/s for 7 s
    frames += [udp_frame("00:17:88:00:00:04", "93.184.216.34", 30 + t * 0.01) for t in range(700)]  # not a leaf
    frames.sort(key=lambda f: f[0])
    whole = _run(frames, len(frames))
    assert [(a["type"], a["mac"]) for a in whole] == [("flood", "00:17:88:00:00:02")]
    (flood,) = whole
    assert flood["ts"] == T0 + 30 + 499 * 0.01  # the 500th frame of the window [30, 40)
    assert flood["evidence"]["frames"] == 500 and flood["evidence"]["window_start"] == T0 + 30
    assert not list(VALIDATOR.iter_errors(flood))
    assert _run(frames, 37) == whole == _run(frames, 128, fast=False) == _run(frames, 1000)


def test_a_leaf_flooded_by_many_senders_is_named_as_the_target() -> None:
    victim = ("00:17:88:00:00:07", "10.5.0.7")
    frames = [udp_frame(victim[0], victim[1], t) for t in range(12)]  # the PLC talks, slowly
    for i in range(600):  # 60 senders, 10 frames each, all to the PLC within 6 s: 100 frames/s received
        sender = f"02:00:00:00:{i % 60:02x}:01"
        raw = bytes(Ether(src=sender, dst=victim[0]) / IP(src=f"10.5.1.{i % 60}", dst=victim[1]) / UDP(dport=502))
        frames.append((T0 + 2 + i * 0.01, raw, len(raw)))
    frames.sort(key=lambda f: f[0])
    whole = _run(frames, len(frames))
    assert [(a["mac"], a["evidence"]["direction"]) for a in whole] == [(victim[0], "received")]
    assert whole[0]["ts"] == T0 + 2 + 499 * 0.01
    assert not list(VALIDATOR.iter_errors(whole[0]))
    assert _run(frames, 41) == whole == _run(frames, 256, fast=False)


def test_detection_settings_change_while_running_and_a_bad_change_changes_nothing() -> None:
    an = Analyzer(AnalyzerSettings())
    frames = [udp_frame("00:17:88:00:00:02", "10.5.0.3", t * 0.01) for t in range(1000)]  # 100 frames/s
    an.feed(FrameBatch.from_frames(1, frames[:500]))
    assert an.floods is None and an.alerts() == []
    before = an.settings
    with pytest.raises(ConfigurationError, match="flood rate"):
        an.set_detection(flood_rate_per_s=-1.0, learning_period_s=5.0)
    assert an.settings is before and an.floods is None and an.detectors.learning_period_s is None
    assert an.set_detection(flood_rate_per_s=20.0).flood_rate_per_s == 20.0
    an.feed(FrameBatch.from_frames(1, frames[500:]))  # 500 frames in [5, 10): the window counts from the change
    assert [(a["type"], a["evidence"]["frames"]) for a in an.alerts()] == [("flood", 200)]
    an.set_detection(flood_rate_per_s=None)
    assert an.floods is None and an.sends is None and an.receives is None


def test_a_mac_flood_past_the_cap_does_not_walk_the_trackers_tables() -> None:
    """New MACs past the trackers' cap forget the oldest in O(1) (#12 defect 6's pathology: a dict's
    ``next(iter())`` first skips every slot deleted since its last resize, so each new MAC of a flood paid for all
    those forgotten before it). Counted, not timed: no iteration over a table starts while the batches go in."""
    from collections import OrderedDict

    from leafguard.detect.silence import SilenceTracker

    walks = 0

    class Counting(OrderedDict[int, Any]):
        def __iter__(self) -> Any:
            nonlocal walks
            walks += 1
            return super().__iter__()

    floods = FloodTracker(5.0, max_macs=50)
    silence = SilenceTracker(60.0, 50)
    floods._windows = Counting()
    silence._last = Counting()
    log = SendLog()
    for k in range(20):
        for i in range(100):  # 100 new MACs per batch, 2,000 in all: 40 times the cap
            log.sent((0x020000000000 + k * 100 + i).to_bytes(6, "big"), 1000.0 + k + i / 1000)
        sends = log.take()
        assert sends is not None
        floods.batch(sends)
        silence.batch(sends)
    assert walks == 0
    assert len(floods._windows) == len(silence._last) == 50
