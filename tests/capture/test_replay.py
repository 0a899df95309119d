"""Replay pacing: the plan is pure, the iterator is driven by a fake clock, and one short real-time run."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from leafguard.capture.replay import PcapReplay, release_plan, slice_batch


def test_plan_fast_is_one_slice() -> None:
    for speed in (0.0, math.inf, -1.0):
        assert release_plan([5.0, 9.0, 100.0], origin_ts=5.0, speed=speed) == [(0, 3, 0.0)]


def test_plan_slices_by_scaled_time() -> None:
    ts = [10.0, 10.001, 10.5, 10.502, 12.0]
    assert release_plan(ts, origin_ts=10.0, speed=1.0, slice_s=0.01) == [(0, 2, 0.0), (2, 4, 0.5), (4, 5, 2.0)]
    # Twice as fast: every due time halves.
    assert release_plan(ts, origin_ts=10.0, speed=2.0, slice_s=0.01) == [(0, 2, 0.0), (2, 4, 0.25), (4, 5, 1.0)]


def test_plan_out_of_order_frames_never_wait_backwards() -> None:
    plan = release_plan([1.0, 3.0, 2.0, 3.001], origin_ts=1.0, speed=1.0, slice_s=0.01)
    assert plan == [(0, 1, 0.0), (1, 4, 2.0)]
    dues = [due for _, _, due in plan]
    assert dues == sorted(dues)


def test_plan_later_batch_is_relative_to_the_first_frame_of_the_replay() -> None:
    assert release_plan([20.0], origin_ts=10.0, speed=4.0) == [(0, 1, 2.5)]
    assert release_plan([], origin_ts=0.0, speed=1.0) == []


def _pcap(tmp_path: Path, times: list[float]) -> Path:
    pkts = []
    for i, t in enumerate(times):
        p = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(dst="10.77.0.2") / UDP(sport=1000 + i)
        p.time = t
        pkts.append(p)
    path = tmp_path / "t.pcap"
    wrpcap(str(path), pkts)
    return path


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(round(s, 6))
        self.now += s


async def test_replay_waits_for_each_slice_with_a_fake_clock(tmp_path: Path) -> None:
    path = _pcap(tmp_path, [1000.0, 1000.002, 1001.0, 1003.0])
    fake = FakeClock()
    out = [b async for b in PcapReplay([path], speed=2.0, clock=fake.clock, sleep=fake.sleep)]
    assert [len(b) for b in out] == [2, 1, 1]
    assert fake.sleeps == [0.5, 1.0]
    assert out[0].timestamps == pytest.approx([1000.0, 1000.002])
    assert out[2].timestamps == pytest.approx([1003.0])


async def test_replay_as_fast_as_possible_never_sleeps(tmp_path: Path) -> None:
    path = _pcap(tmp_path, [1.0, 50.0, 3600.0])
    fake = FakeClock()
    replay = PcapReplay([path, path], speed=0, clock=fake.clock, sleep=fake.sleep)
    out = [b async for b in replay]
    assert sum(len(b) for b in out) == 6
    assert replay.frames == 6
    assert fake.sleeps == []


async def test_replay_real_time_is_paced(tmp_path: Path) -> None:
    path = _pcap(tmp_path, [0.0, 0.1, 0.2, 0.3])
    t0 = time.monotonic()
    frames = [len(b) async for b in PcapReplay([path], speed=1.5)]
    elapsed = time.monotonic() - t0
    assert sum(frames) == 4
    assert 0.18 <= elapsed < 1.0


def test_slice_shares_the_buffer(tmp_path: Path) -> None:
    from leafguard.capture.pcapfile import read_batches

    batch = next(read_batches(_pcap(tmp_path, [1.0, 2.0, 3.0])))
    part = slice_batch(batch, 1, 3)
    assert part.data is batch.data
    assert [part.frame(i) for i in range(2)] == [batch.frame(1), batch.frame(2)]
    assert slice_batch(batch, 0, 3) is batch
