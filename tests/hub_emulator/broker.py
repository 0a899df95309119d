"""The MQTT side of the emulator: authentication, sessions, topics and the faults tests inject.

One `Broker` serves any number of links (TLS sockets, WebSocket streams). It behaves like edgeHub/IoT Hub as
far as azure-iot-device 2.14 can tell (iothub-protocol.md §2):

* CONNECT: client id `device` or `device/module`, user name `{hub host}/{client id}/?api-version=...`, SAS
  token verified like edgeHub (sas.py); CONNACK 5 on any identity failure, a configurable code when refusing.
* One connection per client id: a newer CONNECT drops the older connection (IoT Hub error 400027).
* Sessions survive reconnects unless `clean_session` is set, because the SDK never re-subscribes; CONNACK says
  "session present" and un-acknowledged QoS 1 deliveries are re-sent with DUP.
* No QoS 2 (the hub closes the connection), no foreign topics (closed too), messages over 256 KB close the
  connection, since MQTT 3.1.1 has no negative PUBACK.
* Telemetry is acknowledged once stored, like edgeHub; `stall_pubacks` holds both the store and the PUBACK, so
  a stalled uplink looks like a hub that never got the message and the client re-sends it after a reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from tests.hub_emulator import mqtt, sas
from tests.hub_emulator.identities import Identity, Registry
from tests.hub_emulator.messages import (
    MESSAGE_LIMIT_BYTES,
    MessageLog,
    ReceivedMessage,
    encode_bag,
    message_from_topic,
    message_size,
    parse_event_topic,
)
from tests.hub_emulator.mqtt import ConnackCode, PacketType, Publish
from tests.hub_emulator.notify import Notifier
from tests.hub_emulator.twins import TwinError

log = logging.getLogger(__name__)

CONNECT_ARRIVAL_TIMEOUT_S = 10.0
MAX_PACKET_BYTES = 2 * MESSAGE_LIMIT_BYTES
"""Packets this large are cut off unread; anything between the message limit and this is read and refused."""
SESSION_QUEUE_LIMIT = 1000
"""Un-acknowledged deliveries kept per session (inputs, C2D for an offline client); the oldest goes first."""
STALLED_LIMIT = 10_000
API_VERSION_KEY = "api-version"
HUB_FILTERS = frozenset({
    "$iothub/methods/POST/#", "$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#"})


class Link(Protocol):
    """A byte stream to one client: a TLS socket or a WebSocket."""

    peer: str
    transport: str

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    async def close(self) -> None:
        """Flush and close (a refused CONNECT must still deliver its CONNACK)."""

    def abort(self) -> None:
        """Cut the link at once, like a network failure."""


class StreamLink:
    transport = "mqtts"

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self._writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            self.abort()

    def abort(self) -> None:
        # No TLS close_notify: a dropped connection must look like a network failure.
        self._writer.transport.abort()


@dataclass(slots=True)
class Session:
    client_id: str
    subscriptions: dict[str, int] = field(default_factory=dict)
    """Topic filter -> granted QoS."""
    outbound: collections.OrderedDict[int, Publish] = field(default_factory=collections.OrderedDict)
    """QoS 1 deliveries not yet PUBACKed, by packet id; re-sent with DUP on reconnect."""
    dropped_outbound: int = 0
    _ids: itertools.cycle[int] = field(default_factory=lambda: itertools.cycle(range(1, 65536)))

    def granted(self, topic: str) -> int | None:
        qos = [q for f, q in self.subscriptions.items() if mqtt.topic_matches(f, topic)]
        return max(qos) if qos else None

    def next_packet_id(self) -> int:
        for packet_id in self._ids:
            if packet_id not in self.outbound:
                return packet_id
        raise AssertionError("unreachable: the cycle is endless")


@dataclass(slots=True, eq=False)
class Connection:
    link: Link
    identity: Identity
    session: Session
    keep_alive_s: int
    username: str
    connected_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    closed: bool = False
    timers: set[asyncio.TimerHandle] = field(default_factory=set)

    @property
    def client_id(self) -> str:
        return self.identity.id

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.link.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for timer in self.timers:
                timer.cancel()
            self.link.abort()


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    client_id: str
    peer: str
    transport: str
    connected_at: datetime
    keep_alive_s: int
    subscriptions: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "peer": self.peer, "transport": self.transport,
                "connected_at": self.connected_at.isoformat(), "keep_alive_s": self.keep_alive_s,
                "subscriptions": self.subscriptions}


@dataclass(frozen=True, slots=True)
class MethodResult:
    status: int
    payload: Any


@dataclass(slots=True)
class Faults:
    refuse_code: int | None = None
    puback_delay_s: float = 0.0
    stall_pubacks: bool = False
    stalled_identities: set[str] = field(default_factory=set)
    """Client ids (``device`` or ``device/module``) whose telemetry is held as with `stall_pubacks`."""
    twin_failure_status: int = 500
    twin_failures_left: int = 0
    refuse_downstream_modules: bool = False
    """Refuse module identities of devices that are not IoT Edge devices (leaf modules), as edgeHub versions
    before 1.2.4 do (iothub-protocol.md §4), with CONNACK 2 (identifier rejected)."""


@dataclass(slots=True)
class Stats:
    connects: int = 0
    refused: int = 0
    auth_failures: int = 0
    refused_modules: int = 0
    """Leaf module identities refused while `refuse_downstream_modules` is on."""
    kicked: int = 0
    """Connections dropped because the same client id connected again."""
    protocol_errors: int = 0
    oversized_messages: int = 0
    stalled_dropped: int = 0
    """Held (stalled) messages pushed out by newer ones: their PUBACK never comes."""
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class AuthError(Exception):
    pass


class ProtocolViolation(Exception):
    """The client did something IoT Hub answers by closing the connection."""


class Broker:
    def __init__(self, registry: Registry, messages: MessageLog, hub_hostname: str,
                 gateway_hostnames: Callable[[], list[str]]) -> None:
        self.registry = registry
        self.messages = messages
        self.hub_hostname = hub_hostname
        self._gateway_hostnames = gateway_hostnames
        self.sessions: dict[str, Session] = {}
        self.connections: dict[str, Connection] = {}
        self.faults = Faults()
        self.stats = Stats()
        self.answer_unsubscribed_twin = False
        """Answer twin requests of a client not subscribed to `$iothub/twin/res/#` (undocumented in the hub)."""
        self.gateway_scope: str | None = None
        """When set, act as that edge device's edgeHub in Scope mode: only its modules and children connect."""
        self._stalled: collections.deque[tuple[Connection, int, ReceivedMessage]] = collections.deque(
            maxlen=STALLED_LIMIT)
        self._handlers: set[asyncio.Task[None]] = set()
        self._methods: dict[str, asyncio.Future[MethodResult]] = {}
        self._method_ids = itertools.count(1)
        self.changed = Notifier()
        """Notified on every connect, refusal, authentication failure and disconnect."""

    # ---- links -------------------------------------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, link: Link) -> None:
        """Run one client link to its end. Never raises for a client's misbehaviour."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn: Connection | None = None
        try:
            conn = await self._handshake(reader, link)
            if conn is not None:
                await self._run(reader, conn)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, OSError) as exc:
            log.debug("link %s ended: %r", link.peer, exc)
        except (mqtt.MalformedPacket, ProtocolViolation) as exc:
            self.stats.protocol_errors += 1
            self.stats.last_error = f"{conn.client_id if conn else link.peer}: {exc}"
            log.info("closing %s: %s", link.peer, exc)
        finally:
            self._handlers.discard(task)
            if conn is not None:
                self._forget(conn)
            else:
                await link.close()

    async def close(self) -> None:
        """Drop every connection and wait for their handlers to finish."""
        for conn in list(self.connections.values()):
            conn.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        # Only the cancellations we just caused are expected here; gather collects them as results.
        await asyncio.gather(*handlers, return_exceptions=True)
        for future in self._methods.values():
            future.cancel()
        self._methods.clear()

    def _forget(self, conn: Connection) -> None:
        conn.close()
        if self.connections.get(conn.client_id) is conn:
            del self.connections[conn.client_id]
            self.changed.notify()
        kept = (s for s in self._stalled if s[0] is not conn)
        self._stalled = collections.deque(kept, maxlen=STALLED_LIMIT)

    # ---- CONNECT -----------------------------------------------------------------------------------------

    async def _handshake(self, reader: asyncio.StreamReader, link: Link) -> Connection | None:
        async with asyncio.timeout(CONNECT_ARRIVAL_TIMEOUT_S):
            first, body = await mqtt.read_packet(reader, MAX_PACKET_BYTES)
        packet = mqtt.decode(first, body)
        if not isinstance(packet, mqtt.Connect):
            raise ProtocolViolation(f"first packet is {type(packet).__name__}, not CONNECT")
        if packet.protocol_name != "MQTT" or packet.protocol_level != 4:
            link.write(mqtt.encode_connack(False, ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION))
            await link.drain()
            return None
        if self.faults.refuse_code is not None:
            self.stats.refused += 1
            self.changed.notify()
            link.write(mqtt.encode_connack(False, self.faults.refuse_code))
            await link.drain()
            return None
        try:
            identity = self.authenticate(packet)
        except AuthError as exc:
            self.stats.auth_failures += 1
            self.stats.last_error = f"{packet.client_id}: {exc}"
            self.changed.notify()
            log.info("refusing %s (%s): %s", packet.client_id, link.peer, exc)
            link.write(mqtt.encode_connack(False, ConnackCode.NOT_AUTHORIZED))
            await link.drain()
            return None
        if (self.faults.refuse_downstream_modules and identity.module_id is not None
                and not self.registry.get(identity.device_id).edge):
            self.stats.refused_modules += 1
            self.stats.last_error = f"{identity.id}: module identities of downstream devices are refused"
            self.changed.notify()
            log.info("refusing %s (%s): a downstream device's module", identity.id, link.peer)
            link.write(mqtt.encode_connack(False, ConnackCode.IDENTIFIER_REJECTED))
            await link.drain()
            return None

        if (old := self.connections.get(identity.id)) is not None:
            self.stats.kicked += 1
            self._forget(old)
        existing = self.sessions.get(identity.id)
        session_present = existing is not None and not packet.clean_session
        if existing is None or packet.clean_session:
            existing = self.sessions[identity.id] = Session(identity.id)
        conn = Connection(link, identity, existing, packet.keep_alive_s, packet.username or "")
        self.connections[identity.id] = conn
        self.stats.connects += 1
        # No await between registering the connection and returning it: serve() must own it to forget it.
        conn.send(mqtt.encode_connack(session_present, ConnackCode.ACCEPTED))
        for publish in existing.outbound.values():
            conn.send(mqtt.encode_publish(dataclasses.replace(publish, dup=True)))
        log.debug("%s connected from %s (session present: %s)", identity.id, link.peer, session_present)
        return conn

    def authenticate(self, packet: mqtt.Connect) -> Identity:
        """edgeHub's checks: user name grammar, client id = user name identity, SAS token for that identity."""
        if packet.username is None or packet.password is None:
            raise AuthError("user name and SAS token password required (X.509 is not emulated)")
        path, _, query = packet.username.partition("?")
        segments = path.rstrip("/").split("/")
        if len(segments) not in {2, 3} or not all(segments):
            raise AuthError(f"user name {packet.username!r} is not host/device[/module]/?api-version=...")
        host, name_id = segments[0], "/".join(segments[1:])
        if host not in {self.hub_hostname, *self._gateway_hostnames()}:
            raise AuthError(f"user name host {host!r} is neither the hub nor the gateway")
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        if API_VERSION_KEY not in params:
            raise AuthError("user name has no api-version")
        if packet.client_id != name_id:
            raise AuthError(f"client id {packet.client_id!r} differs from user name identity {name_id!r}")
        identity = self.registry.find(name_id)
        if identity is None:
            raise AuthError(f"unknown identity {name_id!r}")
        if self.gateway_scope is not None and not self._in_scope(identity):
            raise AuthError(f"{name_id!r} is outside the scope of edge device {self.gateway_scope!r}")
        try:
            token = sas.parse(packet.password.decode("utf-8", "replace"))
            keys = identity.keys
            if identity.module_id is not None:
                # allowDeviceAuthForModule: edgeHub lets a module sign with its device's key.
                keys = keys + self.registry.get(identity.device_id).keys
            sas.verify(token, keys)
        except sas.SasError as exc:
            raise AuthError(str(exc)) from exc
        self._check_audience(token.resource, identity)
        return identity

    def _check_audience(self, resource: str, identity: Identity) -> None:
        host, _, rest = resource.partition("/")
        parts = rest.split("/")
        if host not in {self.hub_hostname, *self._gateway_hostnames()}:
            raise AuthError(f"token audience host {host!r} is neither the hub nor the gateway")
        if len(parts) == 2 and parts[0] == "devices":
            device, module = parts[1], None
        elif len(parts) == 4 and parts[0] == "devices" and parts[2] == "modules":
            device, module = parts[1], parts[3]
        else:
            raise AuthError(f"token audience {resource!r} is not host/devices/d[/modules/m]")
        same_device = device.casefold() == identity.device_id.casefold()
        same_module = (module or "").casefold() == (identity.module_id or "").casefold()
        if not (same_device and same_module):
            raise AuthError(f"token audience {resource!r} is not {identity.id!r}")

    def _in_scope(self, identity: Identity) -> bool:
        """The edge device's own modules, its children, and the modules of its children."""
        if identity.module_id is not None:
            device = self.registry.get(identity.device_id)
            return self.gateway_scope in (device.device_id, device.parent)
        return identity.parent == self.gateway_scope

    # ---- packets -----------------------------------------------------------------------------------------

    async def _run(self, reader: asyncio.StreamReader, conn: Connection) -> None:
        await conn.link.drain()
        self.changed.notify()
        # The hub's keep-alive timeout is 1.5x the client's (learn "MQTT support", keep-alive).
        idle_s = conn.keep_alive_s * 1.5 if conn.keep_alive_s else None
        while not conn.closed:
            async with asyncio.timeout(idle_s):
                first, body = await mqtt.read_packet(reader, MAX_PACKET_BYTES)
            packet = mqtt.decode(first, body)
            match packet:
                case mqtt.Publish():
                    self._on_publish(conn, packet)
                case mqtt.PacketIdOnly(kind=PacketType.PUBACK, packet_id=packet_id):
                    conn.session.outbound.pop(packet_id, None)
                case mqtt.Subscribe():
                    self._on_subscribe(conn, packet)
                case mqtt.Unsubscribe(packet_id=packet_id, topics=topics):
                    for topic in topics:
                        conn.session.subscriptions.pop(topic, None)
                    conn.send(mqtt.encode_ack(PacketType.UNSUBACK, packet_id))
                case mqtt.Bare(kind=PacketType.PINGREQ):
                    conn.send(mqtt.encode_bare(PacketType.PINGRESP))
                case mqtt.Bare(kind=PacketType.DISCONNECT):
                    return
                case _:
                    raise ProtocolViolation(f"unexpected {packet!r}")
            await conn.link.drain()

    def _on_subscribe(self, conn: Connection, packet: mqtt.Subscribe) -> None:
        codes = []
        for topic_filter, qos in packet.topics:
            if self._may_subscribe(conn.identity, topic_filter):
                # IoT Hub grants QoS 1 for a QoS 2 request.
                granted = min(qos, 1)
                conn.session.subscriptions[topic_filter] = granted
                codes.append(granted)
            else:
                codes.append(mqtt.SUBACK_FAILURE)
        conn.send(mqtt.encode_suback(packet.packet_id, codes))

    @staticmethod
    def _may_subscribe(identity: Identity, topic_filter: str) -> bool:
        if topic_filter in HUB_FILTERS:
            return True
        if identity.module_id is None:
            return topic_filter == f"devices/{identity.device_id}/messages/devicebound/#"
        base = f"devices/{identity.device_id}/modules/{identity.module_id}"
        return topic_filter in {f"{base}/inputs/#", f"{base}/#"}

    def _on_publish(self, conn: Connection, packet: Publish) -> None:
        if packet.qos == 2:
            raise ProtocolViolation("QoS 2 PUBLISH (IoT Hub closes the connection)")
        topic = packet.topic
        if topic.startswith("$iothub/twin/"):
            self._ack(conn, packet)
            self._on_twin_request(conn, topic, packet.payload)
            return
        if topic.startswith("$iothub/methods/res/"):
            self._ack(conn, packet)
            self._on_method_response(topic, packet.payload)
            return
        event = parse_event_topic(topic)
        if event is None:
            raise ProtocolViolation(f"PUBLISH to unsupported topic {topic!r}")
        if (event.device_id, event.module_id) != (conn.identity.device_id, conn.identity.module_id):
            raise ProtocolViolation(f"{conn.client_id!r} published as another identity on {topic!r}")
        size = message_size(packet.payload, event)
        if size > MESSAGE_LIMIT_BYTES:
            self.stats.oversized_messages += 1
            raise ProtocolViolation(f"message of {size} bytes exceeds {MESSAGE_LIMIT_BYTES}")
        message = message_from_topic(conn.client_id, event, topic, packet.payload, dup=packet.dup,
                                     retain=packet.retain)
        if packet.qos == 0:
            self.messages.append(message)
            return
        packet_id = packet.packet_id
        assert packet_id is not None, "the codec gives every QoS 1 PUBLISH a packet id"
        if self.faults.stall_pubacks or conn.client_id in self.faults.stalled_identities:
            if len(self._stalled) == STALLED_LIMIT:
                self.stats.stalled_dropped += 1
            self._stalled.append((conn, packet_id, message))
        elif self.faults.puback_delay_s > 0:

            def fire() -> None:
                conn.timers.discard(timer)
                self._store_and_ack(conn, packet_id, message)

            timer = asyncio.get_running_loop().call_later(self.faults.puback_delay_s, fire)
            conn.timers.add(timer)
        else:
            self._store_and_ack(conn, packet_id, message)

    def _store_and_ack(self, conn: Connection, packet_id: int, message: ReceivedMessage) -> None:
        if conn.closed:
            return
        self.messages.append(message)
        conn.send(mqtt.encode_ack(PacketType.PUBACK, packet_id))

    @staticmethod
    def _ack(conn: Connection, packet: Publish) -> None:
        if packet.qos == 1 and packet.packet_id is not None:
            conn.send(mqtt.encode_ack(PacketType.PUBACK, packet.packet_id))

    def release_pubacks(self) -> int:
        """Store and acknowledge every held message of a live connection; returns how many."""
        released = 0
        while self._stalled:
            conn, packet_id, message = self._stalled.popleft()
            if not conn.closed:
                self._store_and_ack(conn, packet_id, message)
                released += 1
        return released

    # ---- twins -------------------------------------------------------------------------------------------

    def _on_twin_request(self, conn: Connection, topic: str, payload: bytes) -> None:
        path, _, query = topic.partition("?")
        rid = urllib.parse.parse_qs(query).get("$rid", [""])[0]
        if not rid:
            raise ProtocolViolation(f"twin request without $rid: {topic!r}")
        twin = conn.identity.twin
        status, body, version = 200, b"", None
        if self.faults.twin_failures_left > 0:
            self.faults.twin_failures_left -= 1
            status = self.faults.twin_failure_status
            body = orjson.dumps({"errorCode": status * 1000, "message": "injected failure"})
        elif path == "$iothub/twin/GET/":
            body = orjson.dumps(twin.document())
        elif path == "$iothub/twin/PATCH/properties/reported/":
            try:
                version = twin.reported.apply(orjson.loads(payload))
                status = 204
            except orjson.JSONDecodeError:
                status, body = 400, orjson.dumps({"errorCode": 400004, "message": "malformed JSON"})
            except TwinError as exc:
                status, body = exc.status, orjson.dumps({"errorCode": 400004, "message": str(exc)})
        else:
            raise ProtocolViolation(f"unsupported twin topic {topic!r}")
        response = f"$iothub/twin/res/{status}/?$rid={urllib.parse.quote(rid, safe='')}"
        if version is not None:
            response += f"&$version={version}"
        self._deliver(conn.session, response, body, force=self.answer_unsubscribed_twin)

    async def set_desired(self, identity: Identity, patch: dict[str, Any]) -> int:
        """Apply a desired patch and push it (with `$version`) to the identity if it listens for patches."""
        version = identity.twin.desired.apply(patch)
        body = orjson.dumps({**patch, "$version": version})
        session = self.sessions.get(identity.id)
        # edgeHub relays desired patches only while the client is connected; a later GET catches up.
        if session is not None and identity.id in self.connections:
            self._deliver(session, f"$iothub/twin/PATCH/properties/desired/?$version={version}", body)
            await self._drain(identity.id)
        return version

    # ---- cloud -> device ---------------------------------------------------------------------------------

    def _deliver(self, session: Session, topic: str, payload: bytes, *, force: bool = False,
                 queue_offline: bool = False) -> bool:
        """Publish to a session if it subscribed to `topic`; returns whether it was sent or queued."""
        qos = session.granted(topic)
        if qos is None:
            if not force:
                return False
            qos = 1
        conn = self.connections.get(session.client_id)
        if conn is None and not queue_offline:
            return False
        packet_id = None
        if qos:
            packet_id = session.next_packet_id()
            if len(session.outbound) >= SESSION_QUEUE_LIMIT:
                session.outbound.popitem(last=False)
                session.dropped_outbound += 1
        publish = Publish(topic, payload, qos, packet_id)
        if packet_id is not None:
            session.outbound[packet_id] = publish
        if conn is not None:
            conn.send(mqtt.encode_publish(publish))
        return True

    async def _drain(self, client_id: str) -> None:
        conn = self.connections.get(client_id)
        if conn is not None:
            with contextlib.suppress(ConnectionError):
                await conn.link.drain()

    async def send_to_input(self, identity: Identity, input_name: str, body: bytes,
                            properties: dict[str, str | None]) -> bool:
        """Route a message to a module input, as edgeHub does for `BrokeredEndpoint(.../inputs/{input})`."""
        if identity.module_id is None:
            raise ValueError("inputs exist only on modules")
        topic = f"devices/{identity.device_id}/modules/{identity.module_id}/inputs/{input_name}"
        if properties:
            topic += "/" + encode_bag(properties)
        session = self.sessions.get(identity.id)
        sent = session is not None and self._deliver(session, topic, body, queue_offline=True)
        await self._drain(identity.id)
        return sent

    async def send_c2d(self, identity: Identity, body: bytes, properties: dict[str, str | None]) -> bool:
        if identity.module_id is not None:
            raise ValueError("cloud-to-device messages cannot target modules")
        topic = f"devices/{identity.device_id}/messages/devicebound/{encode_bag(properties)}"
        session = self.sessions.get(identity.id)
        sent = session is not None and self._deliver(session, topic, body, queue_offline=True)
        await self._drain(identity.id)
        return sent

    async def invoke_method(self, identity: Identity, name: str, payload: Any,
                            timeout_s: float) -> MethodResult:
        """Call a direct method; 404 if the client is offline or not listening, 504 on timeout, as the hub."""
        session = self.sessions.get(identity.id)
        rid = format(next(self._method_ids), "x")
        future: asyncio.Future[MethodResult] = asyncio.get_running_loop().create_future()
        self._methods[rid] = future
        try:
            topic = f"$iothub/methods/POST/{name}/?$rid={rid}"
            if session is None or not self._deliver(session, topic, orjson.dumps(payload)):
                return MethodResult(404, {"errorCode": 404103, "message": "device is not online"})
            await self._drain(identity.id)
            try:
                async with asyncio.timeout(timeout_s):
                    return await future
            except TimeoutError:
                return MethodResult(504, {"errorCode": 504101, "message": "method timed out"})
        finally:
            self._methods.pop(rid, None)

    def _on_method_response(self, topic: str, payload: bytes) -> None:
        path, _, query = topic.partition("?")
        rid = urllib.parse.parse_qs(query).get("$rid", [""])[0]
        try:
            status = int(urllib.parse.unquote(path.split("/")[3]))
        except (IndexError, ValueError) as exc:
            raise ProtocolViolation(f"bad method response topic {topic!r}") from exc
        future = self._methods.get(rid)
        if future is not None and not future.done():
            try:
                body = orjson.loads(payload) if payload else None
            except orjson.JSONDecodeError:
                body = payload.decode("utf-8", "replace")
            future.set_result(MethodResult(status, body))

    # ---- queries -----------------------------------------------------------------------------------------

    def connection_info(self) -> list[ConnectionInfo]:
        return [ConnectionInfo(c.client_id, c.link.peer, c.link.transport, c.connected_at, c.keep_alive_s,
                               sorted(c.session.subscriptions)) for c in self.connections.values()]

    def drop(self, client_id: str | None = None) -> int:
        victims = [c for c in self.connections.values() if client_id is None or c.client_id == client_id]
        for conn in victims:
            self._forget(conn)
        return len(victims)

    async def wait_connected(self, client_id: str, timeout_s: float, *, after: int = 0) -> None:
        """Wait until `client_id` is connected and at least `after` connects happened in total."""
        await self.changed.wait_for(lambda: client_id in self.connections and self.stats.connects >= after,
                                    timeout_s)
