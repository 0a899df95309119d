"""`/metrics`: a :class:`~leafguard.service.snapshot.ServiceSnapshot` in the Prometheus text format (0.0.4).

Pure: snapshot in, text out. Conventions (docs/edge-mode.md, "Health and metrics"), after IoT Edge's own modules
and its custom-metrics guide: every name starts with ``leafguard_``; every series carries ``iothub``,
``edge_device``, ``instance_number`` and ``module_name``; counters end in ``_total``, in their ``# HELP`` and
``# TYPE`` lines too, as in the 0.0.4 text format that prometheus_client itself writes; a family with per-item
labels (interface, priority, alert type, leaf) is still announced when it has no series yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from leafguard.service.snapshot import ServiceSnapshot

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Labels
    value: float


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    """Without ``_total``; counters get it on their samples."""
    kind: str
    """``counter`` or ``gauge``."""
    help: str
    samples: tuple[Sample, ...]


def _escape(value: str) -> str:
    # The exposition format's three escapes in label values; anything else (a leaf identity) goes as it is.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family], base: Labels) -> str:
    lines: list[str] = []
    for f in families:
        sample_name = f.name + "_total" if f.kind == "counter" else f.name
        lines.append(f"# HELP {sample_name} {f.help}")
        lines.append(f"# TYPE {sample_name} {f.kind}")
        for s in f.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in (*base, *s.labels))
            lines.append(f"{sample_name}{{{labels}}} {_number(s.value)}")
    return "\n".join(lines) + "\n"


def _one(name: str, kind: str, help_text: str, value: float) -> Family:
    return Family(name, kind, help_text, (Sample((), value),))


def families(snap: ServiceSnapshot) -> list[Family]:
    cap, leaves, agents, alerts = snap.capture, snap.leaves, snap.agents, snap.alerts
    out = [
        Family("leafguard_info", "gauge", "LeafGuard's version (value 1).", (Sample((("version", snap.version),), 1),)),
        _one("leafguard_start_time_seconds", "gauge", "When this instance started (Unix time).", snap.started_at),
        _one("leafguard_batches", "counter", "Frame batches analysed.", snap.batches),
        # capture
        _one("leafguard_analyzed_frames", "counter", "Frames analysed (live or replayed).", cap.analyzed_frames),
        _one("leafguard_analyzed_bytes", "counter", "Wire bytes of the frames analysed.", cap.analyzed_bytes),
        _one("leafguard_decode_errors", "counter", "Frames that could not be decoded.", cap.decode_errors),
        _one("leafguard_truncated_frames", "counter", "Frames cut short by the snap length.", cap.truncated_frames),
    ]
    per_if = [
        ("leafguard_capture_frames", "counter", "Frames read from the interface's ring.", "frames"),
        ("leafguard_capture_bytes", "counter", "Wire bytes of those frames.", "bytes"),
        ("leafguard_capture_kernel_drops", "counter", "Frames the kernel dropped (ring full).", "kernel_drops"),
        ("leafguard_capture_queue_drops", "counter", "Frames dropped by the batch queue's policy.", "queue_drops"),
        ("leafguard_capture_restarts", "counter", "Capture reopened after an error.", "restarts"),
    ]
    for name, kind, help_text, field in per_if:
        samples = tuple(Sample((("interface", i.name),), getattr(i, field)) for i in cap.interfaces)
        out.append(Family(name, kind, help_text, samples))
    out.append(
        Family(
            "leafguard_capture_up",
            "gauge",
            "1 while the interface's capture is running.",
            tuple(Sample((("interface", i.name),), i.running) for i in cap.interfaces),
        )
    )
    if cap.live:
        out.append(
            _one("leafguard_capture_down_seconds", "gauge", "Seconds with no interface running.", cap.down_for_s or 0)
        )
    out += [
        # leaves
        _one("leafguard_leaves_seen", "gauge", "Leaves in the inventory.", leaves.seen),
        _one("leafguard_leaves_named", "gauge", "Leaves the leaf map names (twin identity).", leaves.named),
        _one("leafguard_leaves_managed", "gauge", "Leaves with a hub identity of their own.", leaves.managed),
        _one("leafguard_leaves_unmanaged", "gauge", "Leaves sent for by the gateway module.", leaves.unmanaged),
        _one("leafguard_leaf_agents", "gauge", "Defender agents (one per active leaf).", leaves.agents),
        _one(
            "leafguard_leaf_refused_observations",
            "counter",
            "Observations of leaves beyond the agent limit.",
            leaves.refused_observations,
        ),
        Family(
            "leafguard_leaf_connected",
            "gauge",
            "1 while the leaf's own hub connection is up (per-leaf identities).",
            tuple(Sample((("leaf", c.identity), ("state", c.state)), c.connected) for c in leaves.connections),
        ),
    ]
    for name, kind, help_text, field in (
        ("leafguard_leaf_messages_sent", "counter", "Messages acknowledged on the leaf's own connection.", "sent"),
        ("leafguard_leaf_messages_dropped", "counter", "Messages the leaf's own outbox dropped.", "dropped"),
        ("leafguard_leaf_queue_messages", "gauge", "Messages waiting on the leaf's own connection.", "queued"),
        ("leafguard_leaf_reconnects", "counter", "Connections of the leaf re-established after a loss.", "reconnects"),
    ):
        samples = tuple(Sample((("leaf", c.identity),), getattr(c, field)) for c in leaves.connections)
        out.append(Family(name, kind, help_text, samples))
    # agents, per priority queue
    for name, kind, help_text, field in (
        ("leafguard_agent_events_generated", "counter", "Events the agents generated.", "generated"),
        ("leafguard_agent_events_sent", "counter", "Events sent in security messages.", "sent"),
        ("leafguard_agent_events_dropped", "counter", "Events dropped by the agents' cache policy.", "dropped"),
        ("leafguard_agent_events_pending", "gauge", "Events waiting in the agents' queues.", "pending"),
    ):
        samples = tuple(Sample((("priority", p.priority),), getattr(p, field)) for p in agents.by_priority)
        out.append(Family(name, kind, help_text, samples))
    out.append(_one("leafguard_agent_messages", "counter", "Security messages built.", agents.messages))
    # uplink
    up = snap.uplink
    if up is not None:
        for name, kind, help_text, value in (
            ("leafguard_uplink_connected", "gauge", "1 while connected to the edge hub.", up.connected),
            ("leafguard_uplink_down_seconds", "gauge", "Seconds the uplink has been down.", up.down_for_s or 0),
            ("leafguard_uplink_messages_sent", "counter", "Messages the edge hub acknowledged.", up.messages_sent),
            ("leafguard_uplink_bytes_sent", "counter", "Body bytes of those messages.", up.bytes_sent),
            ("leafguard_uplink_send_failures", "counter", "Sends failed or unacknowledged.", up.send_failures),
            ("leafguard_uplink_messages_dropped", "counter", "Messages dropped by the outbox.", up.messages_dropped),
            ("leafguard_uplink_bytes_dropped", "counter", "Body bytes of those messages.", up.bytes_dropped),
            ("leafguard_uplink_messages_resent", "counter", "Sent again after a break.", up.messages_resent),
            ("leafguard_uplink_queue_messages", "gauge", "Messages awaiting acknowledgement.", up.queue_messages),
            ("leafguard_uplink_queue_bytes", "gauge", "Body bytes awaiting acknowledgement.", up.queue_bytes),
            ("leafguard_uplink_reconnects", "counter", "Connections re-established after a loss.", up.reconnects),
            ("leafguard_uplink_reported_failures", "counter", "Reported-properties patches that failed.",
             up.reported_failures),
            ("leafguard_uplink_reported_refused", "counter", "Reported-properties patches the hub refused.",
             up.reported_refused),
            ("leafguard_uplink_alerts_dropped", "counter", "Alerts in alert messages the outbox dropped.",
             up.alerts_dropped),
            ("leafguard_uplink_durable", "gauge", "1 when queued messages are spooled in the data directory.",
             up.durable),
            ("leafguard_uplink_spool_disk_bytes", "gauge", "Bytes of the spool's segment files.", up.spool_disk_bytes),
            ("leafguard_uplink_spool_corrupt_records", "counter", "Spool records found corrupt and skipped.",
             up.spool_corrupt_records),
            ("leafguard_uplink_spool_torn_records", "counter", "Spool records found cut short and skipped.",
             up.spool_torn_records),
            ("leafguard_uplink_spool_lost_messages", "counter", "Messages lost with corrupt or torn records.",
             up.spool_lost_to_corruption),
        ):
            out.append(_one(name, kind, help_text, value))
    if up is not None:
        out.append(
            Family(
                "leafguard_method_calls",
                "counter",
                "Direct-method calls handled, by method and status.",
                tuple(Sample((("method", m.method), ("status", str(m.status))), m.count) for m in snap.methods),
            )
        )
    # the saved state and its journal
    state = snap.state
    if state is not None:
        for name, kind, help_text, value in (
            ("leafguard_state_saves", "counter", "State saves written.", state.saves),
            ("leafguard_state_save_failures", "counter", "State saves that failed.", state.save_failures),
            ("leafguard_state_last_save_seconds", "gauge", "Time the last state save took.", state.last_save_s),
            ("leafguard_state_restored_agents", "gauge", "Agents restored from the saved state at start-up.",
             state.restored_agents),
            ("leafguard_state_journal_inputs", "counter", "Agent inputs journalled.", state.journal_inputs),
            ("leafguard_state_journal_replayed_inputs", "gauge", "Journalled inputs applied again at start-up.",
             state.journal_replayed),
            ("leafguard_state_journal_write_failures", "counter", "Journal writes that failed.",
             state.journal_write_failures),
            ("leafguard_state_problem", "gauge", "1 when a state file or journal was ignored or damaged, or a save "
             "failed (stats: state.error, state.journal.error).", state.problem),
        ):
            out.append(_one(name, kind, help_text, value))
    # alerts
    out += [
        Family(
            "leafguard_alerts",
            "counter",
            "LeafGuard alerts raised, by type.",
            tuple(Sample((("type", a.type),), a.count) for a in alerts.by_type),
        ),
        _one("leafguard_alerts_dropped", "counter", "Alerts beyond the retained limit.", alerts.dropped),
        _one("leafguard_alerts_suppressed", "counter", "Alerts held back by rate limits.", alerts.suppressed),
        _one("leafguard_alerts_muted", "counter", "Alerts dropped by a mute rule.", alerts.muted),
    ]
    return out


def render_snapshot(snap: ServiceSnapshot) -> str:
    return render(families(snap), snap.labels.as_pairs())
