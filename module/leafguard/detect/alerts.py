"""A LeafGuard alert: one finding of the detectors, as the service reports and forwards it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

ALERT_SCHEMA_VERSION = "1.2"
_NAMESPACE = uuid.UUID("7d6c1b8e-4f0a-4b8e-9a55-2c1d5e3f6a01")

Severity = Literal["low", "medium", "high"]


@dataclass(frozen=True, slots=True)
class Alert:
    type: str
    severity: Severity
    ts: float
    mac: str | None
    """The leaf the finding is about (the scanner, the new claimant of an address), when it has a MAC."""
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        key = f"{self.type}|{self.ts:.6f}|{self.mac}|{sorted(self.evidence.items())}"
        return {
            "schema_version": ALERT_SCHEMA_VERSION,
            "id": str(uuid.uuid5(_NAMESPACE, key)),
            "type": self.type,
            "severity": self.severity,
            "ts": self.ts,
            "mac": self.mac,
            "summary": self.summary,
            "evidence": self.evidence,
        }
