"""Managed leaves end to end: `leafguard run` in edge mode (a real process, the real SDK) against the hub emulator in
Scope mode, each managed leaf with its own identity, twin and messages (#10)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from leafguard.agent.config import CONFIG_OBJECT_NAME as CFG
from leafguard.demo import demo_capture
from leafguard.hub.credentials import derive_device_key
from leafguard.hub.spool import Spool, SpoolSettings
from leafguard.observe.model import identity_for_mac
from testkit.wait import until
from tests.agent.schema import errors
from tests.hub.helpers import service_env
from tests.hub_emulator import HubEmulator, Identity
from tests.hub_emulator.twins import SECTION_LIMIT_BYTES, twin_size

LIMIT_S = 60.0
GROUP_KEY = base64.b64encode(bytes(range(32, 96))).decode()
PLC, LAMP, SENSOR, LAPTOP = "00:0e:8c:aa:bb:01", "00:17:88:24:76:ff", "5c:cf:7f:07:ae:fb", "3c:52:82:11:22:33"
SEC = "azureiotsecurity"


@pytest.fixture
async def hub() -> AsyncIterator[HubEmulator]:
    async with HubEmulator.start(thread=True) as emulator:
        yield emulator


class Plant:
    """The edge device, its gateway module and the demo's leaves registered as its children."""

    def __init__(self, hub: HubEmulator, tmp: Path) -> None:
        self.hub = hub
        self.edge = hub.add_device("edge1", edge=True)
        self.module = hub.add_module(self.edge, "leafguard")
        # plc1: its device twin, its key in the secrets file. lamp: its azureiotsecurity module, its key derived from
        # the group key. sensor: its azureiotsecurity module, a connection string in the secrets file.
        self.plc = hub.add_device("plc1", parent=self.edge)
        lamp_key = derive_device_key(GROUP_KEY, "lamp")
        self.lamp = hub.add_device("lamp", parent=self.edge, primary_key=lamp_key)
        self.lamp_sec = hub.add_module(self.lamp, SEC, primary_key=lamp_key)
        lamp2_key = derive_device_key(GROUP_KEY, "lamp2")  # the lamp's device id once renamed
        hub.add_module(hub.add_device("lamp2", parent=self.edge, primary_key=lamp2_key), SEC, primary_key=lamp2_key)
        self.sensor = hub.add_device("sensor", parent=self.edge)
        self.sensor_sec = hub.add_module(self.sensor, SEC)
        hub.scope_to(self.edge)
        self.secrets = tmp / "leaf-secrets.json"
        self.secrets.write_text(json.dumps({
            "plc1": self.plc.primary_key,
            "sensor": hub.connection_string(self.sensor, gateway=False),
        }))
        self.group_key = tmp / "group.key"
        self.group_key.write_text(GROUP_KEY)
        self.data_dir = tmp / "data"
        self.keys = [GROUP_KEY, *(i.primary_key for i in hub.registry.all()), *(i.secondary_key for i in
                                                                                hub.registry.all())]

    def env(self) -> dict[str, str]:
        return service_env(self.hub, self.module) | {
            "LEAFGUARD_LEAF_SECRETS": str(self.secrets), "LEAFGUARD_LEAF_GROUP_KEY_FILE": str(self.group_key),
            "LEAFGUARD_DATA_DIR": str(self.data_dir),
            "LEAFGUARD_HTTP_PORT": "off", "LEAFGUARD_LEAF_BACKOFF_MAX_S": "2",
            # The gateway's own client too: back within the shutdown deadline after the hub's outage.
            "LEAFGUARD_BACKOFF_MAX_S": "1"}

    def leaf_map(self, *, with_sensor: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            PLC: {"deviceId": "plc1", "identity": "device", "ip": "192.168.50.12"},
            LAMP: {"deviceId": "lamp"},
            LAPTOP: "operator-laptop",  # a name only: unmanaged
        }
        if with_sensor:
            out[SENSOR] = {"deviceId": "sensor", "identity": "module"}
        return out

    def health(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.hub.twin(self.module)["reported"].get("leafguard", {})
        return doc

    def states(self) -> dict[str, str]:
        leaves = self.health().get("managedLeaves", {}).get("leaves", {})
        return {name: entry["state"] for name, entry in leaves.items()}

    def reported(self, identity: Identity) -> dict[str, Any]:
        doc: dict[str, Any] = self.hub.twin(identity)["reported"]
        return doc


def assert_no_key(plant: Plant, hub: HubEmulator, tmp: Path) -> None:
    """No key or connection string in any twin, any message (body and properties) or any file LeafGuard wrote
    (its data directory and anything else under ``tmp`` but the credentials files themselves)."""
    twins = json.dumps([hub.twin(i) for i in hub.registry.all()])
    bodies = b"".join(m.body + json.dumps(m.to_dict()).encode() for m in hub.messages())
    files = [p for p in tmp.rglob("*") if p.is_file() and p not in (plant.secrets, plant.group_key)]
    assert any(p.is_relative_to(plant.data_dir) for p in files), "the service wrote its data directory"
    written = b"".join(p.read_bytes() for p in files)
    for key in plant.keys:
        assert key not in twins and key.encode() not in bodies and key.encode() not in written


async def start(plant: Plant) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
        env=plant.env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def stop(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(LIMIT_S):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out, err


def events(messages: list[Any], name: str) -> list[dict[str, Any]]:
    return [e for m in messages for e in m.json()["Events"] if e["Name"] == name]


async def stalled_leaf_holds_back_no_other(hub: HubEmulator, plant: Plant) -> None:
    """plc1's connection stops being acknowledged; the gateway's flush method sends every leaf's queue over that
    leaf's own client (plc1's and the lamp's hold their aggregated connections; the sensor's were turned off):
    the lamp's arrive at once, plc1's once released."""
    counts = {i: len(hub.messages(i)) for i in ("plc1", "lamp/azureiotsecurity")}
    hub.stall_pubacks(plant.plc)
    flushed = await hub.invoke_method(plant.module, "flush", {"waitS": 2})
    assert flushed.status == 200 and flushed.payload["messages"] > 0, flushed
    assert flushed.payload["sent"] is False, "plc1's messages wait for their acknowledgement"
    assert len(hub.messages("lamp/azureiotsecurity")) > counts["lamp/azureiotsecurity"], "the lamp was held back"
    assert len(hub.messages("plc1")) == counts["plc1"]
    assert hub.release_pubacks() > 0
    await until(lambda: len(hub.messages("plc1")) > counts["plc1"])


async def test_managed_leaves_have_their_own_twin_and_messages(hub: HubEmulator, tmp_path: Path) -> None:
    plant = Plant(hub, tmp_path)
    await hub.set_desired(plant.module, {"leafMap": plant.leaf_map()})
    proc = await start(plant)
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: plant.states() == {"lamp": "connected", "plc1": "connected", "sensor": "connected"})
            # Each managed leaf's own twin: the effective configuration and its passive inventory.
            for twin_of, mac in ((plant.plc, PLC), (plant.lamp_sec, LAMP), (plant.sensor_sec, SENSOR)):
                await until(lambda t=twin_of: "mac" in plant.reported(t).get("leafguard", {})
                            and CFG in plant.reported(t))
                doc = plant.reported(twin_of)
                assert doc["leafguard"]["mac"] == mac and doc["leafguard"]["ips"]
                assert doc[CFG]["maxMessageSizeInBytes"] == {"value": 204800}
                assert twin_size(doc) <= SECTION_LIMIT_BYTES
            assert plant.reported(plant.plc)["leafguard"]["vendor"] == "Siemens AG"
            assert plant.reported(plant.plc)["leafguard"]["configuredIp"] == "192.168.50.12"
            # The gateway's twin no longer carries the managed leaves; it lists what is unmanaged.
            gateway_leaves = plant.reported(plant.module).get("leaves", {})
            assert not {"plc1", "lamp", "sensor"} & set(gateway_leaves)
            assert "operator-laptop" in plant.health()["unmanagedLeaves"]["first"]

            # Tuned live through the leaf's own twin: the sensor stops its ConnectionCreate events, only it.
            await hub.set_desired(plant.sensor_sec, {CFG: {"eventPriorityConnectionCreate": {"value": "Off"}}})
            await until(lambda: plant.reported(plant.sensor_sec)[CFG].get("eventPriorityConnectionCreate")
                        == {"value": "Off"})
            # An invalid patch: rejected whole, reported configuration unchanged, a ConfigurationError from plc1.
            before = plant.reported(plant.plc)
            assert before["leafguard"]["desired"] == {"version": 1, "applied": True}
            version = await hub.set_desired(plant.plc, {CFG: {"maxMessageSizeInBytes": {"value": "big"}}})
            await until(lambda: plant.reported(plant.plc)["leafguard"]["desired"] == {"version": version,
                                                                                       "applied": False})
            assert plant.reported(plant.plc)[CFG] == before[CFG]
            await stalled_leaf_holds_back_no_other(hub, plant)
    finally:
        out, err = await stop(proc)

    received = hub.messages()
    security = [m for m in received if m.is_security_message]
    by_leaf: dict[str, list[Any]] = {}
    for m in security:
        by_leaf.setdefault(m.identity, []).append(m)
    assert {"plc1", "lamp/azureiotsecurity", "sensor/azureiotsecurity", "edge1/leafguard"} <= set(by_leaf)
    for m in security:
        assert m.interface_id == "urn:azureiot:Security:SecurityAgent:1"
        assert errors(m.json()) == []
    # Managed leaves' messages come from their own connection, and name no other leaf.
    for identity, device, module in (("plc1", "plc1", None), ("lamp/azureiotsecurity", "lamp", SEC),
                                     ("sensor/azureiotsecurity", "sensor", SEC)):
        assert {(m.connection_device_id, m.connection_module_id) for m in by_leaf[identity]} == {(device, module)}
    assert all("leafIdentity" not in m.properties for m in by_leaf["plc1"])
    # Unmanaged leaves stay on the gateway's output, named in the message.
    gateway_leaves_sent = {m.properties["leafIdentity"] for m in by_leaf["edge1/leafguard"]}
    assert "operator-laptop" in gateway_leaves_sent and not {"plc1", "lamp", "sensor"} & gateway_leaves_sent
    # Nothing went out before the leaf map was known (under a MAC identity, or from the gateway for a managed leaf).
    assert not {identity_for_mac(mac) for mac in (PLC, LAMP, SENSOR, LAPTOP)} & gateway_leaves_sent
    assert not events(by_leaf["sensor/azureiotsecurity"], "ConnectionCreate"), "turned off on the sensor's twin"
    assert events(by_leaf["plc1"], "ConnectionCreate"), "only the sensor's were turned off"
    problems = [p for e in events(by_leaf["plc1"], "ConfigurationError") for p in e["Payload"]]
    assert any(p["ConfigurationName"] == "maxMessageSizeInBytes" for p in problems)

    # No key anywhere: logs, twins, messages, files.
    for key in plant.keys:
        assert key not in err.decode() and key not in out.decode()
    assert_no_key(plant, hub, tmp_path)


async def test_auth_failure_refused_modules_live_add_and_hub_restart(hub: HubEmulator, tmp_path: Path) -> None:
    """A wrong key ends in auth_failed while the others run; refused module identities are reported as refused
    while the device-mode leaf works; a leaf added to the leaf map connects without a restart, one renamed
    reconnects as its new identity, one removed disconnects; after the hub restarts every client reconnects;
    stopped while the hub is down, every message queued for a leaf is sent once the hub is back within the
    shutdown deadline."""
    plant = Plant(hub, tmp_path)
    plant.secrets.write_text(json.dumps({"plc1": plant.plc.primary_key,
                                         "sensor": base64.b64encode(b"wrong" * 8).decode()}))
    await hub.set_desired(plant.module, {"leafMap": plant.leaf_map(with_sensor=False)})
    hub.refuse_downstream_modules()
    proc = await start(plant)
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: plant.states() == {"lamp": "refused", "plc1": "connected"})
            summary = plant.health()["managedLeaves"]
            assert "downstream" in summary["leaves"]["lamp"]["last_error"]
            assert summary["states"] == {"refused": 1, "connected": 1}
            # Added live: the sensor (module identity, wrong key) is managed at once and fails authentication.
            hub.refuse_downstream_modules(False)
            await hub.set_desired(plant.module, {"leafMap": plant.leaf_map()})
            await until(lambda: plant.states().get("sensor") == "auth_failed")
            await until(lambda: plant.states().get("lamp") == "connected")  # tried again within backoff_max_s
            assert plant.states()["plc1"] == "connected"
            # The right key arrives in the secrets file: the sensor connects without a restart.
            plant.secrets.write_text(json.dumps({"plc1": plant.plc.primary_key,
                                                 "sensor": plant.sensor_sec.primary_key}))
            await until(lambda: plant.states().get("sensor") == "connected")
            connects = hub.stats.connects
            await hub.restart(downtime_s=1.0)
            await until(lambda: hub.stats.connects >= connects + 4 and set(plant.states().values()) == {"connected"})
            await until(lambda: {c.client_id for c in hub.connections()} >= {
                "edge1/leafguard", "plc1", "lamp/azureiotsecurity", "sensor/azureiotsecurity"})
            # Renamed in the leaf map: the old identity's client goes, the new one's connects.
            await hub.set_desired(plant.module, {"leafMap": {LAMP: {"deviceId": "lamp2"}}})
            await until(lambda: plant.states().get("lamp2") == "connected" and "lamp" not in plant.states())
            await until(lambda: "lamp/azureiotsecurity" not in {c.client_id for c in hub.connections()}
                        and "lamp2/azureiotsecurity" in {c.client_id for c in hub.connections()})
            # Removed from the leaf map: its client disconnects, its messages go back to the gateway's path.
            await hub.set_desired(plant.module, {"leafMap": {LAMP: None}})
            await until(lambda: "lamp2" not in plant.states())
            await until(lambda: "lamp2/azureiotsecurity" not in {c.client_id for c in hub.connections()})
            assert plant.states() == {"plc1": "connected", "sensor": "connected"}
            # The hub goes down again and the service is stopped meanwhile: the final flush queues every leaf's
            # messages while nobody can send; the hub is back before the shutdown deadline and nothing is lost.
            async with asyncio.TaskGroup() as tg:
                tg.create_task(hub.restart(downtime_s=3.0), name="hub-restart")
                await until(lambda: not hub.connections())
                proc.send_signal(signal.SIGTERM)
    finally:
        out, err = await stop(proc)
    log = err.decode()
    for identity in ("plc1", "sensor/azureiotsecurity"):
        found = re.search(rf"leaf {re.escape(identity)}: (\d+) messages accepted, (\d+) sent, (\d+) dropped", log)
        assert found, f"no final count for {identity}"
        accepted, sent, dropped = (int(g) for g in found.groups())
        mids = {m.message_id for m in hub.messages(identity)}
        assert dropped == 0 and sent == accepted > 0 and len(mids) == accepted, found.group(0)
    # The lamp, no longer managed, is sent for by the gateway again, under its MAC-derived identity.
    assert identity_for_mac(LAMP) in {m.properties.get("leafIdentity") for m in hub.messages(plant.module)}
    for key in plant.keys:
        assert key not in log and key not in out.decode()
    assert_no_key(plant, hub, tmp_path)


async def test_a_managed_leafs_waiting_messages_survive_kill_9_in_its_own_spool(hub: HubEmulator,
                                                                                tmp_path: Path) -> None:
    """#11 point 1 for managed leaves: with a data directory each managed leaf's outbox is journalled in its own
    spool (``DATA_DIR/leaves/<device id>/``). plc1's acknowledgements stall, the flush method queues its
    messages, the module is killed with SIGKILL; after a restart with the same data directory, every message
    that was waiting arrives over plc1's own identity, with the message id it had, beside the new run's."""
    plant = Plant(hub, tmp_path)
    await hub.set_desired(plant.module, {"leafMap": plant.leaf_map()})
    leaf_dir = plant.data_dir / "leaves" / "plc1"
    hub.stall_pubacks(plant.plc)
    proc = await start(plant)
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: plant.states().get("plc1") == "connected")
            flushed = await hub.invoke_method(plant.module, "flush", {"waitS": 1})
            assert flushed.status == 200 and flushed.payload["sent"] is False, flushed
            waiting = await until(lambda: spooled(leaf_dir, tmp_path / f"copy{time.monotonic_ns()}"))
    finally:
        proc.kill()
        await proc.wait()
    assert hub.messages("plc1") == [], "nothing of plc1's was stored before the kill"
    hub.release_pubacks()  # what the killed connection had in flight was never stored (as on IoT Hub)

    proc = await start(plant)
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: set(waiting) <= {m.message_id for m in hub.messages("plc1")})
    finally:
        await stop(proc)
    received = hub.messages("plc1")
    assert all(m.is_security_message for m in received)
    assert {m.message_id for m in received} >= set(waiting) and len(waiting) >= 1


def spooled(directory: Path, scratch: Path) -> list[str]:
    """The message ids waiting in a spool (read from a copy: opening a spool compacts it)."""
    if not (directory / "spool").is_dir():
        return []
    shutil.copytree(directory, scratch)
    spool, recovery = Spool.open(SpoolSettings(scratch))
    spool.close(0.0)
    return [m.message_id for m in recovery.messages]
