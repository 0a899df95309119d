"""Local mode: the folder is the data directory. kill -9 in the middle of a replay and a restart with the same
folder continue where the saved state stood: no event twice, none of the uninterrupted run's missing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from testkit.wait import wait_for
from tests.hub.captures import steady_capture
from tests.service.helpers import read_stats, replay_locally, stop_service


def start(folder: Path, capture: Path, speed: str) -> subprocess.Popen[bytes]:
    return replay_locally(folder, capture, speed=speed, LEAFGUARD_STATE_INTERVAL_S="0.3")



def events(folder: Path) -> list[dict[str, Any]]:
    return [e for line in (folder / "messages.jsonl").read_bytes().splitlines()
            for e in orjson.loads(line)["body"]["Events"]]


def connection_keys(evs: list[dict[str, Any]]) -> set[tuple[str, ...]]:
    return {(p["Direction"], p["LocalAddress"], p["RemoteAddress"], p["RemotePort"], p["Protocol"])
            for e in evs if e["Name"] == "ConnectionCreate" for p in e["Payload"]}


def logins(evs: list[dict[str, Any]]) -> list[bytes]:
    return sorted(orjson.dumps([e["TimeStamp" if "TimeStamp" in e else "TimestampUTC"], e["Payload"]],
                               option=orjson.OPT_SORT_KEYS) for e in evs if e["Name"] == "Login")


def test_kill_9_mid_replay_then_restart_with_the_same_folder(tmp_path: Path) -> None:
    capture = steady_capture(tmp_path / "steady.pcap", minutes=10)
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"

    proc = start(clean, capture, "0")
    try:
        wait_for(lambda: read_stats(clean)["replay_done"], 60)
    finally:
        stop_service(proc)
    reference = events(clean)

    proc = start(crashed, capture, "30")  # 10 minutes of packet time in 20 s
    try:
        # The first timed messages go out after 7 minutes of packet time; some events wait in the caches then.
        wait_for(lambda: (crashed / "messages.jsonl").stat().st_size > 0, 60)
        time.sleep(0.7)
        assert not read_stats(crashed)["replay_done"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    before_restart = len(events(crashed))
    proc = start(crashed, capture, "0")
    try:
        wait_for(lambda: read_stats(crashed)["replay_done"], 60)
    finally:
        err = stop_service(proc)
    assert "state restored" in err and "resuming the replay" in err
    got = events(crashed)
    assert len(got) > before_restart > 0
    ids = Counter(e["Id"] for e in got)
    assert not [i for i, n in ids.items() if n > 1], "no event twice"
    assert logins(got) == logins(reference), "every login event once, as in the uninterrupted run"
    assert connection_keys(got) >= connection_keys(reference), "every connection reported"
    assert read_stats(crashed)["state"]["restored"] is True


def test_learned_baseline_survives_a_restart_without_a_new_device_storm(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    before = steady_capture(tmp_path / "before.pcap", minutes=2, leaves=10, count=4000)
    after = steady_capture(tmp_path / "after.pcap", minutes=2, leaves=11, count=4400, offset_s=3600.0)

    def run(capture: Path) -> tuple[set[str], list[dict[str, Any]]]:
        (folder / "stats.json").unlink(missing_ok=True)  # the last run's says its replay is done
        proc = subprocess.Popen(
            [sys.executable, "-m", "leafguard", "run", "--local-dir", str(folder), "--pcap", str(capture),
             "--replay-speed", "0", "--learning-period", "60"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: read_stats(folder)["replay_done"], 60)
        finally:
            stop_service(proc)
        leaves = {leaf["mac"] for leaf in orjson.loads((folder / "leaves.json").read_bytes())["leaves"]}
        return leaves, orjson.loads((folder / "alerts.json").read_bytes())["alerts"]

    known, _ = run(before)
    seen, alerts = run(after)
    new = sorted(a["mac"] for a in alerts if a["type"] == "new_device")
    assert len(seen - known) == 1
    assert new == sorted(seen - known), "the one new leaf is found; the known ones are not announced again"


def test_a_corrupt_state_file_is_reported_and_ignored_by_the_service(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "state.json").write_bytes(b"LEAFGUARD-STATE 1\n" + b"0" * 64 + b"\n{not json")
    proc = subprocess.Popen([sys.executable, "-m", "leafguard", "run", "--demo", "--local-dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    state = read_stats(folder)["state"]
    assert state["restored"] is False and "ignored, starting fresh: corrupt" in state["error"]
    assert b"ignored, starting fresh" in err and (folder / "state.json.bad").exists()
    assert state["saves"] >= 1 and (folder / "state.json").read_bytes().startswith(b"LEAFGUARD-STATE 1\n")
