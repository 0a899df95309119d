"""Waiting on a running service's output folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_for(what: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """Poll ``what`` until it returns something truthy (files may be missing or half-written meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got = what()
        except (OSError, ValueError, KeyError):
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the service")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_stats(out: Path) -> dict[str, Any]:
    return dict(read_json(out / "stats.json"))
