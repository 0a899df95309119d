"""`EdgeAgentOutput`: the agents' side of edge mode, the counterpart of ``LocalAgentOutput``.

Messages the fleet builds go to the :class:`~leafguard.hub.transport.EdgeTransport`; the module twin's desired
document (default Defender object plus per-leaf entries, see :mod:`leafguard.hub.twin`) is applied to the
fleet on the service's clock; reported properties and drops flow back. Single-threaded: call it on the loop.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from leafguard import __version__
from leafguard.agent.config import ConfigOutcome
from leafguard.agent.fleet import Fleet, ViewsProvider
from leafguard.agent.local import AnalyzerLike, SecurityMessagePump
from leafguard.agent.messages import OutgoingMessage
from leafguard.hub.transport import EdgeTransport
from leafguard.hub.twin import DesiredChange, MissedDesiredPatchError, ModuleDesired

log = logging.getLogger("leafguard.hub")


ALERTS_OUTPUT = "alerts"


@dataclass(frozen=True, slots=True)
class AlertMessage(OutgoingMessage):
    """A LeafGuard alert for module output ``alerts`` (plain JSON: not a Defender security message)."""

    output: str = ALERTS_OUTPUT
    alert_type: str = ""

    @property
    def custom_properties(self) -> dict[str, str]:
        return {"alertType": self.alert_type}

    def to_sdk_message(self) -> Any:
        from azure.iot.device import Message

        msg = Message(self.body, content_encoding="utf-8", content_type="application/json")  # type: ignore[no-untyped-call]
        msg.custom_properties.update(self.custom_properties)
        return msg


class EdgeAgentOutput:
    """``after_batch`` / ``tick`` / ``poll_desired`` / ``close``, over an :class:`EdgeTransport`."""

    def __init__(self, transport: EdgeTransport, fleet: Fleet) -> None:
        self.transport = transport
        self.fleet = fleet
        self.desired = ModuleDesired()
        self.frames = 0
        self.gateway_status: dict[str, Any] = {}
        """Gateway settings in force and their last errors (the service fills it), reported in the health section."""
        self.unattributed_drops = 0
        """Dropped messages whose leaf no longer has an agent under that identity (renamed meanwhile)."""
        self._pump = SecurityMessagePump(fleet, transport.submit)
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

    def submit_alerts(self, alerts: list[dict[str, Any]], module_identity: str) -> None:
        """Send LeafGuard alerts on output ``alerts``; each names its leaf's identity (or the module's)."""
        self.transport.submit(
            AlertMessage(
                identity=self.fleet.identity_for(alert["mac"]) if alert.get("mac") else module_identity,
                body=orjson.dumps(alert),
                priority="High",
                event_count=1,
                alert_type=str(alert["type"]),
            )
            for alert in alerts
        )

    def close(self, now: float | None) -> None:
        """The final flush of every agent into the outbox (the transport's shutdown sends it)."""
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

    def _on_dropped(self, message: OutgoingMessage) -> None:
        agent = self.fleet.agent(message.identity)
        if agent is None:
            self.unattributed_drops += 1
        else:
            agent.record_send_failures(1)

    def _sync_reported(self) -> None:
        for identity in self.fleet.take_retired():
            self.transport.remove_leaf(identity)
        for identity, reported in self.fleet.take_reported_changes().items():
            self.transport.report_leaf(identity, reported)
