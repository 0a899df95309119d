"""The durable spool and the outbox over it: replay in order with the same ids, corruption and torn records
detected, counted and skipped, kill -9 of a writer process, drop accounting that survives restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from leafguard.agent.messages import OutgoingMessage, Trigger
from leafguard.errors import ConfigurationError
from leafguard.hub.alerts import AlertMessage
from leafguard.hub.outbox import Outbox
from leafguard.hub.spool import FRAME_BYTES, FsyncPolicy, Kind, Spool, SpoolSettings, frame, scan


def msg(identity: str, n: int, size: int = 200, priority: Trigger = "High") -> OutgoingMessage:
    body = f'{{"n":{n},"pad":"'.encode() + b"x" * size + b'"}'
    return OutgoingMessage(identity, body, priority, 1)


def settings(path: Path, **kw: object) -> SpoolSettings:
    return SpoolSettings(path, **kw)  # type: ignore[arg-type]


def open_box(path: Path, max_bytes: int = 1 << 20, **kw: object) -> tuple[Outbox, Spool, list[int]]:
    spool, recovery = Spool.open(settings(path, max_bytes=max(max_bytes, 262_144), **kw))
    box = Outbox(max_bytes, spool)
    box.recover(recovery)
    return box, spool, [recovery.corrupt_records, recovery.torn_records, recovery.lost_to_corruption]


def drain(box: Outbox) -> list[tuple[str, OutgoingMessage]]:
    out = []
    while (entry := box.next_to_send()) is not None:
        assert entry.message is not None
        out.append((entry.message_id, entry.message))
        box.ack(entry)
    return out


def invariant(box: Outbox) -> None:
    c = box.spool.counters if box.spool else None
    assert c is not None
    assert c.acked + c.dropped + len(box) == c.accepted, c


def segments(path: Path) -> list[Path]:
    return sorted((path / "spool").glob("*.seg"))


def test_replay_after_restart_keeps_order_ids_bodies_and_counters(tmp_path: Path) -> None:
    box, spool, _ = open_box(tmp_path)
    ids = {}
    for i in range(30):
        box.put(msg(f"leaf-{i % 3}", i))
    box.put(AlertMessage("edge1/leafguard", b'[{"type":"port_scan"}]', "High", 1, alert_type="port_scan"))
    for _ in range(10):  # the first ten are sent and acknowledged
        entry = box.next_to_send()
        assert entry is not None
        box.ack(entry)
    in_flight = box.next_to_send()  # handed to the SDK, never acknowledged: the process dies
    assert in_flight is not None
    for entry in list(box._entries.values()):
        ids[entry.seq] = entry.message_id
    del box, spool  # no close(): what a crash leaves

    box2, spool2, problems = open_box(tmp_path)
    assert problems == [0, 0, 0]
    invariant(box2)
    sent = drain(box2)
    bodies = [m.body_json().get("n") for _mid, m in sent[:-1]]
    assert bodies == list(range(10, 30)), "replayed in order, the in-flight message first"
    assert sent[0][0] == in_flight.message_id, "the in-flight message goes again with its id"
    assert [mid for mid, _m in sent] == [ids[s] for s in sorted(ids)]
    alert = sent[-1][1]
    assert isinstance(alert, AlertMessage) and alert.alert_type == "port_scan" and alert.output == "alerts"
    c = spool2.counters
    assert (c.accepted, c.acked, c.dropped, len(box2)) == (31, 31, 0, 0)
    spool2.close(0.0)
    # A clean stop and another start: nothing left, the counters continue.
    box3, spool3, _ = open_box(tmp_path)
    assert len(box3) == 0 and spool3.counters.accepted == 31
    box3.put(msg("leaf-0", 99))
    assert drain(box3)[0][1].body_json()["n"] == 99 and spool3.counters.accepted == 32


def test_corrupt_byte_is_skipped_counted_and_reported_once(tmp_path: Path) -> None:
    box, spool, _ = open_box(tmp_path)
    for i in range(20):
        box.put(msg("leaf-a", i, size=500))
    spool.close(0.0)
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    victim = data.find(b'{"n":7,')
    assert victim > 0
    data[victim + 30] ^= 0xFF  # one flipped byte inside message 7's body
    seg.write_bytes(bytes(data))

    box2, spool2, problems = open_box(tmp_path)
    assert problems == [1, 0, 1], "one corrupt record, one message lost with it"
    invariant(box2)
    assert [m.body_json()["n"] for _mid, m in drain(box2)] == [i for i in range(20) if i != 7]
    c = spool2.counters
    assert (c.corrupt_records, c.lost_to_corruption, c.dropped) == (1, 1, 1)
    spool2.close(0.0)
    # The corrupt segment was replaced by a clean one: the next start does not count it again.
    _box3, spool3, problems = open_box(tmp_path)
    assert problems == [0, 0, 0] and spool3.counters.corrupt_records == 1


def test_torn_tail_is_counted_and_everything_before_it_replays(tmp_path: Path) -> None:
    box, spool, _ = open_box(tmp_path)
    for i in range(5):
        box.put(msg("leaf-a", i))
    del box, spool
    (seg,) = segments(tmp_path)
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) - 50])  # the last put cut short, as by a power cut mid-write
    box2, _spool2, problems = open_box(tmp_path)
    assert problems == [0, 1, 1]
    invariant(box2)
    assert [m.body_json()["n"] for _mid, m in drain(box2)] == [0, 1, 2, 3]


def test_scan_resynchronises_after_garbage_and_counts_regions() -> None:
    good = [frame(Kind.ACK, i.to_bytes(8, "little")) for i in range(4)]
    data = good[0] + b"garbage-LG-garbage" + good[1] + good[2][:5] + b"\x00" * 7 + good[3]
    result = scan(data)
    assert [int.from_bytes(r.payload, "little") for r in result.records] == [0, 1, 3]
    assert (result.corrupt, result.torn) == (2, 0)
    torn = scan(good[0] + good[1][: FRAME_BYTES + 3])
    assert (len(torn.records), torn.corrupt, torn.torn) == (1, 0, 1)


def test_full_spool_drops_low_then_high_then_alerts_and_counts_per_leaf_across_restarts(tmp_path: Path) -> None:
    box, spool, _ = open_box(tmp_path, max_bytes=262_144)
    big = 60_000
    box.put(AlertMessage("edge1/leafguard", b"[" + b"1" * big + b"]", "High", 1, alert_type="x"))
    box.put(msg("plc", 1, big, "High"))
    box.put(msg("cam", 2, big, "Low"))
    box.put(msg("cam", 3, big, "Low"))
    dropped = box.put(msg("plc", 4, big, "High"))
    assert [(d.identity, d.priority) for d in dropped] == [("cam", "Low")]
    dropped = box.put(msg("plc", 5, big, "High")) + box.put(msg("plc", 6, big, "High"))
    assert [(d.identity, d.priority) for d in dropped] == [("cam", "Low"), ("plc", "High")]
    assert box.bytes <= 262_144
    spool.mark_reported("cam", 1)  # one of cam's drops reached its agent before the crash
    del box, spool
    box2, spool2, _ = open_box(tmp_path, max_bytes=262_144)
    invariant(box2)
    assert spool2.counters.unreported == {"cam": 1, "plc": 1}
    assert spool2.counters.dropped == 3
    # A restart with a smaller budget: the policy makes room at once, High before the alert.
    del box2, spool2
    box3, spool3, _ = open_box(tmp_path, max_bytes=150_000)
    invariant(box3)
    kinds = [m.identity for _mid, m in drain(box3)]
    assert kinds == ["edge1/leafguard", "plc"] and spool3.counters.dropped == 5


def test_segments_rotate_are_deleted_when_settled_and_stay_within_the_budget(tmp_path: Path) -> None:
    box, spool, _ = open_box(tmp_path, max_bytes=300_000, segment_bytes=65_536)
    for i in range(400):
        box.put(msg("leaf", i, size=1000))
        if i % 10:
            entry = box.next_to_send()
            assert entry is not None
            box.ack(entry)
        assert spool.disk_bytes <= 2 * 300_000 + 65_536 + 2000
    invariant(box)
    assert len(segments(tmp_path)) < 12
    remaining = [m.body_json()["n"] for _mid, m in drain(box)]
    assert remaining == sorted(remaining) and len(remaining) == 40
    assert len(segments(tmp_path)) <= 2


def test_a_message_stuck_in_an_old_segment_is_compacted_forward(tmp_path: Path) -> None:
    box, spool, _ = open_box(tmp_path, max_bytes=262_144, segment_bytes=65_536)
    box.put(msg("leaf", -1, size=1000))
    stuck = box.next_to_send()  # in flight for the whole test: pins the first segment
    assert stuck is not None
    for i in range(2000):
        box.put(msg("leaf", i, size=1000))
        entry = box.next_to_send()
        assert entry is not None
        box.ack(entry)
    assert spool.disk_bytes <= 2 * 262_144 + 65_536 + 2000
    box.ack(stuck)
    del box, spool
    box2, _spool2, problems = open_box(tmp_path, max_bytes=262_144, segment_bytes=65_536)
    assert problems == [0, 0, 0] and len(box2) == 0
    invariant(box2)


def test_memory_outbox_has_no_spool_and_settings_are_validated(tmp_path: Path) -> None:
    box = Outbox(1000)
    box.put(msg("a", 1, 10))
    entry = box.next_to_send()
    assert entry is not None and entry.message is not None and box.spool is None
    with pytest.raises(ConfigurationError, match="max_bytes"):
        SpoolSettings(tmp_path, max_bytes=1000)
    with pytest.raises(ConfigurationError, match="fsync_interval_s"):
        SpoolSettings(tmp_path, fsync_interval_s=0)


@pytest.mark.parametrize("policy", list(FsyncPolicy))
def test_fsync_policies(tmp_path: Path, policy: FsyncPolicy) -> None:
    box, spool, _ = open_box(tmp_path, fsync=policy, fsync_interval_s=10.0)
    base = spool.fsyncs
    for t in range(5):
        box.put(msg("a", t))
        box.commit(100.0 + t)  # monotonic seconds: one fsync at 100, the next due at 110
    expected = {FsyncPolicy.ALWAYS: 5, FsyncPolicy.INTERVAL: 1, FsyncPolicy.NEVER: 0}[policy]
    assert spool.fsyncs - base == expected


WRITER = """
import sys
from pathlib import Path
from leafguard.agent.messages import OutgoingMessage
from leafguard.hub.outbox import Outbox
from leafguard.hub.spool import Spool, SpoolSettings, FsyncPolicy
spool, rec = Spool.open(SpoolSettings(Path(sys.argv[1]), segment_bytes=65536, fsync=FsyncPolicy.NEVER))
box = Outbox(64 * 1024 * 1024, spool)
box.recover(rec)
i = 0
while True:
    box.put(OutgoingMessage("leaf", b'{"n":%d,"pad":"%s"}' % (i, b"y" * (i % 5000)), "High", 1))
    if i % 3 == 0:
        e = box.next_to_send()
        box.ack(e)
    print(i, flush=True)
    i += 1
"""


def test_kill_9_of_a_writing_process_loses_nothing_it_had_written(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=os.environ.copy()
    )
    assert proc.stdout is not None
    written = -1
    for line in proc.stdout:
        written = int(line)
        if written >= 3000:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    box, spool, problems = open_box(tmp_path, max_bytes=64 * 1024 * 1024)
    assert problems[0] == 0 and problems[1] <= 1, "at most the record being written is torn"
    invariant(box)
    got = [m.body_json()["n"] for _mid, m in drain(box)]
    # Every third iteration acknowledged the oldest message: the rest remain, in order, none missing.
    acked_before = spool.counters.acked - len(got)
    assert got == list(range(acked_before, got[-1] + 1)), "in order, nothing missing, nothing twice"
    # The child ran on past the line we read: at least everything it reported is there.
    assert got[-1] >= written
    assert got[-1] // 3 <= acked_before <= got[-1] // 3 + 2
