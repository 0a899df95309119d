"""`/metrics` and `/healthz` of a running `leafguard run`, read with prometheus_client's parser; their settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.samples import Sample

from leafguard.agent.fleet import Fleet
from leafguard.capture.pcapfile import read_batches
from leafguard.cli import _parser
from leafguard.demo import demo_capture
from leafguard.errors import ConfigurationError
from leafguard.hub.settings import EDGE_ENV
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from leafguard.service.health import assess
from leafguard.service.metrics import render_snapshot
from leafguard.service.settings import EDGE_HTTP_PORT, ServiceSettings
from leafguard.service.snapshot import DownTracker, LeafConnection, MetricLabels, build_snapshot
from testkit.wait import wait_for
from tests.service.helpers import BASE_LABELS, free_port, http_get, read_json
from tests.service.helpers import metric_value as value
from tests.service.helpers import parse_metrics as parse

SENSOR_MAC, PLC_MAC = "5c:cf:7f:07:ae:fb", "00:0e:8c:aa:bb:01"


def samples(families: dict[str, Any], name: str) -> list[Sample]:
    return list(families[name].samples)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "LEAFGUARD_"))}
    return env | extra


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "leafguard", "run", "--local-dir", str(tmp_path), "--write-interval", "0.3", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or clean_env(),
    )


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    return err.decode()


def test_metrics_of_a_replay_parse_and_match_the_service_files(tmp_path: Path) -> None:
    port = free_port()
    proc = start(tmp_path, "--pcap", str(demo_capture()), "--replay-speed", "0", "--http-port", str(port))
    try:
        wait_for(lambda: read_json(tmp_path / "stats.json")["replay_done"])
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        taken = time.time()
        # The files rewritten after the scrape describe the same (finished) replay.
        stats = wait_for(lambda: (s := read_json(tmp_path / "stats.json"))["updated_at"] > taken and s)
        health_status, health = http_get(f"http://127.0.0.1:{port}/healthz")
    finally:
        stop(proc)
    assert status == 200
    families = parse(body.decode())
    assert all(name.startswith("leafguard_") for name in families)
    every = [s for f in families.values() for s in f.samples]
    assert every and all(s.labels.keys() >= BASE_LABELS for s in every)
    instances = {s.labels["instance_number"] for s in every}
    assert len(instances) == 1 and uuid.UUID(instances.pop())
    assert {s.labels["module_name"] for s in every} == {"leafguard"}  # local mode: no IOTEDGE_MODULEID
    assert families["leafguard_analyzed_frames"].type == "counter"

    assert value(families, "leafguard_analyzed_frames_total") == stats["capture"]["packets"] > 0
    assert value(families, "leafguard_batches_total") == stats["batches"]
    leaves = read_json(tmp_path / "leaves.json")["leaves"]
    assert value(families, "leafguard_leaves_seen") == len(leaves) > 0
    # No leaf map and no per-leaf clients: every leaf is known by its MAC and sent for by the gateway.
    assert value(families, "leafguard_leaves_unmanaged") == len(leaves)
    assert value(families, "leafguard_leaves_managed") == value(families, "leafguard_leaves_named") == 0
    assert value(families, "leafguard_leaf_agents") == stats["agents"]["leaves"]

    priorities = {"high", "low", "operational"}
    per: dict[str, dict[str, float]] = {}
    for kind in ("generated", "sent", "dropped", "pending"):
        name = f"leafguard_agent_events_{kind}" + ("_total" if kind != "pending" else "")
        got = {s.labels["priority"]: s.value for s in samples(families, f"leafguard_agent_events_{kind}")
               if s.name == name}
        assert got.keys() == priorities
        per[kind] = got
        assert sum(got.values()) == stats["agents"][kind]
    for p in priorities:  # the agents' rule holds queue by queue
        assert per["generated"][p] == per["sent"][p] + per["dropped"][p] + per["pending"][p]
    assert stats["agents"]["generated"] > 0
    # The folder is the data directory: the state's saves and journal are counted.
    assert value(families, "leafguard_state_saves_total") >= 1
    assert 0 < value(families, "leafguard_state_journal_inputs_total") <= stats["state"]["journal"]["inputs"]
    assert value(families, "leafguard_state_problem") == 0 and stats["state"]["journal"]["error"] is None

    alerts = Counter(a["type"] for a in read_json(tmp_path / "alerts.json")["alerts"])
    got_alerts = {s.labels["type"]: s.value for s in samples(families, "leafguard_alerts") if s.name.endswith("_total")}
    assert got_alerts == alerts and alerts["cleartext_login"] == 2
    # A replay has no interfaces and no uplink: those families are empty or absent, and health is fine.
    assert samples(families, "leafguard_capture_frames") == []
    assert "leafguard_uplink_connected" not in families
    assert health_status == 200 and json.loads(health)["status"] == "ok"


def test_healthz_is_503_with_the_reason_once_capture_is_down_longer_than_the_setting(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(LEAFGUARD_HEALTH_DOWN_AFTER_S="1")
    # An interface that does not exist: capture retries it with backoff, and never runs.
    proc = start(tmp_path, "--interface", "lgnothere0", "--http-port", str(port), env=env)
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        first_status, first = wait_for(lambda: http_get(url))
        _status, body = wait_for(lambda: (r := http_get(url))[0] == 503 and r)
        families = parse(http_get(f"http://127.0.0.1:{port}/metrics")[1].decode())
    finally:
        stop(proc)
    doc = json.loads(body)
    assert doc["status"] == "unhealthy" and doc["interfaces"] == {"lgnothere0": "missing"}
    assert len(doc["reasons"]) == 1 and doc["reasons"][0].startswith("capture down for ")
    assert "lgnothere0" in doc["reasons"][0]
    # Before the setting's second had passed it was degraded, not failing (unless the first look came late).
    if first_status == 200:
        assert json.loads(first)["status"] == "degraded"
    assert value(families, "leafguard_capture_up", interface="lgnothere0") == 0
    assert value(families, "leafguard_capture_down_seconds") >= 1
    assert value(families, "leafguard_capture_frames_total", interface="lgnothere0") == 0


def test_http_settings_defaults_environment_and_errors(tmp_path: Path) -> None:
    edge_env = dict.fromkeys(EDGE_ENV, "x")
    replay = _parser().parse_args(["run", "--pcap", "x"])
    local = _parser().parse_args(["run", "--pcap", "x", "--local-dir", str(tmp_path)])

    def settings(args: Any, env: dict[str, str]) -> ServiceSettings:
        return ServiceSettings.from_args(args, env)

    edge = settings(replay, edge_env)
    assert (edge.http_port, edge.http_host, edge.health_down_after_s) == (EDGE_HTTP_PORT, "127.0.0.1", 60.0)
    assert settings(local, {}).http_port is None  # local mode: only when asked for
    assert settings(local, {"LEAFGUARD_HTTP_PORT": "9700"}).http_port == 9700
    assert settings(replay, edge_env | {"LEAFGUARD_HTTP_PORT": "off"}).http_port is None
    flagged = _parser().parse_args(["run", "--pcap", "x", "--http-port", "9800", "--http-host", "::1"])
    both = settings(flagged, edge_env | {"LEAFGUARD_HTTP_PORT": "9700", "LEAFGUARD_HTTP_HOST": "0.0.0.0"})
    assert (both.http_port, both.http_host) == (9800, "::1")  # flags win over the environment
    assert settings(replay, edge_env | {"LEAFGUARD_HTTP_HOST": "0.0.0.0"}).http_host == "0.0.0.0"
    assert settings(replay, edge_env | {"LEAFGUARD_HEALTH_DOWN_AFTER_S": "5"}).health_down_after_s == 5
    for env, field in (
        ({"LEAFGUARD_HTTP_PORT": "http"}, "LEAFGUARD_HTTP_PORT"),
        ({"LEAFGUARD_HTTP_PORT": "70000"}, "LEAFGUARD_HTTP_PORT"),
        ({"LEAFGUARD_HTTP_HOST": "everywhere"}, "LEAFGUARD_HTTP_HOST"),
        ({"LEAFGUARD_HEALTH_DOWN_AFTER_S": "-1"}, "LEAFGUARD_HEALTH_DOWN_AFTER_S"),
    ):
        with pytest.raises(ConfigurationError, match=field):
            settings(replay, edge_env | env)


class ManagedLeaves:
    """The managed-leaves hook as the per-leaf clients fill it."""

    def __init__(self, macs: Iterable[str], items: Iterable[LeafConnection]) -> None:
        self.macs = set(macs)
        self.items = list(items)

    def managed_macs(self) -> set[str]:
        return self.macs

    def leaf_connections(self) -> Iterable[LeafConnection]:
        return self.items


def test_managed_leaves_hook_and_label_escaping_round_trip_through_the_parser() -> None:
    odd = 'plant "7"\\north\nline'
    analyzer = Analyzer(AnalyzerSettings())
    for batch in read_batches(demo_capture()):
        analyzer.feed(batch)
    fleet = Fleet(leaf_map={PLC_MAC: "plant1-plc"})
    snap = build_snapshot(
        version="0", started_at=1.0, taken_at=2.0, batches=0,
        labels=MetricLabels("hub.example", 'edge "1"', "i-1", "leafguard"),
        analyzer=analyzer, fleet=fleet,
        interfaces=None, capture_down_for_s=None, uplink=None, uplink_down_for_s=None,
        managed_leaves=ManagedLeaves([SENSOR_MAC, "02:00:00:00:00:99"],
                                     [LeafConnection("sensor-2", "backoff", False),
                                      LeafConnection(odd, "connected", True)]),
    )
    families = parse(render_snapshot(snap))
    got = {s.labels["leaf"]: (s.labels["state"], s.value) for s in samples(families, "leafguard_leaf_connected")}
    assert got == {odd: ("connected", 1.0), "sensor-2": ("backoff", 0.0)}
    assert {s.labels["edge_device"] for f in families.values() for s in f.samples} == {'edge "1"'}
    # Of the demo's five leaves, the sensor is managed (the hook's other MAC is no leaf now) and the PLC named.
    seen = value(families, "leafguard_leaves_seen")
    assert (seen, value(families, "leafguard_leaves_managed"), value(families, "leafguard_leaves_named")) == (5, 1, 1)
    assert value(families, "leafguard_leaves_unmanaged") == 4


def test_health_thresholds_and_outage_timing() -> None:
    down = DownTracker(now=100.0)  # nothing proved it up yet: down since the start
    assert down.update(False, 100.5) == 0.5
    assert down.update(True, 101.0) is None
    assert down.update(False, 105.0) == 0.0 and down.update(False, 107.0) == 2.0
    assert down.down_for(110.0) == 5.0

    def snap(capture_down: float | None) -> Any:
        return build_snapshot(
            version="0", started_at=1.0, taken_at=2.0, batches=3, labels=MetricLabels("h", "d", "i", "m"),
            analyzer=Analyzer(AnalyzerSettings()), fleet=Fleet(), interfaces=(), capture_down_for_s=capture_down,
            uplink={"state": "backoff", "sent": 0, "dropped": 0, "queued": 4, "queued_bytes": 400},
            uplink_down_for_s=capture_down, managed_leaves=None,
        )

    ok = assess(snap(None), down_after_s=30)
    assert (ok.status_code, ok.body["status"]) == (200, "ok")
    short = assess(snap(10.0), down_after_s=30)
    assert (short.status_code, short.body["status"]) == (200, "degraded") and len(short.body["reasons"]) == 2
    long = assess(snap(31.0), down_after_s=30)
    assert long.status_code == 503 and long.body["status"] == "unhealthy"
    assert any(r.startswith("uplink to the edge hub down for 31 s") for r in long.body["reasons"])
    assert any(r.startswith("capture down for 31 s") for r in long.body["reasons"])
