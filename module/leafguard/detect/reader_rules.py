"""The attack rules run in a capture file's reader process (`capture.forked`), beside the analysis.

The attack rules (`detect.attacks`) read nothing but the batches, in order, and their own state: neither the leaf
inventory nor the conversation table. So `analyze` lets the reader process, which has a CPU of its own and time to
spare, run them on every batch it reads; each batch carries their findings to the analysis (`FrameBatch.found`),
which raises them where it would have run the rules itself (`Analyzer.take_findings`), and so in the same order
among its own findings. The findings at the end of the file (the probes still unanswered then) come last, before
`Analyzer.finish`. Only for one file read this way: the rules' state would not carry over to a second reader.

This module imports nothing heavy: it is built before the reader forks, and builds the rules in the child.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leafguard.capture.batch import FrameBatch
    from leafguard.detect.alerts import Alert
    from leafguard.detect.attacks import AttackDetectors
    from leafguard.observe.settings import AnalyzerSettings


class AttackRulesInReader:
    """`forked.BatchRules` of the attack rules, configured as `Analyzer` configures its own from ``settings``."""

    def __init__(self, settings: AnalyzerSettings) -> None:
        self._settings = settings
        self._rules: AttackDetectors | None = None
        self._found: list[Alert] = []
        self._last_ts: float | None = None

    def __call__(self, batch: FrameBatch) -> list[Alert]:
        """The batch's findings (the analysis feeds only non-empty batches to its rules; so does this)."""
        if not len(batch):
            return []
        if self._rules is None:
            self._rules = self._build()
        last = max(batch.timestamps)
        if self._last_ts is None or last > self._last_ts:
            self._last_ts = last
        self._rules.feed(batch)
        return self._take()

    def finish(self) -> list[Alert]:
        """The findings at the end of the input (at the last packet time, as `Analyzer.finish` judges them)."""
        if self._rules is not None:
            self._rules.finish(self._last_ts)
        return self._take()

    def _take(self) -> list[Alert]:
        found = self._found[:]
        self._found.clear()  # the same list: the rules' sink appends to it
        return found

    def _build(self) -> AttackDetectors:
        from leafguard.detect.attacks import AttackDetectors
        from leafguard.observe.inventory import gateway_set

        s = self._settings
        return AttackDetectors(
            s.thresholds, self._found.append, leaf_nets=s.leaf_nets, gateway_macs=gateway_set(s.gateway_macs),
            max_tracked=min(s.max_flows, 65_536),
        )  # fmt: skip
