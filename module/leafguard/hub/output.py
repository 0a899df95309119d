"""`EdgeAgentOutput`: the agents' side of edge mode, the counterpart of ``LocalAgentOutput``.

Messages the fleet builds go to the :class:`~leafguard.hub.transport.EdgeTransport`; the module twin's desired
document (default Defender object plus per-leaf entries, see :mod:`leafguard.hub.twin`) is applied to the
fleet on the service's clock; reported properties and drops flow back. Single-threaded: call it on the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from leafguard import __version__
from leafguard.agent.agent import LeafAgent
from leafguard.agent.config import ConfigOutcome, merge_desired_patch
from leafguard.agent.fleet import Fleet, ViewsProvider
from leafguard.agent.messages import OutgoingMessage
from leafguard.agent.pump import AnalyzerLike, SecurityMessagePump
from leafguard.hub.alerts import AlertBatcher, AlertMessage
from leafguard.hub.leaf_clients import LeafClients
from leafguard.hub.outbox import Pending
from leafguard.hub.transport import EdgeTransport
from leafguard.hub.twin import DesiredChange, MissedDesiredPatchError, ModuleDesired, bounded, nulls_as_off
from leafguard.observe.model import LeafView

log = logging.getLogger("leafguard.hub")

INVENTORY_REFRESH_S = 2.0
"""How often the managed leaves' inventories are recomputed (each link reports it at most once a minute)."""
UNMANAGED_LISTED = 50
UNMANAGED_BYTES = 8 * 1024
"""The unmanaged leaves' list in the gateway twin's health section (see ``leaf_clients.SUMMARY_BYTES``)."""


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return ""


def leaf_inventory(view: LeafView, alerts: list[dict[str, Any]], agent: LeafAgent | None) -> dict[str, Any]:
    """A managed leaf's passive inventory for its twin's ``leafguard`` section (twin-safe: no nulls, no lists of
    objects deeper than the hub's 10 levels)."""
    names = sorted({*view.hostnames, *([view.dhcp_hostname] if view.dhcp_hostname else [])})
    out: dict[str, Any] = {
        "mac": view.mac, "ips": list(view.ips), "vendor": view.vendor or "", "hostnames": names,
        "firstSeen": _iso(view.first_seen), "lastSeen": _iso(view.last_seen),
        "services": [f"{s.protocol}/{s.port}" for s in view.services],
        "alerts": [{"type": str(a.get("type")), "at": _iso(float(a.get("ts", 0.0)))} for a in alerts],
    }
    os_evidence = {k: v for k, v in (("name", view.os_name), ("vendor", view.os_vendor),
                                     ("version", view.os_version)) if v}
    if os_evidence:
        out["os"] = os_evidence
    if agent is not None:
        stats = agent.stats()
        out["counters"] = {"eventsGenerated": stats.generated, "eventsSent": stats.sent, "messages": stats.messages}
    return out


class EdgeAgentOutput:
    """``after_batch`` / ``tick`` / ``poll_desired`` / ``close``, over an :class:`EdgeTransport` and, for managed
    leaves, their own :class:`~leafguard.hub.leaf_clients.LeafClients` links."""

    def __init__(self, transport: EdgeTransport, fleet: Fleet, leaves: LeafClients | None = None) -> None:
        self.transport = transport
        self.fleet = fleet
        self.leaves = leaves
        self.desired = ModuleDesired()
        self.frames = 0
        self.gateway_status: dict[str, Any] = {}
        """Gateway settings in force and their last errors (the service fills it), reported in the health section."""
        spool = transport.outbox.spool
        self._unhanded: dict[str, int] = dict(spool.counters.unreported) if spool is not None else {}
        """Drops per identity not yet handed to an agent (persisted in the spool: a restart keeps them)."""
        self.leaf_desired: dict[str, dict[str, Any]] = {}
        """Each managed leaf's own twin's desired document (merged over the gateway default)."""
        self.leaf_unattributed_drops = 0
        """Messages a managed leaf's link dropped after its agent went away (renamed meanwhile)."""
        self._now: float | None = None
        """The service's clock as last seen (packet time for a replay): leaf desired patches apply at it."""
        self._on_leaf_twin: set[str] = set()
        self._views: ViewsProvider | None = None
        self._last_inventory = float("-inf")
        self._alerts: Callable[[], list[dict[str, Any]]] | None = None
        self._leaf_states: dict[str, int] = {}
        self._pending_leaf: set[str] = set()
        """Managed leaves whose desired document came before the service's clock was known."""
        self._settings_read = False
        """The module twin's desired document has been applied once: until then the leaf map is unknown, and a
        message built now could go out under a leaf's MAC identity, or from the gateway for a managed leaf."""
        self._pump = SecurityMessagePump(fleet, self._submit, hold=self.hold)
        self.alerts = AlertBatcher(transport.settings.identity)
        transport.on_dropped = self._on_dropped
        transport.health = self.health
        if leaves is not None:
            leaves.on_desired = self._leaf_desired_changed
            leaves.on_dropped = self._on_leaf_dropped

    def _submit(self, messages: Iterable[OutgoingMessage]) -> None:
        """Managed leaves' messages go over their own link; the others on the gateway's output ``security``."""
        rest = self.leaves.submit(messages) if self.leaves is not None else messages
        self.transport.submit(rest)

    def after_batch(self, analyzer: AnalyzerLike) -> None:
        self._pump.after_batch(analyzer)
        stats = getattr(analyzer, "stats", None)
        packets = getattr(stats, "packets", None)
        if isinstance(packets, int):
            self.frames = packets
        now = getattr(analyzer, "now", None)
        if isinstance(now, float | int):
            self._now = float(now)
        views = getattr(analyzer, "leaf_views", None)
        if callable(views):
            self._views = views
        detectors = getattr(analyzer, "detectors", None)
        if detectors is not None:
            self._alerts = lambda: [a.to_json() for a in detectors.alerts[-200:]]
        self._sync_reported()

    def tick(self, now: float, views: ViewsProvider | None = None) -> None:
        self._now = now
        if views is not None:
            self._views = views
        self._submit(self.fleet.tick(now, views, hold=self.hold()))
        self._sync_reported()

    def hold(self) -> bool:
        """Whether the agents hold their timed sends: the uplink is down or behind, or who sends for which leaf
        is not settled yet (the gateway settings not read, or managed leaves whose clients do not exist yet)."""
        if self.transport.congested() or not self._settings_read:
            return True
        return self.leaves is not None and not self.leaves.settled()

    def poll_desired(self, now: float) -> list[tuple[str, ConfigOutcome]]:
        """Apply the desired updates the hub delivered since the last poll, at ``now`` (the service's clock)."""
        self._now = now
        applied: list[tuple[str, ConfigOutcome]] = []
        for identity in sorted(i for i in self.leaf_desired if i in self._pending_leaf):
            applied.append((identity, self._apply_leaf(identity, now)))
        self._pending_leaf.clear()
        for update in self.transport.take_desired_updates():
            change: DesiredChange | None
            # The service applies the gateway settings (the leaf map) from this document right after this call.
            self._settings_read = self._settings_read or update.whole
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

    def module_desired(self) -> ModuleDesired:
        """The module twin's desired document: the gateway settings in edge mode."""
        return self.desired

    def publish_gateway_status(self, status: Mapping[str, Any], *, refresh: bool = True) -> None:
        """The gateway settings in force and their errors, into the health section, reported soon (``refresh``)
        or with the next health report."""
        self.gateway_status.update(status)
        if refresh:
            self.transport.refresh_health()

    def close(self, now: float | None) -> None:
        """The final flush of every agent into the outboxes (the transports' shutdown sends it)."""
        self.transport.submit(self.alerts.flush())
        if now is not None:
            self._submit(self.fleet.shutdown(now))
        self._sync_reported()

    # -- managed leaves -----------------------------------------------------------------------------------

    def _leaf_desired_changed(self, identity: str, doc: dict[str, Any]) -> None:
        """A managed leaf's twin delivered its desired document (on the loop, as the SDK pushed it): applied at
        once when the service's clock is known, so the reported configuration follows within the second."""
        self.leaf_desired[identity] = doc
        if self._now is None:
            self._pending_leaf.add(identity)
            return
        outcome = self._apply_leaf(identity, self._now)
        log.info("desired properties for %s (own twin) %s", identity, "applied" if outcome.accepted else "rejected")
        self._sync_reported()

    def _apply_leaf(self, identity: str, now: float) -> ConfigOutcome:
        outcome = self.fleet.apply_desired(identity, self._effective(identity), now)
        if self.leaves is not None:
            self.leaves.desired_outcome(identity, outcome.accepted)
        return outcome

    def _effective(self, identity: str) -> object:
        """A managed leaf: its own twin's desired document over the gateway's default; else the module twin's."""
        own = self.leaf_desired.get(identity)
        if own is None or self.leaves is None or not self.leaves.manages(identity):
            return self.desired.effective(identity)
        return merge_desired_patch(self.desired.default_document() or {}, own)

    def _inventory(self) -> dict[str, dict[str, Any]]:
        """The passive inventory of each managed leaf, for its twin's ``leafguard`` section."""
        if self.leaves is None or self._views is None or not self.leaves.links:
            return {}
        alerts = self._alerts() if self._alerts is not None else []
        out: dict[str, dict[str, Any]] = {}
        for view in self._views():
            identity = self.fleet.identity_for(view.mac)
            if self.leaves.manages(identity):
                own = [a for a in alerts if a.get("mac") == view.mac][-10:]
                out[identity] = leaf_inventory(view, own, self.fleet.agent(identity))
                entry = self.leaves.entry(identity)
                if entry is not None and entry.ip is not None:
                    # The address the operator gave in the leaf map, beside those seen (a mismatch is telling).
                    out[identity]["configuredIp"] = entry.ip
        return out

    def health(self) -> dict[str, Any]:
        """The ``leafguard`` section of the reported properties."""
        out = {
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
        if self.leaves is not None:
            out["managedLeaves"] = self.leaves.summary()
            out["unmanagedLeaves"] = self._unmanaged_summary()
        # A setting turned off (None) is reported as "off": a null would delete the key, and show nothing.
        return dict(nulls_as_off(out))

    def _unmanaged_summary(self) -> dict[str, Any]:
        """Leaves on the gateway's path (no identity of their own), what an operator needs to register them: the
        first ones by name with MAC, vendor and last seen, and how many are not shown (bounded for the 32 KB)."""
        assert self.leaves is not None
        names = sorted(a.identity for a in self.fleet.agents() if not self.leaves.manages(a.identity))
        views = {self.fleet.identity_for(v.mac): v for v in self._views()} if self._views is not None else {}

        def entry(name: str) -> dict[str, str]:
            view = views.get(name)
            return {"mac": self.fleet.mac_of(name) or ""} if view is None else {
                "mac": view.mac, "vendor": view.vendor or "", "lastSeen": _iso(view.last_seen)}

        # Lazily: only the entries that fit are built.
        first = bounded(((name, entry(name)) for name in names), UNMANAGED_LISTED, UNMANAGED_BYTES)
        return {"count": len(names), "first": first, "notShown": len(names) - len(first)}


    def _apply(self, change: DesiredChange, now: float) -> list[tuple[str, ConfigOutcome]]:
        targets = set(change.leaves)
        if change.default_changed:
            self.fleet.set_default_desired(self.desired.default_document())
            targets |= {agent.identity for agent in self.fleet.agents()}
            targets |= set(self.desired.leaf_identities())
            targets |= set(self.leaf_desired)
        out = []
        for identity in sorted(targets):
            outcome = self.fleet.apply_desired(identity, self._effective(identity), now)
            out.append((identity, outcome))
        return out

    def _on_dropped(self, entry: Pending) -> None:
        self._unhanded[entry.identity] = self._unhanded.get(entry.identity, 0) + 1
        self._hand_drops(entry.identity)

    def _on_leaf_dropped(self, entry: Pending) -> None:
        """A managed leaf's own outbox dropped a message (not spooled): straight to its agent."""
        if not self.fleet.record_send_failures(entry.identity, 1):
            self.leaf_unattributed_drops += 1

    @property
    def unattributed_drops(self) -> int:
        """Dropped messages whose leaf has no agent under that identity (yet: a restart, or renamed meanwhile)."""
        return sum(self._unhanded.values())

    def _hand_drops(self, identity: str) -> None:
        """Drops of a leaf go to its agent (its next MessageStatistics ``TotalFailed``), marked so in the spool."""
        count = self._unhanded.get(identity, 0)
        if not count or not self.fleet.record_send_failures(identity, count):
            return
        del self._unhanded[identity]
        spool = self.transport.outbox.spool
        if spool is not None:
            spool.mark_reported(identity, count)

    def _sync_reported(self) -> None:
        for identity in list(self._unhanded):
            self._hand_drops(identity)
        for identity in self.fleet.take_retired():
            self.transport.remove_leaf(identity)
        leaves = self.leaves
        for identity, reported in self.fleet.take_reported_changes().items():
            if leaves is not None and leaves.manages(identity):
                leaves.report(identity, reported, None)
            else:
                self.transport.report_leaf(identity, reported)
        if leaves is None:
            return
        for identity in list(leaves.links):
            if identity not in self._on_leaf_twin:
                # Newly managed: its configuration moves from the gateway's twin to its own.
                self._on_leaf_twin.add(identity)
                self.transport.remove_leaf(identity)
                leaves.report(identity, self.fleet.reported(identity), None)
                if identity in self.leaf_desired and self._now is not None:
                    self._apply_leaf(identity, self._now)
        self._on_leaf_twin &= set(leaves.links)
        mono = time.monotonic()
        if mono - self._last_inventory >= INVENTORY_REFRESH_S:
            self._last_inventory = mono
            for identity, inventory in self._inventory().items():
                leaves.report(identity, None, inventory)
        states = leaves.states()
        if states != self._leaf_states:
            # A leaf's connection state changed: the gateway's summary goes out now, not within the minute.
            self._leaf_states = states
            self.transport.refresh_health()

