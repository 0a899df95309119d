"""A newcomer's first run: the README's "try edge mode without Azure" lines, run as written, work.

The lines run in bash in a fresh directory whose ``tests`` is this repository's (as in a clone's root), with
``leafguard`` and ``python`` on PATH running this tree's code; everything they start talks to the emulator on a
loopback address. The install line is not run (it would reinstall into the machine's environment); instead the
`emulator` extra it names is checked to cover every package the emulator imports beyond LeafGuard's own.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

MARKER = "<!-- try-edge-mode:"
INSTALL = "pip install '.[emulator]'"


def readme_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    start = text.index(MARKER)
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block is not None, "the try-edge-mode marker precedes a sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _shims(bindir: Path) -> None:
    bindir.mkdir()
    for name, argv in (("leafguard", f'"{sys.executable}" -m leafguard'), ("python", f'"{sys.executable}"')):
        shim = bindir / name
        shim.write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
        shim.chmod(0o755)


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_the_emulator_extra_covers_what_the_emulator_imports() -> None:
    assert readme_lines()[0] == INSTALL
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    provided = _requirement_names(project["dependencies"] + project["optional-dependencies"]["emulator"])
    distributions = importlib.metadata.packages_distributions()
    needed: set[str] = set()
    missing: set[str] = set()
    for path in (REPO / "tests" / "hub_emulator").glob("*.py"):
        if path.name.startswith("test_"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in {"tests", "leafguard"}:
                    continue
                # A namespace package (azure) belongs to several distributions: one of them must be provided.
                candidates = {d.lower() for d in distributions.get(top, [top])}
                needed.add(top)
                if not candidates & provided:
                    missing.add(f"{name} ({', '.join(sorted(candidates))})")
    assert {"aiohttp", "cryptography"} <= needed, needed
    assert not missing, f"not installed by {INSTALL}: {sorted(missing)}"


@pytest.mark.timeout(180)
def test_the_readme_sequence_works_as_written(tmp_path: Path) -> None:
    lines = readme_lines()[1:]
    assert any(line.startswith("leafguard run --demo") for line in lines)
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "tests").symlink_to(REPO / "tests")
    _shims(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "LEAFGUARD_", "HUB_EMULATOR_"))}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the demo capture is built afresh, as on a new machine
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                              timeout=150, check=False)
    finally:
        pid_file = clone / "hub.pid"
        if pid_file.exists():  # the sequence failed before its last line: stop the emulator ourselves
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    env_file = (clone / "hub.env").read_text()
    for name in ("IOTEDGE_IOTHUBHOSTNAME", "IOTEDGE_WORKLOADURI", "IOTEDGE_MODULEID", "HUB_EMULATOR_CONTROL_URL"):
        assert f"\n{name}=" in f"\n{env_file}"
    sent = re.search(r"uplink: (\d+) messages sent \(\d+ bytes\), 0 dropped, 0 still queued", out)
    assert sent and int(sent.group(1)) > 0, out
    assert "edge mode as edge1/leafguard" in out
    # --show: every leaf of the demo network, each with its Defender events by type, and the demo's alerts.
    summary = re.search(r"Defender security messages: (\d+) for (\d+) leaves", out)
    assert summary and int(summary.group(2)) == 5, out
    alerts = re.search(r"LeafGuard alerts \(output alerts\): 2 in (\d+) messages", out)
    assert alerts, out
    assert int(summary.group(1)) + int(alerts.group(1)) == int(sent.group(1)), out
    leaf_rows = [line for line in out.splitlines() if re.match(r"\s+leaf-[0-9a-f]{12}\s+\d+ msg", line)]
    assert len(leaf_rows) == 5 and all("SystemInformation" in row and "ListeningPorts" in row for row in leaf_rows)
    # The last line stopped the emulator: its pid file goes with it.
    deadline = time.monotonic() + 10
    while (clone / "hub.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (clone / "hub.pid").exists()


def test_run_demo_in_local_mode_stops_by_itself_with_the_messages_written(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "leafguard", "run", "--demo", "--local-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "messages.jsonl").read_text().splitlines()
    identities = {json.loads(line)["identity"] for line in lines}
    assert len(identities) == 5
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["replay_done"] is True and stats["capture"]["packets"] == 73
