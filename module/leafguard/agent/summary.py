"""A per-leaf summary of Defender security messages: how many, and their events by type (one line per leaf).

Used by ``leafguard analyze`` (the messages a run would send) and by the hub emulator's ``--show`` (the messages
that arrived), so both read the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class LeafMessages:
    identity: str
    messages: int = 0
    events: Counter[str] = field(default_factory=Counter)
    """Events by their ``Name`` (ConnectionCreate, ListeningPorts, MessageStatistics, ...)."""


def summarize_messages(messages: Iterable[tuple[str, Mapping[str, Any]]]) -> list[LeafMessages]:
    """``(identity, message body)`` pairs → one row per identity, in identity order."""
    rows: dict[str, LeafMessages] = {}
    for identity, body in messages:
        row = rows.get(identity)
        if row is None:
            row = rows[identity] = LeafMessages(identity)
        row.messages += 1
        for event in body.get("Events", ()):
            row.events[str(event.get("Name", "?"))] += 1
    return [rows[k] for k in sorted(rows)]


def format_message_summary(rows: list[LeafMessages]) -> str:
    total = sum(r.messages for r in rows)
    head = f"Defender security messages: {total} for {len(rows)} leaves (events by type)"
    if not rows:
        return head
    width = max(len(r.identity) for r in rows)
    lines = [head]
    for r in rows:
        kinds = ", ".join(f"{name} {n}" for name, n in sorted(r.events.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"  {r.identity:<{width}}  {r.messages:>3} msg  {sum(r.events.values()):>4} events  {kinds}")
    return "\n".join(lines)
