"""Gateway settings that operators change live: the capture section of the module's desired properties.

Edge mode reads it from the module twin (``capture`` in the desired properties, as the deployment manifest
writes it); local mode from ``DIR/gateway.json`` (the same shape). Today the section carries the operator's
extra capture filter; an invalid one is reported and the filter in force stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from leafguard.errors import CaptureError, ConfigurationError

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


class GatewaySettingsFile:
    """``DIR/gateway.json``, read again whenever it changes; a file that is not JSON is a reported error."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / GATEWAY_FILE
        self._seen: tuple[int, int] | None = None

    def changed(self) -> tuple[bool, object]:
        """(changed since the last call, the capture section or None)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return False, None
        self._seen = stamp
        if stamp is None:
            return True, None
        try:
            doc: Any = orjson.loads(self.path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ConfigurationError(f"{self.path}: not readable JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ConfigurationError(f"{self.path}: must hold a JSON object")
        return True, doc.get("capture")


def apply_capture_section(capture: Any, section: object, status: dict[str, Any]) -> None:
    """Apply a capture section to a live capture (``capture`` may be None: a replay has no filter to change).

    ``status`` is updated in place with what is in force and the last error, for stats and reported properties.
    """
    try:
        parsed = CaptureSection.parse(section)
        if parsed.extra_filter is None:
            return
        if capture is None:
            raise ConfigurationError("capture.extraFilter applies to live capture only (this run replays a file)")
        capture.set_extra_filter(parsed.extra_filter)
    except (ConfigurationError, CaptureError) as exc:
        status["error"] = str(exc)
        return
    status["extraFilter"] = parsed.extra_filter
    status["error"] = None
