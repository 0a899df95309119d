"""`EdgeTransport`: LeafGuard's uplink through the edge hub, as the module's own identity.

One ``IoTHubModuleClient`` (``create_from_edge_environment()``) carries everything: the Defender security messages
of every leaf on output ``security`` (routed to ``$upstream`` by the manifest, the leaf named in the
``leafIdentity`` property), the module twin's desired patches in, and coalesced reported properties out.

Threads. azure-iot-device blocks its caller in places (creating the client does HTTP to the workload API;
assigning a receive handler connects and subscribes) and runs handlers on its own threads: blocking calls go
through ``asyncio.to_thread``, handlers only ``loop.call_soon_threadsafe`` onto our loop, and everything else
(outbox, twin state, supervisor) is touched on our loop only.

Tasks (children of :meth:`run`'s TaskGroup, named ``leafguard.hub.*``):

* ``supervisor``: the :class:`~leafguard.hub.link.LinkState` machine. We own reconnection (the client is created
  with ``connection_retry=False, auto_connect=False``), with capped jittered backoff. Warnings are logged on
  transitions only, and an info line when the link recovers.
* ``sender``: up to ``inflight_window`` messages at a time from the :class:`~leafguard.hub.outbox.Outbox`
  (each in its own ``leafguard.hub.send[seq]`` task, children of the sender's TaskGroup), so throughput is not
  one round trip per message. Stalled PUBACKs fill the window and hold the sender (backpressure: the outbox
  fills, within its byte bound, instead of tasks piling up); a send not acknowledged within ``send_timeout_s``
  breaks the connection, and every unacknowledged message is sent again after the reconnect (same ``$.mid``;
  IoT Hub is at-least-once). The MQTT socket has ``TCP_NODELAY`` (:mod:`~leafguard.hub.sockopt`).
* ``method[NAME]``: one per direct-method call (at most ``max_concurrent_methods``; more are answered 503 at
  once): the SDK's handler thread only hands the request to the loop; :attr:`EdgeTransport.method_handler` (the
  :class:`~leafguard.hub.methods.MethodDispatcher`) runs on the loop within ``method_timeout_s`` (else 504), and
  the response goes back through the SDK.
* ``twin``: a twin GET after every (re)connect (it also subscribes the twin response topic; the GET replaces our
  copy of the desired document, so patches missed while disconnected are caught up), and the reported patches.
  It sleeps until something is to be reported (a leaf changed, the health section was refreshed, a reconnect,
  or the health section is due: at most once per ``health_interval_s``), then waits out the rest of
  ``reported_interval_s`` since the last patch, so changes close together go in one patch. Nothing changed:
  no twin operation at all (twin operations are metered and throttled by IoT Hub).

Desired patches are handed to the service as the SDK delivers them: :attr:`EdgeTransport.desired_arrived` is set
for every one, and the service applies them at once (no polling).

A second transport (one client per registered leaf device through the gateway) would plug in next to this one:
:class:`~leafguard.hub.output.EdgeAgentOutput` only uses :meth:`EdgeTransport.submit`,
:meth:`take_desired_updates`, :meth:`report_leaf` and :meth:`request_twin_resync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from azure.iot.device import MethodResponse
from azure.iot.device.aio import IoTHubModuleClient
from azure.iot.device.exceptions import (
    ConnectionDroppedError,
    ConnectionFailedError,
    NoConnectionError,
    OperationCancelled,
    ServiceError,
)

from leafguard.agent.messages import OutgoingMessage
from leafguard.hub.link import Backoff, LinkState
from leafguard.hub.methods import MethodResult
from leafguard.hub.outbox import Outbox, Pending
from leafguard.hub.sdk_calls import (
    SDK_ERRORS,
    SDK_RECONNECT_GRACE_S,
    STABLE_CONNECTION_S,
    SdkCalls,
)
from leafguard.hub.settings import EdgeSettings
from leafguard.hub.sockopt import enable_tcp_nodelay
from leafguard.hub.twin import ReportedPatch, ReportedState, twin_size

log = logging.getLogger("leafguard.hub")

LEAF_IDENTITY_PROPERTY = "leafIdentity"
TWIN_RETRY_S = 5.0
"""After a failed twin request (GET or reported patch): the pause before the next try (IoT Hub throttles twins)."""


MethodHandler = Callable[[str, object], Awaitable[MethodResult]]
"""Answers one direct method call: ``(name, payload)`` → status and JSON payload."""


class DesiredOverflow(enum.Enum):
    """What happens when desired updates arrive faster than the service applies them."""

    RESYNC = "resync"
    """Drop the update and fetch the whole twin again (nothing is lost: the GET carries every change)."""


@dataclass(frozen=True, slots=True)
class DesiredUpdate:
    """A desired document from the hub: a patch (with ``$version``), or the whole document from a twin GET."""

    doc: dict[str, Any]
    whole: bool


@dataclass(slots=True)
class TransportStats:
    connects: int = 0
    reconnects: int = 0
    clients_replaced: int = 0
    """SDK clients given up because they could not even disconnect (see ``BROKEN_DISCONNECT_S``)."""
    send_timeouts: int = 0
    send_errors: int = 0
    desired_updates: int = 0
    desired_overflows: int = 0
    reported_patches: int = 0
    reported_failures: int = 0
    """Reported patches that failed, for any reason (refused, timed out, connection lost)."""
    reported_refused: int = 0
    """Of those, the ones the hub answered with an error status (e.g. the merged section over 32 KB)."""
    last_reported_error: str | None = None
    """The reason of the last failed reported patch, with its UTC time; kept after recovery (it is history)."""
    unsent_at_shutdown: int = 0
    """Messages not sent by the shutdown deadline and lost with the process (no data directory)."""
    spooled_at_shutdown: int = 0
    """Messages not sent by the shutdown deadline that stay in the spool for the next run (data directory)."""
    method_calls: int = 0
    method_timeouts: int = 0
    method_busy: int = 0
    """Calls answered 503 because ``max_concurrent_methods`` were in progress (overflow policy: reject)."""
    method_response_failures: int = 0


def default_client_factory(settings: EdgeSettings) -> Any:
    """The module client from the ``IOTEDGE_*`` environment (blocking: HTTP to the workload API)."""
    return IoTHubModuleClient.create_from_edge_environment(
        connection_retry=False, auto_connect=False, keep_alive=settings.keep_alive_s
    )


class EdgeTransport:
    """The module's one connection to the edge hub: security messages out, module twin in and out."""

    def __init__(
        self,
        settings: EdgeSettings,
        *,
        on_dropped: Callable[[Pending], None] | None = None,
        health: Callable[[], dict[str, Any]] | None = None,
        client_factory: Callable[[EdgeSettings], Any] = default_client_factory,
        outbox: Outbox | None = None,
    ) -> None:
        self.settings = settings
        sdk_log = logging.getLogger("azure.iot.device")
        if sdk_log.level == logging.NOTSET:
            # The SDK logs three INFO lines per message sent; its warnings and errors are what matter here.
            sdk_log.setLevel(logging.WARNING)
        self.outbox = outbox if outbox is not None else Outbox(settings.outbox_max_bytes)
        """In memory, or journalled in the data directory's spool (the service opens and recovers it)."""
        self.reported = ReportedState()
        self.stats = TransportStats()
        self.state = LinkState.DISCONNECTED
        self.on_dropped = on_dropped
        """Called (on the loop) for every message the outbox drops; the service reports it to the leaf's agent."""
        self.health = health
        """Returns the ``leafguard`` health section of the reported properties."""
        self.method_handler: MethodHandler | None = None
        """Answers direct methods (on the loop); None: the module does not subscribe to methods."""
        self._methods_in_progress: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._client_factory = client_factory
        self._client: Any = None
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._desired: asyncio.Queue[DesiredUpdate] = asyncio.Queue(settings.desired_queue_max)
        self.desired_arrived = asyncio.Event()
        """Set (on the loop) whenever a desired update is queued: the service applies it without waiting."""
        self._report_wake = asyncio.Event()
        """Set when there may be something to report: the twin task sleeps on it."""
        self._accepting = True
        self._wake = asyncio.Event()
        """Set when the outbox gets a message or the link comes up; the sender waits on it."""
        self._up = asyncio.Event()
        self._broken = asyncio.Event()
        self._broken_reason = ""
        self._force_disconnect = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = asyncio.Event()
        self._stopped = asyncio.Event()
        self._send_scopes: set[asyncio.Timeout] = set()
        self._sdk = SdkCalls("leafguard.hub", "hub")
        """Sends we stopped waiting for (timeout, broken link); the SDK still owns their PUBLISH."""
        self._epoch = 0
        """Counts successful connects; the twin task fetches the twin once per epoch."""
        self._twin_epoch = -1
        self._resync = False
        self._last_reported = float("-inf")
        self._last_health = float("-inf")
        self._health_wanted = False
        """A state an operator sees changed: the health section goes with the next patch. A flag, not a reset of
        ``_last_health``, so that a refresh during a patch in flight is not undone by that patch's completion."""
        self._reported_failing = 0
        """Reported patches failed in a row (the first one of a run of failures is a warning)."""
        self._down_since: float | None = None
        self._connected_at = 0.0
        self._loss_timer: asyncio.TimerHandle | None = None
        self._failed_attempts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._creating: asyncio.Task[Any] | None = None

    # -- the service side (call on the loop) -----------------------------------------------------------------

    def set_budget(self, max_bytes: int) -> None:
        """A new outbox (or spool) budget while running; what no longer fits is dropped by the policy and
        reported as any other drop."""
        for dropped in self.outbox.set_max_bytes(max_bytes):
            self._dropped(dropped)

    def set_reported_interval(self, seconds: float) -> None:
        """The least time between reported patches, from the next patch on."""
        self.settings = dataclasses.replace(self.settings, reported_interval_s=seconds)

    def submit(self, messages: Iterable[OutgoingMessage]) -> None:
        """Queue messages for sending (never blocks); drops per the outbox policy are reported to ``on_dropped``."""
        spooled = self.outbox.spool is not None
        for message in messages:
            if not self._accepting and not spooled:
                # Shutting down without a data directory: nothing after the final flush can be sent.
                self._dropped(self.outbox.reject(message))
                continue
            # With a data directory, late messages still go into the spool: the next run sends them.
            for dropped in self.outbox.put(message):
                self._dropped(dropped)
        self.outbox.commit(time.monotonic())
        if len(self.outbox):
            self._drained.clear()
            self._wake.set()

    def take_desired_updates(self) -> list[DesiredUpdate]:
        """The desired updates received since the last call, oldest first."""
        out: list[DesiredUpdate] = []
        while not self._desired.empty():
            out.append(self._desired.get_nowait())
        return out

    def request_twin_resync(self) -> None:
        """Fetch the whole twin again (a desired patch was missed)."""
        self._resync = True
        self._report_wake.set()

    def report_leaf(self, identity: str, reported: dict[str, Any]) -> None:
        """A leaf's reported properties changed: they go out with the next coalesced patch."""
        self.reported.update_leaf(identity, reported)
        self._report_wake.set()

    def remove_leaf(self, identity: str) -> None:
        """A leaf identity is no longer used: its reported entry is removed with the next patch."""
        self.reported.remove_leaf(identity)
        self._report_wake.set()

    async def wait_sent(self, timeout_s: float) -> bool:
        """Whether the outbox empties (every message acknowledged) within ``timeout_s``; True at once if empty."""
        if not len(self.outbox):
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    def congested(self) -> bool:
        """The uplink is down, or behind: a whole window of messages waits behind the window in flight. The agents
        then hold their timed sends (events wait in their caches, messages fill up: fewer, fuller messages)."""
        if self.state is not LinkState.CONNECTED:
            return True
        return len(self.outbox) - self.outbox.in_flight >= self.settings.inflight_window

    def refresh_health(self) -> None:
        """Report the health section with the next reported patch (something an operator set changed)."""
        self._health_wanted = True
        self._report_wake.set()

    def counters(self) -> dict[str, Any]:
        """The uplink's state and counters (health section, metrics)."""
        o = self.outbox.stats
        spool = self.outbox.spool
        durable: dict[str, Any] = {"durable": spool is not None}
        if spool is not None:
            c = spool.counters
            durable |= {
                "spool_disk_bytes": spool.disk_bytes,
                "spool_corrupt_records": c.corrupt_records,
                "spool_torn_records": c.torn_records,
                "spool_lost_to_corruption": c.lost_to_corruption,
                "spool_fsyncs": spool.fsyncs,
                "drops_not_yet_reported": sum(c.unreported.values()),
            }
        return durable | {
            "state": self.state.value,
            "generated": o.accepted,
            "queued": len(self.outbox),
            "queued_bytes": self.outbox.bytes,
            "max_bytes": self.outbox.max_bytes,
            "in_flight": self.outbox.in_flight,
            "sent": o.acked,
            "sent_bytes": o.acked_bytes,
            "dropped": o.dropped,
            "dropped_bytes": o.dropped_bytes,
            "resent": o.resent,
            "alerts_dropped": o.alerts_dropped,
            "leaves_not_reported": self.reported.left_out,
            "leaves_not_reported_names": self.reported.left_out_names(),
            "reported_trims": self.reported.trims,
            "reported_bytes": self.reported.hub_size_bytes,
        } | dataclasses.asdict(self.stats)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Supervise the connection, send, and sync the twin until :meth:`shutdown`."""
        self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tasks = [
                    tg.create_task(self._supervise(), name="leafguard.hub.supervisor"),
                    tg.create_task(self._send_loop(), name="leafguard.hub.sender"),
                    tg.create_task(self._twin_loop(), name="leafguard.hub.twin"),
                ]
                await self._closing.wait()
                for task in [*tasks, *self._methods_in_progress]:
                    task.cancel()
        finally:
            self._tg = None
            self._cancel_loss_timer()
            self._stopped.set()
            if not self._closing.is_set():
                # Torn down without shutdown() (the service is failing): still release the SDK's threads.
                await self._close_client(5.0)

    async def shutdown(self, deadline_s: float) -> None:
        """Stop accepting, flush the outbox (and the reported properties) until ``deadline_s``, close the client.

        What is still queued at the deadline stays in the spool (data directory: ``spooled_at_shutdown``, sent
        by the next run with the same ids) or is lost (``unsent_at_shutdown``); either way it is logged, counted
        and in the last reported health section (a fifth of the deadline is kept for that patch).
        """
        self._accepting = False
        started = time.monotonic()
        try:
            async with asyncio.timeout(deadline_s * 0.8):
                await self._drained.wait()
        except TimeoutError:
            left = len(self.outbox)
            spooled = self.outbox.spool is not None
            if spooled:
                self.stats.spooled_at_shutdown = left
            else:
                self.stats.unsent_at_shutdown = left
            log.warning(
                "shutdown deadline (%.1f s): %d messages (%d bytes) not sent%s",
                deadline_s,
                left,
                self.outbox.bytes,
                ", kept in the spool for the next run" if spooled else ", lost (no data directory)",
            )
        try:
            async with asyncio.timeout(max(0.5, deadline_s - (time.monotonic() - started))):
                await self._flush_reported()
        except TimeoutError:
            log.warning("shutdown deadline (%.1f s): the last reported patch did not complete", deadline_s)
        self._closing.set()
        if self._loop is not None:
            try:
                async with asyncio.timeout(deadline_s):
                    await self._stopped.wait()
            except TimeoutError:
                log.warning("the hub transport's tasks did not stop within %.1f s", deadline_s)
        await self._close_client(max(1.0, deadline_s - (time.monotonic() - started)))
        self._set_state(LinkState.DISCONNECTED)

    async def _close_client(self, timeout_s: float) -> None:
        client, self._client = self._client, None
        creating, self._creating = self._creating, None
        if client is None and creating is not None:
            # A creation still running in its thread: wait for it, so that its client is shut down too.
            with contextlib.suppress(TimeoutError, OSError, *SDK_ERRORS):
                async with asyncio.timeout(timeout_s):
                    client = await asyncio.shield(creating)
            self._sdk.keep(creating)
        if client is None:
            return
        await self._sdk.shut_down(client, timeout_s)

    # -- supervisor ------------------------------------------------------------------------------------------

    def _set_state(self, new: LinkState) -> None:
        old, self.state = self.state, new
        if new is LinkState.CONNECTED:
            self._up.set()
            self._wake.set()
        else:
            self._up.clear()
        log.debug("uplink %s -> %s", old.value, new.value)

    def _link_broken(self, reason: str, *, force: bool) -> None:
        """Called on the loop when the connection is found broken (SDK state, send failure or timeout)."""
        if self.state is not LinkState.CONNECTED or self._broken.is_set():
            return
        self._cancel_loss_timer()
        self._broken_reason = reason
        self._force_disconnect = force
        self._broken.set()
        self._up.clear()
        now = asyncio.get_running_loop().time()
        for scope in self._send_scopes:
            if not scope.expired():
                # Abandon the sends in progress now; they stay in the outbox and go again after the reconnect.
                scope.reschedule(now)

    async def _supervise(self) -> None:
        while True:
            if self.state is LinkState.DISCONNECTED:
                self._set_state(LinkState.CONNECTING)
            elif self.state is LinkState.CONNECTING:
                try:
                    await self._connect()
                except (TimeoutError, OSError, *SDK_ERRORS) as exc:
                    self._failed_attempts += 1
                    if self._failed_attempts == 1:
                        log.warning("cannot connect to the edge hub (%r); retrying with backoff", exc)
                    else:
                        log.debug("connect attempt %d failed: %r", self._failed_attempts, exc)
                    self._set_state(LinkState.BACKOFF)
                else:
                    self._on_connected()
            elif self.state is LinkState.BACKOFF:
                await asyncio.sleep(self._backoff.next_delay())
                self._set_state(LinkState.CONNECTING)
            else:
                await self._broken.wait()
                self._down_since = time.monotonic()
                log.warning("uplink to the edge hub lost: %s", self._broken_reason)
                # A connection that did not stay up for a while does not reset the backoff: a hub that accepts
                # and then drops us at once must not be hammered in a tight loop.
                stable = self._down_since - self._connected_at >= STABLE_CONNECTION_S
                if stable:
                    self._backoff.reset()
                self._set_state(LinkState.DISCONNECTED if stable else LinkState.BACKOFF)
                if self._force_disconnect:
                    await self._disconnect_quietly()

    def _on_connected(self) -> None:
        self.stats.connects += 1
        self._epoch += 1
        self._connected_at = time.monotonic()
        if self._down_since is not None:
            self.stats.reconnects += 1
            self._health_wanted = True  # a state change: the health section shows it now
            log.info(
                "uplink recovered after %.1f s (%d failed attempts); %d messages queued",
                self._connected_at - self._down_since,
                self._failed_attempts,
                len(self.outbox),
            )
        else:
            log.info(
                "connected to the edge hub as %s%s",
                self.settings.identity,
                f" after {self._failed_attempts} failed attempts" if self._failed_attempts else "",
            )
        self._down_since = None
        self._failed_attempts = 0
        # Only here, with no await since connect() returned: a drop reported from now on is a new one.
        self._broken.clear()
        self._set_state(LinkState.CONNECTED)
        self._report_wake.set()

    async def _create_client(self) -> Any:
        """The one client, created once. A creation that outlives a connect attempt is awaited again by the next
        one, never started twice: two clients of one identity would keep kicking each other off the hub."""
        if self._client is not None:
            return self._client
        if self._creating is None:
            self._creating = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._client_factory, self.settings), name="leafguard.hub.create_client"
            )
        creating = self._creating
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                client = await asyncio.shield(creating)
        except BaseException:
            if creating.done():
                self._creating = None
            raise
        self._creating = None
        self._client = client
        # A client-event handler, not a receive handler: assigning it does not connect.
        client.on_connection_state_change = self._sdk_state_changed
        enable_tcp_nodelay(client)
        return client

    async def _connect(self) -> None:
        s = self.settings
        client = await self._create_client()
        await self._sdk.call(client.connect(), s.connect_timeout_s, "connect")
        try:
            # Assigning a receive handler subscribes, synchronously; re-assigning it once subscribed is a no-op,
            # and after a failed subscription it tries again.
            handler = self._sdk_desired_patch
            await self._sdk.call(
                asyncio.to_thread(setattr, client, "on_twin_desired_properties_patch_received", handler),
                s.twin_timeout_s,
                "subscribe_desired",
            )
        except TimeoutError:
            # The SDK keeps retrying the SUBSCRIBE; the twin GET after each connect catches up meanwhile.
            log.warning("subscribing to desired-properties patches timed out; relying on twin GETs")
        if self.method_handler is not None:
            try:
                await self._sdk.call(
                    asyncio.to_thread(setattr, client, "on_method_request_received", self._sdk_method_request),
                    s.twin_timeout_s,
                    "subscribe_methods",
                )
            except TimeoutError:
                log.warning("subscribing to direct methods timed out; the SDK keeps trying")

    async def _disconnect_quietly(self) -> None:
        client = self._client
        if client is None:
            return
        if not await self._sdk.disconnect_after_break(client, self.settings.connect_timeout_s):
            # Wedged (its network thread died) and shut down: the next attempt creates a new client.
            self.stats.clients_replaced += 1
            if self._client is client:
                self._client = None

    # -- SDK threads → our loop --------------------------------------------------------------------------------

    def _sdk_state_changed(self) -> None:
        """SDK handler thread: the connection state changed."""
        self._call_on_loop(self._check_connected)

    def _sdk_desired_patch(self, patch: Any) -> None:
        """SDK handler thread: a desired patch (or, after a reconnect, the whole desired document)."""
        if isinstance(patch, dict):
            self._call_on_loop(self._put_desired, DesiredUpdate(patch, whole=False))

    def _sdk_method_request(self, request: Any) -> None:
        """SDK handler thread: a direct-method call. Only handed to the loop; answered there."""
        self._call_on_loop(self._start_method, request)

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            loop.call_soon_threadsafe(fn, *args)

    def _check_connected(self) -> None:
        client = self._client
        if client is None or self.state is not LinkState.CONNECTED:
            return
        if client.connected:
            self._cancel_loss_timer()
        elif self._loss_timer is None:
            self._loss_timer = asyncio.get_running_loop().call_later(SDK_RECONNECT_GRACE_S, self._confirm_lost)

    def _confirm_lost(self) -> None:
        self._loss_timer = None
        client = self._client
        if client is not None and not client.connected:
            self._link_broken("the SDK reports the connection lost", force=False)

    def _cancel_loss_timer(self) -> None:
        if self._loss_timer is not None:
            self._loss_timer.cancel()
            self._loss_timer = None

    def _put_desired(self, update: DesiredUpdate) -> None:
        self.stats.desired_updates += 1
        self.desired_arrived.set()
        try:
            self._desired.put_nowait(update)
        except asyncio.QueueFull:
            # Policy DesiredOverflow.RESYNC: the next twin GET carries this change and every other.
            self.stats.desired_overflows += 1
            self._resync = True

    # -- sender ----------------------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        window = asyncio.Semaphore(self.settings.inflight_window)
        async with asyncio.TaskGroup() as sends:
            while True:
                await self._up.wait()
                await window.acquire()
                entry = self.outbox.next_to_send() if self._up.is_set() else None
                if entry is None:
                    window.release()
                    if self._up.is_set():
                        self._wake.clear()
                        await self._wake.wait()
                    continue
                task = sends.create_task(self._send(entry), name=f"leafguard.hub.send[{entry.seq}]")
                task.add_done_callback(lambda _t: window.release())

    def _after_send(self) -> None:
        self.outbox.commit(time.monotonic())
        if not len(self.outbox):
            self._drained.set()

    async def _send(self, entry: Pending) -> None:
        assert entry.message is not None  # loaded by next_to_send
        msg = entry.message.to_sdk_message()
        msg.message_id = entry.message_id
        msg.custom_properties[LEAF_IDENTITY_PROPERTY] = entry.message.identity
        client = self._client
        if client is None:
            # The link broke and its wedged client was given up after this send was queued: it goes again later.
            self.outbox.release(entry)
            self._after_send()
            return
        # The SDK completes its own future when the PUBACK (or the cancellation) comes, and logs an error if that
        # future was cancelled under it: so we stop waiting for a send (shield) rather than cancel it.
        send = asyncio.get_running_loop().create_task(
            # Alerts carry their own output; Defender security messages go to the configured one.
            client.send_message_to_output(msg, getattr(entry.message, "output", self.settings.output_name)),
            name=f"leafguard.hub.publish[{entry.seq}]",
        )
        scope = asyncio.timeout(self.settings.send_timeout_s)
        try:
            try:
                self._send_scopes.add(scope)
                async with scope:
                    await asyncio.shield(send)
            finally:
                self._send_scopes.discard(scope)
        except TimeoutError:
            self.outbox.release(entry)
            if self.state is LinkState.CONNECTED and not self._broken.is_set():
                self.stats.send_timeouts += 1
                self._link_broken(f"no acknowledgement within {self.settings.send_timeout_s:g} s", force=True)
        except ValueError as exc:
            # The SDK refuses the message itself (its size estimate): it can never be sent.
            log.error("the SDK refused a security message of %s: %s", entry.message.identity, exc)
            self.outbox.fail(entry)
            self._dropped(entry)
        except OperationCancelled:
            # A disconnect cancelled it: the supervisor deals with the link; the message goes again.
            self.outbox.release(entry)
        except (NoConnectionError, ConnectionDroppedError, ConnectionFailedError) as exc:
            self.stats.send_errors += 1
            self.outbox.release(entry)
            self._link_broken(f"send failed: {exc!r}", force=False)
        except SDK_ERRORS as exc:
            self.stats.send_errors += 1
            self.outbox.release(entry)
            self._link_broken(f"send failed: {exc!r}", force=True)
        else:
            self.outbox.ack(entry)
        finally:
            self._sdk.keep(send)
            self._after_send()

    def _dropped(self, entry: Pending) -> None:
        if self.on_dropped is not None:
            self.on_dropped(entry)

    # -- direct methods --------------------------------------------------------------------------------------

    def _start_method(self, request: Any) -> None:
        tg, handler = self._tg, self.method_handler
        if tg is None or handler is None or self._closing.is_set():
            return  # shutting down: IoT Hub answers the caller with its own timeout
        self.stats.method_calls += 1
        if len(self._methods_in_progress) >= self.settings.max_concurrent_methods:
            self.stats.method_busy += 1
            busy = MethodResult(503, {"error": f"{len(self._methods_in_progress)} method calls in progress; retry"})
            call = self._respond(request, busy)
        else:
            call = self._answer(request, handler)
        task = tg.create_task(call, name=f"leafguard.hub.method[{request.name}]")
        self._methods_in_progress.add(task)
        task.add_done_callback(self._methods_in_progress.discard)

    async def _answer(self, request: Any, handler: MethodHandler) -> None:
        timeout_s = self.settings.method_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                result = await handler(request.name, request.payload)
        except TimeoutError:
            self.stats.method_timeouts += 1
            log.warning("direct method %s did not complete within %g s", request.name, timeout_s)
            result = MethodResult(504, {"error": f"{request.name} did not complete within {timeout_s:g} s"})
        except Exception:
            # A bug in a handler answers 500 and is logged whole, rather than ending the uplink's TaskGroup.
            log.exception("direct method %s failed", request.name)
            result = MethodResult(500, {"error": f"{request.name} failed inside LeafGuard (see the module log)"})
        await self._respond(request, result)

    async def _respond(self, request: Any, result: MethodResult) -> None:
        client = self._client
        if client is None:
            return
        response = MethodResponse.create_from_method_request(request, result.status, result.payload)
        try:
            await self._sdk.call(client.send_method_response(response), self.settings.twin_timeout_s, "method_response")
        except (TimeoutError, *SDK_ERRORS) as exc:
            # The caller gets IoT Hub's timeout (504) instead; nothing else depends on this response.
            self.stats.method_response_failures += 1
            log.warning("answering direct method %s failed: %r", request.name, exc)

    # -- twin ------------------------------------------------------------------------------------------------

    async def _twin_loop(self) -> None:
        while True:
            await self._up.wait()
            client = self._client
            self._report_wake.clear()
            failed = False
            try:
                if self._twin_epoch != self._epoch or self._resync:
                    epoch, self._resync = self._epoch, False
                    twin = await self._sdk.call(client.get_twin(), self.settings.twin_timeout_s, "get_twin")
                    self._twin_epoch = epoch
                    desired = twin.get("desired") if isinstance(twin, dict) else None
                    if isinstance(desired, dict):
                        self._put_desired(DesiredUpdate(desired, whole=True))
                    reported = twin.get("reported") if isinstance(twin, dict) else None
                    if isinstance(reported, dict):
                        # What an earlier run (or an earlier connection) left there counts against the 32 KB.
                        self.reported.sync_from_hub(reported)
                await self._patch_reported(final=False)
            except (TimeoutError, *SDK_ERRORS) as exc:
                # Twin requests are not re-sent by the SDK; a lost one just waits. Try again next round.
                log.debug("twin request failed: %r", exc)
                failed = True
            await self._next_twin_round(failed)

    async def _next_twin_round(self, failed: bool) -> None:
        """Sleep until there is something to report, then until ``reported_interval_s`` since the last patch."""
        if failed:
            await asyncio.sleep(TWIN_RETRY_S)
            return
        now = time.monotonic()
        health_due = self._last_health + self.settings.health_interval_s if self.health is not None else None
        pending = (self.reported.has_leaf_changes or self._resync or self._twin_epoch != self._epoch
                   or (health_due is not None and (health_due <= now or self._health_wanted)))
        if not pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if health_due is None else health_due - now):
                    await self._report_wake.wait()
        await asyncio.sleep(max(0.0, self._last_reported + self.settings.reported_interval_s - time.monotonic()))

    async def _patch_reported(self, *, final: bool) -> None:
        now = time.monotonic()
        if not final and now - self._last_reported < self.settings.reported_interval_s:
            return
        health: dict[str, Any] | None = None
        if self.health is not None and (
            # Counters change all the time: the health section goes at most once a minute, unless a state an
            # operator sees changed (refresh_health) or this is the last patch.
            final or self._health_wanted or now - self._last_health >= self.settings.health_interval_s
        ):
            self._health_wanted = False
            health = self.health() | {"uplink": self.counters()}
        patch = self.reported.take_patch(health)
        if patch is None:
            if health is not None:
                self._last_health = now  # built and found unchanged: due again in a minute, not at once
            return
        try:
            client = self._client
            if client is None:
                raise NoConnectionError("the hub client is being replaced")
            await self._sdk.call(
                client.patch_twin_reported_properties(patch.body), self.settings.twin_timeout_s, "patch_reported"
            )
        except (TimeoutError, *SDK_ERRORS) as exc:
            self._health_wanted = self._health_wanted or health is not None
            self._reported_failed(patch, exc)
            raise
        except BaseException:
            self._health_wanted = self._health_wanted or health is not None
            self.reported.restore(patch)
            raise
        self.reported.commit(patch)
        if self._reported_failing:
            log.info("reported properties accepted again after %d failed patches", self._reported_failing)
            self._reported_failing = 0
        self.stats.reported_patches += 1
        self._last_reported = now
        if health is not None:
            self._last_health = now

    def _reported_failed(self, patch: ReportedPatch, exc: BaseException) -> None:
        """A failed reported patch is a warning with the hub's reason, counted; the next one is built afresh."""
        cause = exc.__cause__
        refused = isinstance(cause, ServiceError)
        # The SDK keeps only the status of the hub's answer ("twin operation returned status 400"); 400 is how
        # the hub refuses a patch whose merged section is too large or too deep (429/5xx are throttling, outages).
        too_large = refused and re.search(r"\bstatus 400\b", str(cause)) is not None
        reason = f"{cause}" if refused else (f"no answer within {self.settings.twin_timeout_s:g} s"
                                             if isinstance(exc, TimeoutError) else repr(exc))
        self.stats.reported_failures += 1
        self.stats.last_reported_error = (
            f"{datetime.now(UTC).isoformat(timespec='seconds')}: {reason} "
            f"(patch of {twin_size(patch.body)} bytes, section {patch.size_bytes} bytes by our count)"
        )
        self.reported.restore(patch, refused=too_large)
        if refused:
            self.stats.reported_refused += 1
            # Our copy of what the hub holds may be wrong: fetch it again before the next patch.
            self._resync = True
            log.warning(
                "the hub refused a reported-properties patch (%d so far): %s; retrying with %s",
                self.stats.reported_refused,
                self.stats.last_reported_error,
                "fewer leaves" if too_large else "the same leaves",
            )
        elif self._reported_failing == 0:
            log.warning("reported-properties patch failed: %s; retrying", self.stats.last_reported_error)
        self._reported_failing += 1

    async def _flush_reported(self) -> None:
        """The last reported patch at shutdown (only while connected; the twin task may be mid-request)."""
        if self.state is not LinkState.CONNECTED or self._client is None:
            return
        try:
            await self._patch_reported(final=True)
        except SDK_ERRORS as exc:
            log.warning("last reported-properties patch failed: %r", exc)
