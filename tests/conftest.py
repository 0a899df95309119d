"""Fixtures shared by the whole suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# The tests run this tree's code, whatever `leafguard` pip installed last (another clone, a git worktree), and so
# do the processes they start.
sys.path.insert(0, str(REPO / "module"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "module"), os.environ.get("PYTHONPATH")]))
SHARED = Path(os.environ.get("LEAFGUARD_SHARED", REPO.parent / "shared"))
PCAPS = SHARED / "pcaps"


def shared_pcaps() -> list[Path]:
    """Every real capture in ../shared/pcaps (empty when ../shared is absent)."""
    if not PCAPS.is_dir():
        return []
    return sorted(p for p in PCAPS.iterdir() if p.suffix in {".pcap", ".pcapng", ".cap"})


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared captures and schemas live there")
    return SHARED


def run_analyze(path: Path, *extra: str, timeout_s: float = 240) -> dict[str, Any]:
    """``leafguard analyze PATH --json`` as a process of this tree's code (not whatever is installed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "leafguard", "analyze", str(path), "--json", *extra],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"leafguard analyze {path.name} exited {proc.returncode}: {proc.stderr[-3000:]}"
    report: dict[str, Any] = json.loads(proc.stdout)
    return report
