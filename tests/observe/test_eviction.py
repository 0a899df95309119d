"""Full tables: what an eviction costs and which entry goes (issue #12, defect 6; `leafguard.observe.eviction`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from leafguard.capture.batch import FrameBatch
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.eviction import MAX_PROMOTED, SAMPLE, EvictionQueue
from leafguard.observe.settings import AnalyzerSettings

T0 = 1_700_000_000.0
LEAF = ("00:17:88:00:00:01", "10.1.0.5")
BROKER = ("00:1b:21:00:00:09", "10.1.0.1")


class _Entry:
    def __init__(self, name: str, admitted: float, last: float) -> None:
        self.name = name
        self.admitted = admitted
        self.last = last


def _queue(*entries: _Entry) -> EvictionQueue[_Entry]:
    q: EvictionQueue[_Entry] = EvictionQueue(lambda e: e.last, lambda e: e.admitted)
    for e in entries:
        q.admit(e)
    return q


def _names(q: EvictionQueue[_Entry], now: float, n: int) -> list[str]:
    return [q.victim(now, idle_s=300.0).name for _ in range(n)]


def test_newcomers_go_oldest_first_and_proven_entries_are_kept_while_active() -> None:
    proven = [_Entry(f"p{i}", 0.0, 995.0) for i in range(3)]  # active for 995 s, and lately
    flood = [_Entry(f"f{i}", 990.0 + i, 990.0 + i) for i in range(5)]  # one-frame entries, all recent
    q = _queue(proven[0], flood[0], proven[1], proven[2], *flood[1:])
    assert _names(q, 1000.0, 5) == ["f0", "f1", "f2", "f3", "f4"]
    assert len(q) == 3  # the proven ones, protected now
    proven[1].last = 600.0  # quiet for 400 s: it goes when its turn comes
    q.admit(_Entry("new", 999.0, 999.0))
    assert _names(q, 1000.0, 2) == ["new", "p1"]
    assert q.looked_at <= 7 * 3


def test_a_quiet_newcomer_goes_and_the_proven_ones_before_it_are_promoted() -> None:
    q = _queue(_Entry("p", 0.0, 999.0), _Entry("quiet", 100.0, 100.0), _Entry("f", 999.0, 999.0))
    assert _names(q, 1000.0, 1) == ["quiet"]
    assert _names(q, 1000.0, 1) == ["f"]


def test_when_every_entry_is_proven_the_least_recently_active_of_a_sample_goes() -> None:
    entries = [_Entry(f"e{i}", 0.0, 900.0 + i) for i in range(SAMPLE + 1)]
    entries[2].last = 800.0
    entries[-1].last = 750.0  # less recent, but beyond the sample: not compared
    q = _queue(*entries)
    assert _names(q, 1000.0, 1) == ["e2"]
    assert q.looked_at <= 1 + MAX_PROMOTED + SAMPLE
    assert _names(q, 10_000.0, SAMPLE) == ["e4", "e0", "e1", "e3"]  # (all quiet now: in queue order)
    with pytest.raises(LookupError):
        q.victim(0.0, 1.0)


def _syn(n: int) -> Any:
    """A new conversation from a new leaf-side address and MAC (a scan, a flood, a MAC flood)."""
    mac = f"02:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}:01"
    ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
    return Ether(src=mac, dst=BROKER[0]) / IP(src=ip, dst=BROKER[1]) / TCP(sport=40000, dport=80, flags="S")


def _burst(new: int, per_batch: int = 100) -> Iterator[FrameBatch]:
    """``new`` one-frame conversations in 1 ms steps, and among them, every 10th frame, one long-lived conversation
    of the leaf, each frame a payload from the leaf."""
    frames: list[tuple[float, bytes, int]] = []
    sent = 0
    for n in range(new):
        if n % 10 == 0:
            p = Ether(src=LEAF[0], dst=BROKER[0]) / IP(src=LEAF[1], dst=BROKER[1])
            raw = bytes(p / TCP(sport=50000, dport=8883, flags="PA") / b"x")
            frames.append((T0 + len(frames) * 0.001, raw, len(raw)))
            sent += 1
        raw = bytes(_syn(n))
        frames.append((T0 + len(frames) * 0.001, raw, len(raw)))
    for k in range(0, len(frames), per_batch):
        yield FrameBatch.from_frames(1, frames[k : k + per_batch])


class _CountingDict(dict[Any, Any]):
    """A table that counts the iterations started over it."""

    walks = 0

    def __iter__(self) -> Iterator[Any]:
        _CountingDict.walks += 1
        return super().__iter__()

    def keys(self) -> Any:
        _CountingDict.walks += 1
        return super().keys()

    def values(self) -> Any:
        _CountingDict.walks += 1
        return super().values()

    def items(self) -> Any:
        _CountingDict.walks += 1
        return super().items()


@pytest.mark.parametrize("fast", [True, False], ids=["bulk", "per-frame"])
def test_evicting_never_walks_a_table(fast: bool) -> None:
    """Past the caps, with every entry recent, a new conversation or MAC evicts one without iterating over the
    table: in CPython even ``next(iter(table))`` is not O(1) on a dict that entries leave from the front (it first
    skips the slots of every entry deleted since the last resize), which made analysis 20x slower past the cap."""
    an = Analyzer(AnalyzerSettings(max_flows=300, max_macs=200), fast_path=fast, observations=False)
    an.conversations.flows = _CountingDict()
    an.inventory.macs = _CountingDict()
    _CountingDict.walks = 0
    for b in _burst(3000):
        an.feed(b)
    assert _CountingDict.walks == 0
    assert an.stats.evicted_flows == 3000 + 1 - 300
    assert an.stats.evicted_macs == 3000 + 2 - 200
    for order in (an.conversations.order, an.inventory.order):
        assert order.looked_at <= 3 * (3000 + 2)
    assert len(an.flows) == len(an.conversations.order) == 300
    assert len(an.macs) == len(an.inventory.order) == 200


def test_the_work_per_eviction_does_not_grow_with_the_table() -> None:
    """A complexity probe by counts: entries looked at per eviction, with tables of N and of 4N entries."""
    per_eviction = []
    for cap in (250, 1000):
        an = Analyzer(AnalyzerSettings(max_flows=cap, max_macs=cap), observations=False)
        for b in _burst(cap * 3):
            an.feed(b)
        assert an.stats.evicted_flows > cap
        per_eviction.append(an.conversations.order.looked_at / an.stats.evicted_flows)
    assert all(1 <= x <= 3 for x in per_eviction)
    assert per_eviction[1] <= per_eviction[0] * 1.1


@pytest.mark.parametrize("fast", [True, False], ids=["bulk", "per-frame"])
def test_an_active_conversation_and_leaf_outlive_a_flood_past_the_caps(fast: bool) -> None:
    an = Analyzer(AnalyzerSettings(max_flows=256, max_macs=128), fast_path=fast)
    for b in _burst(4000):
        an.feed(b)
    assert an.stats.evicted_flows > 3000 and an.stats.evicted_macs > 3000
    leaf = next(c for c in an.report()["conversations"] if c["a_port"] == 50000)
    assert leaf["packets_ab"] == 400  # every frame counted in the one conversation, never evicted
    seen = [o for o in an.drain_observations() if o.local_port == 50000]
    assert len(seen) == 1  # so it was seen as new once
    assert an.leaf_report(LEAF[0]) is not None
    assert an.leaf_report(LEAF[0])["packets_out"] == 400  # type: ignore[index]


def test_a_row_queue_behaves_as_a_deque_of_its_row_numbers() -> None:
    """The conversation table's queues hold row numbers in a ring of machine ints; they must keep a deque's order
    through growth, rotation and wrap-around."""
    import random
    from collections import deque

    from leafguard.observe.eviction import RowQueue

    rnd = random.Random(3)
    ring, ref = RowQueue(), deque[int]()
    for _ in range(20_000):
        op = rnd.random()
        if op < 0.45:
            row = rnd.randrange(2**31)
            ring.append(row)
            ref.append(row)
        elif op < 0.7 and ref:
            assert ring.popleft() == ref.popleft()
        elif op < 0.85:
            ring.rotate(-1)
            ref.rotate(-1)
        else:
            rows = [rnd.randrange(1000) for _ in range(rnd.randrange(4))]
            ring.extend(rows)
            ref.extend(rows)
        assert len(ring) == len(ref)
        if ref:
            assert ring[0] == ref[0]
    assert [ring.popleft() for _ in range(len(ref))] == list(ref)
