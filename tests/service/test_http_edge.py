"""`/metrics` and `/healthz` of `leafguard run` in edge mode against the hub emulator, through an edgeHub outage."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from leafguard.demo import demo_capture
from testkit.wait import until
from tests.hub_emulator import HubEmulator
from tests.service.helpers import BASE_LABELS, free_port, http_get
from tests.service.helpers import metric_value as value
from tests.service.helpers import parse_metrics as parse

LIMIT_S = 60.0
PLC, SENSOR = "00:0e:8c:aa:bb:01", "5c:cf:7f:07:ae:fb"


@pytest.fixture
async def hub() -> AsyncIterator[HubEmulator]:
    async with HubEmulator.start(thread=True) as emulator:
        yield emulator


async def poll(what: Callable[[], Any], interval_s: float = 0.1) -> Any:
    """`until` for a blocking HTTP check: run in a thread, a refused connection counts as not yet."""
    return await until(lambda: asyncio.to_thread(what), interval_s=interval_s, ignoring=(OSError,))


async def test_edge_metrics_carry_the_iot_edge_labels_and_healthz_fails_while_the_hub_is_down(
    hub: HubEmulator,
) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "LEAFGUARD_"))}
    env |= hub.edge_environment(module) | {"LEAFGUARD_HTTP_PORT": str(port), "LEAFGUARD_HEALTH_DOWN_AFTER_S": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    healthz, metrics = f"http://127.0.0.1:{port}/healthz", f"http://127.0.0.1:{port}/metrics"

    def health() -> tuple[int, dict[str, Any]]:
        status, body = http_get(healthz)
        return status, json.loads(body)

    try:
        async with asyncio.timeout(LIMIT_S):
            await poll(lambda: (r := health())[0] == 200 and r[1].get("uplink") == "connected")
            # The demo's two cleartext logins go out as alerts (batched) at once; security messages only at the end.
            families = await poll(lambda: (f := parse(http_get(metrics)[1].decode()))
                                  and value(f, "leafguard_uplink_messages_sent_total") >= 1
                                  and value(f, "leafguard_uplink_queue_messages") == 0 and f)
            labels = {(s.labels["iothub"], s.labels["edge_device"], s.labels["module_name"])
                      for f in families.values() for s in f.samples}
            assert labels == {(hub.hub_hostname, "edge1", "leafguard")}
            assert all(s.labels.keys() >= BASE_LABELS for f in families.values() for s in f.samples)
            assert value(families, "leafguard_uplink_connected") == 1
            assert value(families, "leafguard_uplink_bytes_sent_total") > 0
            assert value(families, "leafguard_uplink_queue_messages") == 0
            assert families["leafguard_method_calls"].type == "counter"  # announced before any call

            async with asyncio.TaskGroup() as tg:
                tg.create_task(hub.restart(downtime_s=8), name="test.hub_outage")
                _status, doc = await poll(lambda: (r := health())[0] == 503 and r)
                down = parse(http_get(metrics)[1].decode())
            assert doc["status"] == "unhealthy" and doc["uplink"] != "connected"
            assert any(r.startswith("uplink to the edge hub down for ") for r in doc["reasons"])
            assert value(down, "leafguard_uplink_connected") == 0
            assert value(down, "leafguard_uplink_down_seconds") > 1
            # Back: healthy again, and the reconnect is counted.
            await poll(lambda: (r := health())[0] == 200 and r[1]["status"] == "ok", interval_s=0.3)
            assert value(parse(http_get(metrics)[1].decode()), "leafguard_uplink_reconnects_total") >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT_S):
            _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def test_a_managed_leaf_is_counted_and_its_connection_shown(hub: HubEmulator, tmp_path: Path) -> None:
    """The managed-leaves hook, filled by the per-leaf clients: the PLC as its own device (key in the secrets
    file) shows up as managed, named and connected, in /metrics and in getInventory."""
    edge = hub.add_device("edge1", edge=True)
    module = hub.add_module(edge, "leafguard")
    plc = hub.add_device("plc1", parent=edge)
    hub.scope_to(edge)
    secrets = tmp_path / "leaf-secrets.json"
    secrets.write_text(json.dumps({"plc1": plc.primary_key}))
    await hub.set_desired(module, {"leafMap": {PLC: {"deviceId": "plc1", "identity": "device"}}})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "LEAFGUARD_"))}
    env |= hub.edge_environment(module) | {"LEAFGUARD_HTTP_PORT": str(port), "LEAFGUARD_LEAF_SECRETS": str(secrets)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    metrics = f"http://127.0.0.1:{port}/metrics"

    def connected() -> Any:
        families = parse(http_get(metrics)[1].decode())
        samples = [s for s in families["leafguard_leaf_connected"].samples if s.labels["leaf"] == "plc1"]
        return samples and samples[0].labels["state"] == "connected" and families

    def sent() -> Any:
        families = parse(http_get(metrics)[1].decode())
        found = [s.value for f in families.values() for s in f.samples
                 if s.name == "leafguard_leaf_messages_sent_total" and s.labels.get("leaf") == "plc1"]
        return found and found[0] > 0 and families

    try:
        async with asyncio.timeout(LIMIT_S):
            families = await poll(connected)
            assert value(families, "leafguard_leaf_connected", leaf="plc1") == 1
            assert value(families, "leafguard_leaves_managed") == 1
            assert value(families, "leafguard_leaves_named") == 1
            assert value(families, "leafguard_leaves_unmanaged") == value(families, "leafguard_leaves_seen") - 1
            # Its own counters: what the hub received from plc1's own connection (flushed now, not at the timers).
            flushed = await hub.invoke_method(module, "flush", {"waitS": 10})
            assert flushed.status == 200 and flushed.payload["sent"], flushed
            families = await poll(sent)
            assert value(families, "leafguard_leaf_messages_sent_total", leaf="plc1") == len(hub.messages("plc1"))
            assert value(families, "leafguard_leaf_messages_dropped_total", leaf="plc1") == 0
            assert value(families, "leafguard_leaf_queue_messages", leaf="plc1") == 0
            leaf = (await hub.invoke_method(module, "getInventory", {"mac": PLC})).payload["leaf"]
            assert (leaf["identity"], leaf["named"], leaf["managed"]) == ("plc1", True, True)
            other = (await hub.invoke_method(module, "getInventory", {"mac": SENSOR})).payload["leaf"]
            assert (other["named"], other["managed"]) == (False, False)
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT_S):
            _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert plc.primary_key not in err.decode()
