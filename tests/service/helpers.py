"""Reading a running service: its output folder, its HTTP server and metrics (polling: `testkit.wait`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from testkit.netns import Netns


def run_capturing(ns: Netns, interface: str, out: Path, log: Path,
                  env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``leafguard run`` capturing ``interface`` inside ``ns``, in local mode into ``out`` (its files rewritten every
    0.2 s), its log into ``log``; ``env`` adds to this process's environment."""
    with log.open("wb") as fh:
        return ns.popen(
            sys.executable, "-m", "leafguard", "run", "--interface", interface, "--local-dir", str(out),
            "--write-interval", "0.2", stderr=fh, env=os.environ | dict(env or {}),
        )  # fmt: skip


def replay_locally(folder: Path, capture: Path, *, speed: str = "0", **env: str) -> subprocess.Popen[bytes]:
    """`leafguard run` replaying ``capture`` in local mode into ``folder`` (the data directory too)."""
    return subprocess.Popen(
        [sys.executable, "-m", "leafguard", "run", "--local-dir", str(folder), "--pcap", str(capture),
         "--replay-speed", speed, "--write-interval", "0.3"],
        env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_service(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM, a clean exit within a minute; the service's log."""
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    return err.decode()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_stats(out: Path) -> dict[str, Any]:
    return dict(read_json(out / "stats.json"))


def free_port() -> int:
    """A TCP port free on loopback now (for a service's --http-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> tuple[int, bytes]:
    """Status and body of a GET; an HTTP error status is an answer too (503 from /healthz)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


BASE_LABELS = {"iothub", "edge_device", "instance_number", "module_name"}
"""The labels of IoT Edge's built-in metrics, on every LeafGuard series."""


def parse_metrics(text: str) -> dict[str, Any]:
    """Families by name, with prometheus_client's parser (it raises on anything malformed)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def metric_value(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of the one sample called ``name`` (``_total`` included) with these labels."""
    found = [
        s.value
        for f in families.values()
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])
