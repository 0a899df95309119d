"""ConnectionCreate aggregation, as the reference agents do it (defender-spec §4).

Within one window, connections that are identical on the identity keys — direction, local address, remote address,
protocol and the *service* port (the local port for ``In``, the remote port for ``Out``; process fields are
constant here) — are counted instead of reported one by one. When the window has passed (strictly more than the
interval since the previous flush) each distinct connection becomes one event with ``Category: "Aggregated"`` and
exactly one payload item whose ``ExtraDetails`` carry ``HitCount``, ``StartTimeLocal``, ``StartTimeUtc``,
``EndTimeLocal`` and ``EndTimeUtc`` as strings (start = the previous flush, end = this one). Non-key fields are
zeroed: ``ProcessId`` 0 and the client-side port ``"0"``; per-connection evidence (TCP state, bytes) is left out
because it differs between the aggregated connections.

The map is bounded (``max_entries``): a connection with a new key that finds the map full is not lost, it is
returned to be reported unaggregated and counted in :attr:`ConnectionAggregator.overflowed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leafguard.agent.events import SOURCE, Event, connection_payload, timestamp_local, timestamp_utc
from leafguard.observe.model import ConnectionSeen

DEFAULT_MAX_ENTRIES = 4096

_Key = tuple[str, str, str, str, int]


@dataclass(slots=True)
class _Entry:
    item: dict[str, Any]
    hits: int


class ConnectionAggregator:
    """The aggregation map of one leaf's ConnectionCreate events; pure, driven by packet time."""

    def __init__(self, interval_s: float, now: float, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.interval_s = interval_s
        self.window_start = now
        self.max_entries = max_entries
        self.overflowed = 0
        """Connections reported unaggregated because the map was full (cumulative)."""
        self._entries: dict[_Key, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, obs: ConnectionSeen) -> Event | None:
        """Count one connection. Returns an event to report right away only when the map is full."""
        # The key is built from the raw record (cheap); the payload only for a new key.
        key: _Key = (
            obs.direction,
            obs.local_addr,
            obs.remote_addr,
            obs.protocol,
            obs.local_port if obs.direction == "In" else obs.remote_port,
        )
        if not self._entries and obs.ts - self.window_start > self.interval_s:
            # Empty windows end silently on the interval grid, so an idle period does not make the next
            # window start in the past (and its first connection flush at once).
            self.window_start += (obs.ts - self.window_start) // self.interval_s * self.interval_s
        entry = self._entries.get(key)
        if entry is not None:
            entry.hits += 1
            return None
        item = connection_payload(obs)
        if item is None:
            return None
        if len(self._entries) >= self.max_entries:
            self.overflowed += 1
            return Event("ConnectionCreate", "Triggered", "Security", obs.ts, (item,))
        if obs.direction == "In":
            item["RemotePort"] = "0"
        else:
            item["LocalPort"] = "0"
        item["ExtraDetails"] = {"Source": SOURCE, "LeafMac": obs.leaf_mac}
        self._entries[key] = _Entry(item, 1)
        return None

    def export_state(self) -> dict[str, Any]:
        """The open window (JSON-ready): its start, the connections counted in it, the overflow count."""
        return {
            "windowStart": self.window_start,
            "overflowed": self.overflowed,
            "entries": [[list(key), entry.item, entry.hits] for key, entry in self._entries.items()],
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        entries: dict[_Key, _Entry] = {}
        for key, item, hits in state["entries"]:
            direction, local, remote, protocol, port = key
            if not isinstance(item, dict):
                raise TypeError("aggregation entry: item must be an object")
            entries[(str(direction), str(local), str(remote), str(protocol), int(port))] = _Entry(item, int(hits))
        self.window_start = float(state["windowStart"])
        self.overflowed = int(state["overflowed"])
        self._entries = entries

    def due_at(self) -> float:
        """The time after which a tick flushes (strictly later than this)."""
        return self.window_start + self.interval_s

    def is_due(self, now: float) -> bool:
        """More than the interval has passed since the previous flush."""
        return now - self.window_start > self.interval_s

    def flush(self, now: float) -> list[Event]:
        """End the window at ``now``: one Aggregated event per distinct connection, in first-seen order."""
        start_local, start_utc = timestamp_local(self.window_start), timestamp_utc(self.window_start)
        end_local, end_utc = timestamp_local(now), timestamp_utc(now)
        out: list[Event] = []
        for entry in self._entries.values():
            item = dict(entry.item)
            item["ExtraDetails"] = {
                **entry.item["ExtraDetails"],
                "HitCount": str(entry.hits),
                "StartTimeLocal": start_local,
                "StartTimeUtc": start_utc,
                "EndTimeLocal": end_local,
                "EndTimeUtc": end_utc,
            }
            out.append(Event("ConnectionCreate", "Aggregated", "Security", now, (item,)))
        self._entries.clear()
        self.window_start = now
        return out
