"""The emulator against the real, unmodified azure-iot-device 2.14 async clients.

Every test is bounded by `asyncio.timeout` so a bug fails fast, and always shuts its clients down. SDK calls that
block their thread until the hub answers (client creation from the edge environment, handler assignment) run in
`asyncio.to_thread`: the emulator shares this loop and would otherwise never get to answer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from azure.iot.device import Message, MethodResponse
from azure.iot.device.aio import IoTHubDeviceClient, IoTHubModuleClient
from azure.iot.device.exceptions import ClientError, ConnectionFailedError, CredentialError, ServiceError

from tests.hub_emulator import HubEmulator, Identity
from tests.hub_emulator.identities import new_key

LIMIT_S = 20.0


@pytest.fixture
async def hub() -> AsyncIterator[HubEmulator]:
    async with HubEmulator.start() as emulator:
        yield emulator


@pytest.fixture
async def clients() -> AsyncIterator[list[IoTHubDeviceClient | IoTHubModuleClient]]:
    """Clients to shut down after the test, whatever happened."""
    made: list[IoTHubDeviceClient | IoTHubModuleClient] = []
    yield made
    for client in made:
        await shutdown(client)


async def shutdown(client: IoTHubDeviceClient | IoTHubModuleClient) -> None:
    async with asyncio.timeout(LIMIT_S):
        await client.shutdown()


def device_client(hub: HubEmulator, identity: Identity, made: list[Any], **kwargs: Any) -> IoTHubDeviceClient:
    client = IoTHubDeviceClient.create_from_connection_string(
        hub.connection_string(identity), server_verification_cert=hub.ca_pem, connection_retry_interval=1,
        **kwargs)
    made.append(client)
    return client


async def set_handler(client: Any, name: str, handler: Callable[..., Any]) -> None:
    """Assigning a handler connects and subscribes synchronously, so it must not run on the emulator's loop."""
    await asyncio.to_thread(setattr, client, name, handler)


def to_queue(queue: asyncio.Queue[Any]) -> Callable[[Any], Awaitable[None]]:
    """A coroutine handler: the SDK runs it on its own loop, so hand items over thread-safely."""
    loop = asyncio.get_running_loop()

    async def handler(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    return handler


async def test_device_connects_with_good_key(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1", parent=hub.add_device("edge1", edge=True))
    client = device_client(hub, leaf, clients)
    async with asyncio.timeout(LIMIT_S):
        await client.connect()
    assert client.connected
    (conn,) = hub.connections()
    assert conn.client_id == "plc1" and conn.keep_alive_s == 60


async def test_device_with_bad_key_gets_credential_error(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    wrong = hub.connection_string(leaf).replace(leaf.primary_key, new_key())
    client = IoTHubDeviceClient.create_from_connection_string(wrong, server_verification_cert=hub.ca_pem)
    clients.append(client)
    async with asyncio.timeout(LIMIT_S):
        with pytest.raises(CredentialError):
            await client.connect()
    assert hub.stats.auth_failures == 1
    assert "signature" in hub.stats.last_error


async def test_refused_connection_is_retried_by_connect(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    hub.refuse_connections(3)
    async with asyncio.timeout(LIMIT_S):
        with pytest.raises(ConnectionFailedError):
            await client.connect()
        hub.accept_connections()
        # The SDK fails connect() on the CONNACK and handles paho's disconnect of that refused link later; a
        # connect() issued before that lands fails too (its racy connect, azure-iot-sdk-python PR 1259).
        await asyncio.sleep(0.5)
        await client.connect()
    assert hub.stats.refused == 1 and client.connected


async def test_reconnect_retries_while_refused_then_recovers(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    async with asyncio.timeout(LIMIT_S):
        await client.get_twin()
        connects = hub.stats.connects
        hub.refuse_connections(3)
        hub.drop_connection(leaf)
        # CONNACK 3 is transient for the SDK: it retries every connection_retry_interval (1 s here).
        await hub.wait_until(lambda: hub.stats.refused >= 2)
        hub.accept_connections()
        await hub.wait_connected(leaf, after=connects + 1)
        assert (await client.get_twin())["reported"] == {"$version": 1}


async def test_reconnect_stops_after_not_authorized(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    async with asyncio.timeout(LIMIT_S):
        await client.connect()
        leaf.primary_key = leaf.secondary_key = new_key()  # keys rotated in the hub
        hub.drop_connection(leaf)
        await hub.wait_until(lambda: hub.stats.auth_failures >= 1)
        # CONNACK 5 is not transient: no retry follows within several retry intervals.
        await asyncio.sleep(2.5)
    assert hub.stats.auth_failures == 1 and hub.connections() == [] and not client.connected


async def test_get_twin_and_patch_reported_versions(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    await hub.set_desired(leaf, {"interval": 10})
    client = device_client(hub, leaf, clients)
    async with asyncio.timeout(LIMIT_S):
        twin = await client.get_twin()
        assert twin == {"desired": {"interval": 10, "$version": 2}, "reported": {"$version": 1}}
        await client.patch_twin_reported_properties({"firmware": "1.2", "nested": {"a": 1}})
        await client.patch_twin_reported_properties({"nested": {"a": None, "b": 2}})
        twin = await client.get_twin()
    assert twin["reported"] == {"firmware": "1.2", "nested": {"b": 2}, "$version": 3}
    assert hub.twin(leaf)["reported"]["$version"] == 3


async def test_twin_request_failure_surfaces_as_client_error(hub: HubEmulator, clients: list[Any]) -> None:
    client = device_client(hub, hub.add_device("plc1"), clients)
    hub.fail_twin_requests(429, count=1)
    async with asyncio.timeout(LIMIT_S):
        with pytest.raises(ClientError) as err:
            await client.get_twin()
        assert isinstance(err.value.__cause__, ServiceError)
        assert (await client.get_twin())["reported"] == {"$version": 1}


async def test_desired_patch_is_pushed_with_version(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    patches: asyncio.Queue[Any] = asyncio.Queue()
    async with asyncio.timeout(LIMIT_S):
        await client.get_twin()  # subscribes $iothub/twin/res/# for the SDK's own GET after reconnects
        await set_handler(client, "on_twin_desired_properties_patch_received", to_queue(patches))
        assert await hub.set_desired(leaf, {"interval": 30, "mode": {"learn": True}}) == 2
        assert await patches.get() == {"interval": 30, "mode": {"learn": True}, "$version": 2}
        await hub.set_desired(leaf, {"mode": None})
        assert await patches.get() == {"mode": None, "$version": 3}
    assert hub.twin(leaf)["desired"] == {"interval": 30, "$version": 3}


async def test_security_message_recorded_with_property_bag(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    message = Message('{"AgentVersion": "0.1"}', message_id="m-1", content_encoding="utf-8",
                      content_type="application/json")
    message.set_as_security_message()
    message.custom_properties["leaf mac"] = "00:11:22:33:44:55"
    async with asyncio.timeout(LIMIT_S):
        await client.send_message(message)
        (received,) = await hub.wait_for_messages(1, identity=leaf)
    assert received.is_security_message
    assert received.system == {"$.mid": "m-1", "$.ct": "application/json", "$.ce": "utf-8",
                               "$.ifid": "urn:azureiot:Security:SecurityAgent:1"}
    assert received.properties == {"leaf mac": "00:11:22:33:44:55"}
    assert received.json() == {"AgentVersion": "0.1"}


async def test_module_from_edge_environment_via_workload_api(hub: HubEmulator, clients: list[Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    edge = hub.add_device("edge1", edge=True)
    module = hub.add_module(edge, "leafguard")
    for name, value in hub.edge_environment(module).items():
        monkeypatch.setenv(name, value)
    async with asyncio.timeout(LIMIT_S):
        # Creation does blocking HTTP to the workload API (trust bundle, then a sign call for the token).
        client = await asyncio.to_thread(IoTHubModuleClient.create_from_edge_environment,
                                         connection_retry_interval=1)
        clients.append(client)
        await client.connect()
        await client.patch_twin_reported_properties({"health": "ok"})
        await client.send_message_to_output(Message("alert", content_type="application/json"), "alerts")
        (received,) = await hub.wait_for_messages(1)
    assert received.identity == "edge1/leafguard"
    assert received.output_name == "alerts"
    assert received.topic.startswith("devices/edge1/modules/leafguard/messages/events/%24.on=alerts")
    assert hub.twin(module)["reported"] == {"health": "ok", "$version": 2}


async def test_reconnect_after_drop_keeps_subscriptions(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    patches: asyncio.Queue[Any] = asyncio.Queue()
    states: list[bool] = []

    async def on_state() -> None:
        states.append(client.connected)

    async with asyncio.timeout(LIMIT_S):
        await client.get_twin()
        await set_handler(client, "on_twin_desired_properties_patch_received", to_queue(patches))
        await set_handler(client, "on_connection_state_change", on_state)
        connects = hub.stats.connects
        assert hub.drop_connection(leaf) == 1
        await hub.wait_connected(leaf, after=connects + 1)
        # The SDK does not subscribe again: the patch arrives only because the session kept the subscription.
        await hub.set_desired(leaf, {"interval": 99})
        patch = await patches.get()
        while patch.get("interval") != 99:  # the SDK's own post-reconnect GET may deliver the full desired first
            patch = await patches.get()
        assert patch["$version"] == 2
        assert (await client.get_twin())["desired"]["interval"] == 99
    assert hub.connections()[0].subscriptions == ["$iothub/twin/PATCH/properties/desired/#",
                                                  "$iothub/twin/res/#"]


async def test_stalled_puback_keeps_send_pending_until_released(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    async with asyncio.timeout(LIMIT_S):
        await client.connect()
        hub.stall_pubacks()
        send = asyncio.ensure_future(client.send_message("held"))
        await asyncio.sleep(0.5)
        assert not send.done()
        assert hub.messages() == []
        assert hub.release_pubacks() == 1
        await send
    assert [m.body for m in hub.messages()] == [b"held"]


async def test_stalled_message_is_resent_after_reconnect(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    async with asyncio.timeout(LIMIT_S):
        await client.connect()
        hub.stall_pubacks()
        send = asyncio.ensure_future(client.send_message("held"))
        await asyncio.sleep(0.3)
        connects = hub.stats.connects
        hub.drop_connection(leaf)
        # What the dropped connection held is gone, as in a hub that never stored it.
        assert hub.release_pubacks() == 0
        await hub.wait_connected(leaf, after=connects + 1)
        await send
        (received,) = await hub.wait_for_messages(1)
    assert received.body == b"held" and received.dup


async def test_delayed_pubacks_delay_send(hub: HubEmulator, clients: list[Any]) -> None:
    client = device_client(hub, hub.add_device("plc1"), clients)
    async with asyncio.timeout(LIMIT_S):
        await client.connect()
        hub.delay_pubacks(0.4)
        started = time.monotonic()
        await client.send_message("slow")
    assert time.monotonic() - started >= 0.35


async def test_direct_method_round_trip(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)

    async def on_method(request: Any) -> None:
        response = MethodResponse.create_from_method_request(request, 200, {"echo": request.payload})
        await client.send_method_response(response)

    async with asyncio.timeout(LIMIT_S):
        await set_handler(client, "on_method_request_received", on_method)
        result = await hub.invoke_method(leaf, "ping", {"n": 1})
    assert (result.status, result.payload) == (200, {"echo": {"n": 1}})


async def test_module_input_message(hub: HubEmulator, clients: list[Any]) -> None:
    hub.add_device("edge1", edge=True)
    module = hub.add_module("edge1", "leafguard")
    client = IoTHubModuleClient.create_from_connection_string(
        hub.connection_string(module), server_verification_cert=hub.ca_pem, connection_retry_interval=1)
    clients.append(client)
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    async with asyncio.timeout(LIMIT_S):
        await set_handler(client, "on_message_received", to_queue(inbox))
        assert await hub.send_to_input(module, "control", '{"cmd": 1}',
                                       {"$.mid": "x1", "$.cdid": "edge1", "prio": "high"})
        message = await inbox.get()
    assert message.input_name == "control"
    assert message.message_id == "x1"
    assert message.custom_properties == {"$.cdid": "edge1", "prio": "high"}
    assert message.data == b'{"cmd": 1}'


async def test_cloud_to_device_message(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    async with asyncio.timeout(LIMIT_S):
        await set_handler(client, "on_message_received", to_queue(inbox))
        assert await hub.send_c2d(leaf, "reboot", {"$.mid": "c1", "reason": "patch day", "flag": None})
        message = await inbox.get()
    assert (message.data, message.message_id) == (b"reboot", "c1")
    assert message.custom_properties == {"reason": "patch day", "flag": None}


async def test_restart_drops_clients_and_they_come_back(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    client = device_client(hub, leaf, clients)
    async with asyncio.timeout(LIMIT_S):
        await client.get_twin()
        connects = hub.stats.connects
        await hub.restart()
        await hub.wait_connected(leaf, after=connects + 1)
        await client.patch_twin_reported_properties({"after": "restart"})
    assert hub.twin(leaf)["reported"]["after"] == "restart"


async def test_sas_renewal_reauthorizes_with_a_new_connect(hub: HubEmulator, clients: list[Any]) -> None:
    leaf = hub.add_device("plc1")
    # The SDK renews 120 s before expiry: with a 122 s token the hourly DISCONNECT + CONNECT comes after ~2 s.
    client = device_client(hub, leaf, clients, sastoken_ttl=122)
    async with asyncio.timeout(LIMIT_S):
        await client.get_twin()
        await hub.wait_connected(leaf, after=2)
        await client.patch_twin_reported_properties({"renewed": True})
    assert hub.stats.connects == 2 and hub.stats.kicked == 0 and hub.stats.auth_failures == 0


def _may_bind_443() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 443
    except (OSError, ValueError):
        return False


@pytest.mark.skipif(not _may_bind_443(), reason="MQTT over WebSocket needs port 443 (root or a low port start)")
async def test_websocket_transport(clients: list[Any]) -> None:
    async with HubEmulator.start(websockets=True) as hub:
        leaf = hub.add_device("plc1")
        client = device_client(hub, leaf, clients, websockets=True)
        try:
            async with asyncio.timeout(LIMIT_S):
                await client.send_message("over ws")
                twin = await client.get_twin()
                (received,) = await hub.wait_for_messages(1)
            assert received.body == b"over ws" and twin["reported"] == {"$version": 1}
            assert hub.connections()[0].transport == "wss"
            started = time.monotonic()
            async with asyncio.timeout(LIMIT_S):
                await hub.restart()
                assert time.monotonic() - started < 1.0
                await hub.wait_connected(leaf, after=2)
                await client.patch_twin_reported_properties({"over": "ws"})
        finally:
            await shutdown(client)
            clients.remove(client)


async def test_clients_of_two_emulators(clients: list[Any]) -> None:
    async with HubEmulator.start() as one, HubEmulator.start() as two:
        first = device_client(one, one.add_device("plc1"), clients)
        second = device_client(two, two.add_device("plc1"), clients)
        try:
            async with asyncio.timeout(LIMIT_S):
                await first.send_message("one")
                await second.send_message("two")
            assert [m.body for m in one.messages()] == [b"one"]
            assert [m.body for m in two.messages()] == [b"two"]
        finally:
            for client in (first, second):
                await shutdown(client)
                clients.remove(client)


async def test_threaded_emulator_tolerates_blocking_sdk_calls(clients: list[Any],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    async with HubEmulator.start(thread=True) as hub:
        module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
        for name, value in hub.edge_environment(module).items():
            monkeypatch.setenv(name, value)
        patches: asyncio.Queue[Any] = asyncio.Queue()
        # Both calls block this loop until the hub answers: fine, the hub has a loop of its own.
        client = IoTHubModuleClient.create_from_edge_environment(connection_retry_interval=1)
        try:
            client.on_twin_desired_properties_patch_received = to_queue(patches)
            async with asyncio.timeout(LIMIT_S):
                await hub.set_desired(module, {"k": 1})
                assert await patches.get() == {"k": 1, "$version": 2}
                await client.send_message_to_output("x", "alerts")
                (received,) = await hub.wait_for_messages(1)
            assert received.output_name == "alerts"
            assert [c.client_id for c in hub.connections()] == ["edge1/leafguard"]
            hub.stall_pubacks()
            assert hub.release_pubacks() == 0
        finally:
            await shutdown(client)


def module_client(hub: HubEmulator, identity: Identity, made: list[Any], **kwargs: Any) -> IoTHubModuleClient:
    client = IoTHubModuleClient.create_from_connection_string(
        hub.connection_string(identity), server_verification_cert=hub.ca_pem, connection_retry=False, **kwargs)
    made.append(client)
    return client


async def test_messages_record_the_sending_connection_and_scope_admits_only_children(
        hub: HubEmulator, clients: list[Any]) -> None:
    """What IoT Hub stamps on a message is the connection's identity (a leaf's device, and a leaf's module);
    through an edge hub in Scope mode only the edge device's children and their modules connect."""
    edge = hub.add_device("edge1", edge=True)
    leaf = hub.add_device("plc1", parent=edge)
    security = hub.add_module(leaf, "azureiotsecurity")
    stranger = hub.add_device("elsewhere")
    hub.scope_to(edge)
    device = device_client(hub, leaf, clients)
    module = module_client(hub, security, clients)
    outsider = device_client(hub, stranger, clients, connection_retry=False)
    async with asyncio.timeout(LIMIT_S):
        await device.send_message(Message("from the device"))
        msg = Message("from the module")
        msg.set_as_security_message()
        await module.send_message(msg)
        with pytest.raises(CredentialError):
            await outsider.connect()
    by_body = {m.body: m for m in hub.messages()}
    assert by_body[b"from the device"].connection_device_id == "plc1"
    assert by_body[b"from the device"].connection_module_id is None
    assert by_body[b"from the module"].connection_device_id == "plc1"
    assert by_body[b"from the module"].connection_module_id == "azureiotsecurity"
    assert by_body[b"from the module"].to_dict()["connectionModuleId"] == "azureiotsecurity"
    assert by_body[b"from the module"].is_security_message
    assert hub.stats.auth_failures == 1


async def test_refusing_downstream_module_identities(hub: HubEmulator, clients: list[Any]) -> None:
    """edgeHub before 1.2.4 refuses a leaf's module identity; the leaf's device identity and the edge device's own
    modules still connect. The SDK surfaces CONNACK 2 as a ClientError (not retried, not a CredentialError)."""
    edge = hub.add_device("edge1", edge=True)
    leaf = hub.add_device("plc1", parent=edge)
    hub.refuse_downstream_modules()
    refused = module_client(hub, hub.add_module(leaf, "azureiotsecurity"), clients)
    device = device_client(hub, leaf, clients)
    gateway_module = module_client(hub, hub.add_module(edge, "leafguard"), clients)
    async with asyncio.timeout(LIMIT_S):
        with pytest.raises(ClientError) as err:
            await refused.connect()
        assert not isinstance(err.value, CredentialError)
        await device.connect()
        await gateway_module.connect()
    assert hub.stats.refused_modules == 1 and "downstream" in hub.stats.last_error
    assert sorted(c.client_id for c in hub.connections()) == ["edge1/leafguard", "plc1"]
