"""The fleet's journal: every input that changes the agents, as one small typed record each, so that a restart
continues exactly where the killed process stood (`leafguard.service.journal` keeps them on disk).

The agents are pure state machines driven by their inputs and ``now`` (`leafguard.agent.agent`), so the saved state
(`leafguard.service.state`) plus the inputs that came after it, applied again in order, give back the agents as they
were: the events in their caches, their aggregation windows, counters and timers, event for event. Messages built
while the inputs are applied again are discarded: they reached the output before the process died (every output
writes a message before the call that built it returns), and the few that a kill cut off are found by the
reconciliation with the output that follows (`leafguard.service.state.reconcile`).

A tick is journalled only when it does something (one that finds nothing due changes nothing), with the leaves its
discovery saw and the inventory views of the agents that take a snapshot in it; the other agents are handed a view
nobody reads. Pure: encoding and decoding only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from leafguard.observe.model import ConnectionSeen, LeafView, LoginSeen, Observation, Service


class JournalError(ValueError):
    """A journal record that cannot be decoded, or inputs that no longer lead where they led (a replay that
    diverges): the replay stops there."""


@dataclass(frozen=True, slots=True)
class Observed:
    obs: Observation

    @property
    def clock(self) -> float | None:
        """The input's time (None: it has none); a replay ends at the latest."""
        return self.obs.ts


@dataclass(frozen=True, slots=True)
class Ticked:
    now: float
    hold: bool
    discovered: tuple[str, ...] | None
    """The MACs of the inventory views the tick asked for, in their order (None: it asked for none)."""
    views: tuple[LeafView, ...]
    """The views the agents that took a snapshot used."""

    @property
    def clock(self) -> float | None:
        return self.now


@dataclass(frozen=True, slots=True)
class ShutDown:
    now: float

    @property
    def clock(self) -> float | None:
        return self.now


@dataclass(frozen=True, slots=True)
class DesiredApplied:
    identity: str
    desired: object
    now: float

    @property
    def clock(self) -> float | None:
        return self.now


@dataclass(frozen=True, slots=True)
class DefaultDesiredSet:
    desired: object

    @property
    def clock(self) -> float | None:
        return None


@dataclass(frozen=True, slots=True)
class LeafMapSet:
    leaf_map: Mapping[str, str]
    now: float

    @property
    def clock(self) -> float | None:
        return self.now


@dataclass(frozen=True, slots=True)
class SendFailures:
    identity: str
    count: int

    @property
    def clock(self) -> float | None:
        return None


@dataclass(frozen=True, slots=True)
class CaptureDrops:
    frames: int

    @property
    def clock(self) -> float | None:
        return None


@dataclass(frozen=True, slots=True)
class Diagnosed:
    severity: str
    message: str
    now: float

    @property
    def clock(self) -> float | None:
        return self.now


@dataclass(frozen=True, slots=True)
class Flushed:
    mac: str
    now: float

    @property
    def clock(self) -> float | None:
        return self.now


@dataclass(frozen=True, slots=True)
class Forgotten:
    ids: Mapping[str, tuple[str, ...]]
    """Event Ids by identity that left the caches because the output already had them."""

    @property
    def clock(self) -> float | None:
        return None


FleetOp = (
    Observed | Ticked | ShutDown | DesiredApplied | DefaultDesiredSet | LeafMapSet | SendFailures | CaptureDrops
    | Diagnosed | Flushed | Forgotten
)


def _connection(o: ConnectionSeen) -> list[Any]:
    return [o.ts, o.leaf_mac, o.direction, o.protocol, o.local_addr, o.local_port, o.remote_addr, o.remote_port,
            o.tcp_state, o.bytes_seen]


def _login(o: LoginSeen) -> list[Any]:
    return [o.ts, o.leaf_mac, o.protocol, o.direction, o.local_addr, o.local_port, o.remote_addr, o.remote_port,
            o.user, o.result, o.reply_code]


def _view(v: LeafView) -> list[Any]:
    return [v.mac, v.ips, v.vendor, v.hostnames, v.dhcp_hostname, v.dhcp_vendor_class, v.dhcp_param_request_list,
            v.randomized_mac, v.first_seen, v.last_seen, [[s.protocol, s.port] for s in v.services], v.os_name,
            v.os_vendor, v.os_version]


def _view_from(f: list[Any]) -> LeafView:
    return LeafView(str(f[0]), tuple(f[1]), f[2], tuple(f[3]), f[4], f[5], tuple(f[6]), bool(f[7]), float(f[8]),
                    float(f[9]), tuple(Service(p, int(n)) for p, n in f[10]), f[11], f[12], f[13])


def placeholder_view(mac: str) -> LeafView:
    """What a replayed tick hands an agent that takes no snapshot in it (and so never reads its view)."""
    return LeafView(mac, (), None, (), None, None, (), False, 0.0, 0.0, ())


def encode(op: FleetOp) -> bytes:
    """One record's bytes (compact JSON: a tag, then the fields)."""
    doc: list[Any]
    match op:
        case Observed(obs=ConnectionSeen() as c):
            doc = ["c", *_connection(c)]
        case Observed(obs=LoginSeen() as lg):
            doc = ["l", *_login(lg)]
        case Ticked():
            doc = ["t", op.now, op.hold, op.discovered, [_view(v) for v in op.views]]
        case ShutDown():
            doc = ["s", op.now]
        case DesiredApplied():
            doc = ["d", op.identity, op.desired, op.now]
        case DefaultDesiredSet():
            doc = ["D", op.desired]
        case LeafMapSet():
            doc = ["m", dict(op.leaf_map), op.now]
        case SendFailures():
            doc = ["f", op.identity, op.count]
        case CaptureDrops():
            doc = ["k", op.frames]
        case Diagnosed():
            doc = ["g", op.severity, op.message, op.now]
        case Flushed():
            doc = ["F", op.mac, op.now]
        case Forgotten():
            doc = ["x", {k: list(v) for k, v in op.ids.items()}]
    return orjson.dumps(doc)


def _ticked(f: list[Any]) -> Ticked:
    discovered = tuple(str(m) for m in f[2]) if f[2] is not None else None
    return Ticked(float(f[0]), bool(f[1]), discovered, tuple(_view_from(v) for v in f[3]))


_DECODERS: dict[str, Callable[[list[Any]], FleetOp]] = {
    "c": lambda f: Observed(ConnectionSeen(float(f[0]), str(f[1]), f[2], f[3], str(f[4]), int(f[5]), str(f[6]),
                                           int(f[7]), str(f[8]), int(f[9]))),
    "l": lambda f: Observed(LoginSeen(float(f[0]), str(f[1]), f[2], f[3], str(f[4]), int(f[5]), str(f[6]),
                                      int(f[7]), f[8], f[9], f[10])),
    "t": _ticked,
    "s": lambda f: ShutDown(float(f[0])),
    "d": lambda f: DesiredApplied(str(f[0]), f[1], float(f[2])),
    "D": lambda f: DefaultDesiredSet(f[0]),
    "m": lambda f: LeafMapSet({str(k): str(v) for k, v in dict(f[0]).items()}, float(f[1])),
    "f": lambda f: SendFailures(str(f[0]), int(f[1])),
    "k": lambda f: CaptureDrops(int(f[0])),
    "g": lambda f: Diagnosed(str(f[0]), str(f[1]), float(f[2])),
    "F": lambda f: Flushed(str(f[0]), float(f[1])),
    "x": lambda f: Forgotten({str(k): tuple(str(i) for i in v) for k, v in dict(f[0]).items()}),
}


def decode(raw: bytes) -> FleetOp:
    """The record in ``raw``; raises :class:`JournalError`."""
    try:
        doc = orjson.loads(raw)
        decoder = _DECODERS.get(doc[0])
        if decoder is None:
            raise JournalError(f"unknown journal record {str(doc[0])[:8]!r}")
        return decoder(doc[1:])
    except (orjson.JSONDecodeError, IndexError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, JournalError):
            raise
        raise JournalError(f"undecodable journal record: {type(exc).__name__}: {exc}") from exc
