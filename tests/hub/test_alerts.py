"""LeafGuard alerts on the uplink: batched into arrays, uncapped stream (the retained list is capped), drops of
alert messages counted as alerts_dropped."""

from __future__ import annotations

from typing import Any

import orjson

from leafguard.agent.fleet import make_fleet
from leafguard.detect.detectors import MAX_ALERTS, Alert, Detectors
from leafguard.hub.alerts import AlertBatcher
from leafguard.hub.output import EdgeAgentOutput
from leafguard.hub.settings import EDGE_ENV, EdgeSettings
from leafguard.hub.transport import EdgeTransport


def alert(i: int, kind: str = "cleartext_login") -> dict[str, Any]:
    return {"type": kind, "mac": f"02:00:00:00:{i >> 8 & 0xFF:02x}:{i & 0xFF:02x}", "summary": f"finding {i}"}


def test_batcher_fills_messages_to_the_byte_limit_and_keeps_every_alert_in_order() -> None:
    batcher = AlertBatcher("edge1/leafguard", max_bytes=4096)
    out = []
    for i in range(500):
        out += batcher.add(alert(i, "port_scan" if i % 2 else "cleartext_login"), now=0.0)
    assert batcher.due(0.5) == [] and len(batcher) > 0, "waits below max_wait_s"
    out += batcher.due(1.0)
    assert len(batcher) == 0
    assert all(len(m.body) <= 4096 for m in out)
    docs = [a for m in out for a in orjson.loads(m.body)]
    assert [d["summary"] for d in docs] == [f"finding {i}" for i in range(500)]
    assert sum(m.event_count for m in out) == 500 and len(out) < 500 / 20, "many alerts per message"
    assert {m.alert_type for m in out} == {"mixed"} and all(m.identity == "edge1/leafguard" for m in out)
    huge = AlertBatcher("m", max_bytes=100)
    assert huge.add(alert(1) | {"summary": "x" * 500}, 0.0) == []
    (alone,) = huge.add(alert(2), 0.0)
    assert alone.event_count == 1 and len(alone.body) > 100, "one alert larger than a message goes alone"


def test_more_than_ten_thousand_alerts_are_all_forwarded_and_drops_are_counted() -> None:
    detectors = Detectors()
    detectors.forward = []
    total = MAX_ALERTS + 2500
    for i in range(total):
        detectors.raise_alert(Alert("cleartext_login", "medium", float(i), alert(i)["mac"], f"finding {i}"))
    assert len(detectors.alerts) == MAX_ALERTS and detectors.dropped_alerts == 2500, "the retained list is capped"
    assert len(detectors.forward) == total, "the stream is not"

    env = dict.fromkeys(EDGE_ENV, "x") | {"LEAFGUARD_OUTBOX_MAX_BYTES": str(1 << 20)}
    transport = EdgeTransport(EdgeSettings.from_env(env))
    output = EdgeAgentOutput(transport, make_fleet())
    # As the service does: drained after every batch of frames (here 50 batches).
    forwarded = detectors.forward
    for start in range(0, total, total // 50):
        output.submit_alerts([a.to_json() for a in forwarded[start : start + total // 50]], now=float(start))
    output.close(None)
    box = transport.outbox
    queued = sum(e.events for e in box._entries.values())
    assert queued + box.stats.alerts_dropped == total, "every alert queued or counted as dropped"
    assert box.stats.alerts_dropped > 0 and box.bytes <= 1 << 20, "a 1 MiB outbox cannot hold 12,500 alerts"
    health = output.health()["alerts"]
    assert health["forwarded"] == total and health["dropped"] == box.stats.alerts_dropped
    assert transport.counters()["alerts_dropped"] == box.stats.alerts_dropped
    assert len(box) + box.stats.dropped == health["messages"] < total / 20
