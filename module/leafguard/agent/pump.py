"""The message pump: after every batch, an analyzer's observations go to the fleet in packet order, the fleet ticks
at packet time, and the messages due go to a sink (a file, the hub's outboxes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from leafguard.agent.fleet import Fleet
from leafguard.agent.messages import OutgoingMessage
from leafguard.observe.model import ConnectionSeen, LeafView, LoginSeen


class AnalyzerLike(Protocol):
    """What the pump needs from ``leafguard.observe.analyzer.Analyzer``."""

    def drain_observations(self) -> list[ConnectionSeen | LoginSeen]: ...

    def leaf_views(self) -> list[LeafView]: ...

    @property
    def now(self) -> float | None: ...


class SecurityMessagePump:
    """Feeds an analyzer's observations to a fleet after each batch and hands the due messages to a sink."""

    def __init__(
        self, fleet: Fleet, sink: Callable[[list[OutgoingMessage]], None], hold: Callable[[], bool] | None = None
    ) -> None:
        self.fleet = fleet
        self.sink = sink
        self.hold = hold
        """Whether the output is down or behind now (the agents then hold their timed sends); None: never."""
        self.messages = 0

    def after_batch(self, analyzer: AnalyzerLike) -> None:
        """Call after every ``analyzer.feed(batch)``: observations in packet order, then one tick."""
        for obs in analyzer.drain_observations():
            self.fleet.observe(obs)
        now = analyzer.now
        if now is not None:
            hold = self.hold is not None and self.hold()
            self._emit(self.fleet.tick(now, analyzer.leaf_views, hold=hold))

    def finish(self, analyzer: AnalyzerLike) -> None:
        """At the end of the run: the last observations, a last tick, then the final flush of every agent."""
        self.after_batch(analyzer)
        now = analyzer.now
        if now is not None:
            self._emit(self.fleet.shutdown(now))

    def _emit(self, msgs: list[OutgoingMessage]) -> None:
        if msgs:
            self.messages += len(msgs)
            self.sink(msgs)
