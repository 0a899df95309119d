"""The IoT Edge workload API, the two calls `create_from_edge_environment()` makes (iothub-protocol.md §3.2).

Served over loopback HTTP: the SDK uses any non-`unix://` `IOTEDGE_WORKLOADURI` as a base URL. Each edge
device gets its own base, `http://{host}:{port}/workload/{device}/`, because the daemon's paths name only the module.

* `GET  trust-bundle?api-version=...` → `{"certificate": "<CA PEM>"}` (plain text, as the daemon sends it).
* `POST modules/{module}/genid/{genid}/sign?api-version=...` with `{"keyId", "algo": "HMACSHA256", "data"}` →
  `{"digest": base64(HMAC-SHA256(module key, base64decode(data)))}`; 404 for an unknown module or generation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

import orjson
from aiohttp import web

from tests.hub_emulator.identities import Registry

MIN_API_VERSION = "2018-06-28"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


def _api_version_ok(request: web.Request) -> bool:
    # ISO dates compare correctly as strings.
    return request.query.get("api-version", "") >= MIN_API_VERSION


def routes(registry: Registry, ca_pem: str) -> web.RouteTableDef:
    table = web.RouteTableDef()

    @table.get("/workload/{device}/trust-bundle")
    async def trust_bundle(request: web.Request) -> web.Response:
        if not _api_version_ok(request):
            return _error(400, "api-version missing or too old")
        return web.json_response({"certificate": ca_pem})

    @table.post("/workload/{device}/modules/{module}/genid/{genid}/sign")
    async def sign(request: web.Request) -> web.Response:
        if not _api_version_ok(request):
            return _error(400, "api-version missing or too old")
        identity = registry.find(f"{request.match_info['device']}/{request.match_info['module']}")
        if identity is None or identity.generation_id != request.match_info["genid"]:
            return _error(404, "module not found")
        try:
            # The SDK sends JSON without a Content-Type, so the body is parsed whatever the header says.
            body = orjson.loads(await request.read())
            if body.get("algo") != "HMACSHA256":
                return _error(400, "algo must be HMACSHA256")
            data = base64.b64decode(body["data"], validate=True)
        except (orjson.JSONDecodeError, KeyError, AttributeError, TypeError, binascii.Error):
            return _error(400, "body must be {keyId, algo, data}")
        key = identity.secondary_key if body.get("keyId") == "secondary" else identity.primary_key
        digest = hmac.digest(base64.b64decode(key), data, hashlib.sha256)
        return web.json_response({"digest": base64.b64encode(digest).decode()})

    return table
