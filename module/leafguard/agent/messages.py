"""Security messages: the envelope, filling one message from the queues, and its properties.

A body is ``{"AgentVersion":…,"AgentId":…,"MessageSchemaVersion":"1.0","Events":[…]}`` in compact UTF-8 JSON.
Its size, envelope included, never exceeds ``maxMessageSizeInBytes``: events are already serialized, so the
builder adds exact byte counts (event, comma, envelope) and never estimates.

Filling (defender-spec §5.3): the operational queue first, then the queue whose trigger fired, then the other one
as padding; oldest first within each queue; a queue's contribution ends at its first event that does not fit (FIFO
order is kept; that event waits for the next message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from leafguard.agent.events import agent_id
from leafguard.agent.queues import EventQueues, QueueName

SECURITY_INTERFACE_ID = "urn:azureiot:Security:SecurityAgent:1"
"""What ``Message.set_as_security_message()`` sets; sent as the ``$.ifid`` system property."""
CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"
MESSAGE_SCHEMA_VERSION = "1.0"
SDK_BODY_LIMIT_BYTES = 262144 - 1024
"""The largest body we build whatever the configuration says: azure-iot-device refuses a message whose
``get_size()`` (body plus ``sys.getsizeof`` overheads and properties) exceeds 262144, so keep a margin."""

Trigger = Literal["High", "Low"]


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One security message ready to send for one leaf identity."""

    identity: str
    body: bytes
    """The serialized body (UTF-8 JSON); ``len(body) <= maxMessageSizeInBytes``."""
    priority: Trigger
    """The queue whose trigger built the message (the ``MessagePriority`` property)."""
    event_count: int
    hub_resource_id: str = ""

    @property
    def custom_properties(self) -> dict[str, str]:
        """Application properties: ``MessagePriority`` (and ``HubResourceId`` when set), as C# sends."""
        props: dict[str, str] = {"MessagePriority": self.priority}
        if self.hub_resource_id:
            props["HubResourceId"] = self.hub_resource_id
        return props

    def properties(self) -> dict[str, str]:
        """System and application properties under their MQTT names (``$.ifid``, ``$.ct``, ``$.ce``)."""
        return {
            "$.ifid": SECURITY_INTERFACE_ID,
            "$.ct": CONTENT_TYPE,
            "$.ce": CONTENT_ENCODING,
            **self.custom_properties,
        }

    def body_json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed

    def jsonl_line(self) -> bytes:
        """``{"identity": …, "properties": {…}, "body": {…}}`` and a newline (the local file format)."""
        return (
            b'{"identity":'
            + orjson.dumps(self.identity)
            + b',"properties":'
            + orjson.dumps(self.properties())
            + b',"body":'
            + self.body
            + b"}\n"
        )

    def to_sdk_message(self) -> Any:
        """An ``azure.iot.device.Message`` marked as a security message, with content type and encoding."""
        from azure.iot.device import Message

        # bytes, not str: the SDK sizes str data with sys.getsizeof, up to 4 bytes per non-ASCII character.
        msg = Message(self.body, content_encoding=CONTENT_ENCODING, content_type=CONTENT_TYPE)  # type: ignore[no-untyped-call]
        msg.set_as_security_message()  # type: ignore[no-untyped-call]
        msg.custom_properties.update(self.custom_properties)
        return msg


class MessageBuilder:
    """Builds message bodies for one agent identity within a size limit."""

    def __init__(self, identity: str, agent_version: str, max_message_size_bytes: int) -> None:
        self.identity = identity
        self.agent_version = agent_version
        self.max_message_size_bytes = max_message_size_bytes
        self._prefix = (
            b'{"AgentVersion":'
            + orjson.dumps(agent_version)
            + b',"AgentId":'
            + orjson.dumps(agent_id(identity))
            + b',"MessageSchemaVersion":"'
            + MESSAGE_SCHEMA_VERSION.encode()
            + b'","Events":['
        )
        self._suffix = b"]}"

    @property
    def overhead_bytes(self) -> int:
        """Bytes of the envelope around the events."""
        return len(self._prefix) + len(self._suffix)

    @property
    def body_limit_bytes(self) -> int:
        """``maxMessageSizeInBytes``, but never more than :data:`SDK_BODY_LIMIT_BYTES`."""
        return min(self.max_message_size_bytes, SDK_BODY_LIMIT_BYTES)

    @property
    def max_event_bytes(self) -> int:
        """The largest serialized event that fits in a message on its own."""
        return self.body_limit_bytes - self.overhead_bytes

    def build(
        self, queues: EventQueues, main: QueueName, other: QueueName, hub_resource_id: str = ""
    ) -> OutgoingMessage | None:
        """Take events (operational, main, other; oldest first) into one message; None if nothing fits."""
        remaining = self.max_event_bytes
        parts: list[bytes] = []
        for name in (QueueName.OPERATIONAL, main, other):
            while True:
                size = queues.head_size(name)
                if size is None:
                    break
                cost = size + (1 if parts else 0)
                if cost > remaining:
                    break
                parts.append(queues.pop(name))
                remaining -= cost
        if not parts:
            return None
        body = self._prefix + b",".join(parts) + self._suffix
        assert len(body) <= self.body_limit_bytes
        trigger: Trigger = "High" if main == QueueName.HIGH else "Low"
        return OutgoingMessage(self.identity, body, trigger, len(parts), hub_resource_id)
