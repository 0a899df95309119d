"""`leafguard run` in local mode, as a real process: replay, live desired properties, signals, clean exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leafguard.demo import demo_capture
from testkit.wait import wait_for
from tests.service.helpers import read_json

CFG = "ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration"
SENSOR = "leaf-5ccf7f07aefb"


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "leafguard", "run", "--local-dir", str(tmp_path), "--write-interval", "0.5", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_replay_then_live_desired_changes_then_clean_stop(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--pcap", str(demo_capture()), "--replay-speed", "0")
    try:
        wait_for(lambda: read_json(tmp_path / "stats.json")["replay_done"])
        twin = tmp_path / "twins" / f"{SENSOR}.json"
        reported = wait_for(lambda: read_json(twin))
        assert reported[CFG]["maxMessageSizeInBytes"] == {"value": 204800}

        desired = tmp_path / "desired" / f"{SENSOR}.json"
        desired.write_text(
            json.dumps({CFG: {"maxMessageSizeInBytes": {"value": 16384}, "eventPriorityLogin": {"value": "low"}}})
        )
        wait_for(lambda: read_json(twin)[CFG]["maxMessageSizeInBytes"] == {"value": 16384})
        assert read_json(twin)[CFG]["eventPriorityLogin"] == {"value": "Low"}

        # A type mismatch is rejected as a whole: the previous configuration stays and is reported again.
        desired.write_text(
            json.dumps({CFG: {"maxMessageSizeInBytes": {"value": "big"}, "eventPriorityLogin": {"value": "High"}}})
        )
        time.sleep(3)
        assert read_json(twin)[CFG]["maxMessageSizeInBytes"] == {"value": 16384}
        assert read_json(twin)[CFG]["eventPriorityLogin"] == {"value": "Low"}
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"stopped cleanly" in err

    leaves = read_json(tmp_path / "leaves.json")["leaves"]
    analyzed = json.loads(
        subprocess.run(
            [sys.executable, "-m", "leafguard", "analyze", str(demo_capture()), "--json"],
            check=True,
            capture_output=True,
        ).stdout
    )
    assert read_json(tmp_path / "alerts.json")["alerts"] == analyzed["alerts"]  # the demo's MQTT and HTTP logins
    assert {a["type"] for a in analyzed["alerts"]} == {"cleartext_login"}
    assert leaves == analyzed["leaves"]

    lines = [json.loads(line) for line in (tmp_path / "messages.jsonl").read_text().splitlines()]
    sensor = [m for m in lines if m["identity"] == SENSOR]
    events = [e for m in sensor for e in m["body"]["Events"]]
    errors = [p for e in events if e["Name"] == "ConfigurationError" for p in e["Payload"]]
    assert any(p["ErrorType"] == "TypeMismatch" and "maxMessageSizeInBytes" in p["Message"] for p in errors)
    logins = [p for e in events if e["Name"] == "Login" for p in e["Payload"]]
    assert logins and logins[0]["UserName"] == "sensor" and logins[0]["Result"] == "Success"
    assert all("plant" not in json.dumps(m) for m in lines), "the MQTT password must never leave the module"
    assert all(m["properties"]["$.ifid"] == "urn:azureiot:Security:SecurityAgent:1" for m in lines)


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--pcap", str(demo_capture()), "--replay-speed", "1")
    try:
        wait_for((tmp_path / "stats.json").exists)
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "needs a source"),
        (("--pcap", "/nonexistent/x.pcap", "--local-dir", "DIR"), "cannot open"),
        (("--pcap", "PCAP", "--replay-speed", "-1", "--local-dir", "DIR"), "--replay-speed"),
    ],
)
def test_bad_invocations_are_one_line_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    argv = [a.replace("DIR", str(tmp_path)).replace("PCAP", str(demo_capture())) for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "LEAFGUARD_"))}
    proc = subprocess.run([sys.executable, "-m", "leafguard", "run", *argv], capture_output=True, timeout=30, env=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.decode().splitlines() if line.startswith("leafguard:")]
    assert len(lines) == 1 and message in lines[0]
