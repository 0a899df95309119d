"""`EdgeAgentOutput`: the agents' side of edge mode, the counterpart of ``LocalAgentOutput``.

Messages the fleet builds go to the :class:`~leafguard.hub.transport.EdgeTransport`; the module twin's desired
document (default Defender object plus per-leaf entries, see :mod:`leafguard.hub.twin`) is applied to the
fleet on the service's clock; reported properties and drops flow back. Single-threaded: call it on the loop.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from leafguard import __version__
from leafguard.agent.config import ConfigOutcome
from leafguard.agent.fleet import Fleet, ViewsProvider
from leafguard.agent.local import AnalyzerLike, SecurityMessagePump
from leafguard.hub.alerts import AlertBatcher, AlertMessage
from leafguard.hub.outbox import Pending
from leafguard.hub.transport import EdgeTransport
from leafguard.hub.twin import DesiredChange, MissedDesiredPatchError, ModuleDesired

log = logging.getLogger("leafguard.hub")


class EdgeAgentOutput:
    """``after_batch`` / ``tick`` / ``poll_desired`` / ``close``, over an :class:`EdgeTransport`."""

    def __init__(self, transport: EdgeTransport, fleet: Fleet) -> None:
        self.transport = transport
        self.fleet = fleet
        self.desired = ModuleDesired()
        self.frames = 0
        self.gateway_status: dict[str, Any] = {}
        """Gateway settings in force and their last errors (the service fills it), reported in the health section."""
        spool = transport.outbox.spool
        self._unhanded: dict[str, int] = dict(spool.counters.unreported) if spool is not None else {}
        """Drops per identity not yet handed to an agent (persisted in the spool: a restart keeps them)."""
        self._pump = SecurityMessagePump(fleet, transport.submit)
        self.alerts = AlertBatcher(transport.settings.identity)
        transport.on_dropped = self._on_dropped
        transport.health = self.health

    def after_batch(self, analyzer: AnalyzerLike) -> None:
        self._pump.after_batch(analyzer)
        stats = getattr(analyzer, "stats", None)
        packets = getattr(stats, "packets", None)
        if isinstance(packets, int):
            self.frames = packets
        self._sync_reported()

    def tick(self, now: float, views: ViewsProvider | None = None) -> None:
        self.transport.submit(self.fleet.tick(now, views))
        self._sync_reported()

    def poll_desired(self, now: float) -> list[tuple[str, ConfigOutcome]]:
        """Apply the desired updates the hub delivered since the last poll, at ``now`` (the service's clock)."""
        applied: list[tuple[str, ConfigOutcome]] = []
        for update in self.transport.take_desired_updates():
            change: DesiredChange | None
            try:
                change = self.desired.replace(update.doc) if update.whole else self.desired.patch(update.doc)
            except MissedDesiredPatchError as exc:
                log.info("%s: fetching the whole twin", exc)
                self.transport.request_twin_resync()
                continue
            if change is not None:
                applied.extend(self._apply(change, now))
        self._sync_reported()
        return applied

    def submit_alerts(self, alerts: list[dict[str, Any]], now: float) -> None:
        """Queue LeafGuard alerts for output ``alerts``, batched (:class:`AlertBatcher`): each names its leaf's
        identity (``leafIdentity``; the module's when it has no MAC). ``now``: monotonic seconds."""
        out: list[AlertMessage] = []
        for alert in alerts:
            mac = alert.get("mac")
            ident = self.fleet.identity_for(mac) if mac else self.alerts.identity
            out.extend(self.alerts.add(alert | {"leafIdentity": ident}, now))
        self.transport.submit(out)

    def flush_due_alerts(self, mono: float) -> None:
        """Every service tick: alerts that waited long enough go out (``mono``: monotonic seconds)."""
        self.transport.submit(self.alerts.due(mono))

    def close(self, now: float | None) -> None:
        """The final flush of every agent into the outbox (the transport's shutdown sends it)."""
        self.transport.submit(self.alerts.flush())
        if now is not None:
            self.transport.submit(self.fleet.shutdown(now))
        self._sync_reported()

    def health(self) -> dict[str, Any]:
        """The ``leafguard`` section of the reported properties."""
        return {
            "version": __version__,
            "frames": self.frames,
            "leaves": len(self.fleet.agents()),
            "agents": dataclasses.asdict(self.fleet.stats()),
            "alerts": {
                "forwarded": self.alerts.alerts,
                "messages": self.alerts.messages,
                "waiting": len(self.alerts),
                "dropped": self.transport.outbox.stats.alerts_dropped,
            },
        } | self.gateway_status

    def _apply(self, change: DesiredChange, now: float) -> list[tuple[str, ConfigOutcome]]:
        targets = set(change.leaves)
        if change.default_changed:
            self.fleet.default_desired = self.desired.default_document()
            targets |= {agent.identity for agent in self.fleet.agents()}
            targets |= set(self.desired.leaf_identities())
        out = []
        for identity in sorted(targets):
            outcome = self.fleet.apply_desired(identity, self.desired.effective(identity), now)
            out.append((identity, outcome))
        return out

    def _on_dropped(self, entry: Pending) -> None:
        self._unhanded[entry.identity] = self._unhanded.get(entry.identity, 0) + 1
        self._hand_drops(entry.identity)

    @property
    def unattributed_drops(self) -> int:
        """Dropped messages whose leaf has no agent under that identity (yet: a restart, or renamed meanwhile)."""
        return sum(self._unhanded.values())

    def _hand_drops(self, identity: str) -> None:
        """Drops of a leaf go to its agent (its next MessageStatistics ``TotalFailed``), marked so in the spool."""
        agent = self.fleet.agent(identity)
        count = self._unhanded.get(identity, 0)
        if agent is None or not count:
            return
        agent.record_send_failures(count)
        del self._unhanded[identity]
        spool = self.transport.outbox.spool
        if spool is not None:
            spool.mark_reported(identity, count)

    def _sync_reported(self) -> None:
        for identity in list(self._unhanded):
            self._hand_drops(identity)
        for identity in self.fleet.take_retired():
            self.transport.remove_leaf(identity)
        for identity, reported in self.fleet.take_reported_changes().items():
            self.transport.report_leaf(identity, reported)
