"""Leaves gone silent: the tracker's gaps, and the alerts the analyzer raises from them."""

from __future__ import annotations

from typing import Any

import numpy as np
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from leafguard.capture.batch import FrameBatch
from leafguard.detect.sends import SendLog, Sends
from leafguard.detect.silence import SilenceTracker
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from tests.detect.test_detectors import VALIDATOR

T0 = 1_700_000_000.0


def _sends(log: SendLog, sends: list[tuple[int, float]]) -> Sends | None:
    log.sent_many(
        np.asarray([m for m, _ in sends], dtype=np.int64), np.asarray([t for _, t in sends], dtype=np.float64)
    )
    return log.take()


def _bulk(
    tracker: SilenceTracker, sends: list[tuple[int, float]], log: SendLog | None = None
) -> list[tuple[int, float]]:
    got = _sends(log or SendLog(), sends)
    return tracker.batch(got) if got is not None else []


def test_gaps_inside_and_across_batches_and_silences_still_going_on() -> None:
    tr = SilenceTracker(10.0, max_macs=100)
    # MAC 1 pauses 12 s inside the batch; MAC 2 pauses 9.9 s (not enough); frames arrive out of order.
    assert _bulk(tr, [(1, 0.0), (2, 0.0), (1, 15.0), (1, 3.0), (2, 9.9)]) == [(1, 3.0)]
    # MAC 2 then comes back 10.1 s after its last frame of the previous batch.
    assert _bulk(tr, [(2, 20.0), (1, 16.0)]) == [(2, 9.9)]
    assert tr.silent_now(25.5) == []  # nobody quiet for 10 s yet
    assert tr.silent_now(26.2) == []  # MAC 1 is, but the last look was less than a second ago
    assert tr.silent_now(26.2, final=True) == [(1, 16.0)]
    # The same silence, ending later, is not found twice; nor is it found again by a later check.
    assert _bulk(tr, [(1, 40.0)]) == []
    assert tr.silent_now(49.0, final=True) == [(2, 20.0)]


def test_per_frame_and_bulk_sends_are_merged_before_looking_for_gaps() -> None:
    tr, log = SilenceTracker(10.0, max_macs=100), SendLog()
    _bulk(tr, [(0x0017_8800_0001, 0.0)], log)
    # A frame walked at 9 s fills what would look like an 18 s gap before the bulk frames at 18 and 27 s.
    log.sent(bytes.fromhex("001788000001"), 9.0)
    assert _bulk(tr, [(0x0017_8800_0001, 27.0), (0x0017_8800_0001, 18.0)], log) == []
    log.sent(bytes.fromhex("001788000001"), 40.0)  # and a walked frame alone ends a silence too
    walked = log.take()
    assert walked is not None and tr.batch(walked) == [(0x0017_8800_0001, 27.0)]
    assert log.take() is None


def test_the_table_is_bounded() -> None:
    tr = SilenceTracker(10.0, max_macs=3)
    _bulk(tr, [(m, 0.0) for m in range(10)])
    assert len(tr.silent_now(100.0, final=True)) == 3


def udp_frame(mac: str, ip: str, t: float) -> tuple[float, bytes, int]:
    """A CoAP datagram from ``mac``/``ip`` to the gateway, ``t`` seconds after T0."""
    raw = bytes(Ether(src=mac, dst="00:1b:21:00:00:01") / IP(src=ip, dst="10.5.0.1") / UDP(sport=5683, dport=5683))
    return (T0 + t, raw, len(raw))


def alerts_in_batches(
    settings: AnalyzerSettings, frames: list[tuple[float, bytes, int]], batch: int, fast: bool = True
) -> list[dict[str, Any]]:
    an = Analyzer(settings, fast_path=fast)
    for lo in range(0, len(frames), batch):
        an.feed(FrameBatch.from_frames(1, frames[lo : lo + batch]))
    an.finish()
    return an.alerts()


def _run(frames: list[tuple[float, bytes, int]], batch: int, fast: bool = True) -> list[dict[str, Any]]:
    return alerts_in_batches(AnalyzerSettings(silent_after_s=20.0), frames, batch, fast)


def test_silent_leaves_are_found_whatever_the_batches() -> None:
    frames = []
    for t in range(101):
        frames.append(udp_frame("00:17:88:00:00:01", "10.5.0.2", t))  # steady
        if t <= 30:
            frames.append(udp_frame("00:17:88:00:00:02", "10.5.0.3", t + 0.5))  # stops at 30.5
        if t <= 10 or t >= 50:
            frames.append(udp_frame("00:17:88:00:00:03", "10.5.0.4", t + 0.25))  # pauses 10.25 -> 50.25
        if t <= 5:
            frames.append(udp_frame("00:17:88:00:00:04", "93.184.216.34", t))  # not a leaf: never reported
    whole = _run(frames, len(frames))
    assert [(a["type"], a["mac"], a["ts"], a["evidence"]["last_seen"]) for a in whole] == [
        ("leaf_silent", "00:17:88:00:00:03", T0 + 30.25, T0 + 10.25),
        ("leaf_silent", "00:17:88:00:00:02", T0 + 50.5, T0 + 30.5),
    ]
    for alert in whole:
        assert not list(VALIDATOR.iter_errors(alert)), alert
    assert _run(frames, 7) == whole == _run(frames, 64, fast=False) == _run(frames, 300)


def test_without_the_setting_nothing_is_watched() -> None:
    an = Analyzer()
    an.feed(FrameBatch.from_frames(1, [udp_frame("00:17:88:00:00:02", "10.5.0.3", t) for t in (0, 100)]))
    an.finish()
    assert an.silence is None and an.alerts() == []
