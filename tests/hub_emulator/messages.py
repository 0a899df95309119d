"""Telemetry topics, property bags and the bounded log of what the hub received.

The SDK encodes every key and value with `quote(safe="")` and puts system properties (`$.on`, `$.mid`,
`$.cid`, `$.uid`, `$.ct`, `$.ce`, `$.ifid`, `$.exp`) before the custom ones; the hub decodes with plain `unquote`
(not `unquote_plus`: a `+` stays a `+`). A key without `=` has the value None.
"""

from __future__ import annotations

import collections
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from tests.hub_emulator.notify import Notifier

MESSAGE_LIMIT_BYTES = 262144  # IoT Hub's device-to-cloud limit, body and properties together
SECURITY_INTERFACE_ID = "urn:azureiot:Security:SecurityAgent:1"


def decode_bag(bag: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for part in bag.split("&"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        out[urllib.parse.unquote(key)] = urllib.parse.unquote(value) if sep else None
    return out


def encode_bag(properties: dict[str, str | None]) -> str:
    def one(key: str, value: str | None) -> str:
        quoted = urllib.parse.quote(key, safe="")
        return quoted if value is None else f"{quoted}={urllib.parse.quote(value, safe='')}"

    return "&".join(one(k, v) for k, v in properties.items())


@dataclass(frozen=True, slots=True)
class EventTopic:
    device_id: str
    module_id: str | None
    bag: dict[str, str | None]


def parse_event_topic(topic: str) -> EventTopic | None:
    """`devices/{d}[/modules/{m}]/messages/events[/][{bag}]`, the eight forms edgeHub accepts; else None."""
    parts = topic.split("/", 6)
    if len(parts) < 4 or parts[0] != "devices":
        return None
    device, rest = parts[1], parts[2:]
    module = None
    if rest[0] == "modules" and len(rest) >= 4:
        module, rest = rest[1], rest[2:]
    if rest[:2] != ["messages", "events"] or len(rest) > 3:
        return None
    return EventTopic(device, module, decode_bag(rest[2]) if len(rest) == 3 else {})


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One device-to-cloud or module-output message, as the hub stored it."""

    identity: str
    """Client id of the sending connection (`device` or `device/module`), as it authenticated."""
    body: bytes
    system: dict[str, str | None]
    """System properties by their wire names (`$.ifid`, `$.on`, `$.ct`, `$.ce`, `$.mid`, ...)."""
    properties: dict[str, str | None]
    """Custom (application) properties."""
    received_at: datetime
    topic: str
    dup: bool = False
    """The client re-sent it after a reconnect (paho's DUP flag); IoT Hub stores it again (at-least-once)."""

    @property
    def output_name(self) -> str | None:
        return self.system.get("$.on")

    @property
    def interface_id(self) -> str | None:
        return self.system.get("$.ifid")

    @property
    def is_security_message(self) -> bool:
        return self.interface_id == SECURITY_INTERFACE_ID

    @property
    def content_type(self) -> str | None:
        return self.system.get("$.ct")

    @property
    def content_encoding(self) -> str | None:
        return self.system.get("$.ce")

    @property
    def message_id(self) -> str | None:
        return self.system.get("$.mid")

    @property
    def connection_device_id(self) -> str:
        """IoT Hub's `connectionDeviceId`: the device of the connection that sent it (never read from the topic or
        the properties, so a gateway cannot speak for a leaf except over the leaf's own connection)."""
        return self.identity.partition("/")[0]

    @property
    def connection_module_id(self) -> str | None:
        """IoT Hub's `connectionModuleId`: the sending connection's module, None for a device connection."""
        return self.identity.partition("/")[2] or None

    def json(self) -> Any:
        return orjson.loads(self.body)

    def to_dict(self) -> dict[str, Any]:
        try:
            body: Any = self.body.decode()
        except UnicodeDecodeError:
            body = self.body.hex()
        return {"identity": self.identity, "connectionDeviceId": self.connection_device_id,
                "connectionModuleId": self.connection_module_id, "system": self.system,
                "properties": self.properties, "body": body,
                "received_at": self.received_at.isoformat(), "topic": self.topic, "dup": self.dup}


def message_from_topic(identity: str, topic: EventTopic, raw_topic: str, body: bytes, *, dup: bool,
                       retain: bool) -> ReceivedMessage:
    system = {k: v for k, v in topic.bag.items() if k.startswith("$.")}
    custom = {k: v for k, v in topic.bag.items() if not k.startswith("$.")}
    if retain:
        # IoT Hub does not keep retained messages; it marks them instead (learn "MQTT support", D2C).
        custom["mqtt-retain"] = "true"
    return ReceivedMessage(identity, body, system, custom, datetime.now(UTC), raw_topic, dup)


def message_size(body: bytes, topic: EventTopic) -> int:
    return len(body) + sum(len(k.encode()) + len((v or "").encode()) for k, v in topic.bag.items())


class MessageLog:
    """The last `capacity` messages, a counter of all of them and a way to wait for more."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.total = 0
        """Every message ever appended, evicted or cleared ones included."""
        self.evicted = 0
        self._items: collections.deque[ReceivedMessage] = collections.deque(maxlen=capacity)
        self._changed = Notifier()

    def append(self, message: ReceivedMessage) -> None:
        if len(self._items) == self.capacity:
            self.evicted += 1
        self._items.append(message)
        self.total += 1
        self._changed.notify()

    def items(self, identity: str | None = None) -> list[ReceivedMessage]:
        return [m for m in self._items if identity is None or m.identity == identity]

    def clear(self) -> None:
        self._items.clear()

    async def wait_for(self, count: int, identity: str | None, timeout_s: float) -> list[ReceivedMessage]:
        """Wait until at least `count` messages (of `identity`) are in the log; TimeoutError otherwise."""
        await self._changed.wait_for(lambda: len(self.items(identity)) >= count, timeout_s)
        return self.items(identity)
