"""Bulk counting of settled frames (placeholder: every frame takes the per-frame path)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leafguard.capture.batch import FrameBatch

if TYPE_CHECKING:
    from leafguard.observe.analyzer import Analyzer


def split_batch(analyzer: Analyzer, batch: FrameBatch) -> range:
    return range(len(batch))
