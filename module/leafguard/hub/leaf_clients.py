"""`LeafClients`: the supervisor of every managed leaf's :class:`~leafguard.hub.leaf_link.LeafLink`.

Which leaves are managed follows the leaf map (object entries, :mod:`leafguard.hub.leaves`) and the credentials
(:mod:`leafguard.hub.credentials`, re-read every ``CREDENTIALS_POLL_S``): adding, removing or renaming a managed
leaf, changing its identity mode or its key starts and stops the right links live. A link is replaced only once
the old one has stopped: two clients of one identity would keep kicking each other off the hub.

A failing leaf never blocks another: each link is its own task (``leafguard.leaf[<device>]``, children of
:meth:`run`'s TaskGroup), with its own outbox. The edge hub's CA comes from the workload API's trust bundle (as
the module client gets it), or from ``EdgeModuleCACertificateFile`` in local development; it is fetched once,
bounded, and again with backoff until it is had.

Cost. Each SDK client adds a paho network thread and a SAS-renewal alarm thread (iothub-protocol.md §1.4);
``benchmarks/leaf_twins.py`` measures threads and RSS for 100 leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from azure.iot.device.iothub.edge_hsm import IoTEdgeError

from leafguard.agent.messages import OutgoingMessage
from leafguard.hub.credentials import LeafCredentials
from leafguard.hub.leaf_link import (
    ClientFactory,
    DesiredHandler,
    LeafLink,
    LeafState,
    LeafTarget,
    default_client_factory,
)
from leafguard.hub.leaves import LeafEntry
from leafguard.hub.link import Backoff
from leafguard.hub.outbox import Pending
from leafguard.hub.settings import EdgeSettings
from leafguard.hub.spool import SpoolSettings
from leafguard.hub.twin import bounded
from leafguard.service.snapshot import LeafConnection

log = logging.getLogger("leafguard.hub.leaf")

CREDENTIALS_POLL_S = 2.0
LEAF_STOP_DEADLINE_S = 5.0
"""A leaf removed from the leaf map (or re-keyed) gets this long to send what it has queued."""
LEAVES_DIR = "leaves"
"""Where the managed leaves' own spools live in the data directory, a folder per device id."""
CA_TIMEOUT_S = 15.0
SUMMARY_LEAVES = 50
"""Managed leaves listed by name in the gateway's reported summary; the rest are counted."""
SUMMARY_BYTES = 12 * 1024
NAMES_BYTES = 3 * 1024
"""Byte budgets of the summary's lists (the hub's size rule): with the unmanaged leaves' 8 KB and the rest of the
health section they keep the gateway twin's reported section under 32 KB whatever the number or names of leaves."""
ERROR_CHARS = 200
"""A leaf's last error in the summary is cut to this (SDK reprs can be long): 50 leaves stay within ~15 KB."""


def workload_trust_bundle(settings: EdgeSettings) -> str:
    """The edge hub's CA (blocking): ``EdgeModuleCACertificateFile``, else the workload API's trust bundle,
    fetched the way the SDK does for the module client (unix socket or HTTP)."""
    if settings.ca_file is not None:
        return settings.ca_file.read_text()
    from azure.iot.device.iothub.edge_hsm import IoTEdgeHsm

    hsm = IoTEdgeHsm(settings.module_id, settings.module_generation_id, settings.workload_uri,  # type: ignore[no-untyped-call]
                     settings.api_version)
    return str(hsm.get_certificate())  # type: ignore[no-untyped-call]


class LeafClients:
    """Every managed leaf's link; call everything but :meth:`run` and :meth:`shutdown` on the loop, sync."""

    def __init__(self, edge: EdgeSettings, *, on_desired: DesiredHandler,
                 on_dropped: Callable[[Pending], None] | None = None,
                 client_factory: ClientFactory = default_client_factory,
                 ca_loader: Callable[[EdgeSettings], str] = workload_trust_bundle,
                 spool: SpoolSettings | None = None) -> None:
        """``spool``: the data directory's spool settings; each managed leaf then has its own spool under
        ``DATA_DIR/leaves/<device id>/`` with the leaf outbox's budget."""
        self.edge = edge
        self._spool = spool
        self.settings = edge.leaves
        self.credentials = LeafCredentials(self.settings.secrets_path, self.settings.group_key_path)
        self.on_desired = on_desired
        self.on_dropped = on_dropped
        self._factory = client_factory
        self._ca_loader = ca_loader
        self._ca_pem: str | None = None
        self._entries: dict[str, LeafEntry] = {}
        """Managed candidates (object entries of the leaf map), by device id."""
        self.links: dict[str, LeafLink] = {}
        self._stopping_links: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._closing = asyncio.Event()
        self._changed = asyncio.Event()
        self._entries_generation = 0
        self._settled_generation = 0
        """The leaf map generation the links were last reconciled with (or could not be: no CA)."""
        self.unmanaged_candidates: list[str] = []
        """Object entries without credentials: listed for the operator (they stay on the gateway's path)."""

    def _leaf_spool(self, device_id: str) -> SpoolSettings | None:
        if self._spool is None:
            return None
        # Device ids may hold characters a file name should not ('%', '*', '?'...): quoted, one folder each.
        folder = self._spool.directory / LEAVES_DIR / urllib.parse.quote(device_id, safe="")
        return dataclasses.replace(self._spool, directory=folder, max_bytes=self.settings.outbox_max_bytes)

    # -- the service side ------------------------------------------------------------------------------------

    def set_entries(self, entries: Mapping[str, LeafEntry]) -> None:
        """The leaf map changed: its object entries are the managed candidates."""
        self._entries = {e.device_id: e for e in entries.values() if e.managed}
        self._entries_generation += 1
        self._changed.set()

    def settled(self) -> bool:
        """Every managed leaf of the current leaf map has its link (a message built now goes the right way)."""
        return self._settled_generation == self._entries_generation

    def entry(self, identity: str) -> LeafEntry | None:
        """The leaf map's entry of a managed candidate (its ``ip``, for the inventory)."""
        return self._entries.get(identity)

    def manages(self, identity: str) -> bool:
        return identity in self.links

    def submit(self, messages: Iterable[OutgoingMessage]) -> list[OutgoingMessage]:
        """Hand each managed leaf's messages to its link; returns the others (for the gateway's output)."""
        rest: list[OutgoingMessage] = []
        by_leaf: dict[str, list[OutgoingMessage]] = {}
        for message in messages:
            if message.identity in self.links and getattr(message, "output", None) is None:
                by_leaf.setdefault(message.identity, []).append(message)
            else:
                rest.append(message)
        for identity, batch in by_leaf.items():
            self.links[identity].submit(batch)
        return rest

    def queued(self) -> int:
        """Messages waiting in the managed leaves' outboxes."""
        return sum(len(link.outbox) for link in self.links.values())

    async def wait_sent(self, timeout_s: float) -> bool:
        """Whether every managed leaf's outbox empties within ``timeout_s`` (the ``flush`` method's ``waitS``)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while True:
                    if not self.queued():
                        return True
                    # Each link acknowledges on its own; looking every 50 ms is cheaper than an event per link.
                    await asyncio.sleep(0.05)
        return not self.queued()

    def report(self, identity: str, config: dict[str, Any] | None, inventory: dict[str, Any] | None) -> None:
        link = self.links.get(identity)
        if link is not None:
            link.report(config, inventory)

    def desired_outcome(self, identity: str, accepted: bool) -> None:
        link = self.links.get(identity)
        if link is not None:
            link.desired_outcome(accepted)

    def states(self) -> dict[str, int]:
        return dict(Counter(link.state.value for link in self.links.values()))

    def summary(self) -> dict[str, Any]:
        """The gateway twin's bounded view: counts by state, then the leaves by name with state and counters, those
        not connected first (what an operator has to act on), as many as fit in ``SUMMARY_BYTES``."""
        order = sorted(self.links, key=lambda n: (self.links[n].state is LeafState.CONNECTED, n))
        shown = bounded(((name, {k: v[:ERROR_CHARS] if isinstance(v, str) and k == "last_error" else v
                                 for k, v in self.links[name].counters().items()
                                 if k in ("state", "mode", "sent", "dropped", "queued", "last_error", "reconnects")})
                         for name in order), SUMMARY_LEAVES, SUMMARY_BYTES)
        missing = sorted(self.unmanaged_candidates)
        listed = list(bounded(((name, True) for name in missing), SUMMARY_LEAVES, NAMES_BYTES))
        out: dict[str, Any] = {"count": len(order), "states": self.states(), "leaves": shown,
                               "notShown": len(order) - len(shown), "withoutCredentials": listed,
                               "withoutCredentialsNotShown": len(missing) - len(listed)}
        if self.credentials.errors:
            out["credentialErrors"] = {k: v[:ERROR_CHARS] for k, v in self.credentials.errors.items()}
        return out

    def managed_macs(self) -> list[str]:
        """MACs of the leaves with a link (for metrics and getInventory)."""
        return sorted(self._entries[d].mac for d in self.links if d in self._entries)

    def leaf_connections(self) -> list[LeafConnection]:
        """For ``/metrics`` (``leafguard_leaf_connected{leaf,state}``)."""
        return [LeafConnection(link.target.identity, link.state.value, link.state is LeafState.CONNECTED,
                               sent=link.outbox.stats.acked, dropped=link.outbox.stats.dropped,
                               queued=len(link.outbox), reconnects=link.stats.reconnects)
                for link in self.links.values()]

    def counters(self) -> dict[str, dict[str, Any]]:
        return {name: link.counters() for name, link in sorted(self.links.items())}

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the links in line with the leaf map and the credentials until :meth:`shutdown`."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                await self._supervise()
            finally:
                self._tg = None

    async def _supervise(self) -> None:
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        while not self._closing.is_set():
            generation = self._entries_generation
            if self.credentials.reload():
                for link in self.links.values():
                    link.retry()
            if self._ca_pem is None and self._entries:
                try:
                    async with asyncio.timeout(CA_TIMEOUT_S):
                        self._ca_pem = await asyncio.to_thread(self._ca_loader, self.edge)
                except (TimeoutError, OSError, ValueError, IoTEdgeError) as exc:
                    log.warning("cannot get the edge hub's CA for the leaf clients: %r", exc)
                    # Their messages go by the gateway meanwhile, rather than wait for a CA that may not come.
                    self._settled_generation = generation
                    await self._sleep(backoff.next_delay())
                    continue
            self._reconcile()
            self._settled_generation = generation
            await self._sleep(CREDENTIALS_POLL_S)

    async def _sleep(self, seconds: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._changed.wait()

    def _targets(self) -> dict[str, LeafTarget]:
        out: dict[str, LeafTarget] = {}
        missing: list[str] = []
        for device_id, entry in self._entries.items():
            mode = entry.mode_or(self.settings.default_mode)
            target_module = "azureiotsecurity" if mode.value == "module" else None
            credential = self.credentials.for_leaf(device_id, target_module)
            if credential is None:
                missing.append(device_id)
                continue
            out[device_id] = LeafTarget(device_id, mode, self.edge.hub_hostname, self.edge.gateway_hostname,
                                        credential)
        self.unmanaged_candidates = missing
        return out

    def _reconcile(self) -> None:
        if self._tg is None or self._ca_pem is None or self._closing.is_set():
            return
        wanted = self._targets()
        for device_id, link in list(self.links.items()):
            if wanted.get(device_id) != link.target:
                del self.links[device_id]
                log.info("leaf %s: %s", link.target.identity,
                         "no longer managed" if device_id not in wanted else "identity or key changed, reconnecting")
                self._stopping_links[device_id] = self._tg.create_task(
                    self._stop_link(link), name=f"leafguard.leaf-stop[{device_id}]")
        for device_id, target in wanted.items():
            if device_id in self.links or device_id in self._stopping_links:
                continue  # a replacement waits until the old link has let go of the identity
            link = LeafLink(target, self._ca_pem, self.settings, on_desired=self.on_desired,
                            on_dropped=self.on_dropped, client_factory=self._factory,
                            spool=self._leaf_spool(device_id))
            self.links[device_id] = link
            log.info("leaf %s: managed (%s twin, key from the %s)", target.identity, target.mode.value,
                     target.credential.source)
            self._tg.create_task(link.run(), name=f"leafguard.leaf[{device_id}]")

    async def _stop_link(self, link: LeafLink) -> None:
        try:
            await link.shutdown(LEAF_STOP_DEADLINE_S)
        finally:
            self._stopping_links.pop(link.device_id, None)
            self._changed.set()

    async def shutdown(self, deadline_s: float) -> None:
        """Flush every link against the deadline (all at once), then close them; :meth:`run` ends."""
        self._closing.set()
        self._changed.set()
        links = list(self.links.values())
        if links:
            await asyncio.gather(*(link.shutdown(deadline_s) for link in links))
        for link in links:
            o = link.outbox.stats
            (log.warning if o.dropped else log.info)(
                "leaf %s: %d messages accepted, %d sent, %d dropped", link.target.identity, o.accepted, o.acked,
                o.dropped)
        states = Counter(link.state for link in links)
        if states and set(states) != {LeafState.STOPPED}:
            log.warning("leaf clients not stopped within %.1f s: %s", deadline_s, dict(states))
