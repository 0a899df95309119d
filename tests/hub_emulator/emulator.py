"""`HubEmulator`: the broker, the workload API, the control API and the listeners, on one loopback address.

The emulator runs on the loop that starts it, or with `thread=True` on a loop of its own in a daemon thread.
In thread mode every public method hops onto that loop (`_on_loop` for coroutines, `_sync` for the rest), so
test code may block its own loop with synchronous SDK calls without starving the hub that must answer them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from tests.hub_emulator import certs, control, websocket, workload
from tests.hub_emulator.broker import Broker, ConnectionInfo, MethodResult, Stats, StreamLink
from tests.hub_emulator.identities import Identity, Registry
from tests.hub_emulator.messages import MessageLog, ReceivedMessage
from tests.hub_emulator.mqtt import ConnackCode

log = logging.getLogger(__name__)

DEFAULT_HUB_HOSTNAME = "lg-emulator.azure-devices.net"
MQTT_PORT = 8883  # fixed in the SDK (mqtt_transport.py), hence one loopback address per emulator
WEBSOCKET_PORT = 443
WORKLOAD_API_VERSION = "2019-01-30"
# Spread concurrent test processes over the 253 addresses; the bind itself is what proves an address free.
_host_counter = itertools.count(os.getpid() * 7)
SYNC_CALL_TIMEOUT_S = 10.0
T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread, for `HubEmulator.start(thread=True)`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="hub-emulator-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A restarted emulator must rebind at once although the old port still has TIME_WAIT connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _allocate(host: str | None, ports: list[int]) -> tuple[str, list[socket.socket]]:
    """Bind every port in `ports` on one address: `host`, or the first free 127.0.0.2..254."""
    candidates = [host] if host else [f"127.0.0.{2 + next(_host_counter) % 253}" for _ in range(253)]
    for candidate in candidates:
        bound: list[socket.socket] = []
        try:
            for port in ports:
                bound.append(_listen(candidate, port))
        except OSError as exc:
            for sock in bound:
                sock.close()
            if exc.errno != errno.EADDRINUSE or host:
                raise
            continue
        return candidate, bound
    raise OSError(errno.EADDRINUSE, f"no loopback address in 127.0.0.2-254 has ports {ports} free")


class HubEmulator:
    """A local IoT Hub / edgeHub for azure-iot-device clients. Create it with `HubEmulator.start()`."""

    def __init__(self, *, hub_hostname: str, max_messages: int, websockets: bool, http_port: int) -> None:
        self.hub_hostname = hub_hostname
        self.host = ""
        """The loopback address the clients dial: `GatewayHostName` and the certificate's SAN."""
        self.http_port = http_port
        self.websockets = websockets
        self.registry = Registry()
        self.message_log = MessageLog(max_messages)
        self.broker = Broker(self.registry, self.message_log, hub_hostname, lambda: [self.host])
        self._credentials: certs.Credentials | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._ssl: ssl.SSLContext | None = None
        self._mqtt_server: asyncio.Server | None = None
        self._http: web.AppRunner | None = None
        self._ws: web.AppRunner | None = None
        self._own_loop: _LoopThread | None = None

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._own_loop is None:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._own_loop.loop))

    def _sync(self, fn: Callable[[], T]) -> T:
        """Run `fn` where the broker lives: transports and waiters are not thread-safe."""
        if self._own_loop is None or threading.current_thread() is self._own_loop.thread:
            return fn()

        async def call() -> T:
            return fn()

        future = asyncio.run_coroutine_threadsafe(call(), self._own_loop.loop)
        return future.result(SYNC_CALL_TIMEOUT_S)

    # ---- lifecycle ---------------------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, *, host: str | None = None, hub_hostname: str = DEFAULT_HUB_HOSTNAME,
                    websockets: bool = False, http_port: int = 0, max_messages: int = 100_000,
                    thread: bool = False) -> AsyncIterator[HubEmulator]:
        """Start an emulator; `host` defaults to a free 127.0.0.x. Stops everything on exit.

        `websockets` adds MQTT over WebSocket on port 443 (`/$iothub/websocket`); `http_port` 0 picks a free
        port for the workload and control APIs; `thread` runs the emulator on its own loop in a thread.
        """
        hub = cls(hub_hostname=hub_hostname, max_messages=max_messages, websockets=websockets,
                  http_port=http_port)
        if thread:
            hub._own_loop = _LoopThread()
        try:
            await hub._on_loop(hub._open(host))
            yield hub
        finally:
            try:
                await hub._on_loop(hub.aclose())
            finally:
                if hub._own_loop is not None:
                    hub._own_loop.stop()

    async def _open(self, host: str | None) -> None:
        ports = [MQTT_PORT, self.http_port] + ([WEBSOCKET_PORT] if self.websockets else [])
        self.host, socks = _allocate(host, ports)
        mqtt_sock, http_sock, *ws_socks = socks
        self.http_port = http_sock.getsockname()[1]
        self._credentials = certs.generate([self.host])
        self._tmp = tempfile.TemporaryDirectory(prefix="lg-hub-")
        self._ssl = self._credentials.server_context(Path(self._tmp.name))
        self._mqtt_server = await self._serve_mqtt(mqtt_sock)

        app = web.Application()
        app.add_routes(workload.routes(self.registry, self._credentials.ca_pem))
        app.add_routes(control.routes(self))
        self._http = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._http.setup()
        await web.SockSite(self._http, http_sock).start()
        if ws_socks:
            self._ws = await websocket.serve(self.broker, ws_socks[0], self._ssl)
        log.info("hub emulator on %s (mqtts :%d, http :%d)", self.host, MQTT_PORT, self.http_port)

    async def _serve_mqtt(self, sock: socket.socket) -> asyncio.Server:
        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.broker.serve(reader, StreamLink(writer))

        return await asyncio.start_server(on_client, sock=sock, ssl=self._ssl, ssl_handshake_timeout=10)

    async def aclose(self) -> None:
        await self._stop_listeners()
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def _stop_listeners(self) -> None:
        if self._mqtt_server is not None:
            self._mqtt_server.close()
        # Sessions first: aiohttp's cleanup would otherwise wait for every open WebSocket to end by itself.
        await self.broker.close()
        if self._ws is not None:
            await self._ws.cleanup()
            self._ws = None
        if self._mqtt_server is not None:
            await self._mqtt_server.wait_closed()
            self._mqtt_server = None

    async def restart(self, *, downtime_s: float = 0.0) -> None:
        """Restart the hub side: every connection drops, listeners close and reopen after `downtime_s`.

        Registry, twins, sessions (subscriptions) and recorded messages survive, as in edgeHub's store.
        The workload API stays up: it belongs to the IoT Edge daemon, not to edgeHub.
        """
        await self._on_loop(self._restart(downtime_s))

    async def _restart(self, downtime_s: float) -> None:
        await self._stop_listeners()
        await asyncio.sleep(downtime_s)
        ports = [MQTT_PORT] + ([WEBSOCKET_PORT] if self.websockets else [])
        _, socks = _allocate(self.host, ports)
        self._mqtt_server = await self._serve_mqtt(socks[0])
        if len(socks) > 1:
            assert self._ssl is not None
            self._ws = await websocket.serve(self.broker, socks[1], self._ssl)

    # ---- identities --------------------------------------------------------------------------------------

    def add_device(self, device_id: str, *, parent: str | Identity | None = None, edge: bool = False,
                   primary_key: str | None = None, secondary_key: str | None = None) -> Identity:
        """Register a device; `edge=True` makes it an IoT Edge device that can have modules and children."""
        parent_id = parent.device_id if isinstance(parent, Identity) else parent
        return self._sync(lambda: self.registry.add_device(
            device_id, parent=parent_id, edge=edge, primary_key=primary_key, secondary_key=secondary_key))

    def add_module(self, device: str | Identity, module_id: str, *, primary_key: str | None = None,
                   secondary_key: str | None = None) -> Identity:
        device_id = device.device_id if isinstance(device, Identity) else device
        return self._sync(lambda: self.registry.add_module(
            device_id, module_id, primary_key=primary_key, secondary_key=secondary_key))

    def identity(self, identity: str | Identity) -> Identity:
        """Look an identity up by client id (`device` or `device/module`)."""
        return identity if isinstance(identity, Identity) else self.registry.get(identity)

    @property
    def ca_pem(self) -> str:
        """The emulator's CA: pass it as `server_verification_cert` (it is also the workload trust bundle)."""
        assert self._credentials is not None, "emulator not started"
        return self._credentials.ca_pem

    @property
    def ca_file(self) -> Path:
        """The CA as a file, for `EdgeModuleCACertificateFile` and people."""
        assert self._tmp is not None, "emulator not started"
        return Path(self._tmp.name) / "ca.pem"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def workload_uri(self, device: str | Identity) -> str:
        device_id = device.device_id if isinstance(device, Identity) else device
        return f"{self.http_url}/workload/{device_id}/"

    def connection_string(self, identity: str | Identity, *, gateway: bool = True,
                          secondary: bool = False) -> str:
        """`HostName=..;DeviceId=..[;ModuleId=..];SharedAccessKey=..[;GatewayHostName=<emulator address>]`.

        Without the gateway host name the SDK would dial the (fake) hub host name, which does not resolve.
        """
        ident = self.identity(identity)
        parts = [f"HostName={self.hub_hostname}", f"DeviceId={ident.device_id}"]
        if ident.module_id is not None:
            parts.append(f"ModuleId={ident.module_id}")
        parts.append(f"SharedAccessKey={ident.secondary_key if secondary else ident.primary_key}")
        if gateway:
            parts.append(f"GatewayHostName={self.host}")
        return ";".join(parts)

    def edge_environment(self, device: str | Identity, module: str | None = None) -> dict[str, str]:
        """The `IOTEDGE_*` variables edgeAgent gives a module, pointing at this emulator's workload API.

        Pass a module identity, or a device and a module id; the device must be an edge device.
        """
        ident = self.identity(device if module is None else f"{self.identity(device).device_id}/{module}")
        if ident.module_id is None:
            raise ValueError("edge_environment needs a module identity")
        if not self.registry.get(ident.device_id).edge:
            raise ValueError(f"{ident.device_id!r} is not an IoT Edge device (add_device(..., edge=True))")
        return {
            "IOTEDGE_IOTHUBHOSTNAME": self.hub_hostname,
            "IOTEDGE_DEVICEID": ident.device_id,
            "IOTEDGE_MODULEID": ident.module_id,
            "IOTEDGE_GATEWAYHOSTNAME": self.host,
            "IOTEDGE_MODULEGENERATIONID": ident.generation_id,
            "IOTEDGE_WORKLOADURI": self.workload_uri(ident),
            "IOTEDGE_APIVERSION": WORKLOAD_API_VERSION,
            "IOTEDGE_AUTHSCHEME": "sasToken",
        }

    def local_dev_environment(self, module: str | Identity) -> dict[str, str]:
        """The iotedgehubdev-style fallback: `EdgeHubConnectionString` + `EdgeModuleCACertificateFile`."""
        return {"EdgeHubConnectionString": self.connection_string(module),
                "EdgeModuleCACertificateFile": str(self.ca_file)}

    # ---- twins and messages ------------------------------------------------------------------------------

    async def set_desired(self, identity: str | Identity, patch: dict[str, Any]) -> int:
        """Merge `patch` into the desired properties, push it to a connected client; returns `$version`."""
        return await self._on_loop(self.broker.set_desired(self.identity(identity), patch))

    def set_reported(self, identity: str | Identity, patch: dict[str, Any]) -> int:
        """Merge `patch` into the reported properties as if the identity had sent it (what an earlier run left);
        returns `$version`; TwinError when the hub would refuse it."""
        section = self.identity(identity).twin.reported
        return self._sync(lambda: section.apply(patch))

    def twin(self, identity: str | Identity) -> dict[str, Any]:
        """`{"desired": {..., "$version": n}, "reported": {..., "$version": m}}`, a copy."""
        return self._sync(self.identity(identity).twin.document)

    def messages(self, identity: str | Identity | None = None) -> list[ReceivedMessage]:
        """Recorded telemetry and module-output messages, oldest first (the last `max_messages`)."""
        client_id = None if identity is None else self.identity(identity).id
        return self._sync(lambda: self.message_log.items(client_id))

    def clear_messages(self) -> None:
        self._sync(self.message_log.clear)

    async def wait_for_messages(self, count: int, timeout_s: float = 10.0,
                                identity: str | Identity | None = None) -> list[ReceivedMessage]:
        """Wait until `count` messages (of `identity`) are recorded; TimeoutError otherwise."""
        ident = None if identity is None else self.identity(identity).id
        return await self._on_loop(self.message_log.wait_for(count, ident, timeout_s))

    async def send_to_input(self, module: str | Identity, input_name: str, body: bytes | str,
                            properties: dict[str, str | None] | None = None) -> bool:
        """Deliver a message to a module input (queued if the module's session is offline)."""
        data = body.encode() if isinstance(body, str) else body
        return await self._on_loop(self.broker.send_to_input(self.identity(module), input_name, data,
                                                             properties or {}))

    async def send_c2d(self, device: str | Identity, body: bytes | str,
                       properties: dict[str, str | None] | None = None) -> bool:
        data = body.encode() if isinstance(body, str) else body
        return await self._on_loop(self.broker.send_c2d(self.identity(device), data, properties or {}))

    async def invoke_method(self, identity: str | Identity, name: str, payload: Any = None,
                            timeout_s: float = 10.0) -> MethodResult:
        return await self._on_loop(self.broker.invoke_method(self.identity(identity), name, payload, timeout_s))

    # ---- connections and faults --------------------------------------------------------------------------

    def connections(self) -> list[ConnectionInfo]:
        return self._sync(self.broker.connection_info)

    async def wait_connected(self, identity: str | Identity, timeout_s: float = 10.0, *,
                             after: int = 0) -> None:
        """Wait until the client is connected and `stats.connects` has reached `after`."""
        await self._on_loop(self.broker.wait_connected(self.identity(identity).id, timeout_s, after=after))

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait until `predicate()` (evaluated on the emulator's loop) holds after a connect, refusal,
        authentication failure or disconnect, e.g. `lambda: hub.stats.refused >= 2`."""
        await self._on_loop(self.broker.changed.wait_for(predicate, timeout_s))

    @property
    def stats(self) -> Stats:
        return self.broker.stats

    @property
    def answer_unsubscribed_twin_requests(self) -> bool:
        """Whether twin responses reach a client not subscribed to `$iothub/twin/res/#` (default False)."""
        return self.broker.answer_unsubscribed_twin

    @answer_unsubscribed_twin_requests.setter
    def answer_unsubscribed_twin_requests(self, value: bool) -> None:
        self.broker.answer_unsubscribed_twin = value

    def refuse_connections(self, code: int = ConnackCode.SERVER_UNAVAILABLE) -> None:
        """Answer every new CONNECT with `code` (3: the SDK retries; 4/5: it gives up)."""
        self.broker.faults.refuse_code = code

    def accept_connections(self) -> None:
        self.broker.faults.refuse_code = None

    def drop_connection(self, identity: str | Identity | None = None) -> int:
        """Cut one client's connection (or all) like a network failure; returns how many were cut."""
        client_id = None if identity is None else self.identity(identity).id
        return self._sync(lambda: self.broker.drop(client_id))

    def stall_pubacks(self, identity: str | Identity | None = None) -> None:
        """Hold telemetry unstored and unacknowledged (a stalled uplink) until `release_pubacks()`: every
        client's, or only that of `identity` (one stalled connection among others)."""
        if identity is None:
            self.broker.faults.stall_pubacks = True
        else:
            self.broker.faults.stalled_identities.add(self.identity(identity).id)

    def release_pubacks(self) -> int:
        """Stop stalling (everyone); store and acknowledge what was held; returns how many."""
        self.broker.faults.stall_pubacks = False
        self.broker.faults.stalled_identities.clear()
        return self._sync(self.broker.release_pubacks)

    def delay_pubacks(self, seconds: float) -> None:
        """Store and acknowledge each telemetry message `seconds` after it arrives (0 turns it off)."""
        self.broker.faults.puback_delay_s = seconds

    def fail_twin_requests(self, status: int = 429, count: int = 1) -> None:
        """Answer the next `count` twin GET/PATCH requests with `status` (429 throttled, 500, 503...)."""
        self.broker.faults.twin_failure_status = status
        self.broker.faults.twin_failures_left = count

    def refuse_downstream_modules(self, refuse: bool = True) -> None:
        """Refuse (CONNACK 2) module identities of devices that are not edge devices, as edgeHub before 1.2.4."""
        self.broker.faults.refuse_downstream_modules = refuse

    def scope_to(self, edge_device: str | Identity | None) -> None:
        """Authenticate like that edge device's edgeHub (Scope mode): only its modules, its children and their
        modules; any other registered identity is refused as unknown (CONNACK 5)."""
        self.broker.gateway_scope = None if edge_device is None else self.identity(edge_device).device_id
