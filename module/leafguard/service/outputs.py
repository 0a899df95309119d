"""Where everything the core produces goes, behind one protocol: :class:`LocalOutput` (a folder) and
:class:`EdgeOutput` (the edge hub: the gateway module's transport, the managed leaves' own clients, the spool).

The service calls the same methods in either mode and never asks which one it has: the security messages and twins
of the agents (``after_batch``, ``tick``, ``poll_desired``, ``close``), LeafGuard's alerts (``submit_alerts``),
the gateway settings' document and status, the uplink's lifecycle (``run``, ``shutdown``), and what the saved state
needs to know about the output (``resume``, ``reconcile``, ``position``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from leafguard.agent.config import ConfigOutcome
from leafguard.agent.fleet import Fleet, ViewsProvider
from leafguard.agent.local import LocalAgentOutput
from leafguard.agent.pump import AnalyzerLike
from leafguard.errors import ConfigurationError
from leafguard.hub.leaves import LeafEntry
from leafguard.hub.outbox import Outbox
from leafguard.hub.spool import Spool
from leafguard.service.gateway import UplinkTarget
from leafguard.service.settings import ServiceSettings
from leafguard.service.snapshot import ManagedLeavesSource
from leafguard.service.state import Restored, reconcile

if TYPE_CHECKING:
    from leafguard.hub.leaf_clients import LeafClients
    from leafguard.hub.output import EdgeAgentOutput
    from leafguard.hub.transport import EdgeTransport
    from leafguard.hub.twin import ModuleDesired

log = logging.getLogger("leafguard.service")


class ServiceOutput(Protocol):
    managed_leaves: ManagedLeavesSource | None
    """Managed leaves and their own hub connections (edge mode with leaf credentials)."""

    def after_batch(self, analyzer: AnalyzerLike) -> None: ...

    def tick(self, now: float, views: ViewsProvider | None = None) -> None: ...

    def housekeeping(self, mono: float, replay_clock: float | None) -> None:
        """Every service tick: the spool's fsync policy, alerts that waited long enough, and in a replay the
        messages the agents held while the uplink was behind (``replay_clock``: the replay's clock)."""

    def poll_desired(self, now: float) -> list[tuple[str, ConfigOutcome]]: ...

    @property
    def desired_arrived(self) -> asyncio.Event | None:
        """Set when the hub pushed a desired patch (apply it now, not at the next poll); None: nothing pushes."""

    def module_desired(self) -> ModuleDesired | None:
        """The module twin's desired document (edge mode); None where the settings come from ``gateway.json``."""

    def publish_gateway_status(self, status: Mapping[str, Any], *, refresh: bool = True) -> None:
        """The gateway settings in force (and the state's status) wherever this output reports them; ``refresh``:
        report them soon, not only with the next health report."""

    def set_leaf_entries(self, entries: Mapping[str, LeafEntry]) -> None:
        """The leaf map in force: managed leaves' clients follow it."""

    def submit_alerts(self, alerts: list[dict[str, Any]], mono: float) -> None: ...

    def uplink(self) -> UplinkTarget | None:
        """What the ``intervals`` and ``uplink`` settings change; None: no uplink (local mode)."""

    def uplink_counters(self) -> dict[str, Any] | None: ...

    async def run(self) -> None:
        """The connections, until :meth:`shutdown` ends them."""

    async def shutdown(self, deadline_s: float) -> None:
        """After :meth:`close`: send what is queued within the deadline, then close the connections and files."""

    def close(self, now: float | None) -> None:
        """The agents' final flush."""

    def resume(self, restored: Restored | None, pcap: Path | None) -> int:
        """Where a replay of ``pcap`` resumes after a restored state: the frames to skip (a local replay of the same
        file goes back to where the state was saved: the output is cut back to it); 0: from its start."""

    def reconcile(self, restored: Restored) -> int:
        """Events that reached the output after the state was saved leave the restored caches; returns how
        many."""

    def position(self) -> dict[str, int | None]:
        """Where the output stands now, for the saved state (``StateKeeper.save`` keywords)."""


class LocalOutput:
    """Local mode: messages, twins and desired files in one folder (`LocalAgentOutput`); no uplink."""

    managed_leaves: ManagedLeavesSource | None = None

    def __init__(self, directory: Path, fleet: Fleet) -> None:
        self.fleet = fleet
        self.agents = LocalAgentOutput(directory, fleet)

    def after_batch(self, analyzer: AnalyzerLike) -> None:
        self.agents.after_batch(analyzer)

    def tick(self, now: float, views: ViewsProvider | None = None) -> None:
        self.agents.tick(now, views)

    def housekeeping(self, mono: float, replay_clock: float | None) -> None:
        """Nothing waits: messages are written as they are made."""

    def poll_desired(self, now: float) -> list[tuple[str, ConfigOutcome]]:
        return self.agents.poll_desired(now)

    @property
    def desired_arrived(self) -> asyncio.Event | None:
        return None

    def module_desired(self) -> ModuleDesired | None:
        return None

    def publish_gateway_status(self, status: Mapping[str, Any], *, refresh: bool = True) -> None:
        """``stats.json`` carries the gateway status locally."""

    def set_leaf_entries(self, entries: Mapping[str, LeafEntry]) -> None:
        """No managed leaves locally: the names in the map are the fleet's business."""

    def submit_alerts(self, alerts: list[dict[str, Any]], mono: float) -> None:
        """``alerts.json`` carries them locally."""

    def uplink(self) -> UplinkTarget | None:
        return None

    def uplink_counters(self) -> dict[str, Any] | None:
        return None

    async def run(self) -> None:
        return

    async def shutdown(self, deadline_s: float) -> None:
        return

    def close(self, now: float | None) -> None:
        self.agents.close(now)

    def resume(self, restored: Restored | None, pcap: Path | None) -> int:
        writer = self.agents.messages
        writer.cut_torn_tail()
        if restored is None or restored.messages_offset is None:
            return 0
        replay = restored.replay_of(pcap)
        if replay is not None:
            # The same capture again: back to where the state was saved, and resume the replay there.
            log.info("state: resuming the replay of %s after %d frames; %d lines after them rewritten",
                     pcap, replay.frames, writer.rollback(restored.messages_offset))
            return replay.frames
        return 0

    def reconcile(self, restored: Restored) -> int:
        return reconcile(restored, self.fleet, self.agents.messages, restored.messages_offset)

    def position(self) -> dict[str, int | None]:
        return {"messages_offset": self.agents.messages.offset}


class EdgeOutput:
    """Edge mode: the agents' messages and twins through the edge hub (`EdgeAgentOutput`), over the gateway
    module's transport and the managed leaves' own clients; the spool under both."""

    def __init__(self, agents: EdgeAgentOutput, transport: EdgeTransport, leaves: LeafClients | None,
                 spool: Spool | None, fleet: Fleet) -> None:
        self.agents = agents
        self.transport = transport
        self.leaves = leaves
        self.spool = spool
        self.fleet = fleet
        self.managed_leaves: ManagedLeavesSource | None = leaves

    def after_batch(self, analyzer: AnalyzerLike) -> None:
        self.agents.after_batch(analyzer)

    def tick(self, now: float, views: ViewsProvider | None = None) -> None:
        self.agents.tick(now, views)

    def housekeeping(self, mono: float, replay_clock: float | None) -> None:
        # The spool's fsync interval runs on this clock too (a quiet uplink still gets its fsync).
        self.transport.outbox.commit(mono)
        self.agents.flush_due_alerts(mono)
        if replay_clock is not None:
            # A replay's agents tick with its batches; this tick lets held messages go when the link is back.
            self.agents.tick(replay_clock)

    def poll_desired(self, now: float) -> list[tuple[str, ConfigOutcome]]:
        return self.agents.poll_desired(now)

    @property
    def desired_arrived(self) -> asyncio.Event | None:
        return self.transport.desired_arrived

    def module_desired(self) -> ModuleDesired | None:
        return self.agents.module_desired()

    def publish_gateway_status(self, status: Mapping[str, Any], *, refresh: bool = True) -> None:
        self.agents.publish_gateway_status(status, refresh=refresh)

    def set_leaf_entries(self, entries: Mapping[str, LeafEntry]) -> None:
        if self.leaves is not None:
            self.leaves.set_entries(entries)

    def submit_alerts(self, alerts: list[dict[str, Any]], mono: float) -> None:
        self.agents.submit_alerts(alerts, mono)

    def uplink(self) -> UplinkTarget | None:
        return self.transport

    def uplink_counters(self) -> dict[str, Any] | None:
        return self.transport.counters()

    @classmethod
    def open(cls, settings: ServiceSettings, fleet: Fleet) -> EdgeOutput:
        """The transport over the data directory's spool (replayed now) or a memory outbox, and the managed leaves'
        clients when leaf credentials are configured."""
        from leafguard.hub.leaf_clients import LeafClients
        from leafguard.hub.output import EdgeAgentOutput
        from leafguard.hub.transport import EdgeTransport

        assert settings.edge is not None
        outbox, spool = _open_outbox(settings)
        transport = EdgeTransport(settings.edge, outbox=outbox)
        leaves = None
        if settings.edge.leaves.configured:
            # Managed leaves (their own identity and twin); EdgeAgentOutput takes their callbacks.
            leaves = LeafClients(settings.edge, on_desired=lambda _identity, _doc: None, spool=settings.spool)
        return cls(EdgeAgentOutput(transport, fleet, leaves), transport, leaves, spool, fleet)

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.transport.run(), name="leafguard.hub")
                if self.leaves is not None:
                    tg.create_task(self.leaves.run(), name="leafguard.leaves")
        finally:
            # The connections have let go of the outboxes: the spool's last records can be synced.
            if self.spool is not None:
                self.spool.close(time.monotonic())

    async def shutdown(self, deadline_s: float) -> None:
        # The gateway's outbox and every managed leaf's are flushed at once, against the same deadline; their
        # tasks end with it.
        flushes = [self.transport.shutdown(deadline_s)]
        if self.leaves is not None:
            flushes.append(self.leaves.shutdown(deadline_s))
        await asyncio.gather(*flushes)

    def close(self, now: float | None) -> None:
        self.agents.close(now)

    def resume(self, restored: Restored | None, pcap: Path | None) -> int:
        return 0

    def reconcile(self, restored: Restored) -> int:
        return reconcile(restored, self.fleet, self.transport.outbox, restored.spool_next_seq)

    def position(self) -> dict[str, int | None]:
        return {"spool_next_seq": self.transport.outbox.next_seq}


def _open_outbox(settings: ServiceSettings) -> tuple[Outbox, Spool | None]:
    """The uplink's outbox: journalled in the data directory's spool (replayed now), or in memory."""
    assert settings.edge is not None
    if settings.spool is None:
        log.info("no data directory (--data-dir / LEAFGUARD_DATA_DIR): queued data is held in memory only")
        return Outbox(settings.edge.outbox_max_bytes), None
    try:
        spool, recovery = Spool.open(settings.spool)
    except OSError as exc:
        raise ConfigurationError(
            f"data directory {settings.spool.directory}: {exc.strerror or exc} (check the volume and its owner)"
        ) from exc
    outbox = Outbox(settings.spool.max_bytes, spool)
    outbox.recover(recovery)
    log.info(
        "spool in %s: %d messages (%d bytes) to send from the last run, replayed in %.2f s%s",
        settings.spool.spool_dir,
        len(outbox),
        outbox.bytes,
        recovery.duration_s,
        f"; {recovery.corrupt_records} corrupt and {recovery.torn_records} torn records skipped"
        if recovery.corrupt_records or recovery.torn_records
        else "",
    )
    return outbox, spool
