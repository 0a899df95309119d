"""LeafGuard alerts as hub messages: plain JSON on module output ``alerts`` (not Defender security messages).

Alerts are batched: one message carries a JSON array of alerts, up to :data:`ALERT_BATCH_MAX_BYTES`, so a burst of
findings (1000 leaves' cleartext logins) is a few messages, not one message per alert. The receiver reads
``alertCount`` and the body (an array; every alert names its leaf in ``leafIdentity``); ``alertType`` names the
type when every alert of the message has the same one, else ``mixed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from leafguard.agent.messages import OutgoingMessage

ALERTS_OUTPUT = "alerts"
ALERT_BATCH_MAX_BYTES = 64 * 1024
"""The largest alert message body we build (one alert larger than this goes alone)."""


@dataclass(frozen=True, slots=True)
class AlertMessage(OutgoingMessage):
    """LeafGuard alerts for module output ``alerts``: a JSON array (plain JSON: not a security message)."""

    output: str = ALERTS_OUTPUT
    alert_type: str = ""

    @property
    def custom_properties(self) -> dict[str, str]:
        return {"alertType": self.alert_type, "alertCount": str(self.event_count)}

    def to_sdk_message(self) -> Any:
        from azure.iot.device import Message

        msg = Message(self.body, content_encoding="utf-8", content_type="application/json")  # type: ignore[no-untyped-call]
        msg.custom_properties.update(self.custom_properties)
        return msg


class AlertBatcher:
    """Collects alerts (already JSON) and cuts them into messages of at most ``max_bytes``. Pure.

    An alert waits at most ``max_wait_s`` (the service's ticks call :meth:`due`), or until a full message's
    worth is waiting; one alert larger than ``max_bytes`` goes alone. Every message is one JSON array, sent as
    the module's identity; each alert names its leaf (``leafIdentity``) itself.
    """

    def __init__(self, identity: str, max_bytes: int = ALERT_BATCH_MAX_BYTES, max_wait_s: float = 1.0) -> None:
        self.identity = identity
        self.max_bytes = max_bytes
        self.max_wait_s = max_wait_s
        self._parts: list[bytes] = []
        self._types: list[str] = []
        self._bytes = 2
        self._since: float | None = None
        self.alerts = 0
        self.messages = 0

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, alert: dict[str, Any], now: float) -> list[AlertMessage]:
        """Queue one alert; returns the messages that became full."""
        raw = orjson.dumps(alert)
        out: list[AlertMessage] = []
        if self._parts and self._bytes + 1 + len(raw) > self.max_bytes:
            out.append(self._cut())
        if not self._parts:
            self._since = now
        self._parts.append(raw)
        self._types.append(str(alert.get("type", "")))
        self._bytes += len(raw) + (1 if len(self._parts) > 1 else 0)
        self.alerts += 1
        return out

    def due(self, now: float) -> list[AlertMessage]:
        """The waiting alerts as a message when the oldest has waited ``max_wait_s``."""
        if self._parts and self._since is not None and now - self._since >= self.max_wait_s:
            return [self._cut()]
        return []

    def flush(self) -> list[AlertMessage]:
        return [self._cut()] if self._parts else []

    def _cut(self) -> AlertMessage:
        kinds = set(self._types)
        msg = AlertMessage(
            identity=self.identity,
            body=b"[" + b",".join(self._parts) + b"]",
            priority="High",
            event_count=len(self._parts),
            alert_type=kinds.pop() if len(kinds) == 1 else "mixed",
        )
        self._parts, self._types, self._bytes, self._since = [], [], 2, None
        self.messages += 1
        return msg
