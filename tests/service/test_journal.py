"""The event journal's file: segments that follow the saved state, damage detected and reported, a journal whose
state is gone ignored; and local mode through it: kill -9 long after the last save loses no event."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from leafguard.agent import journal as j
from leafguard.agent.config import AgentConfig
from leafguard.agent.fleet import Fleet
from leafguard.detect.detectors import Detectors
from leafguard.service.journal import EventJournal
from leafguard.service.state import StateKeeper, StateSettings
from testkit.wait import wait_for
from tests.agent.helpers import T0, conn
from tests.hub.captures import empty_capture, steady_capture
from tests.service.helpers import read_stats, replay_locally, stop_service


def keeper(folder: Path) -> StateKeeper:
    return StateKeeper(StateSettings(folder), Fleet(AgentConfig()), Detectors())


def events_held(k: StateKeeper) -> int:
    return sum(a.stats().pending for a in k.fleet.agents())


def test_inputs_after_the_save_come_back_and_a_save_deletes_what_it_covers(tmp_path: Path) -> None:
    first = keeper(tmp_path)
    first.start_journal(first.load(T0))
    for i in range(5):
        first.fleet.observe(conn(T0 + i, remote_port=1000 + i))
    assert first.save(0.0, clock=T0 + 5)
    for i in range(5, 12):
        first.fleet.observe(conn(T0 + i, remote_port=1000 + i))
    first.commit_journal(1.0)  # then kill -9: no close, no save
    assert len(first.journal.segments()) == 1, "the save deleted the segment it covered"

    second = keeper(tmp_path)
    restored = second.replay_journal(second.load(T0))
    assert restored is not None and restored.clock == T0 + 11
    assert second.journal_replayed == 7
    assert second.fleet.export_state()["agents"] == first.fleet.export_state()["agents"]


def test_inputs_not_committed_are_the_only_ones_a_kill_loses(tmp_path: Path) -> None:
    first = keeper(tmp_path)
    first.start_journal(None)
    first.fleet.observe(conn(T0))
    first.commit_journal(0.0)
    first.fleet.observe(conn(T0 + 1, remote_port=22))  # recorded, not yet written

    second = keeper(tmp_path)
    restored = second.replay_journal(second.load(T0))
    assert restored is not None and restored.generation is None, "no state file: the journal alone"
    assert second.journal_replayed == 1


def test_a_damaged_record_stops_the_replay_there_and_is_reported(tmp_path: Path) -> None:
    first = keeper(tmp_path)
    first.start_journal(None)
    for i in range(10):
        first.fleet.observe(conn(T0 + i, remote_port=2000 + i))
        first.commit_journal(float(i))
    (segment,) = first.journal.segments()
    path = tmp_path / "journal" / f"{segment:016d}.jnl"
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0xFF
    path.write_bytes(bytes(data))

    second = keeper(tmp_path)
    second.replay_journal(second.load(T0))
    status = second.status()["journal"]
    assert 0 < second.journal_replayed < 10, "what came before the damage is applied, nothing after it"
    assert "damaged" in status["error"] and "1 corrupt" in status["error"]


def test_a_resumed_replay_leaves_out_the_inputs_of_a_batch_that_damage_cut_short(tmp_path: Path) -> None:
    first = keeper(tmp_path)
    first.start_journal(None)
    for batch in range(3):
        first.fleet.observe(conn(T0 + batch, remote_port=3000 + batch))
        first.fleet.observe(conn(T0 + batch + 0.5, remote_port=4000 + batch))
        first.commit_journal(float(batch), frames=100 * (batch + 1))
    (segment,) = first.journal.segments()
    path = tmp_path / "journal" / f"{segment:016d}.jnl"
    data = path.read_bytes()
    path.write_bytes(data[:-30])  # the last batch's second input and its mark, torn

    found = EventJournal(tmp_path / "journal").read(None)
    assert found.frames == 200 and found.ops_at_frames == 4 and len(found.ops) == 5 and found.torn == 1
    second = keeper(tmp_path)
    second.replay_journal(second.load(T0), resuming=True)
    assert second.journal_replayed == 4, "the third batch's frames are analysed again: none of its inputs apply"


def test_a_journal_whose_state_file_is_gone_is_ignored(tmp_path: Path) -> None:
    first = keeper(tmp_path)
    first.start_journal(first.load(T0))
    first.fleet.observe(conn(T0))
    assert first.save(0.0, clock=T0)
    first.fleet.observe(conn(T0 + 1, remote_port=22))
    first.commit_journal(0.0)
    (tmp_path / "state.json").unlink()

    second = keeper(tmp_path)
    assert second.replay_journal(second.load(T0)) is None
    assert second.journal_replayed == 0 and second.fleet.agents() == []
    assert "gone" in second.status()["journal"]["error"]
    assert second.journal.segments() == [], "deleted: it would stand before the journal of the fresh start"


def test_records_frame_like_the_spool_and_undecodable_inputs_stop_the_replay(tmp_path: Path) -> None:
    journal = EventJournal(tmp_path)
    journal.start(1, 0)
    journal.record(j.CaptureDrops(3))
    journal.commit(0.0)
    with (tmp_path / "0000000000000001.jnl").open("ab") as fh:
        from leafguard.hub.spool import Kind, frame

        fh.write(frame(Kind.JOURNAL_INPUT, b'["?"]'))
        fh.write(frame(Kind.JOURNAL_INPUT, j.encode(j.CaptureDrops(4))))
    found = EventJournal(tmp_path).read(None)
    assert found.ops == [j.CaptureDrops(3)] and found.error is not None


def test_a_stop_asked_for_while_the_journal_is_applied_is_a_clean_stop(tmp_path: Path) -> None:
    """SIGTERM while start-up applies a long journal (after the state is restored, before the loop runs): the
    service finishes starting, then stops cleanly (it used to die of the signal's default action)."""
    first = keeper(tmp_path)
    first.start_journal(first.load(T0))
    assert first.save(0.0, clock=T0)
    for i in range(60_000):
        first.fleet.observe(conn(T0 + i * 0.01, mac=f"02:00:00:00:{i % 200 >> 8:02x}:{i % 200 & 255:02x}",
                                 remote_port=1000 + i % 30_000))
    first.commit_journal(1.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "leafguard", "run", "--local-dir", str(tmp_path), "--pcap",
         str(empty_capture(tmp_path / "empty.pcap")), "--replay-speed", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "state restored" in line:
            proc.send_signal(signal.SIGTERM)
            break
    err = "".join(lines) + proc.communicate(timeout=60)[1]
    assert proc.returncode == 0, err
    assert "stop requested during start-up" in err and "stopped cleanly" in err
    assert "inputs of the journal applied again" in err


def security_events(folder: Path) -> list[bytes]:
    out: list[bytes] = []
    for line in (folder / "messages.jsonl").read_bytes().splitlines():
        out += [orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in orjson.loads(line)["body"]["Events"]
                if e["EventType"] == "Security"]
    return sorted(out)


def test_local_mode_kill_9_long_after_the_last_save_then_another_capture(tmp_path: Path) -> None:
    """The replay ends, its events wait in the agents, the last state was saved before its first frame; kill -9,
    and a restart on another (empty) capture: the messages hold every event of the uninterrupted run, once."""
    capture = steady_capture(tmp_path / "steady.pcap", minutes=10)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    proc = replay_locally(clean, capture)
    try:
        wait_for(lambda: read_stats(clean)["replay_done"], 60)
    finally:
        stop_service(proc)
    reference = security_events(clean)
    assert len(reference) > 300

    proc = replay_locally(crashed, capture, LEAFGUARD_STATE_INTERVAL_S="3600")
    try:
        wait_for(lambda: read_stats(crashed)["replay_done"], 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    before: Any = security_events(crashed) if (crashed / "messages.jsonl").exists() else []
    assert len(before) < len(reference), "events were still waiting in the agents"
    (crashed / "stats.json").unlink()  # it says the killed run's replay is done
    proc = replay_locally(crashed, empty_capture(tmp_path / "empty.pcap"))
    try:
        wait_for(lambda: read_stats(crashed)["replay_done"], 60)
    finally:
        err = stop_service(proc)
    assert security_events(crashed) == reference
    assert "inputs of the journal applied again" in err
