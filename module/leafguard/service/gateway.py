"""Gateway settings that operators change live, from the module's desired properties.

Edge mode reads them from the module twin; local mode from ``DIR/gateway.json`` (the same shape):

* ``capture``: ``extraFilter`` (the operator's extra capture filter), ``interfaces`` (the capture interfaces,
  opened and closed live) and ``promiscuous``; a key left out means the flag's or environment's value;
* ``network``: ``leafNets`` (CIDR networks on the leaf side) and ``gatewayMacs`` (more MACs that are never
  leaves; the capture interfaces' own are always added);
* ``intervals``: ``writeIntervalS`` (local mode: how often the folder's files are rewritten) and
  ``reportedIntervalS`` (edge mode: the least time between reported patches);
* ``uplink``: ``maxBytes``, the budget of what waits for the uplink (the spool with a data directory, the
  memory outbox without);
* ``leafMap``: ``{"<MAC>": "<identity>"}``, the twin identities of known leaves (a leaf it does not name keeps
  the identity derived from its MAC), or ``{"<MAC>": {"deviceId": …, "identity": "module"|"device", "ip": …}}``
  for a managed leaf (``leafguard.hub.leaves``); an invalid map is reported and the map in force stays;
* ``detection``: ``learningPeriodS``, ``silentAfterS``, ``floodRatePerS`` (a number, or ``"off"`` to turn it
  off; null too in ``gateway.json``, but in a twin patch a null deletes the key, which keeps the value),
  and the thresholds of `leafguard.detect.thresholds` (``portScanPorts``, ``udpReplyTimeoutS``...: numbers);
  keys it leaves out keep their value.

Each section is validated as a whole: an invalid one, or one that sets what this run cannot change live (an
interface in a replay, an uplink budget in local mode), is reported with the key it names and the settings in
force stay. Keys nobody reads are reported as warnings (`unknown_keys`).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from leafguard.agent.config import CONFIG_OBJECT_NAME
from leafguard.detect.thresholds import THRESHOLD_KEYS
from leafguard.documents import read_document
from leafguard.errors import CaptureError, ConfigurationError
from leafguard.hub.leaves import LeafEntry
from leafguard.observe.settings import AnalyzerSettings, Network

GATEWAY_FILE = "gateway.json"
_T = TypeVar("_T")


MAX_INTERFACES = 64
MAX_NETWORK_ENTRIES = 1024
MIN_UPLINK_BYTES = 262_144
"""The largest message (256 KiB) must fit, or nothing could ever be queued."""

SECTION_KEYS: dict[str, frozenset[str]] = {
    "capture": frozenset({"extraFilter", "interfaces", "promiscuous"}),
    "network": frozenset({"leafNets", "gatewayMacs"}),
    "intervals": frozenset({"writeIntervalS", "reportedIntervalS"}),
    "uplink": frozenset({"maxBytes"}),
}
"""The keys of the sections whose keys are fixed (``leafMap`` keys are MACs, ``detection`` rejects others)."""
DOCUMENT_KEYS = frozenset({*SECTION_KEYS, "leafMap", "detection", "mute", "learn", "leaves", CONFIG_OBJECT_NAME})
"""Every top-level key somebody reads; ``$version`` and other ``$`` keys are the hub's."""


def unknown_keys(doc: dict[str, Any]) -> list[str]:
    """Keys of a settings document that nothing reads (typos, settings of another version): warnings."""
    out = [key for key in doc if key not in DOCUMENT_KEYS and not key.startswith("$")]
    for section, known in SECTION_KEYS.items():
        value = doc.get(section)
        if isinstance(value, dict):
            out += [f"{section}.{key}" for key in value if key not in known]
    return out


def _section(section: object, name: str) -> dict[str, Any]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigurationError(f"{name} must be an object")
    return section


def _split_names(value: object) -> tuple[str, ...]:
    """Interface names; an entry may hold several, comma- or space-separated (the template's
    ``["$LEAFGUARD_INTERFACES"]`` expands to one string)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError("capture.interfaces must be a list of interface names")
    names = tuple(n for v in value for n in v.replace(",", " ").split())
    if not names:
        raise ConfigurationError("capture.interfaces must name at least one interface")
    if len(names) > MAX_INTERFACES:
        raise ConfigurationError(f"capture.interfaces: at most {MAX_INTERFACES} interfaces")
    for name in names:
        # The kernel's IFNAMSIZ (16, with the terminating NUL), and no path separators.
        if len(name) > 15 or "/" in name or name in (".", ".."):
            raise ConfigurationError(f"capture.interfaces: {name!r} is not an interface name")
    if len(set(names)) != len(names):
        raise ConfigurationError(f"capture.interfaces repeat a name: {', '.join(names)}")
    return names


@dataclass(frozen=True, slots=True)
class CaptureSection:
    extra_filter: str | None
    """None when the section does not set it (the flag's or environment's filter applies)."""
    interfaces: tuple[str, ...] | None = None
    promiscuous: bool | None = None

    @classmethod
    def parse(cls, section: object) -> CaptureSection:
        doc = _section(section, "capture")
        expr = doc.get("extraFilter")
        if expr is not None and not isinstance(expr, str):
            raise ConfigurationError("capture.extraFilter must be a string (a pcap filter expression)")
        interfaces = doc.get("interfaces")
        promiscuous = doc.get("promiscuous")
        if promiscuous is not None and not isinstance(promiscuous, bool):
            raise ConfigurationError("capture.promiscuous must be true or false")
        return cls(expr, None if interfaces is None else _split_names(interfaces), promiscuous)

    @property
    def sets_anything(self) -> bool:
        return (self.extra_filter, self.interfaces, self.promiscuous) != (None, None, None)


def _list(value: object, name: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{name} must be a list of strings")
    if len(value) > MAX_NETWORK_ENTRIES:
        raise ConfigurationError(f"{name}: at most {MAX_NETWORK_ENTRIES} entries")
    return value


@dataclass(frozen=True, slots=True)
class NetworkSection:
    leaf_nets: tuple[Network, ...] | None = None
    gateway_macs: frozenset[str] | None = None

    @classmethod
    def parse(cls, section: object) -> NetworkSection:
        doc = _section(section, "network")
        nets = _list(doc.get("leafNets"), "network.leafNets")
        macs = _list(doc.get("gatewayMacs"), "network.gatewayMacs")
        parsed_nets: tuple[Network, ...] | None = None
        if nets is not None:
            try:
                parsed_nets = tuple(ipaddress.ip_network(n, strict=False) for n in nets)
            except ValueError as exc:
                raise ConfigurationError(f"network.leafNets: {exc}") from exc
        parsed_macs: frozenset[str] | None = None
        if macs is not None:
            canon = [m.lower().replace("-", ":") for m in macs]
            for mac, given in zip(canon, macs, strict=True):
                if not _MAC.match(mac):
                    raise ConfigurationError(f"network.gatewayMacs: {given!r} is not a MAC address")
            parsed_macs = frozenset(canon)
        return cls(parsed_nets, parsed_macs)


def _seconds(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a positive number of seconds")
    return float(value)


@dataclass(frozen=True, slots=True)
class IntervalsSection:
    write_interval_s: float | None = None
    reported_interval_s: float | None = None

    @classmethod
    def parse(cls, section: object) -> IntervalsSection:
        doc = _section(section, "intervals")
        return cls(
            _seconds(doc.get("writeIntervalS"), "intervals.writeIntervalS"),
            _seconds(doc.get("reportedIntervalS"), "intervals.reportedIntervalS"),
        )


@dataclass(frozen=True, slots=True)
class UplinkSection:
    max_bytes: int | None = None

    @classmethod
    def parse(cls, section: object) -> UplinkSection:
        value = _section(section, "uplink").get("maxBytes")
        if value is None:
            return cls()
        if isinstance(value, bool) or not isinstance(value, int) or value < MIN_UPLINK_BYTES:
            raise ConfigurationError(f"uplink.maxBytes must be a whole number of bytes, at least {MIN_UPLINK_BYTES}")
        return cls(value)


DETECTION_KEYS = {
    "learningPeriodS": "learning_period_s",
    "silentAfterS": "silent_after_s",
    "floodRatePerS": "flood_rate_per_s",
    **THRESHOLD_KEYS,
}
"""The detection settings operators may change live, and the `AnalyzerSettings` (or `Thresholds`) field each one
sets."""


def parse_detection(section: object) -> dict[str, float | None]:
    """The `AnalyzerSettings` fields a detection section sets (the analyzer checks the values' ranges)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigurationError("detection must be an object")
    out: dict[str, float | None] = {}
    for key, given in section.items():
        field = DETECTION_KEYS.get(key)
        if field is None:
            raise ConfigurationError(f"detection.{key} is not a setting ({', '.join(DETECTION_KEYS)} are)")
        # "off" is the twin's way: there a null in a desired patch deletes the key instead.
        value = None if given == "off" else given
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigurationError(f'detection.{key} must be a number, or "off" to turn it off')
        out[field] = None if value is None else float(value)
    return out


_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")


def parse_leaf_map(section: object) -> dict[str, str]:
    """A validated leaf map with canonical MACs → twin identity (an object entry's ``deviceId``)."""
    return {mac: entry.device_id for mac, entry in parse_leaf_entries(section).items()}


def parse_leaf_entries(section: object) -> dict[str, LeafEntry]:
    """A validated leaf map with canonical MACs; string entries and object entries (``leafguard.hub.leaves``);
    ConfigurationError names what is wrong."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigurationError("leafMap must be an object of MAC -> identity")
    out: dict[str, LeafEntry] = {}
    for mac, identity in section.items():
        canon = str(mac).lower().replace("-", ":")
        if not _MAC.match(canon):
            raise ConfigurationError(f"leafMap: {mac!r} is not a MAC address")
        out[canon] = LeafEntry.parse(canon, identity)
    if len({e.device_id for e in out.values()}) != len(out):
        raise ConfigurationError("leafMap: two MACs map to the same identity")
    return out


class GatewaySettingsFile:
    """``DIR/gateway.json``, read again whenever it changes; a file that is not JSON is a reported error."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / GATEWAY_FILE
        self._seen: tuple[int, int] | None = None

    def changed(self) -> tuple[bool, dict[str, Any]]:
        """(changed since the last call, the whole settings document)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return False, {}
        self._seen = stamp
        if stamp is None:
            return True, {}
        doc = read_document(self.path)
        if not isinstance(doc, dict):
            raise ConfigurationError(f"{self.path}: must hold a JSON object")
        return True, doc


class LiveCaptureLike(Protocol):
    """What the capture section changes on a running capture (`leafguard.capture.live.LiveCapture`)."""

    def set_extra_filter(self, expression: str) -> None: ...

    def set_interfaces(self, interfaces: tuple[str, ...]) -> None: ...

    def set_promiscuous(self, on: bool) -> None: ...


@dataclass(frozen=True, slots=True)
class CaptureDefaults:
    """What the flags and environment set: in force where the settings document sets nothing."""

    extra_filter: str
    interfaces: tuple[str, ...]
    promiscuous: bool


def apply_capture_section(
    capture: LiveCaptureLike | None,
    section: object,
    status: dict[str, Any],
    defaults: CaptureDefaults,
) -> None:
    """Apply a capture section to a live capture (``capture`` is None in a replay: nothing to change there).

    ``status`` holds what is in force and the last error (for stats and reported properties) and is updated in
    place. The filter is compiled first, so that a section with a bad one changes nothing.
    """
    try:
        parsed = CaptureSection.parse(section)
        if capture is None:
            if parsed.sets_anything:
                key = "extraFilter" if parsed.extra_filter is not None else (
                    "interfaces" if parsed.interfaces is not None else "promiscuous")
                raise ConfigurationError(f"capture.{key} applies to live capture only (this run replays a file)")
            status["error"] = None  # nothing to change, and nothing wrong
            return
        expr = defaults.extra_filter if parsed.extra_filter is None else parsed.extra_filter
        interfaces = defaults.interfaces if parsed.interfaces is None else parsed.interfaces
        promiscuous = defaults.promiscuous if parsed.promiscuous is None else parsed.promiscuous
        if expr != status["extraFilter"]:
            capture.set_extra_filter(expr)
        if list(interfaces) != status["interfaces"]:
            capture.set_interfaces(interfaces)
        if promiscuous != status["promiscuous"]:
            capture.set_promiscuous(promiscuous)
    except (ConfigurationError, CaptureError) as exc:
        status["error"] = str(exc)
        return
    status.update(extraFilter=expr, interfaces=list(interfaces), promiscuous=promiscuous, error=None)


class NetworkTarget(Protocol):
    def set_network(self, leaf_nets: tuple[Network, ...], gateway_macs: frozenset[str]) -> AnalyzerSettings: ...


def apply_network_section(
    analyzer: NetworkTarget,
    section: object,
    status: dict[str, Any],
    defaults: AnalyzerSettings,
    own_macs: Callable[[], list[str]],
) -> None:
    """The leaf side and the gateway's MACs: the section's, else the defaults; the capture interfaces' own MACs
    (``own_macs``, read now: the interfaces may have changed) are always the gateway's."""
    try:
        parsed = NetworkSection.parse(section)
        nets = defaults.leaf_nets if parsed.leaf_nets is None else parsed.leaf_nets
        macs = (defaults.gateway_macs if parsed.gateway_macs is None else parsed.gateway_macs) | set(own_macs())
        in_force = analyzer.set_network(nets, frozenset(macs))
    except ConfigurationError as exc:
        status["error"] = str(exc)
        return
    status.update(
        leafNets=[str(n) for n in in_force.leaf_nets], gatewayMacs=sorted(in_force.gateway_macs), error=None
    )


class UplinkTarget(Protocol):
    """What the intervals and uplink sections change on the edge hub connection (`EdgeTransport`)."""

    def set_budget(self, max_bytes: int) -> None: ...

    def set_reported_interval(self, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class RunDefaults:
    """The intervals and the budget the flags and environment set (None: this run has no such thing)."""

    write_interval_s: float | None
    """Local mode only."""
    reported_interval_s: float | None
    uplink_max_bytes: int | None
    """Edge mode only, both."""


def apply_intervals_section(
    uplink: UplinkTarget | None,
    set_write_interval: Callable[[float], None],
    section: object,
    status: dict[str, Any],
    defaults: RunDefaults,
) -> None:
    try:
        parsed = IntervalsSection.parse(section)
        write = _in_this_mode(parsed.write_interval_s, defaults.write_interval_s, "intervals.writeIntervalS",
                              "local mode (--local-dir): edge mode writes no files")
        reported = _in_this_mode(parsed.reported_interval_s, defaults.reported_interval_s,
                                 "intervals.reportedIntervalS", "edge mode: local mode has no twin")
    except ConfigurationError as exc:
        status["error"] = str(exc)
        return
    if write is not None:
        set_write_interval(write)
    if reported is not None and uplink is not None:
        uplink.set_reported_interval(reported)
    status.update(writeIntervalS=write, reportedIntervalS=reported, error=None)


def apply_uplink_section(uplink: UplinkTarget | None, section: object, status: dict[str, Any],
                         defaults: RunDefaults) -> None:
    try:
        parsed = UplinkSection.parse(section)
        budget = _in_this_mode(parsed.max_bytes, defaults.uplink_max_bytes, "uplink.maxBytes",
                               "edge mode: local mode writes messages to its folder")
        if budget is not None and uplink is not None:
            uplink.set_budget(budget)
    except ConfigurationError as exc:
        status["error"] = str(exc)
        return
    status.update(maxBytes=budget, error=None)


def _in_this_mode(value: _T | None, default: _T | None, key: str, mode: str) -> _T | None:
    """The value in force: the section's, else the default; a value this run has no use for is an error."""
    if default is None:
        if value is not None:
            raise ConfigurationError(f"{key} applies in {mode}")
        return None
    return default if value is None else value
