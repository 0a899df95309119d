"""The saved state file: atomic, checked, and a bad one is reported and ignored; the detectors' baselines and
memories survive a restart, so known leaves are not announced as new again."""

from __future__ import annotations

from pathlib import Path

import pytest

from leafguard.agent.config import AgentConfig
from leafguard.agent.fleet import Fleet
from leafguard.detect import detectors as det
from leafguard.detect import evidence as ev
from leafguard.service.state import MAGIC, StateKeeper, StateSettings, decode_state, encode_state
from tests.agent.helpers import T0, login

A, B, C = bytes.fromhex("020000000001"), bytes.fromhex("020000000002"), bytes.fromhex("020000000003")


def learned_detectors() -> det.Detectors:
    d = det.Detectors(learning_period_s=60.0)
    d.learning_started = T0
    d.process([
        ev.NewLeaf(T0 + 1, A, "10.0.0.1", ""),
        ev.NewLeaf(T0 + 2, B, "10.0.0.2", ""),
        ev.ConversationOpened(T0 + 3, A, bytes([10, 0, 0, 9]), 502, "tcp"),
        ev.ServiceOffered(T0 + 4, B, "tcp", 80),
        ev.LoginResult(T0 + 5, A, "telnet", bytes([10, 0, 0, 5]), bytes([10, 0, 0, 1]), 23, "root", "Success"),
        ev.DhcpServerReply(T0 + 6, B, bytes([10, 0, 0, 2])),
    ])
    return d


def after_restart(d: det.Detectors, learning_started: float | None) -> list[str]:
    """What a restarted run (learning again from its own first frame unless restored) finds on the same leaves,
    a new one, a new peer, the same cleartext login again within the hour."""
    if d.learning_started is None:
        d.learning_started = learning_started
    d.forward = []
    t = T0 + 600
    d.process([
        ev.NewLeaf(t, A, "10.0.0.1", ""),
        ev.NewLeaf(t + 1, B, "10.0.0.2", ""),
        ev.NewLeaf(t + 2, C, "10.0.0.3", ""),
        ev.ConversationOpened(t + 3, A, bytes([10, 0, 0, 9]), 502, "tcp"),
        ev.ConversationOpened(t + 4, A, bytes([10, 0, 0, 66]), 22, "tcp"),
        ev.LoginResult(t + 5, A, "telnet", bytes([10, 0, 0, 5]), bytes([10, 0, 0, 1]), 23, "root", "Success"),
    ])
    return sorted(a.type for a in d.forward)


def test_baselines_and_memories_survive_a_restart_through_the_file(tmp_path: Path) -> None:
    before = learned_detectors()
    keeper = StateKeeper(StateSettings(tmp_path), Fleet(AgentConfig()), before)
    assert keeper.save(0.0, clock=T0 + 10)
    restored = det.Detectors(learning_period_s=60.0)
    again = StateKeeper(StateSettings(tmp_path), Fleet(AgentConfig()), restored)
    got = again.load(T0)
    assert got is not None and got.clock == T0 + 10 and again.error is None
    # Known leaves stay known (no new_device storm), the new one and the new peer are found, the cleartext login
    # of the last hour is not reported again.
    assert after_restart(restored, T0 + 600) == ["new_device", "new_peer"]
    # Without the state, the restarted run learns afresh: the new leaf and the new peer go unnoticed.
    assert after_restart(det.Detectors(learning_period_s=60.0), T0 + 600) == ["cleartext_login"]


def test_fleet_is_saved_and_restored_with_its_cached_events(tmp_path: Path) -> None:
    fleet = Fleet(AgentConfig())
    for i in range(20):
        fleet.observe(login(T0 + i))
    keeper = StateKeeper(StateSettings(tmp_path), fleet, det.Detectors())
    assert keeper.save(0.0, clock=T0 + 20, spool_next_seq=7)
    again = Fleet(AgentConfig())
    got = StateKeeper(StateSettings(tmp_path), again, det.Detectors()).load(T0)
    assert got is not None and got.spool_next_seq == 7 and got.agents == 1
    assert again.stats() == fleet.stats() and again.stats().pending == 20
    assert not list(tmp_path.glob("*.tmp")), "the write is atomic: no temporary file is left"


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "format", "shape", "garbage"])
def test_a_corrupt_or_incompatible_state_is_reported_and_ignored(tmp_path: Path, damage: str) -> None:
    fleet = Fleet(AgentConfig())
    fleet.observe(login(T0))
    StateKeeper(StateSettings(tmp_path), fleet, det.Detectors()).save(0.0, clock=T0)
    path = tmp_path / "state.json"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x20
    elif damage == "truncate":
        del raw[len(raw) // 2 :]
    elif damage == "magic":
        raw[: len(MAGIC)] = b"LEAFGUARD-STATE 9\n"
    elif damage == "garbage":
        raw = bytearray(b"\x00\xff" * 100)
    else:
        doc = decode_state(bytes(raw))
        if damage == "format":
            doc["format"] = 2
        else:
            doc["fleet"]["agents"] = 5
            doc["fleet"]["leafMap"] = "nope"
        raw = bytearray(encode_state(doc))  # a valid checksum over a document of another format or shape
    path.write_bytes(bytes(raw))
    again = Fleet(AgentConfig())
    keeper = StateKeeper(StateSettings(tmp_path), again, det.Detectors())
    assert keeper.load(T0) is None
    assert keeper.error is not None and ("corrupt" in keeper.error or "incompatible" in keeper.error)
    assert keeper.status()["restored"] is False and not again.agents(), "started fresh"
    assert (tmp_path / "state.json.bad").exists() and not path.exists()
    # The next save writes a good file again.
    assert keeper.save(1.0, clock=T0) and decode_state(path.read_bytes())["format"] == 1


@pytest.mark.parametrize("output", ["spool", "jsonl"])
def test_events_that_reached_the_output_after_the_save_are_not_sent_again(tmp_path: Path, output: str) -> None:
    from leafguard.agent.local import JsonlMessageWriter
    from leafguard.hub.outbox import Outbox
    from leafguard.hub.spool import Spool, SpoolSettings
    from leafguard.service.state import reconcile

    fleet = Fleet(AgentConfig())
    for i in range(40):
        fleet.observe(login(T0 + i))  # triggered events: they wait in the cache until a timed send
    spool, _ = Spool.open(SpoolSettings(tmp_path / "data"))
    outbox = Outbox(spool.settings.max_bytes, spool)
    writer = JsonlMessageWriter(tmp_path / "messages.jsonl")
    keeper = StateKeeper(StateSettings(tmp_path), fleet, det.Detectors())
    keeper.save(0.0, clock=T0 + 40, spool_next_seq=outbox.next_seq, messages_offset=writer.offset)
    sent = fleet.shutdown(T0 + 41)  # after the save these reach the output; then the process is killed
    if output == "spool":
        for message in sent:
            outbox.put(message)
    else:
        writer.write(sent)
    again = Fleet(AgentConfig())
    restored = StateKeeper(StateSettings(tmp_path), again, det.Detectors()).load(T0)
    assert restored is not None and again.stats().pending == 40
    target = outbox if output == "spool" else writer
    position = restored.spool_next_seq if output == "spool" else restored.messages_offset
    assert reconcile(restored, again, target, position) == 40
    assert again.stats().pending == 0 and again.stats().sent == 40
    spool.close(0.0)
    writer.close()


def test_an_older_state_never_replaces_a_newer_one(tmp_path: Path) -> None:
    fleet = Fleet(AgentConfig())
    keeper = StateKeeper(StateSettings(tmp_path), fleet, det.Detectors())
    older = keeper.document(0.0, clock=T0)  # a periodic save, still encoding in its thread...
    fleet.observe(login(T0 + 1))
    newer = keeper.document(0.1, clock=T0 + 1)  # ...when the final one is taken and written
    assert keeper.write(newer) and keeper.write(older)
    doc = decode_state((tmp_path / "state.json").read_bytes())
    assert doc["generation"] == newer["generation"] and doc["clock"] == T0 + 1


async def test_a_periodic_save_with_nothing_new_is_skipped(tmp_path: Path) -> None:
    fleet = Fleet(AgentConfig())
    detectors = det.Detectors()
    keeper = StateKeeper(StateSettings(tmp_path), fleet, detectors)
    assert await keeper.save_async(0.0, clock=T0)
    assert await keeper.save_async(30.0, clock=T0 + 30)
    assert (keeper.saves, keeper.skipped_saves) == (1, 1)
    fleet.observe(login(T0 + 31))
    assert await keeper.save_async(60.0, clock=T0 + 60)
    detectors.process([ev.DhcpServerReply(T0 + 61, A, bytes([10, 0, 0, 1]))])
    assert await keeper.save_async(90.0, clock=T0 + 90)
    assert (keeper.saves, keeper.skipped_saves) == (3, 1)


def test_every_change_to_the_saved_fleet_is_seen_by_the_change_counter() -> None:
    """Whenever what would be saved differs, the counter a skipped save relies on has moved."""
    from leafguard.service.state import encode_state
    from tests.agent.helpers import MAC, conn

    cfg = "ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration"
    fleet = Fleet(AgentConfig())
    agent_ops = [
        lambda: fleet.observe(conn(T0)),
        lambda: fleet.observe(conn(T0 + 1, remote_port=22)),
        lambda: fleet.observe(login(T0 + 2)),
        lambda: fleet.tick(T0 + 3),
        lambda: fleet.tick(T0 + 3),
        lambda: fleet.tick(T0 + 500, hold=True),
        lambda: fleet.tick(T0 + 501),
        lambda: fleet.apply_desired("leaf-001122334455", {cfg: {"maxMessageSizeInBytes": {"value": 16384}}}, T0 + 502),
        lambda: fleet.set_leaf_map({MAC: "plc-1"}, T0 + 503),
        lambda: fleet.agents()[0].record_send_failures(2),
        lambda: fleet.agents()[0].record_capture_drops(5),
        lambda: fleet.agents()[0].diagnostic("Warning", "x", T0 + 504),
        lambda: fleet.observe(conn(T0 + 4000)),
        lambda: fleet.tick(T0 + 4000),
        lambda: fleet.agents()[0].flush(T0 + 4001),
        lambda: fleet.shutdown(T0 + 4002),
    ]

    def saved() -> bytes:
        doc = fleet.export_state()
        return encode_state({"fleet": doc}).split(b"\n", 2)[2].split(b',"fleet":', 1)[1]

    before, changes = saved(), fleet.totals.changes
    for op in agent_ops:
        op()
        after = saved()
        if after != before:
            assert fleet.totals.changes != changes, op
        before, changes = after, fleet.totals.changes
