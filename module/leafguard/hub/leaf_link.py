"""`LeafLink`: one managed leaf's own connection through the edge hub, its twin and its security messages.

The leaf connects as itself (``connectionDeviceId`` is the leaf): as the ``azureiotsecurity`` module of the leaf
device (``IoTHubModuleClient``, the Defender convention) or as the leaf device (``IoTHubDeviceClient``), from a
connection string with ``GatewayHostName`` = the edge hub and the edge hub's CA as ``server_verification_cert``.

States (:class:`LeafState`), one task per leaf (``leafguard.leaf[<device>]``), transitions logged::

    connecting ──ok──▶ connected ──broken──▶ backing_off ──delay──▶ connecting
        │ CONNACK 4/5 ─▶ auth_failed  (tried again when the credentials change, or after backoff_max_s)
        │ CONNACK 1/2 ─▶ refused      (the edge hub refuses this identity, e.g. a downstream module; same retry)
        └ timeout, network, 3 ─▶ backing_off (capped, jittered: hub.link.Backoff)
    any ── stop() ──▶ stopped

Threads. Every SDK call is bounded on our side (the SDK's twin calls have no timeout, its connect waits up to
60 s): the call runs as a task we stop *waiting* for at the timeout, never cancel (the SDK completes its own
futures from its threads); creating the client and assigning the patch handler (which subscribes, blocking) run
in ``asyncio.to_thread``. SDK handlers (desired patch, connection state) run on SDK threads and only hand the
event to our loop with ``call_soon_threadsafe``; everything else is touched on the loop only.

Twin. After every connect: ``get_twin()`` (the whole desired document replaces ours, so patches missed while
down are caught up; the reported section is what later patches are diffed against), then desired patches as
the SDK pushes them; a patch that skips a version fetches the twin again. Reported: the leaf's effective
Defender configuration and a ``leafguard`` inventory section, sent only when they differ from what the hub
holds; a configuration change goes at once, an inventory-only change at most every ``health_interval_s``.
Only those two keys are managed: other reported keys of the twin (a device's own) are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from azure.iot.device.aio import IoTHubDeviceClient, IoTHubModuleClient
from azure.iot.device.common.transport_exceptions import ProtocolClientError
from azure.iot.device.exceptions import (
    ClientError,
    ConnectionDroppedError,
    ConnectionFailedError,
    CredentialError,
    NoConnectionError,
    OperationCancelled,
    OperationTimeout,
)

from leafguard.agent.config import CONFIG_OBJECT_NAME
from leafguard.agent.messages import OutgoingMessage
from leafguard.hub.credentials import LeafCredential, Secret, connection_string_fields
from leafguard.hub.leaves import SECURITY_MODULE_ID, IdentityMode
from leafguard.hub.link import Backoff
from leafguard.hub.outbox import Outbox, Pending
from leafguard.hub.sdk_calls import (
    SDK_ERRORS,
    SDK_RECONNECT_GRACE_S,
    STABLE_CONNECTION_S,
    SdkCalls,
)
from leafguard.hub.settings import LeafClientSettings
from leafguard.hub.spool import Spool, SpoolSettings
from leafguard.hub.twin import MissedDesiredPatchError, ModuleDesired, merge_patch, twin_size, without_nulls

log = logging.getLogger("leafguard.hub.leaf")

INVENTORY = "leafguard"
"""The reported key of the leaf's passive inventory."""
MANAGED_KEYS = (CONFIG_OBJECT_NAME, INVENTORY)
REPORTED_BUDGET_BYTES = 30 * 1024
"""The leaf twin's reported section is limited to 32 KB by the hub; we keep a 2 KB margin."""


class LeafState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    AUTH_FAILED = "auth_failed"
    REFUSED = "refused"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class LeafTarget:
    """Whom a leaf client connects as, and where."""

    device_id: str
    mode: IdentityMode
    hub_hostname: str
    gateway_hostname: str
    credential: LeafCredential

    @property
    def module_id(self) -> str | None:
        return SECURITY_MODULE_ID if self.mode is IdentityMode.MODULE else None

    @property
    def identity(self) -> str:
        """The MQTT client id: ``device`` or ``device/azureiotsecurity``."""
        return self.device_id if self.module_id is None else f"{self.device_id}/{self.module_id}"

    def connection_string(self) -> Secret:
        """``HostName;DeviceId[;ModuleId];SharedAccessKey;GatewayHostName``: from the key, or the secrets file's
        connection string with the module and the gateway put in."""
        if self.credential.connection_string is not None:
            fields = connection_string_fields(self.credential.connection_string.reveal())
        else:
            assert self.credential.key is not None
            fields = {"HostName": self.hub_hostname, "DeviceId": self.device_id,
                      "SharedAccessKey": self.credential.key.reveal()}
        fields.pop("ModuleId", None)
        if self.module_id is not None:
            fields = {k: v for k, v in fields.items() if k in ("HostName", "DeviceId")} | {
                "ModuleId": self.module_id} | {k: v for k, v in fields.items() if k not in ("HostName", "DeviceId")}
        fields["GatewayHostName"] = self.gateway_hostname
        return Secret(";".join(f"{k}={v}" for k, v in fields.items()))


@dataclass(slots=True)
class LeafLinkStats:
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    auth_failures: int = 0
    refusals: int = 0
    send_timeouts: int = 0
    send_errors: int = 0
    desired_updates: int = 0
    reported_patches: int = 0
    reported_failures: int = 0
    last_error: str | None = None


ClientFactory = Callable[[LeafTarget, str, LeafClientSettings], Any]
DesiredHandler = Callable[[str, dict[str, Any]], None]
"""Called on the loop with (device id, the leaf twin's whole desired document) whenever it changes."""


def default_client_factory(target: LeafTarget, ca_pem: str, settings: LeafClientSettings) -> Any:
    """The SDK client of the leaf (blocking: builds the pipeline and its TLS context)."""
    cls = IoTHubModuleClient if target.module_id is not None else IoTHubDeviceClient
    return cls.create_from_connection_string(
        target.connection_string().reveal(), server_verification_cert=ca_pem, connection_retry=False,
        auto_connect=False, keep_alive=settings.keep_alive_s)


def _refused(exc: BaseException) -> bool:
    """CONNACK 1/2 (identifier rejected): the SDK raises a plain ClientError caused by a ProtocolClientError."""
    return isinstance(exc.__cause__, ProtocolClientError)


class LeafLink:
    """One managed leaf: its client, its state machine, its outbox and its twin."""

    def __init__(self, target: LeafTarget, ca_pem: str, settings: LeafClientSettings, *,
                 on_desired: DesiredHandler, on_dropped: Callable[[Pending], None] | None = None,
                 client_factory: ClientFactory = default_client_factory, spool: SpoolSettings | None = None) -> None:
        """``spool``: this leaf's own spool in the data directory (its waiting messages survive a restart);
        None: they are held in memory only."""
        self.target = target
        self.settings = settings
        self._ca_pem = ca_pem
        self._factory = client_factory
        self.on_desired = on_desired
        self.on_dropped = on_dropped
        self.state = LeafState.CONNECTING
        self.stats = LeafLinkStats()
        self.spool: Spool | None = None
        self.outbox = self._open_outbox(spool)
        self.desired = ModuleDesired()
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick = asyncio.Event()
        """Set when there is something to do (a message, a reported change, a broken link, stop)."""
        self._stopping = False
        self._accepting = True
        self._broken: str | None = None
        self._resync = False
        self._loss_timer: asyncio.TimerHandle | None = None
        self._sdk = SdkCalls(f"leafguard.leaf[{target.device_id}]", f"leaf {target.identity}")
        self._connected_at = 0.0
        self._ever_connected = False
        self._want_config: dict[str, Any] | None = None
        self._want_inventory: dict[str, Any] | None = None
        self._hub_reported: dict[str, Any] = {}
        self._reported_synced = False
        self._config_dirty = False
        self._inventory_dirty = False
        self._last_inventory_report = float("-inf")
        self._desired_status: dict[str, Any] | None = None
        self.trimmed: dict[str, int] = {}
        """List entries left out of the last inventory for the 32 KB budget, by list name."""
        self._done = asyncio.Event()

    def _open_outbox(self, spool: SpoolSettings | None) -> Outbox:
        if spool is None:
            return Outbox(self.settings.outbox_max_bytes)
        try:
            self.spool, recovery = Spool.open(spool)
        except OSError as exc:
            # One leaf's unwritable folder must not stop the others: this leaf queues in memory, and says so.
            log.error("leaf %s: spool in %s: %s; its messages are held in memory only",
                      self.target.identity, spool.spool_dir, exc.strerror or exc)
            return Outbox(self.settings.outbox_max_bytes)
        outbox = Outbox(spool.max_bytes, self.spool)
        outbox.recover(recovery)
        if len(outbox):
            log.info("leaf %s: %d messages to send from the last run", self.target.identity, len(outbox))
        return outbox

    # -- the service side (on the loop) ----------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self.target.device_id

    def submit(self, messages: Iterable[OutgoingMessage]) -> None:
        for message in messages:
            if not self._accepting and self.spool is None:
                self._dropped(self.outbox.reject(message))
                continue
            # With a spool, late messages still go into it: the next run sends them.
            for dropped in self.outbox.put(message):
                self._dropped(dropped)
        self.outbox.commit(time.monotonic())
        self._kick.set()

    def report(self, config: dict[str, Any] | None = None, inventory: dict[str, Any] | None = None) -> None:
        """What the leaf's reported properties should hold: its effective configuration (``{CFG: …}``, as the
        fleet reports it) and its inventory section; None leaves that part as it is."""
        if config is not None:
            wanted = without_nulls(config.get(CONFIG_OBJECT_NAME, {}))
            if wanted != self._want_config:
                self._want_config = wanted
                self._config_dirty = True
        if inventory is not None:
            trimmed, self.trimmed = trim_inventory(without_nulls(inventory), self._config_size())
            if trimmed != self._want_inventory:
                self._want_inventory = trimmed
                self._inventory_dirty = True
        self._kick.set()

    def desired_outcome(self, accepted: bool) -> None:
        """The leaf's desired document (its version as last received) was applied or rejected: reported at once,
        as ``leafguard.desired`` (``{"version": n, "applied": bool}``), so an operator sees a rejection too."""
        status = {"version": self.desired.version or 0, "applied": accepted}
        if status != self._desired_status:
            self._desired_status = status
            self._config_dirty = True
            self._kick.set()

    def retry(self) -> None:
        """The credentials changed: a leaf in auth_failed or refused tries again now."""
        if self.state in (LeafState.AUTH_FAILED, LeafState.REFUSED, LeafState.BACKING_OFF):
            self._backoff.reset()
            self._kick.set()

    def counters(self) -> dict[str, Any]:
        o = self.outbox.stats
        return {
            "identity": self.target.identity, "mode": self.target.mode.value, "state": self.state.value,
            "queued": len(self.outbox), "sent": o.acked, "sent_bytes": o.acked_bytes, "dropped": o.dropped,
            "resent": o.resent,
        } | dataclasses.asdict(self.stats)

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                if self.state is LeafState.CONNECTING:
                    await self._attempt()
                elif self.state is LeafState.CONNECTED:
                    await self._serve()
                elif self.state is LeafState.BACKING_OFF:
                    await self._pause(self._backoff.next_delay())
                else:  # auth_failed, refused: slowly, or at once when the credentials change
                    await self._pause(self.settings.backoff_max_s)
        finally:
            self._cancel_loss_timer()
            self._set_state(LeafState.STOPPED)
            await self._close_client(self.settings.connect_timeout_s)
            self._done.set()

    async def shutdown(self, deadline_s: float) -> None:
        """Stop accepting, send what is queued (and the last reported patch) until the deadline, close the client.

        Messages still queued at the deadline stay in the leaf's spool for the next run, or without one are lost
        and counted as dropped."""
        self._accepting = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline_s):
                # A leaf that is only backing off (the edge hub restarting) may come back within the deadline: its
                # queue waits for it. Credentials refused will not change now: nothing to wait for.
                while self.state not in (LeafState.AUTH_FAILED, LeafState.REFUSED, LeafState.STOPPED) and (
                        len(self.outbox) or self._reported_due(force=True)):
                    if self.state is LeafState.CONNECTED:
                        self._kick.set()
                    await asyncio.sleep(0.05)
        self._stopping = True
        self._kick.set()
        if self._loop is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(1.0, deadline_s)):
                    await self._done.wait()
        self.outbox.release_in_flight()
        if self.spool is not None:
            if len(self.outbox):
                log.info("leaf %s: %d messages stay in its spool for the next run", self.target.identity,
                         len(self.outbox))
            self.spool.close(time.monotonic())
            return
        while (entry := self.outbox.next_to_send()) is not None:
            self.outbox.fail(entry)
            self._dropped(entry)

    # -- states ----------------------------------------------------------------------------------------------

    def _set_state(self, new: LeafState, reason: str = "") -> None:
        old, self.state = self.state, new
        if old is new:
            return
        if new in (LeafState.AUTH_FAILED, LeafState.REFUSED) or (
                new is LeafState.BACKING_OFF and old is LeafState.CONNECTED):
            log.warning("leaf %s: %s -> %s: %s", self.target.identity, old.value, new.value, reason)
        elif new is LeafState.CONNECTED:
            log.info("leaf %s: connected%s", self.target.identity, " again" if self._ever_connected else "")
        else:
            log.debug("leaf %s: %s -> %s %s", self.target.identity, old.value, new.value, reason)

    async def _pause(self, delay_s: float) -> None:
        self._kick.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._kick.wait()
        if not self._stopping:
            self._set_state(LeafState.CONNECTING)

    async def _attempt(self) -> None:
        s = self.settings
        try:
            if self._client is None:
                self._client = await self._sdk.call(
                    asyncio.to_thread(self._factory, self.target, self._ca_pem, s), s.connect_timeout_s, "create")
                # A client-event handler, not a receive handler: assigning it does not connect.
                self._client.on_connection_state_change = self._sdk_state_changed
            client = self._client
            await self._sdk.call(client.connect(), s.connect_timeout_s, "connect")
            twin = await self._sdk.call(client.get_twin(), s.twin_timeout_s, "get_twin")
            self._on_twin(twin)
            # Assigning the receive handler subscribes, synchronously (iothub-protocol.md §1.4).
            await self._sdk.call(asyncio.to_thread(setattr, client, "on_twin_desired_properties_patch_received",
                                                  self._sdk_desired_patch), s.twin_timeout_s, "subscribe")
        except CredentialError as exc:
            self.stats.auth_failures += 1
            self._failed(LeafState.AUTH_FAILED, f"the edge hub refused the credentials ({exc})")
        except (ConnectionFailedError, ConnectionDroppedError, NoConnectionError, OperationCancelled,
                OperationTimeout, TimeoutError, OSError) as exc:
            self._failed(LeafState.BACKING_OFF, f"cannot connect: {exc!r}")
        except ClientError as exc:
            if _refused(exc):
                self.stats.refusals += 1
                hint = " (module identities of downstream devices refused: set identity \"device\")" if (
                    self.target.mode is IdentityMode.MODULE) else ""
                self._failed(LeafState.REFUSED, f"the edge hub refuses identity {self.target.identity}{hint}")
            else:
                self._failed(LeafState.BACKING_OFF, f"cannot connect: {exc!r}")
        else:
            self.stats.connects += 1
            if self._ever_connected:
                self.stats.reconnects += 1
            self._connected_at = time.monotonic()
            self._broken = None
            self.outbox.release_in_flight()
            self._set_state(LeafState.CONNECTED)
            self._ever_connected = True

    def _failed(self, state: LeafState, reason: str) -> None:
        self.stats.connect_failures += 1
        self.stats.last_error = reason
        self._set_state(state, reason)

    async def _serve(self) -> None:
        """Connected: send queued messages, one at a time, and reported patches, until the link breaks."""
        while not self._stopping and self._broken is None:
            if self._resync:
                self._resync = False
                try:
                    self._on_twin(await self._sdk.call(self._client.get_twin(), self.settings.twin_timeout_s,
                                                      "get_twin"))
                except (TimeoutError, *SDK_ERRORS) as exc:
                    self._break(f"twin GET failed: {exc!r}")
                continue
            entry = self.outbox.next_to_send()
            if entry is not None:
                await self._send(entry)
                continue
            if self._reported_due(force=False):
                await self._patch_reported()
                continue
            self._kick.clear()
            wait_s = self._next_report_in()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._kick.wait()
        if self._broken is not None and not self._stopping:
            self.outbox.release_in_flight()
            if time.monotonic() - self._connected_at >= STABLE_CONNECTION_S:
                self._backoff.reset()
            self._set_state(LeafState.BACKING_OFF, self._broken)
            await self._disconnect_quietly()

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            self.stats.last_error = reason
        self._kick.set()

    async def _send(self, entry: Pending) -> None:
        assert entry.message is not None, "next_to_send loads a spooled message"
        msg = entry.message.to_sdk_message()
        msg.message_id = entry.message_id
        try:
            await self._sdk.call(self._client.send_message(msg), self.settings.send_timeout_s, "send")
        except TimeoutError:
            self.stats.send_timeouts += 1
            self.outbox.release_in_flight()
            self._break(f"no acknowledgement within {self.settings.send_timeout_s:g} s")
        except ValueError as exc:
            log.error("leaf %s: the SDK refused a security message: %s", self.target.identity, exc)
            self.outbox.fail(entry)
            self._dropped(entry)
        except SDK_ERRORS as exc:
            self.stats.send_errors += 1
            self.outbox.release_in_flight()
            self._break(f"send failed: {exc!r}")
        else:
            self.outbox.ack(entry)
            self.outbox.commit(time.monotonic())

    # -- twin ------------------------------------------------------------------------------------------------

    def _on_twin(self, twin: Any) -> None:
        if not isinstance(twin, dict):
            return
        desired = twin.get("desired")
        if isinstance(desired, dict) and self.desired.replace(desired) is not None:
            self.stats.desired_updates += 1
            self.on_desired(self.device_id, dict(self.desired.doc))
        reported = twin.get("reported")
        if isinstance(reported, dict):
            self._hub_reported = without_nulls({k: reported[k] for k in MANAGED_KEYS if k in reported})
            self._reported_synced = True
            self._config_dirty = self._config_dirty or self._want_config is not None
            self._inventory_dirty = self._inventory_dirty or self._want_inventory is not None

    def _on_desired_patch(self, patch: dict[str, Any]) -> None:
        try:
            change = self.desired.patch(patch)
        except MissedDesiredPatchError as exc:
            log.info("leaf %s: %s; fetching the twin", self.target.identity, exc)
            self._resync = True
            self._kick.set()
            return
        if change is not None:
            self.stats.desired_updates += 1
            self.on_desired(self.device_id, dict(self.desired.doc))

    def _config_size(self) -> int:
        return twin_size({CONFIG_OBJECT_NAME: self._want_config or {}})

    def _reported_due(self, *, force: bool) -> bool:
        if not self._reported_synced:
            return False
        if self._config_dirty:
            return True
        if not self._inventory_dirty:
            return False
        return force or time.monotonic() - self._last_inventory_report >= self.settings.health_interval_s

    def _next_report_in(self) -> float | None:
        if self._reported_synced and self._inventory_dirty and not self._config_dirty:
            return max(0.0, self._last_inventory_report + self.settings.health_interval_s - time.monotonic())
        return None

    async def _patch_reported(self) -> None:
        target: dict[str, Any] = {}
        if self._want_config is not None:
            target[CONFIG_OBJECT_NAME] = self._want_config
        elif CONFIG_OBJECT_NAME in self._hub_reported:
            target[CONFIG_OBJECT_NAME] = self._hub_reported[CONFIG_OBJECT_NAME]
        inventory_sent = self._want_inventory is not None
        if inventory_sent:
            target[INVENTORY] = dict(self._want_inventory or {})
        elif INVENTORY in self._hub_reported:
            target[INVENTORY] = dict(self._hub_reported[INVENTORY])
        if self._desired_status is not None:
            target.setdefault(INVENTORY, {})["desired"] = self._desired_status
        body = merge_patch(self._hub_reported, target)
        config_was_dirty = self._config_dirty
        self._config_dirty = self._inventory_dirty = False
        if not body:
            return
        try:
            await self._sdk.call(self._client.patch_twin_reported_properties(body), self.settings.twin_timeout_s,
                                "patch_reported")
        except (TimeoutError, *SDK_ERRORS) as exc:
            self.stats.reported_failures += 1
            self.stats.last_error = f"reported patch failed: {exc!r} ({exc.__cause__ or ''})"
            self._config_dirty = config_was_dirty or self._config_dirty
            self._inventory_dirty = inventory_sent or self._inventory_dirty
            # Our copy of the hub's section may be wrong: fetch it with the next GET.
            self._resync = True
            log.warning("leaf %s: %s", self.target.identity, self.stats.last_error)
            return
        self._hub_reported = target
        self.stats.reported_patches += 1
        if inventory_sent:
            self._last_inventory_report = time.monotonic()

    # -- SDK threads → our loop ------------------------------------------------------------------------------

    def _sdk_desired_patch(self, patch: Any) -> None:
        if isinstance(patch, dict):
            self._call_on_loop(self._on_desired_patch, patch)

    def _sdk_state_changed(self) -> None:
        self._call_on_loop(self._check_connected)

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
                loop.call_soon_threadsafe(fn, *args)

    def _check_connected(self) -> None:
        client = self._client
        if client is None or self.state is not LeafState.CONNECTED:
            return
        if client.connected:
            self._cancel_loss_timer()
        elif self._loss_timer is None and self._loop is not None:
            self._loss_timer = self._loop.call_later(SDK_RECONNECT_GRACE_S, self._confirm_lost)

    def _confirm_lost(self) -> None:
        self._loss_timer = None
        if self._client is not None and not self._client.connected:
            self._break("the SDK reports the connection lost")

    def _cancel_loss_timer(self) -> None:
        if self._loss_timer is not None:
            self._loss_timer.cancel()
            self._loss_timer = None

    # -- SDK calls, bounded ------------------------------------------------------------------------------------

    async def _disconnect_quietly(self) -> None:
        client = self._client
        if client is None:
            return
        if not await self._sdk.disconnect_after_break(client, self.settings.connect_timeout_s) and (
                self._client is client):
            self._client = None  # wedged and shut down: the next attempt creates a new client

    async def _close_client(self, timeout_s: float) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        await self._sdk.shut_down(client, timeout_s)

    def _dropped(self, entry: Pending) -> None:
        if self.on_dropped is not None:
            self.on_dropped(entry)


TRIMMABLE = ("services", "ips", "hostnames", "alerts")
"""Inventory lists shortened, longest first, when the leaf's reported section would pass its budget."""


def trim_inventory(inventory: dict[str, Any], config_bytes: int,
                   budget_bytes: int = REPORTED_BUDGET_BYTES) -> tuple[dict[str, Any], dict[str, int]]:
    """The inventory cut to fit beside the configuration: the longest list loses entries first (from its end);
    what was cut is stated in the section itself (``trimmed``: list → entries left out) and returned."""
    doc = dict(inventory)
    trimmed: dict[str, int] = {}

    def size() -> int:
        return config_bytes + len(INVENTORY) + twin_size(doc | ({"trimmed": trimmed} if trimmed else {}))

    while size() > budget_bytes:
        lists = [k for k in TRIMMABLE if isinstance(doc.get(k), list) and doc[k]]
        if not lists:
            break
        longest = max(lists, key=lambda k: twin_size(doc[k]))
        doc[longest] = doc[longest][: len(doc[longest]) // 2]
        trimmed[longest] = len(inventory[longest]) - len(doc[longest])
    if trimmed:
        doc["trimmed"] = trimmed
    return doc, trimmed
