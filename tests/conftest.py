"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
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
