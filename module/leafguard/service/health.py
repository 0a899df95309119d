"""`/healthz`: healthy or not, and why, from a :class:`~leafguard.service.snapshot.ServiceSnapshot`. Pure.

Unhealthy (HTTP 503) when live capture has had no running interface, or the uplink to the edge hub has been
down, for longer than ``down_after_s``: shorter outages (an interface flapping, the hourly SAS renewal, an
edgeHub restart) are reported in the body as ``degraded`` but keep 200, so a liveness probe does not restart a
module that is already recovering by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from leafguard.service.snapshot import ServiceSnapshot


@dataclass(frozen=True, slots=True)
class Health:
    status_code: int
    body: dict[str, Any]


def assess(snap: ServiceSnapshot, down_after_s: float) -> Health:
    reasons: list[str] = []
    degraded: list[str] = []
    cap = snap.capture
    body: dict[str, Any] = {"version": snap.version, "batches": snap.batches}
    if cap.live:
        body["interfaces"] = {i.name: i.state for i in cap.interfaces}
        if cap.down_for_s is not None:
            errors = "; ".join(f"{i.name}: {i.last_error or i.state}" for i in cap.interfaces)
            text = f"capture down for {cap.down_for_s:.0f} s (no interface running: {errors})"
            (reasons if cap.down_for_s > down_after_s else degraded).append(text)
    up = snap.uplink
    if up is not None:
        body["uplink"] = up.state
        if up.down_for_s is not None:
            text = f"uplink to the edge hub down for {up.down_for_s:.0f} s (state {up.state})"
            (reasons if up.down_for_s > down_after_s else degraded).append(text)
    if reasons:
        body["status"] = "unhealthy"
        body["reasons"] = reasons + degraded
        return Health(503, body)
    body["status"] = "degraded" if degraded else "ok"
    if degraded:
        body["reasons"] = degraded
    return Health(200, body)
