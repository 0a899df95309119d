"""Direct methods on the gateway module: typed requests, one dispatcher, typed responses. No SDK, no threads.

:class:`MethodDispatcher` turns ``(name, payload)`` into a :class:`MethodResult` (status + JSON payload) by
parsing the payload into a typed request (:class:`BadRequest` names the field that is wrong: 400) and calling
the service through :class:`MethodTarget`. The transport (:mod:`leafguard.hub.transport`) only receives the SDK's
method request on its thread, hands it to the loop, awaits :meth:`MethodDispatcher.handle` within its timeout and
sends the response. Every handler does O(leaves) work at most without awaiting, except ``flush``, which packs
the agents' queues in slices of at most :data:`~leafguard.service.control.FLUSH_SLICE_S` with the loop's turn
between them and then awaits its optional wait: none blocks the loop for long.

Methods (docs/edge-mode.md, "Direct methods", has the JSON):

* ``getInventory``: ``{"mac"}`` or ``{"identity"}`` / ``{"deviceId"}`` (one leaf, 404 if unknown), or
  ``{"pageSize", "cursor"}`` (all leaves in MAC order, keyset-paged: a cursor stays valid while leaves come and go);
* ``getStats``: the service's statistics snapshot (the one ``/metrics`` renders);
* ``flush``: the agents' queued events go into security messages now, and (``waitS``) wait for the outbox to empty;
* ``mute``: alerts of a ``type`` and/or a leaf (``mac``) dropped ``until`` a time or ``forS`` seconds;
* ``learn``: the leaves seen now (all, or one ``mac``) and what they use join the detection baseline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from leafguard.detect.muting import ALERT_TYPES
from leafguard.errors import LeafGuardError

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 200
MAX_FLUSH_WAIT_S = 60.0
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class BadRequest(LeafGuardError):
    """A request the method cannot take (HTTP-like 400); ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NotFound(LeafGuardError):
    """The request names a leaf LeafGuard does not know (404)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class MethodResult:
    status: int
    payload: dict[str, Any]


# -- typed requests --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InventoryRequest:
    mac: str | None = None
    identity: str | None = None
    cursor: str | None = None
    page_size: int = DEFAULT_PAGE_SIZE


@dataclass(frozen=True, slots=True)
class FlushRequest:
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class MuteRequest:
    type: str | None
    mac: str | None
    until: float | None
    for_s: float | None


@dataclass(frozen=True, slots=True)
class LearnRequest:
    mac: str | None = None


def _fields(payload: object, allowed: Sequence[str]) -> dict[str, Any]:
    """The payload as an object with known keys only (null and no payload mean ``{}``)."""
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise BadRequest("payload", f"the payload must be a JSON object (fields: {', '.join(allowed) or 'none'})")
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise BadRequest(unknown[0], f"{unknown[0]} is not a field of this method (fields: {known})")
    return payload


def _mac(fields: Mapping[str, Any], name: str = "mac") -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    text = value.strip().lower().replace("-", ":") if isinstance(value, str) else ""
    if not _MAC.match(text):
        raise BadRequest(name, f"{name} must be a MAC address like 5c:cf:7f:07:ae:fb, not {value!r}")
    return text


def _string(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(name, f"{name} must be a non-empty string")
    return value.strip()


def _seconds(fields: Mapping[str, Any], name: str, *, maximum: float = math.inf, zero: bool = False) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or not (value >= 0 if zero else value > 0) or value > maximum:
        bound = f" and at most {maximum:g}" if math.isfinite(maximum) else ""
        raise BadRequest(name, f"{name} must be a number of seconds, {'0 or more' if zero else 'more than 0'}{bound}")
    return float(value)


def parse_inventory(payload: object) -> InventoryRequest:
    f = _fields(payload, ("mac", "identity", "deviceId", "cursor", "pageSize"))
    mac = _mac(f)
    identity = _string(f, "identity")
    device_id = _string(f, "deviceId")
    if identity is not None and device_id is not None and identity != device_id:
        raise BadRequest("deviceId", "identity and deviceId name the same thing: give one")
    identity = identity or device_id
    cursor = _mac(f, "cursor")
    size = f.get("pageSize", DEFAULT_PAGE_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_PAGE_SIZE:
        raise BadRequest("pageSize", f"pageSize must be an integer from 1 to {MAX_PAGE_SIZE}")
    one = [k for k, v in (("mac", mac), ("identity", identity)) if v is not None]
    if len(one) > 1:
        raise BadRequest("identity", "give mac or identity, not both")
    if one and (cursor is not None or "pageSize" in f):
        paging = "cursor" if cursor is not None else "pageSize"
        raise BadRequest(paging, f"{paging} pages all leaves; {one[0]} asks for one: give one or the other")
    return InventoryRequest(mac=mac, identity=identity, cursor=cursor, page_size=size)


def parse_flush(payload: object) -> FlushRequest:
    f = _fields(payload, ("waitS",))
    return FlushRequest(wait_s=_seconds(f, "waitS", maximum=MAX_FLUSH_WAIT_S, zero=True) or 0.0)


def parse_mute(payload: object) -> MuteRequest:
    f = _fields(payload, ("type", "mac", "until", "forS"))
    kind, mac = _string(f, "type"), _mac(f)
    if kind is not None and kind not in ALERT_TYPES:
        raise BadRequest("type", f"type {kind!r} is not an alert type ({', '.join(sorted(ALERT_TYPES))})")
    if kind is None and mac is None:
        raise BadRequest("type", "mute names a type, a mac, or both (muting every alert is not a rule)")
    until, for_s = _seconds(f, "until"), _seconds(f, "forS")
    if (until is None) == (for_s is None):
        raise BadRequest("forS", "give exactly one of until (Unix time) and forS (seconds from now)")
    return MuteRequest(type=kind, mac=mac, until=until, for_s=for_s)


def parse_learn(payload: object) -> LearnRequest:
    return LearnRequest(mac=_mac(_fields(payload, ("mac",))))


# -- what the service provides ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeafRecord:
    """One leaf as ``getInventory`` returns it (built by the service from its inventory and agents)."""

    mac: str
    identity: str
    named: bool
    """Named by the leaf map (an operator-assigned twin identity), not derived from the MAC."""
    managed: bool
    """Has an IoT Hub identity and client of its own (otherwise it goes through the gateway module)."""
    doc: dict[str, Any]
    """The inventory fields (addresses, vendor, names, services, OS, first/last seen, agent counters)."""

    def to_json(self) -> dict[str, Any]:
        head = {"mac": self.mac, "identity": self.identity, "named": self.named, "managed": self.managed}
        return head | self.doc


@dataclass(frozen=True, slots=True)
class LeafPage:
    macs: list[str]
    total: int
    """Leaves in all."""
    more: bool
    """Leaves follow the last of ``macs``."""


@dataclass(frozen=True, slots=True)
class FlushOutcome:
    messages: int
    """Security messages built from the agents' queues by this flush."""
    queued: int
    """Messages waiting in the outbox right after it (this flush's and earlier ones)."""


class MethodTarget(Protocol):
    """The service, as the methods see it (called on the loop)."""

    def leaf_page(self, after: str | None, limit: int) -> LeafPage:
        """Up to ``limit`` leaf MACs in MAC order, after ``after`` (a MAC, not necessarily a leaf's)."""
        ...

    def leaf(self, mac: str) -> LeafRecord | None: ...

    def mac_of_identity(self, identity: str) -> str | None: ...

    def stats(self) -> dict[str, Any]: ...

    async def flush(self) -> FlushOutcome:
        """Pack every agent's queued events into messages now; yields to the loop between slices of agents."""
        ...

    async def wait_sent(self, timeout_s: float) -> bool:
        """Whether the outbox emptied within ``timeout_s`` (True at once when it is empty)."""
        ...


class DetectionControl(Protocol):
    """Muting and learning, as detection offers them (the ``mute`` and ``learn`` methods exist only with it)."""

    def mute(self, request: MuteRequest) -> dict[str, Any]:
        """Add a rule; returns ``{"muted": rule, "rules": [in force]}``; BadRequest for what detection refuses."""
        ...

    def learn(self, mac: str | None) -> int:
        """Learn the leaves seen now (or one); returns how many."""
        ...


# -- the dispatcher --------------------------------------------------------------------------------------------


class MethodDispatcher:
    """``(name, payload)`` → :class:`MethodResult`; counts calls per method and status."""

    def __init__(self, target: MethodTarget, detection: DetectionControl | None = None) -> None:
        self.target = target
        self.detection = detection
        self.calls: dict[tuple[str, int], int] = {}
        self._methods: dict[str, Callable[[object], Awaitable[MethodResult]]] = {
            "getInventory": self._inventory,
            "getStats": self._stats,
            "flush": self._flush,
        }
        if detection is not None:
            self._methods |= {"mute": self._mute, "learn": self._learn}

    @property
    def names(self) -> list[str]:
        return sorted(self._methods)

    async def handle(self, name: str, payload: object) -> MethodResult:
        method = self._methods.get(name)
        if method is None:
            result = MethodResult(501, {"error": f"no method {name!r}; methods: {', '.join(self.names)}"})
        else:
            try:
                result = await method(payload)
            except BadRequest as exc:
                result = MethodResult(400, {"error": str(exc), "field": exc.field})
            except NotFound as exc:
                result = MethodResult(404, {"error": str(exc), "field": exc.field})
        key = (name if method is not None else "?", result.status)
        self.calls[key] = self.calls.get(key, 0) + 1
        return result

    async def _inventory(self, payload: object) -> MethodResult:
        req = parse_inventory(payload)
        t = self.target
        if req.identity is not None:
            mac = t.mac_of_identity(req.identity)
            if mac is None:
                raise NotFound("identity", f"no leaf has the identity {req.identity!r}")
            req = InventoryRequest(mac=mac)
        if req.mac is not None:
            record = t.leaf(req.mac)
            if record is None:
                raise NotFound("mac", f"no leaf with mac {req.mac}")
            return MethodResult(200, {"leaf": record.to_json()})
        page = t.leaf_page(req.cursor, req.page_size)
        leaves = [r.to_json() for r in (t.leaf(m) for m in page.macs) if r is not None]
        cursor = page.macs[-1] if page.more and page.macs else None
        return MethodResult(200, {"leaves": leaves, "total": page.total, "nextCursor": cursor})

    async def _stats(self, payload: object) -> MethodResult:
        _fields(payload, ())
        return MethodResult(200, self.target.stats())

    async def _flush(self, payload: object) -> MethodResult:
        req = parse_flush(payload)
        outcome = await self.target.flush()
        sent = await self.target.wait_sent(req.wait_s)
        return MethodResult(200, {"messages": outcome.messages, "queued": outcome.queued, "sent": sent})

    async def _mute(self, payload: object) -> MethodResult:
        assert self.detection is not None  # registered only with it
        return MethodResult(200, self.detection.mute(parse_mute(payload)))

    async def _learn(self, payload: object) -> MethodResult:
        assert self.detection is not None
        req = parse_learn(payload)
        if req.mac is not None and self.target.leaf(req.mac) is None:
            raise NotFound("mac", f"no leaf with mac {req.mac}")
        return MethodResult(200, {"learned": self.detection.learn(req.mac)})
