"""Gateway settings that operators change live, from the module's desired properties.

Edge mode reads them from the module twin; local mode from ``DIR/gateway.json`` (the same shape):

* ``capture.extraFilter``: the operator's extra capture filter; an invalid one is reported and the filter in
  force stays;
* ``leafMap``: ``{"<MAC>": "<identity>"}``, the twin identities of known leaves (a leaf it does not name keeps
  the identity derived from its MAC), or ``{"<MAC>": {"deviceId": …, "identity": "module"|"device", "ip": …}}``
  for a managed leaf (``leafguard.hub.leaves``); an invalid map is reported and the map in force stays;
* ``detection``: ``learningPeriodS``, ``silentAfterS``, ``floodRatePerS`` (a number, or null to turn it off),
  and the thresholds of `leafguard.detect.thresholds` (``portScanPorts``, ``udpReplyTimeoutS``...: numbers);
  keys it leaves out keep their value, and an invalid section is reported and the settings in force stay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leafguard.detect.thresholds import THRESHOLD_KEYS
from leafguard.documents import read_document
from leafguard.errors import CaptureError, ConfigurationError
from leafguard.hub.leaves import LeafEntry

GATEWAY_FILE = "gateway.json"


@dataclass(frozen=True, slots=True)
class CaptureSection:
    extra_filter: str | None
    """None when the section does not set it (the filter in force stays)."""

    @classmethod
    def parse(cls, section: object) -> CaptureSection:
        if section is None:
            return cls(None)
        if not isinstance(section, dict):
            raise ConfigurationError("capture must be an object")
        expr = section.get("extraFilter")
        if expr is not None and not isinstance(expr, str):
            raise ConfigurationError("capture.extraFilter must be a string (a pcap filter expression)")
        return cls(expr)


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
    for key, value in section.items():
        field = DETECTION_KEYS.get(key)
        if field is None:
            raise ConfigurationError(f"detection.{key} is not a setting ({', '.join(DETECTION_KEYS)} are)")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigurationError(f"detection.{key} must be a number, or null to turn it off")
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


def apply_capture_section(capture: Any, section: object, status: dict[str, Any]) -> None:
    """Apply a capture section to a live capture (``capture`` may be None: a replay has no filter to change).

    ``status`` is updated in place with what is in force and the last error, for stats and reported properties.
    """
    try:
        parsed = CaptureSection.parse(section)
        if parsed.extra_filter is None:
            status["error"] = None  # nothing to change, and nothing wrong: the filter in force stays
            return
        if capture is None:
            raise ConfigurationError("capture.extraFilter applies to live capture only (this run replays a file)")
        capture.set_extra_filter(parsed.extra_filter)
    except (ConfigurationError, CaptureError) as exc:
        status["error"] = str(exc)
        return
    status["extraFilter"] = parsed.extra_filter
    status["error"] = None
