"""Many leaves (identities, per-leaf config) and the local transport (JSONL, twins dir, desired dir)."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from leafguard.agent.agent import LeafAgent
from leafguard.agent.aggregation import ConnectionAggregator
from leafguard.agent.config import CONFIG_OBJECT_NAME, AgentConfig, Priority
from leafguard.agent.events import agent_id
from leafguard.agent.fleet import Fleet, load_agent_config_file
from leafguard.agent.local import DesiredDir, JsonlMessageWriter, TwinsDirWriter, apply_desired_changes
from leafguard.agent.offline import OfflineMessageWriter
from leafguard.errors import ConfigurationError
from leafguard.observe.model import ConnectionSeen, LeafView, LoginSeen
from tests.agent.helpers import MAC, T0, conn, events, login, view

OTHER = "66:77:88:99:aa:bb"


def wrap(**props: object) -> dict[str, object]:
    return {CONFIG_OBJECT_NAME: {k: {"value": v} for k, v in props.items()}}


def test_identities_from_mac_until_the_leaf_map_names_them() -> None:
    fleet = Fleet()
    fleet.observe(login(T0, mac=MAC))
    assert fleet.identity_for(MAC) == "leaf-001122334455"
    assert fleet.agent("leaf-001122334455") is not None
    fleet.set_leaf_map({MAC.upper(): "camera-1"}, T0 + 1)
    assert fleet.agent("camera-1") is not None and fleet.agent("leaf-001122334455") is None
    msgs = fleet.shutdown(T0 + 2)
    assert {m.identity for m in msgs} == {"camera-1"}
    assert all(orjson.loads(m.body)["AgentId"] == agent_id("camera-1") for m in msgs)


def test_per_leaf_desired_and_default_desired() -> None:
    fleet = Fleet(default_desired=wrap(eventPriorityLogin="Off"))
    fleet.apply_desired("leaf-667788990a0b", wrap(eventPriorityLogin="Low"), T0)  # not seen yet
    fleet.apply_desired("leaf-66778899aabb", wrap(eventPriorityLogin="Low"), T0)
    fleet.observe(login(T0 + 1, mac=MAC))
    fleet.observe(login(T0 + 1, mac=OTHER))
    a, b = fleet.agent("leaf-001122334455"), fleet.agent("leaf-66778899aabb")
    assert a is not None and b is not None
    assert a.config.priority_login is Priority.OFF and b.config.priority_login is Priority.LOW
    assert fleet.reported("leaf-66778899aabb")[CONFIG_OBJECT_NAME]["eventPriorityLogin"] == {"value": "Low"}
    st = fleet.stats()
    assert st.generated == 1  # the Off leaf produced nothing


def test_tick_asks_for_views_only_when_needed() -> None:
    calls = 0

    def views() -> list[LeafView]:
        nonlocal calls
        calls += 1
        return [view(MAC), view(OTHER)]

    fleet = Fleet(discovery_interval_s=10)
    fleet.tick(T0, views)
    assert calls == 1 and len(fleet.agents()) == 2  # leaves seen only in the inventory get agents too
    for i in range(1, 10):
        fleet.tick(T0 + i * 0.5, views)
    assert calls == 1
    fleet.tick(T0 + 11, views)
    assert calls == 2


def test_aggregation_map_is_bounded_and_nothing_is_lost() -> None:
    agg = ConnectionAggregator(3600, T0, max_entries=3)
    overflow = [agg.add(conn(T0 + i, remote_port=1000 + i)) for i in range(5)]
    assert len(agg) == 3 and agg.overflowed == 2
    assert [e is not None and e.category for e in overflow] == [False, False, False, "Triggered", "Triggered"]
    a = LeafAgent("leaf-x", AgentConfig(), T0, max_aggregation_entries=2)
    for i in range(4):
        a.observe(conn(T0 + i, remote_port=2000 + i))
    evs = events(a.shutdown(T0 + 10))
    cc = [e for e in evs if e["Name"] == "ConnectionCreate"]
    assert sorted(e["Category"] for e in cc) == ["Aggregated", "Aggregated", "Triggered", "Triggered"]
    diag = [e for e in evs if e["Name"] == "Diagnostic"]
    assert diag and "2 connections reported unaggregated" in diag[0]["Payload"][0]["Message"]


def test_jsonl_writer_and_twins_dir(tmp_path: Path) -> None:
    a = LeafAgent("leaf-x", AgentConfig(), T0)
    a.observe(login(T0))
    msgs = a.shutdown(T0 + 1)
    path = tmp_path / "run" / "messages.jsonl"
    with JsonlMessageWriter(path) as w:
        w.write(msgs)
    with JsonlMessageWriter(path) as w:  # appends
        w.write(msgs[:1])
    lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert len(lines) == len(msgs) + 1 and lines[0]["identity"] == "leaf-x"
    assert lines[0]["body"] == orjson.loads(msgs[0].body)
    twins = TwinsDirWriter(tmp_path / "twins")
    assert twins.write("leaf-x", a.reported())
    assert not twins.write("leaf-x", a.reported())  # unchanged: not rewritten
    doc = orjson.loads((tmp_path / "twins" / "leaf-x.json").read_bytes())
    assert doc == a.reported()


def test_desired_dir_applies_changes_live(tmp_path: Path) -> None:
    desired = tmp_path / "desired"
    desired.mkdir()
    fleet = Fleet()
    fleet.observe(login(T0))
    twins = TwinsDirWriter(tmp_path / "twins")
    watcher = DesiredDir(desired)
    assert watcher.scan() == []
    f = desired / "leaf-001122334455.json"
    f.write_bytes(orjson.dumps(wrap(eventPriorityLogin="Off")))
    results = apply_desired_changes(fleet, watcher.scan(), T0 + 1, twins)
    assert [(i, o.accepted) for i, o in results] == [("leaf-001122334455", True)]
    agent = fleet.agent("leaf-001122334455")
    assert agent is not None and agent.config.priority_login is Priority.OFF
    twin = orjson.loads((tmp_path / "twins" / "leaf-001122334455.json").read_bytes())
    assert twin[CONFIG_OBJECT_NAME]["eventPriorityLogin"] == {"value": "Off"}
    assert watcher.scan() == []  # nothing changed
    os.utime(f, ns=(1, 1))
    assert watcher.scan() == []  # touched, same content
    f.write_bytes(b"{not json")
    results = apply_desired_changes(fleet, watcher.scan(), T0 + 2, twins)
    assert [(i, o.accepted) for i, o in results] == [("leaf-001122334455", False)]
    assert agent.config.priority_login is Priority.OFF  # previous configuration kept
    f.unlink()
    results = apply_desired_changes(fleet, watcher.scan(), T0 + 3, twins)
    assert [(i, o.accepted) for i, o in results] == [("leaf-001122334455", True)]
    assert agent.config == AgentConfig()
    evs = events(fleet.shutdown(T0 + 4))
    errors = [e for e in evs if e["Name"] == "ConfigurationError"]
    assert len(errors) == 1 and errors[0]["Payload"][0]["ConfigurationName"] == CONFIG_OBJECT_NAME


def test_agent_config_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_bytes(orjson.dumps(wrap(maxMessageSizeInBytes=65536)))
    assert load_agent_config_file(good) == wrap(maxMessageSizeInBytes=65536)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"[1")
    with pytest.raises(ConfigurationError, match="not JSON"):
        load_agent_config_file(bad)
    with pytest.raises(ConfigurationError):
        load_agent_config_file(tmp_path / "missing.json")
    with pytest.raises(ConfigurationError, match="object"):
        (tmp_path / "list.json").write_bytes(b"[]")
        load_agent_config_file(tmp_path / "list.json")


class FakeAnalyzer:
    """Stands in for the observation core: observations per batch, views, packet time."""

    def __init__(self, batches: list[list[ConnectionSeen | LoginSeen]]) -> None:
        self._batches = batches
        self._pending: list[ConnectionSeen | LoginSeen] = []
        self.now: float | None = None

    def feed(self) -> None:
        self._pending = self._batches.pop(0)
        self.now = self._pending[-1].ts

    def drain_observations(self) -> list[ConnectionSeen | LoginSeen]:
        out, self._pending = self._pending, []
        return out

    def leaf_views(self) -> list[LeafView]:
        return [view(MAC)]


def test_offline_writer_uses_packet_time_and_flushes_at_the_end(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_bytes(orjson.dumps(wrap(aggregationIntervalConnectionCreate="PT1M", snapshotFrequency="PT1H")))
    batches: list[list[ConnectionSeen | LoginSeen]] = [
        [conn(T0 + i) for i in range(10)],
        [conn(T0 + 3 * 3600 + i) for i in range(10)],  # three hours later, in packet time
    ]
    analyzer = FakeAnalyzer(batches)
    out = tmp_path / "m.jsonl"
    writer = OfflineMessageWriter(out, cfg)
    for _ in range(2):
        analyzer.feed()
        writer.step(analyzer)
    writer.finish(analyzer)
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert writer.lines == len(recs) > 0
    evs = [e for r in recs for e in r["body"]["Events"]]
    cc = [e for e in evs if e["Name"] == "ConnectionCreate"]
    assert [e["Payload"][0]["ExtraDetails"]["HitCount"] for e in cc] == ["10", "10"]
    snaps = [e["TimestampUTC"] for e in evs if e["Name"] == "SystemInformation"]
    assert len(snaps) == 2  # at the start and after the 1-hour snapshot frequency (packet time)
    st = writer.fleet.stats()
    assert st.pending == 0 and st.sent + st.dropped == st.generated


def test_fleet_tick_is_constant_time_when_nothing_is_due(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = Fleet()
    for i in range(50):
        fleet.observe(login(T0, mac=f"00:00:00:00:00:{i:02x}"))
    fleet.tick(T0 + 1, list)
    calls = 0
    original = LeafAgent.tick

    def counting(self: LeafAgent, now: float, view: LeafView | None = None, *, hold: bool = False) -> list[object]:
        nonlocal calls
        calls += 1
        return original(self, now, view, hold=hold)  # type: ignore[return-value]

    monkeypatch.setattr(LeafAgent, "tick", counting)
    fleet.tick(T0 + 2, list)
    fleet.tick(T0 + 3)
    assert calls == 0
    fleet.observe(
        login(T0 + 4, mac="00:00:00:00:00:00")
    )  # input marks one agent: only a sweep is due, and then nothing again
    fleet.tick(T0 + 4)
    assert calls == 50
    fleet.tick(T0 + 7 * 60 + 1)  # the high-priority timer of every agent
    assert calls == 100


def test_reported_changes_are_tracked() -> None:
    fleet = Fleet()
    assert fleet.take_reported_changes() == {}
    fleet.observe(login(T0))
    changes = fleet.take_reported_changes()
    assert list(changes) == ["leaf-001122334455"] and changes["leaf-001122334455"] == AgentConfig().reported()
    assert fleet.take_reported_changes() == {}
    fleet.apply_desired("leaf-001122334455", wrap(eventPriorityLogin="bogus"), T0 + 1)
    assert fleet.take_reported_changes() == {"leaf-001122334455": AgentConfig().reported()}
    fleet.set_leaf_map({MAC: "cam"}, T0 + 2)
    assert list(fleet.take_reported_changes()) == ["cam"]


def test_local_agent_output_folder(tmp_path: Path) -> None:
    from leafguard.agent.local import LocalAgentOutput

    (tmp_path / "desired").mkdir()
    (tmp_path / "desired" / "leaf-001122334455.json").write_bytes(orjson.dumps(wrap(eventPriorityLogin="Low")))
    out = LocalAgentOutput(tmp_path, Fleet())
    applied = out.poll_desired(T0)  # before the leaf is seen: kept for when it shows up
    assert [(i, o.accepted) for i, o in applied] == [("leaf-001122334455", True)]
    analyzer = FakeAnalyzer([[login(T0 + 1), login(T0 + 2, mac=OTHER)]])
    analyzer.feed()
    out.after_batch(analyzer)
    twins = sorted(p.name for p in (tmp_path / "twins").iterdir())
    assert twins == ["leaf-001122334455.json", "leaf-66778899aabb.json"]
    rep = orjson.loads((tmp_path / "twins" / "leaf-001122334455.json").read_bytes())
    assert rep[CONFIG_OBJECT_NAME]["eventPriorityLogin"] == {"value": "Low"}
    out.tick(T0 + 7 * 60 + 5)  # wall-clock tick: the high timer of the other leaf fires
    out.close(T0 + 7 * 60 + 6)
    recs = [orjson.loads(x) for x in (tmp_path / "messages.jsonl").read_bytes().splitlines()]
    assert {r["identity"] for r in recs} == {"leaf-001122334455", "leaf-66778899aabb"}
    first_other = next(r for r in recs if r["identity"] == "leaf-66778899aabb")
    assert first_other["properties"]["MessagePriority"] == "High"


def test_renamed_leaf_leaves_no_stale_twin(tmp_path: Path) -> None:
    from leafguard.agent.local import LocalAgentOutput

    fleet = Fleet()
    out = LocalAgentOutput(tmp_path, fleet)
    analyzer = FakeAnalyzer([[login(T0 + 1)]])
    analyzer.feed()
    out.after_batch(analyzer)
    assert sorted(p.name for p in (tmp_path / "twins").iterdir()) == ["leaf-001122334455.json"]
    fleet.set_leaf_map({"00:11:22:33:44:55": "plc-7"}, T0 + 2)
    out.tick(T0 + 3)
    assert sorted(p.name for p in (tmp_path / "twins").iterdir()) == ["plc-7.json"]
    assert fleet.take_retired() == []
    out.close(T0 + 4)
