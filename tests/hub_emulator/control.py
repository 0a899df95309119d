"""The control API over HTTP, for people driving a standalone emulator (`python -m tests.hub_emulator`) with curl.

Everything under `/control`; identities in paths are `{device}` or `{device}/{module}`:

    GET    /control                                summary: addresses, stats, faults
    GET    /control/identities                     every identity with keys and connection string
    POST   /control/identities                     {"device_id", "module_id"?, "parent"?, "edge"?}
    GET    /control/twins/{identity}               the twin
    PATCH  /control/twins/{identity}               a desired-properties patch; answers {"$version": n}, or 400
                                                   {"errorCode": 400004, "message": reason} if too large/deep
    GET    /control/messages?identity=&limit=      recorded messages (newest last)
    DELETE /control/messages                       forget them
    GET    /control/connections                    live connections
    DELETE /control/connections[/{identity}]       drop all (or one) like a network failure
    GET    /control/faults                         current faults
    POST   /control/faults                         {"refuse": 3|null, "stall_pubacks": bool,
                                                    "puback_delay_s": s,
                                                    "twin_failure": {"status": 429, "count": 2},
                                                    "answer_unsubscribed_twin": bool,
                                                    "refuse_downstream_modules": bool}
    POST   /control/restart                        {"downtime_s": 0}
    POST   /control/methods                        {"identity", "method", "payload"?, "timeout_s"?}
    POST   /control/inputs                         {"identity", "input", "body", "properties"?}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from tests.hub_emulator.identities import Identity, RegistryError
from tests.hub_emulator.twins import TwinError

if TYPE_CHECKING:
    from tests.hub_emulator.emulator import HubEmulator

IDENTITY = "{identity:[^/]+(?:/[^/]+)?}"


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value, option=orjson.OPT_INDENT_2), status=status,
                        content_type="application/json")


def _identity(hub: HubEmulator, request: web.Request) -> Identity:
    try:
        return hub.identity(request.match_info["identity"])
    except RegistryError as exc:
        raise web.HTTPNotFound(text=str(exc)) from exc


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


def describe(hub: HubEmulator, ident: Identity) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": ident.id, "device_id": ident.device_id, "module_id": ident.module_id,
        "primary_key": ident.primary_key, "secondary_key": ident.secondary_key,
        "generation_id": ident.generation_id, "parent": ident.parent, "edge": ident.edge,
        "connection_string": hub.connection_string(ident),
    }
    if ident.module_id is not None and hub.registry.get(ident.device_id).edge:
        out["edge_environment"] = hub.edge_environment(ident)
    return out


def _faults(hub: HubEmulator) -> dict[str, Any]:
    f = hub.broker.faults
    return {"refuse": f.refuse_code, "stall_pubacks": f.stall_pubacks, "puback_delay_s": f.puback_delay_s,
            "twin_failure": {"status": f.twin_failure_status, "count": f.twin_failures_left},
            "answer_unsubscribed_twin": hub.answer_unsubscribed_twin_requests,
            "refuse_downstream_modules": f.refuse_downstream_modules}


def routes(hub: HubEmulator) -> web.RouteTableDef:
    table = web.RouteTableDef()

    @table.get("/control")
    async def summary(_: web.Request) -> web.Response:
        return _json({"host": hub.host, "hub_hostname": hub.hub_hostname, "mqtt_port": 8883,
                      "http_url": hub.http_url, "ca_file": str(hub.ca_file), "stats": hub.stats.to_dict(),
                      "messages_total": hub.message_log.total,
                      "messages_evicted": hub.message_log.evicted, "faults": _faults(hub)})

    @table.get("/control/identities")
    async def identities(_: web.Request) -> web.Response:
        return _json([describe(hub, i) for i in hub.registry.all()])

    @table.post("/control/identities")
    async def add_identity(request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            if body.get("module_id"):
                ident = hub.add_module(str(body["device_id"]), str(body["module_id"]))
            else:
                ident = hub.add_device(str(body["device_id"]), parent=body.get("parent"),
                                       edge=bool(body.get("edge", False)))
        except (KeyError, RegistryError) as exc:
            raise web.HTTPBadRequest(text=f"cannot add identity: {exc}") from exc
        return _json(describe(hub, ident), status=201)

    @table.get(f"/control/twins/{IDENTITY}")
    async def get_twin(request: web.Request) -> web.Response:
        return _json(hub.twin(_identity(hub, request)))

    @table.patch(f"/control/twins/{IDENTITY}")
    async def patch_desired(request: web.Request) -> web.Response:
        ident = _identity(hub, request)
        try:
            version = await hub.set_desired(ident, await _body(request))
        except TwinError as exc:
            # What the hub's service API answers for a patch it refuses: the status and the reason, nothing merged.
            return _json({"errorCode": exc.status * 1000 + 4, "message": str(exc)}, status=exc.status)
        return _json({"$version": version})

    @table.get("/control/messages")
    async def messages(request: web.Request) -> web.Response:
        identity = request.query.get("identity") or None
        limit = int(request.query.get("limit", "100"))
        found = hub.message_log.items(identity)[-limit:] if limit > 0 else []
        return _json({"total": hub.message_log.total, "messages": [m.to_dict() for m in found]})

    @table.delete("/control/messages")
    async def clear(_: web.Request) -> web.Response:
        hub.clear_messages()
        return _json({"cleared": True})

    @table.get("/control/connections")
    async def connections(_: web.Request) -> web.Response:
        return _json([c.to_dict() for c in hub.connections()])

    @table.delete("/control/connections")
    async def drop_all(_: web.Request) -> web.Response:
        return _json({"dropped": hub.drop_connection()})

    @table.delete(f"/control/connections/{IDENTITY}")
    async def drop_one(request: web.Request) -> web.Response:
        return _json({"dropped": hub.drop_connection(_identity(hub, request))})

    @table.get("/control/faults")
    async def faults(_: web.Request) -> web.Response:
        return _json(_faults(hub))

    @table.post("/control/faults")
    async def set_faults(request: web.Request) -> web.Response:
        body = await _body(request)
        if "refuse" in body:
            if body["refuse"] is None:
                hub.accept_connections()
            else:
                hub.refuse_connections(int(body["refuse"]))
        if "stall_pubacks" in body:
            if body["stall_pubacks"]:
                hub.stall_pubacks()
            else:
                hub.release_pubacks()
        if "puback_delay_s" in body:
            hub.delay_pubacks(float(body["puback_delay_s"]))
        if "twin_failure" in body:
            spec = body["twin_failure"] or {}
            hub.fail_twin_requests(int(spec.get("status", 429)), int(spec.get("count", 1)))
        if "refuse_downstream_modules" in body:
            hub.refuse_downstream_modules(bool(body["refuse_downstream_modules"]))
        if "answer_unsubscribed_twin" in body:
            hub.answer_unsubscribed_twin_requests = bool(body["answer_unsubscribed_twin"])
        return _json(_faults(hub))

    @table.post("/control/restart")
    async def restart(request: web.Request) -> web.Response:
        body = await _body(request)
        await hub.restart(downtime_s=float(body.get("downtime_s", 0)))
        return _json({"restarted": True})

    @table.post("/control/methods")
    async def invoke(request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            ident = hub.identity(str(body["identity"]))
            method = str(body["method"])
        except (KeyError, RegistryError) as exc:
            raise web.HTTPBadRequest(text=f"need identity and method: {exc}") from exc
        result = await hub.invoke_method(ident, method, body.get("payload"), float(body.get("timeout_s", 30)))
        return _json({"status": result.status, "payload": result.payload})

    @table.post("/control/inputs")
    async def send_input(request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            ident = hub.identity(str(body["identity"]))
            sent = await hub.send_to_input(ident, str(body["input"]), str(body.get("body", "")),
                                           body.get("properties"))
        except (KeyError, RegistryError, ValueError) as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return _json({"sent": sent})

    return table
