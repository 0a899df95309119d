"""The service's statistics as one typed, immutable snapshot: what `/metrics`, `/healthz` and `getStats` read.

The service builds a :class:`ServiceSnapshot` (:func:`build_snapshot`) from its parts; the handlers never touch
the analyzer, the fleet, the capture or the transport themselves, so what they show is one consistent moment
and the parts can change shape without the handlers knowing. Building it is O(leaves + alerts): cheap at
scrape intervals (seconds), not meant for every batch.

Outages are measured by :class:`DownTracker` (pure: ``now`` passed in), which the service updates every tick, so
that a capture that came back between two scrapes is not counted as down for the whole gap.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from leafguard.agent.fleet import Fleet
from leafguard.agent.queues import QueueName
from leafguard.observe.analyzer import Analyzer


@dataclass(frozen=True, slots=True)
class MetricLabels:
    """The labels IoT Edge's built-in metrics carry (edgeHub, edgeAgent), put on every LeafGuard series.

    ``instance_number`` is generated once per process start, as edgeAgent and edgeHub do: a restart begins new
    series, so counters that start again at 0 are not mistaken for a reset of the same instance.
    """

    iothub: str
    edge_device: str
    instance_number: str
    module_name: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> MetricLabels:
        return cls(
            iothub=env.get("IOTEDGE_IOTHUBHOSTNAME", ""),
            edge_device=env.get("IOTEDGE_DEVICEID", ""),
            instance_number=str(uuid.uuid4()),
            module_name=env.get("IOTEDGE_MODULEID", "leafguard"),
        )

    def as_pairs(self) -> tuple[tuple[str, str], ...]:
        return (
            ("iothub", self.iothub),
            ("edge_device", self.edge_device),
            ("instance_number", self.instance_number),
            ("module_name", self.module_name),
        )


@dataclass(frozen=True, slots=True)
class InterfaceSnapshot:
    name: str
    state: str
    running: bool
    frames: int
    bytes: int
    kernel_drops: int
    queue_drops: int
    restarts: int
    last_error: str


@dataclass(frozen=True, slots=True)
class CaptureSnapshot:
    live: bool
    """Live capture (False: a replay of a capture file, which has no interfaces and is never "down")."""
    analyzed_frames: int
    analyzed_bytes: int
    decode_errors: int
    truncated_frames: int
    interfaces: tuple[InterfaceSnapshot, ...]
    down_for_s: float | None
    """How long no interface has been running (None: capture is up, or this is a replay)."""


@dataclass(frozen=True, slots=True)
class LeafConnection:
    """One leaf's own connection to the hub (per-leaf identities); ``state`` is the connection's own word."""

    identity: str
    state: str
    connected: bool
    sent: int = 0
    """Messages the hub acknowledged on this connection."""
    dropped: int = 0
    """Messages its outbox dropped (by the overflow policy, or unsent at shutdown)."""
    queued: int = 0
    reconnects: int = 0


class ManagedLeavesSource(Protocol):
    """Whatever keeps managed leaves' own hub connections (the per-leaf clients) plugs in here (``Service.
    managed_leaves``) for metrics, ``getStats`` and ``getInventory``."""

    def managed_macs(self) -> Collection[str]:
        """MACs (``aa:bb:..``) of the leaves that have an IoT Hub identity and client of their own."""
        ...

    def leaf_connections(self) -> Iterable[LeafConnection]: ...


@dataclass(frozen=True, slots=True)
class LeafSnapshot:
    seen: int
    """Leaves in the inventory now."""
    named: int
    """Of those, the leaves the leaf map names (an operator gave them a twin identity)."""
    managed: int
    """Of those, the leaves with an IoT Hub identity and client of their own (:class:`ManagedLeavesSource`)."""
    unmanaged: int
    """The others: their messages go out through the gateway module."""
    agents: int
    """Defender agents (one per leaf that produced an observation or showed up in the inventory)."""
    refused_observations: int
    """Observations of leaves beyond the agent limit."""
    connections: tuple[LeafConnection, ...]


@dataclass(frozen=True, slots=True)
class PriorityCounts:
    priority: str
    """``high``, ``low`` or ``operational`` (the Defender agent's three queues)."""
    generated: int
    sent: int
    dropped: int
    pending: int


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    by_priority: tuple[PriorityCounts, ...]
    messages: int

    @property
    def generated(self) -> int:
        return sum(p.generated for p in self.by_priority)

    @property
    def sent(self) -> int:
        return sum(p.sent for p in self.by_priority)

    @property
    def dropped(self) -> int:
        return sum(p.dropped for p in self.by_priority)

    @property
    def pending(self) -> int:
        return sum(p.pending for p in self.by_priority)


@dataclass(frozen=True, slots=True)
class UplinkSnapshot:
    state: str
    connected: bool
    messages_sent: int
    bytes_sent: int
    send_failures: int
    """Sends that failed or were not acknowledged in time (the message stays queued and goes again)."""
    messages_dropped: int
    bytes_dropped: int
    messages_resent: int
    queue_messages: int
    queue_bytes: int
    connects: int
    reconnects: int
    down_for_s: float | None
    reported_failures: int = 0
    """Reported-properties patches that failed (refused by the hub, timed out, connection lost)."""
    reported_refused: int = 0
    """Of those, the ones the hub refused (an error status, e.g. the merged section over 32 KB)."""
    alerts_dropped: int = 0
    """LeafGuard alerts in alert messages the outbox dropped (full)."""
    durable: bool = False
    """Queued messages are in the data directory's spool (else in memory only)."""
    spool_disk_bytes: int = 0
    spool_corrupt_records: int = 0
    spool_torn_records: int = 0
    spool_lost_to_corruption: int = 0


@dataclass(frozen=True, slots=True)
class AlertCount:
    type: str
    count: int


@dataclass(frozen=True, slots=True)
class AlertSnapshot:
    by_type: tuple[AlertCount, ...]
    dropped: int
    suppressed: int
    muted: int
    """Findings a mute rule dropped (see :mod:`leafguard.detect.muting`)."""


@dataclass(frozen=True, slots=True)
class MethodCount:
    method: str
    """The direct method's name (``?`` for names that are no method)."""
    status: int
    count: int


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """The saved state and its journal (with a data directory)."""

    saves: int
    save_failures: int
    skipped_saves: int
    last_save_s: float
    restored_agents: int
    journal_inputs: int
    """Inputs journalled by this process."""
    journal_replayed: int
    """Inputs of the journal applied again at start-up."""
    journal_write_failures: int
    problem: bool
    """A state file or journal was ignored or damaged, or a save failed (``error`` in stats says which)."""


@dataclass(frozen=True, slots=True)
class ServiceSnapshot:
    version: str
    started_at: float
    taken_at: float
    batches: int
    labels: MetricLabels
    capture: CaptureSnapshot
    leaves: LeafSnapshot
    agents: AgentSnapshot
    alerts: AlertSnapshot
    uplink: UplinkSnapshot | None
    """None in local mode (no hub)."""
    methods: tuple[MethodCount, ...] = ()
    """Direct-method calls answered, by method and status (edge mode)."""
    state: StateSnapshot | None = None
    """None without a data directory."""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (``getStats``): the same fields, nested, tuples as lists."""
        out = asdict(self)
        out.pop("labels")
        return out


class DownTracker:
    """Since when something has been down, from up/down samples; it starts down (nothing proved it up yet)."""

    def __init__(self, now: float) -> None:
        self._down_since: float | None = now

    def update(self, up: bool, now: float) -> float | None:
        """Record a sample; returns how long it has been down (None when up)."""
        if up:
            self._down_since = None
            return None
        if self._down_since is None:
            self._down_since = now
        return now - self._down_since

    def down_for(self, now: float) -> float | None:
        return None if self._down_since is None else now - self._down_since


class CaptureStatsSource(Protocol):
    def stats(self) -> Mapping[str, Any]: ...


def interfaces_of(capture: CaptureStatsSource | None) -> tuple[InterfaceSnapshot, ...]:
    if capture is None:
        return ()
    return tuple(
        InterfaceSnapshot(
            name=name,
            state=str(st.state),
            running=str(st.state) == "running",
            frames=st.frames,
            bytes=st.bytes,
            kernel_drops=st.kernel_drops,
            queue_drops=st.queue_drops,
            restarts=st.restarts,
            last_error=st.last_error,
        )
        for name, st in sorted(capture.stats().items())
    )


def capture_up(interfaces: tuple[InterfaceSnapshot, ...]) -> bool:
    """Capture is up when at least one interface is running (the others are retried meanwhile)."""
    return any(i.running for i in interfaces)


def uplink_up(counters: Mapping[str, Any]) -> bool:
    return counters.get("state") == "connected"


_PRIORITY_NAMES = {QueueName.HIGH: "high", QueueName.LOW: "low", QueueName.OPERATIONAL: "operational"}


def build_snapshot(
    *,
    version: str,
    started_at: float,
    taken_at: float,
    batches: int,
    labels: MetricLabels,
    analyzer: Analyzer,
    fleet: Fleet,
    interfaces: tuple[InterfaceSnapshot, ...] | None,
    capture_down_for_s: float | None,
    uplink: Mapping[str, Any] | None,
    uplink_down_for_s: float | None,
    managed_leaves: ManagedLeavesSource | None,
    method_calls: Mapping[tuple[str, int], int] | None = None,
    state: StateSnapshot | None = None,
) -> ServiceSnapshot:
    """One consistent snapshot; ``interfaces`` is None for a replay, ``uplink`` (transport counters) locally."""
    st = analyzer.stats
    # O(MACs) without sorting, then O(named + managed): no per-leaf Python beyond the leaf rule.
    seen = sum(1 for mac_state in analyzer.macs.values() if analyzer.is_leaf(mac_state))
    named = sum(1 for mac in fleet.named_macs() if _is_leaf(analyzer, mac))
    managed_macs = managed_leaves.managed_macs() if managed_leaves is not None else ()
    managed = sum(1 for mac in managed_macs if _is_leaf(analyzer, mac))
    totals = fleet.totals.totals()
    detectors = analyzer.detectors
    by_type = Counter(alert.type for alert in detectors.alerts)
    connections = (
        tuple(sorted(managed_leaves.leaf_connections(), key=lambda c: c.identity))
        if managed_leaves is not None
        else ()
    )
    return ServiceSnapshot(
        version=version,
        started_at=started_at,
        taken_at=taken_at,
        batches=batches,
        labels=labels,
        capture=CaptureSnapshot(
            live=interfaces is not None,
            analyzed_frames=st.packets,
            analyzed_bytes=st.bytes,
            decode_errors=st.decode_errors,
            truncated_frames=st.truncated,
            interfaces=interfaces or (),
            down_for_s=capture_down_for_s if interfaces is not None else None,
        ),
        leaves=LeafSnapshot(
            seen=seen,
            named=named,
            managed=managed,
            unmanaged=seen - managed,
            agents=len(fleet.agents()),
            refused_observations=fleet.refused_observations,
            connections=connections,
        ),
        agents=AgentSnapshot(
            by_priority=tuple(
                PriorityCounts(_PRIORITY_NAMES[name], t.generated, t.sent, t.dropped, t.pending)
                for name, t in totals.items()
            ),
            messages=fleet.totals.messages,
        ),
        alerts=AlertSnapshot(
            by_type=tuple(AlertCount(t, n) for t, n in sorted(by_type.items())),
            dropped=detectors.dropped_alerts,
            suppressed=detectors.suppressed_alerts,
            muted=detectors.muting.muted,
        ),
        uplink=_uplink(uplink, uplink_down_for_s) if uplink is not None else None,
        methods=tuple(MethodCount(m, status, n) for (m, status), n in sorted((method_calls or {}).items())),
        state=state,
    )


def _is_leaf(analyzer: Analyzer, mac: str) -> bool:
    try:
        key = bytes.fromhex(mac.replace(":", ""))
    except ValueError:
        return False
    mac_state = analyzer.macs.get(key)
    return mac_state is not None and analyzer.is_leaf(mac_state)


def _uplink(c: Mapping[str, Any], down_for_s: float | None) -> UplinkSnapshot:
    return UplinkSnapshot(
        state=str(c["state"]),
        connected=uplink_up(c),
        messages_sent=int(c["sent"]),
        bytes_sent=int(c.get("sent_bytes", 0)),
        send_failures=int(c.get("send_errors", 0)) + int(c.get("send_timeouts", 0)),
        messages_dropped=int(c["dropped"]),
        bytes_dropped=int(c.get("dropped_bytes", 0)),
        messages_resent=int(c.get("resent", 0)),
        queue_messages=int(c["queued"]),
        queue_bytes=int(c["queued_bytes"]),
        connects=int(c.get("connects", 0)),
        reconnects=int(c.get("reconnects", 0)),
        down_for_s=down_for_s,
        reported_failures=int(c.get("reported_failures", 0)),
        reported_refused=int(c.get("reported_refused", 0)),
        alerts_dropped=int(c.get("alerts_dropped", 0)),
        durable=bool(c.get("durable", False)),
        spool_disk_bytes=int(c.get("spool_disk_bytes", 0)),
        spool_corrupt_records=int(c.get("spool_corrupt_records", 0)),
        spool_torn_records=int(c.get("spool_torn_records", 0)),
        spool_lost_to_corruption=int(c.get("spool_lost_to_corruption", 0)),
    )
