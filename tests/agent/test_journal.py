"""The fleet's journal: a saved state plus the inputs journalled after it, applied again, give back the fleet the
killed process had (caches, aggregation windows, counters, timers), whatever the inputs and wherever the cut."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leafguard.agent import journal as j
from leafguard.agent.config import AgentConfig
from leafguard.agent.fleet import Fleet
from leafguard.service.state import decode_state, encode_state
from tests.agent.helpers import T0, conn, login, view

CFG = "ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration"
MACS = ["00:11:22:33:44:55", "00:11:22:33:44:66", "02:00:00:00:00:07"]


class Recorder:
    """The journal as the file keeps it: every input encoded, and decoded again when replayed."""

    def __init__(self) -> None:
        self.records: list[bytes] = []

    def record(self, op: j.FleetOp) -> None:
        self.records.append(j.encode(op))

    def ops(self) -> list[j.FleetOp]:
        return [j.decode(r) for r in self.records]


def saved(fleet: Fleet) -> dict[str, Any]:
    """The fleet's state as a state file holds it (encoded and read back)."""
    raw = encode_state({"fleet": fleet.export_state()})
    doc = decode_state(raw)["fleet"]
    assert isinstance(doc, dict)
    return doc


def comparable(fleet: Fleet) -> bytes:
    return orjson.dumps(saved(fleet), option=orjson.OPT_SORT_KEYS)


Step = Callable[[Fleet], object]


def inputs(seed: int, count: int) -> list[tuple[float, Step]]:
    """A random but valid stream of everything that reaches a fleet, with its clock."""
    rnd = random.Random(seed)
    t = T0
    out: list[tuple[float, Step]] = []
    known: list[str] = []

    def views() -> list[Any]:
        return [view(mac, last_seen=t) for mac in known]

    for _ in range(count):
        t += rnd.choice([0.0, 0.5, 3.0, 31.0, 400.0, 1900.0])
        now = t
        kind = rnd.randrange(12)
        mac = rnd.choice(MACS)
        if kind <= 3:
            port = rnd.choice([22, 80, 443, 502, 1883])
            obs = conn(now, mac=mac, remote_port=port, remote=f"10.0.0.{rnd.randrange(2, 9)}",
                       direction=rnd.choice(["In", "Out"]), protocol=rnd.choice(["tcp", "udp"]))
            if mac not in known:
                known.append(mac)
            out.append((now, lambda f, o=obs: f.observe(o)))
        elif kind == 4:
            seen = login(now, mac=mac, result=rnd.choice(["Success", "Fail"]))
            out.append((now, lambda f, o=seen: f.observe(o)))
        elif kind <= 7:
            hold = rnd.random() < 0.3
            snap = list(views())
            provider = (lambda s=snap: s) if rnd.random() < 0.7 else None
            out.append((now, lambda f, n=now, p=provider, h=hold: f.tick(n, p, hold=h)))
        elif kind == 8:
            doc = {CFG: {"maxMessageSizeInBytes": {"value": rnd.choice([2048, 8192, 65536])},
                         "aggregationEnabledConnectionCreate": {"value": rnd.random() < 0.5},
                         "maxLocalCacheSizeInBytes": {"value": rnd.choice([4096, 2560000])}}}
            ident = "leaf-" + mac.replace(":", "")
            out.append((now, lambda f, i=ident, d=doc, n=now: f.apply_desired(i, d, n)))
        elif kind == 9:
            mapping = {mac: rnd.choice(["plc-1", "cam-2"])} if rnd.random() < 0.7 else {}
            out.append((now, lambda f, m=mapping, n=now: f.set_leaf_map(m, n)))
        elif kind == 10:
            choice = rnd.randrange(3)
            if choice == 0:
                out.append((now, lambda f: f.record_capture_drops(7)))
            elif choice == 1:
                out.append((now, lambda f, n=now: f.diagnostic("Warning", "capture dropped frames", n)))
            else:
                out.append((now, lambda f, n=now: [m for mac in f.macs() for m in f.flush_leaf(mac, n)]))
        else:
            out.append((now, lambda f, m=mac: f.record_send_failures(f.identity_for(m), 2)))
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(5, 120), cut=st.floats(0.0, 1.0))
def test_state_plus_journal_is_the_fleet_that_was_killed(seed: int, count: int, cut: float) -> None:
    steps = inputs(seed, count)
    at = int(cut * len(steps))
    killed = Fleet(AgentConfig(), discovery_interval_s=10.0)
    for _, step in steps[:at]:
        step(killed)
    state = saved(killed)
    clock = steps[at - 1][0] if at else T0
    journal = Recorder()
    killed.journal = journal
    for _, step in steps[at:]:
        step(killed)

    restarted = Fleet(AgentConfig(), discovery_interval_s=10.0)
    restarted.restore_state(state, clock)
    latest = restarted.replay(journal.ops())
    assert comparable(restarted) == comparable(killed)
    clocks = [c for op in journal.ops() if (c := op.clock) is not None]
    assert latest == (max(clocks) if clocks else None)
    # And from here on both behave alike: the next tick and the final flush give the same messages.
    end = steps[-1][0] + 7200.0
    assert restarted.tick(end) == killed.tick(end)
    assert restarted.shutdown(end + 1) == killed.shutdown(end + 1)


def test_a_tick_that_finds_nothing_due_is_not_journalled() -> None:
    fleet = Fleet(AgentConfig())
    journal = Recorder()
    fleet.journal = journal
    fleet.observe(conn(T0))
    fleet.tick(T0)
    done = len(journal.records)
    for i in range(50):
        fleet.tick(T0 + 1 + i * 0.1)
    assert len(journal.records) == done, "an idle gateway's ticks cost no journal records"


def test_only_the_views_agents_read_are_journalled() -> None:
    fleet = Fleet(AgentConfig(), discovery_interval_s=10.0)
    journal = Recorder()
    fleet.tick(T0, lambda: [view(mac) for mac in MACS])  # every agent's first snapshot
    fleet.journal = journal
    fleet.tick(T0 + 11, lambda: [view(mac) for mac in MACS])  # discovery only: nobody takes a snapshot
    (op,) = journal.ops()
    assert isinstance(op, j.Ticked) and op.discovered == tuple(MACS) and op.views == ()


def test_a_replay_that_no_longer_leads_where_it_led_stops_with_an_error() -> None:
    fleet = Fleet(AgentConfig())
    with pytest.raises(j.JournalError, match="send failures"):
        fleet.replay([j.SendFailures("leaf-nobody", 1)])
    with pytest.raises(j.JournalError):
        j.decode(b'["?", 1]')
    with pytest.raises(j.JournalError):
        j.decode(b'["c", "not a time"]')
    with pytest.raises(j.JournalError):
        j.decode(b"\xff")


def test_every_input_round_trips_through_its_record() -> None:
    ops: list[j.FleetOp] = [
        j.Observed(conn(T0)),
        j.Observed(login(T0, user=None)),
        j.Ticked(T0, True, ("00:11:22:33:44:55",), (view(),)),
        j.Ticked(T0, False, None, ()),
        j.ShutDown(T0),
        j.DesiredApplied("plc-1", {CFG: {"x": {"value": 1}}}, T0 + 0.1),
        j.DefaultDesiredSet(None),
        j.LeafMapSet({"00:11:22:33:44:55": "plc-1"}, T0),
        j.SendFailures("plc-1", 3),
        j.CaptureDrops(9),
        j.Diagnosed("Warning", "x", T0),
        j.Flushed("00:11:22:33:44:55", T0),
        j.Forgotten({"plc-1": ("a", "b")}),
    ]
    assert [j.decode(j.encode(op)) for op in ops] == ops
