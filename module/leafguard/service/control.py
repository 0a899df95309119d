"""The service as the direct methods see it: :class:`~leafguard.hub.methods.MethodTarget` over its parts.

Called on the loop only (the transport hands every method call to it), so it reads and changes the analyzer, the
fleet and the outbox like the pipeline does, between batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from bisect import bisect_right
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

from leafguard.agent.fleet import Fleet
from leafguard.agent.messages import OutgoingMessage
from leafguard.detect.muting import parse_rule
from leafguard.errors import ConfigurationError
from leafguard.hub.methods import BadRequest, FlushOutcome, LeafPage, LeafRecord, MuteRequest
from leafguard.hub.transport import EdgeTransport
from leafguard.observe.addresses import mac_text
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.model import identity_for_mac
from leafguard.service.snapshot import ServiceSnapshot

FLUSH_SLICE_S = 0.02
"""``flush`` holds the loop at most about this long at a time."""


class LeafOutlets(Protocol):
    """The managed leaves' own clients (:class:`~leafguard.hub.leaf_clients.LeafClients`): a flushed leaf's
    messages go over its own identity, as every other message of it does."""

    def submit(self, messages: Iterable[OutgoingMessage]) -> list[OutgoingMessage]: ...

    def queued(self) -> int: ...

    async def wait_sent(self, timeout_s: float) -> bool: ...


class ServiceControl:
    def __init__(
        self,
        *,
        analyzer: Analyzer,
        fleet: Fleet,
        transport: EdgeTransport,
        snapshot: Callable[[], ServiceSnapshot],
        clock: Callable[[], float | None],
        managed_macs: Callable[[], Collection[str]] = tuple,
        leaves: LeafOutlets | None = None,
    ) -> None:
        self.analyzer = analyzer
        self.leaves = leaves
        self._managed_macs = managed_macs
        self.fleet = fleet
        self.transport = transport
        self._snapshot = snapshot
        self._clock = clock
        """The agents' clock: the wall clock when capturing live, packet time in a replay (None before a frame)."""

    def leaf_page(self, after: str | None, limit: int) -> LeafPage:
        # Sorting the raw 6-byte keys is a C sort; only the page is turned into text. Fixed-width lowercase hex
        # keeps the byte order, so a text cursor and the byte order agree.
        a = self.analyzer
        keys = sorted(key for key, st in a.macs.items() if a.is_leaf(st))
        start = bisect_right(keys, bytes.fromhex(after.replace(":", ""))) if after is not None else 0
        page = keys[start : start + limit]
        return LeafPage([mac_text(k) for k in page], len(keys), start + limit < len(keys))

    def leaf(self, mac: str) -> LeafRecord | None:
        doc = self.analyzer.leaf_report(mac)
        if doc is None:
            return None
        doc.pop("mac")
        identity = self.fleet.identity_for(mac)
        agent = self.fleet.agent(identity)
        doc["agent"] = dataclasses.asdict(agent.stats()) if agent is not None else None
        return LeafRecord(
            mac=mac,
            identity=identity,
            named=identity != identity_for_mac(mac),
            managed=mac in self._managed_macs(),
            doc=doc,
        )

    def mac_of_identity(self, identity: str) -> str | None:
        mac = self.fleet.mac_of(identity)
        if mac is not None:
            # Almost every leaf has an agent: found in O(1) (it must still be a leaf now).
            return mac if self.analyzer.leaf_report(mac) is not None else None
        for st in self.analyzer.leaves():
            mac = mac_text(st.mac)
            if self.fleet.identity_for(mac) == identity:
                return mac
        return None

    def stats(self) -> dict[str, Any]:
        return self._snapshot().to_json()

    async def flush(self) -> FlushOutcome:
        # Packing costs about 0.2 ms per agent with queued events (2 s for 10,000 leaves): in slices, so that the
        # pipeline, the uplink and other methods get their turn. An agent flushed in an earlier slice may queue
        # new events meanwhile; they wait for its next message, as they would have after a flush in one go.
        count = 0
        now = self._clock()
        slice_ends = time.monotonic() + FLUSH_SLICE_S
        for mac in self.fleet.macs():
            if now is None:
                break
            messages = self.fleet.flush_leaf(mac, now)
            count += len(messages)
            self.transport.submit(self.leaves.submit(messages) if self.leaves is not None else messages)
            if time.monotonic() >= slice_ends:
                await asyncio.sleep(0)
                now = self._clock()
                slice_ends = time.monotonic() + FLUSH_SLICE_S
        leaves = self.leaves.queued() if self.leaves is not None else 0
        return FlushOutcome(messages=count, queued=len(self.transport.outbox) + leaves)

    async def wait_sent(self, timeout_s: float) -> bool:
        started = time.monotonic()
        sent = await self.transport.wait_sent(timeout_s)
        if self.leaves is None:
            return sent
        return await self.leaves.wait_sent(max(0.0, timeout_s - (time.monotonic() - started))) and sent


class DetectionControl:
    """``mute`` and ``learn`` over the analyzer's detection (:mod:`leafguard.detect.muting`, ``Analyzer.learn``).

    A rule from the method joins the rules in force (one per type and MAC: a new one for the same pair replaces
    it); ``forS`` counts from the detection clock, the wall clock live and packet time in a replay, since expiry
    is judged on the alerts' own times.
    """

    def __init__(self, analyzer: Analyzer, clock: Callable[[], float | None]) -> None:
        self.analyzer = analyzer
        self._clock = clock

    def mute(self, request: MuteRequest) -> dict[str, Any]:
        now = self._clock()
        if now is None:
            now = time.time()
        entry = {
            key: value
            for key, value in (("type", request.type), ("mac", request.mac), ("until", request.until),
                               ("forS", request.for_s))
            if value is not None
        }  # fmt: skip
        muting = self.analyzer.detectors.muting
        try:
            rule = parse_rule(entry, now)
            muting.add(rule)
        except ConfigurationError as exc:
            # The request was valid field by field (methods.parse_mute): what is left is the rule table's limit.
            raise BadRequest("payload", str(exc)) from exc
        return {"muted": rule.to_json(), "rules": muting.in_force(now)}

    def learn(self, mac: str | None) -> int:
        return self.analyzer.learn(mac)
