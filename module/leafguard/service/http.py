"""`/healthz` and `/metrics` (Prometheus text) on aiohttp, embedded with an AppRunner under our TaskGroup."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from leafguard.service.main import Service

SERVICE_KEY: web.AppKey[Service] = web.AppKey("service")


async def _healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    body: dict[str, Any] = {"status": "ok", "batches": service.batches}
    if service.capture is not None:
        states = {name: str(st.state) for name, st in service.capture.stats().items()}
        body["interfaces"] = states
        if not any(state == "running" for state in states.values()):
            body["status"] = "degraded"
    status = 200 if body["status"] == "ok" else 503
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _metric_lines(service: Service) -> list[str]:
    st = service.analyzer.stats
    lines = [
        "# TYPE leafguard_frames_total counter",
        f"leafguard_frames_total {st.packets}",
        "# TYPE leafguard_bytes_total counter",
        f"leafguard_bytes_total {st.bytes}",
        "# TYPE leafguard_decode_errors_total counter",
        f"leafguard_decode_errors_total {st.decode_errors}",
        "# TYPE leafguard_truncated_frames_total counter",
        f"leafguard_truncated_frames_total {st.truncated}",
        "# TYPE leafguard_evicted_flows_total counter",
        f"leafguard_evicted_flows_total {st.evicted_flows}",
        "# TYPE leafguard_flows gauge",
        f"leafguard_flows {len(service.analyzer.flows)}",
        "# TYPE leafguard_queue_depth gauge",
        f"leafguard_queue_depth {service.queue.qsize()}",
    ]
    agents = service.fleet.stats()
    for name in ("generated", "sent", "dropped", "pending", "messages"):
        lines += [
            f"# TYPE leafguard_agent_events_{name} gauge",
            f"leafguard_agent_events_{name} {getattr(agents, name)}",
        ]
    transport = service.transport
    if transport is not None:
        uplink = transport.counters()
        lines += [
            "# TYPE leafguard_uplink_connected gauge",
            f"leafguard_uplink_connected {int(uplink['state'] == 'connected')}",
        ]
        for name, kind in (
            ("queued", "gauge"),
            ("queued_bytes", "gauge"),
            ("sent", "counter"),
            ("dropped", "counter"),
            ("resent", "counter"),
        ):
            metric = f"leafguard_uplink_{name}" + ("_total" if kind == "counter" else "")
            lines += [f"# TYPE {metric} {kind}", f"{metric} {uplink[name]}"]
    if service.capture is not None:
        for field in ("frames", "kernel_drops", "queue_drops", "restarts"):
            lines.append(f"# TYPE leafguard_capture_{field}_total counter")
            for name, ist in service.capture.stats().items():
                lines.append(f'leafguard_capture_{field}_total{{interface="{name}"}} {getattr(ist, field)}')
    return lines


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(text="\n".join(_metric_lines(request.app[SERVICE_KEY])) + "\n", content_type="text/plain")


async def start_http(service: Service, port: int) -> web.AppRunner:
    app = web.Application()
    app[SERVICE_KEY] = service
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # Loopback unless told otherwise: a module on the edge network sets LEAFGUARD_HTTP_HOST=0.0.0.0.
    site = web.TCPSite(runner, os.environ.get("LEAFGUARD_HTTP_HOST", "127.0.0.1"), port)
    await site.start()
    return runner
