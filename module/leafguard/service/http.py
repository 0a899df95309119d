"""`/healthz` and `/metrics` on aiohttp, embedded with an AppRunner in the service's loop.

The handlers read one :class:`~leafguard.service.snapshot.ServiceSnapshot` per request (through
:class:`SnapshotSource`), never the service's parts; what they do with it is pure (:mod:`.health`,
:mod:`.metrics`). The server binds the configured address: loopback unless the operator configured another one
(``LEAFGUARD_HTTP_HOST``), since a module on the host network would otherwise expose it on the leaf-facing
interfaces too.
"""

from __future__ import annotations

from typing import Protocol

import orjson
from aiohttp import web

from leafguard.service.health import assess
from leafguard.service.metrics import render_snapshot
from leafguard.service.snapshot import ServiceSnapshot


class SnapshotSource(Protocol):
    def snapshot(self) -> ServiceSnapshot: ...


METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SOURCE_KEY: web.AppKey[SnapshotSource] = web.AppKey("snapshots")
DOWN_AFTER_KEY: web.AppKey[float] = web.AppKey("down_after_s")


async def _healthz(request: web.Request) -> web.Response:
    health = assess(request.app[SOURCE_KEY].snapshot(), request.app[DOWN_AFTER_KEY])
    return web.Response(body=orjson.dumps(health.body), status=health.status_code, content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    text = render_snapshot(request.app[SOURCE_KEY].snapshot())
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def start_http(source: SnapshotSource, host: str, port: int, down_after_s: float) -> web.AppRunner:
    """Serve until ``runner.cleanup()``; raises OSError when the address cannot be bound."""
    app = web.Application()
    app[SOURCE_KEY] = source
    app[DOWN_AFTER_KEY] = down_after_s
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
