"""LeafGuard alerts as hub messages: plain JSON on module output ``alerts`` (not Defender security messages).

Alerts are batched: one message carries a JSON array of alerts of one identity, up to
:data:`ALERT_BATCH_MAX_BYTES`, so a burst of findings (1000 leaves' cleartext logins) is a few messages, not
one message per alert. The receiver reads ``alertCount`` and the body (an array); ``alertType`` names the
type when every alert of the message has the same one, else ``mixed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


def batch_alerts(
    alerts: Iterable[dict[str, Any]],
    identity_of: Callable[[dict[str, Any]], str],
    max_bytes: int = ALERT_BATCH_MAX_BYTES,
) -> list[AlertMessage]:
    """Alerts grouped by identity (first-seen order), each group split into arrays of at most ``max_bytes``."""
    groups: dict[str, list[bytes]] = {}
    types: dict[str, list[str]] = {}
    for alert in alerts:
        ident = identity_of(alert)
        groups.setdefault(ident, []).append(orjson.dumps(alert))
        types.setdefault(ident, []).append(str(alert.get("type", "")))
    out: list[AlertMessage] = []
    for ident, parts in groups.items():
        kinds = types[ident]
        start = 0
        while start < len(parts):
            size = 2 + len(parts[start])
            end = start + 1
            while end < len(parts) and size + 1 + len(parts[end]) <= max_bytes:
                size += 1 + len(parts[end])
                end += 1
            chunk_types = set(kinds[start:end])
            out.append(
                AlertMessage(
                    identity=ident,
                    body=b"[" + b",".join(parts[start:end]) + b"]",
                    priority="High",
                    event_count=end - start,
                    alert_type=chunk_types.pop() if len(chunk_types) == 1 else "mixed",
                )
            )
            start = end
    return out
