"""`EdgeTransport` with the real azure-iot-device SDK against the hub emulator, over TLS.

The emulator runs on its own loop (`thread=True`) because some SDK calls block their thread until the hub answers.
Every test is bounded by `asyncio.timeout`, and the transport (and with it its SDK client) is shut down in
`finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from leafguard.agent.config import CONFIG_OBJECT_NAME as CFG
from leafguard.agent.fleet import make_fleet
from leafguard.agent.messages import OutgoingMessage
from leafguard.agent.offline import write_security_messages
from leafguard.demo import demo_capture
from leafguard.hub.link import LinkState
from leafguard.hub.output import EdgeAgentOutput
from leafguard.hub.settings import EdgeSettings
from leafguard.hub.sockopt import paho_client
from leafguard.hub.transport import EdgeTransport
from leafguard.observe.analyzer import Analyzer
from testkit.wait import until
from tests.agent.schema import errors
from tests.hub.helpers import MODULE
from tests.hub_emulator import HubEmulator, Identity

LIMIT_S = 30.0


@pytest.fixture
async def hub() -> AsyncIterator[HubEmulator]:
    async with HubEmulator.start(thread=True) as emulator:
        yield emulator


@pytest.fixture
def module(hub: HubEmulator, monkeypatch: pytest.MonkeyPatch) -> Identity:
    identity = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    for name, value in hub.edge_environment(identity).items():
        monkeypatch.setenv(name, value)
    return identity


@pytest.fixture(scope="module")
def demo_messages(tmp_path_factory: pytest.TempPathFactory) -> list[OutgoingMessage]:
    """The security messages of the demo capture (real, schema-valid bodies)."""
    path = tmp_path_factory.mktemp("demo") / "messages.jsonl"
    write_security_messages([demo_capture()], path)
    out = []
    for line in path.read_bytes().splitlines():
        doc = orjson.loads(line)
        out.append(OutgoingMessage(doc["identity"], orjson.dumps(doc["body"]),
                                   doc["properties"]["MessagePriority"], len(doc["body"]["Events"])))
    return out


def settings(**tuning: Any) -> EdgeSettings:
    base = EdgeSettings.from_env(os.environ)
    return dataclasses.replace(base, backoff_initial_s=0.2, backoff_max_s=1.0, reported_interval_s=0.2, **tuning)


@contextlib.asynccontextmanager
async def running(transport: EdgeTransport) -> AsyncIterator[EdgeTransport]:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(transport.run(), name="test.transport")
        try:
            yield transport
        finally:
            await transport.shutdown(5.0)



def distinct_ids(hub: HubEmulator) -> set[str]:
    return {m.system["$.mid"] for m in hub.messages(MODULE)}


def many(messages: list[OutgoingMessage], n: int) -> list[OutgoingMessage]:
    return [messages[i % len(messages)] for i in range(n)]


async def test_security_messages_go_out_on_output_security(hub: HubEmulator, module: Identity,
                                                           demo_messages: list[OutgoingMessage],
                                                           shared_dir: Path) -> None:
    transport = EdgeTransport(settings())
    async with asyncio.timeout(LIMIT_S), running(transport):
        transport.submit(demo_messages)
        await until(lambda: len(distinct_ids(hub)) == len(demo_messages))
    received = hub.messages(MODULE)
    assert len(received) == len(demo_messages)
    # Several messages are in flight at once (the SDK hands each to its pipeline from a thread pool), so they
    # may arrive in another order within the window: pair them by body.
    by_body = {m.body: m for m in demo_messages}
    assert len(by_body) == len(demo_messages) == len({m.body for m in received})
    for got in received:
        sent = by_body[got.body]
        assert got.output_name == "security"
        assert got.is_security_message and got.interface_id == "urn:azureiot:Security:SecurityAgent:1"
        assert got.system["$.ct"] == "application/json" and got.system["$.ce"] == "utf-8"
        assert got.properties == {"MessagePriority": sent.priority, "leafIdentity": sent.identity}
        assert got.body == sent.body
        assert errors(got.json()) == []
    assert hub.connections() == [], "the client is shut down"
    assert transport.counters()["sent"] == len(demo_messages)


async def test_stalled_pubacks_hold_the_sender_and_lose_nothing(hub: HubEmulator, module: Identity,
                                                                demo_messages: list[OutgoingMessage]) -> None:
    transport = EdgeTransport(settings(send_timeout_s=20.0))
    batch = many(demo_messages, 40)
    async with asyncio.timeout(LIMIT_S), running(transport):
        await until(lambda: transport.state is LinkState.CONNECTED)
        hub.stall_pubacks()
        transport.submit(batch)
        await asyncio.sleep(1.0)
        # Backpressure: a window of messages is with the SDK, the rest wait in the outbox; nothing is stored yet.
        window = transport.settings.inflight_window
        assert hub.messages(MODULE) == []
        assert len(transport.outbox) == 40 and transport.outbox.stats.dropped == 0
        assert transport.outbox.in_flight == window
        assert hub.release_pubacks() == window
        await until(lambda: len(distinct_ids(hub)) == 40)
    assert len(distinct_ids(hub)) == 40 and transport.outbox.stats.acked == 40
    assert transport.stats.send_timeouts == 0 and transport.stats.reconnects == 0


async def test_unacknowledged_send_times_out_reconnects_and_resends(hub: HubEmulator, module: Identity,
                                                                    demo_messages: list[OutgoingMessage]) -> None:
    transport = EdgeTransport(settings(send_timeout_s=1.0))
    batch = many(demo_messages, 10)
    async with asyncio.timeout(LIMIT_S), running(transport):
        await until(lambda: transport.state is LinkState.CONNECTED)
        connects = hub.stats.connects
        hub.stall_pubacks()
        transport.submit(batch)
        # No PUBACK within the send timeout: the supervisor drops the connection and connects again.
        await until(lambda: hub.stats.connects > connects and transport.state is LinkState.CONNECTED)
        assert transport.stats.send_timeouts >= 1 and transport.stats.reconnects >= 1
        assert len(transport.outbox) == 10
        hub.release_pubacks()
        await until(lambda: len(distinct_ids(hub)) == 10 and not len(transport.outbox))
    assert transport.outbox.stats.dropped == 0
    assert {m.body for m in hub.messages(MODULE)} == {m.body for m in batch}


async def test_dropped_connection_mid_stream_loses_nothing(hub: HubEmulator, module: Identity,
                                                           demo_messages: list[OutgoingMessage]) -> None:
    transport = EdgeTransport(settings(send_timeout_s=5.0))
    batch = many(demo_messages, 150)
    async with asyncio.timeout(LIMIT_S), running(transport):
        await until(lambda: transport.state is LinkState.CONNECTED)
        hub.delay_pubacks(0.01)
        transport.submit(batch)
        await until(lambda: len(hub.messages(MODULE)) >= 30)
        connects = hub.stats.connects
        assert hub.drop_connection(module) == 1
        await until(lambda: hub.stats.connects > connects)
        await until(lambda: len(distinct_ids(hub)) == 150 and not len(transport.outbox))
    assert transport.stats.reconnects >= 1 and transport.outbox.stats.dropped == 0
    assert len(hub.messages(MODULE)) >= 150  # duplicates allowed (at-least-once), none missing


async def test_a_client_whose_network_thread_died_is_replaced_and_nothing_is_lost(
        hub: HubEmulator, module: Identity, demo_messages: list[OutgoingMessage]) -> None:
    """azure-iot-sdk-python#989: a TLS write that races the socket's close kills paho's network thread with an
    SSLEOFError; the SDK client still says it is connected and never disconnects or connects again. The PUBACKs
    that stop coming break the link, the disconnect that never completes gets the client replaced, and every
    message arrives."""
    transport = EdgeTransport(settings(send_timeout_s=2.0))
    batch = many(demo_messages, 60)
    async with asyncio.timeout(LIMIT_S), running(transport):
        await until(lambda: transport.state is LinkState.CONNECTED)
        hub.delay_pubacks(0.01)
        paho = paho_client(transport._client)
        assert paho is not None

        def eof(_buf: bytes) -> int:
            raise ssl.SSLEOFError(8, "EOF occurred in violation of protocol")

        transport.submit(batch[:10])
        await until(lambda: len(distinct_ids(hub)) == 10)
        paho._sock_send = eof  # the next write in paho's thread raises, as the race does
        transport.submit(batch[10:])
        await until(lambda: len(distinct_ids(hub)) == 60 and not len(transport.outbox))
    assert transport.stats.clients_replaced == 1 and transport.outbox.stats.dropped == 0


async def test_refused_connections_back_off_then_recover(hub: HubEmulator, module: Identity,
                                                         demo_messages: list[OutgoingMessage]) -> None:
    hub.refuse_connections(3)
    transport = EdgeTransport(settings())
    async with asyncio.timeout(LIMIT_S), running(transport):
        transport.submit(demo_messages[:3])
        await until(lambda: hub.stats.refused >= 2)
        assert transport.state in {LinkState.BACKOFF, LinkState.CONNECTING}
        hub.accept_connections()
        await until(lambda: len(distinct_ids(hub)) == 3)
    assert transport.stats.connects == 1


async def test_module_twin_tunes_every_leaf_and_reports_back(hub: HubEmulator, module: Identity) -> None:
    fleet = make_fleet()
    transport = EdgeTransport(settings())
    output = EdgeAgentOutput(transport, fleet)
    analyzer = Analyzer()
    from leafguard.capture.pcapfile import read_batches

    for batch in read_batches(demo_capture()):
        analyzer.feed(batch)
        output.after_batch(analyzer)
    leaves = sorted(agent.identity for agent in fleet.agents())
    plc = leaves[0]
    now = analyzer.now
    assert now is not None

    def reported() -> dict[str, Any]:
        twin: dict[str, Any] = hub.twin(module)["reported"]
        return twin

    def max_size(identity: str) -> Any:
        return reported().get("leaves", {}).get(identity, {}).get(CFG, {}).get("maxMessageSizeInBytes")

    async def applied() -> list[tuple[str, Any]]:
        while True:
            if outcomes := output.poll_desired(now):
                return outcomes
            await asyncio.sleep(0.05)

    await hub.set_desired(module, {CFG: {"maxMessageSizeInBytes": {"value": 65536}}})
    async with asyncio.timeout(LIMIT_S), running(transport):
        # The twin GET at connect brings the default object: every leaf takes it.
        assert {i for i, o in await applied() if o.accepted} == set(leaves)
        await until(lambda: all(max_size(i) == {"value": 65536} for i in leaves))
        assert reported()["leafguard"]["leaves"] == len(leaves)
        assert reported()["leafguard"]["frames"] == analyzer.stats.packets

        # A per-leaf entry overrides the default for that leaf only.
        await hub.set_desired(module, {"leaves": {plc: {CFG: {"maxMessageSizeInBytes": {"value": 16384}}}}})
        assert [(i, o.accepted) for i, o in await applied()] == [(plc, True)]
        await until(lambda: max_size(plc) == {"value": 16384})
        assert fleet.agent(plc).config.max_message_size_bytes == 16384  # type: ignore[union-attr]
        assert all(max_size(i) == {"value": 65536} for i in leaves if i != plc)

        # An invalid value is rejected whole: the previous configuration stays in force and is reported again.
        await hub.set_desired(module, {"leaves": {plc: {CFG: {"maxMessageSizeInBytes": {"value": "big"}}}}})
        assert [(i, o.accepted) for i, o in await applied()] == [(plc, False)]
        await asyncio.sleep(0.5)
        assert max_size(plc) == {"value": 16384}
        assert fleet.agent(plc).config.max_message_size_bytes == 16384  # type: ignore[union-attr]


async def test_sas_renewal_by_the_sdk_is_not_an_outage(hub: HubEmulator, module: Identity,
                                                      demo_messages: list[OutgoingMessage]) -> None:
    from azure.iot.device.aio import IoTHubModuleClient

    def short_token_client(_settings: EdgeSettings) -> Any:
        # The SDK renews 120 s before expiry: with a 122 s token it re-authorizes (DISCONNECT + CONNECT) after 2 s.
        return IoTHubModuleClient.create_from_edge_environment(
            connection_retry=False, auto_connect=False, sastoken_ttl=122)

    transport = EdgeTransport(settings(), client_factory=short_token_client)
    async with asyncio.timeout(LIMIT_S), running(transport):
        await until(lambda: transport.state is LinkState.CONNECTED)
        await until(lambda: hub.stats.connects >= 2)
        await asyncio.sleep(0.5)
        transport.submit(demo_messages[:2])
        await until(lambda: len(distinct_ids(hub)) == 2)
        assert transport.stats.reconnects == 0 and transport.stats.connects == 1


async def test_full_outbox_drops_low_first_and_counts_every_drop(hub: HubEmulator, module: Identity,
                                                                demo_messages: list[OutgoingMessage]) -> None:
    dropped: list[OutgoingMessage] = []
    transport = EdgeTransport(settings(outbox_max_bytes=262_144, send_timeout_s=20.0), on_dropped=dropped.append)
    batch = many(demo_messages, 120)  # about 400 KB of bodies: more than the outbox holds
    async with asyncio.timeout(LIMIT_S), running(transport):
        await until(lambda: transport.state is LinkState.CONNECTED)
        hub.stall_pubacks()
        transport.submit(batch)
        assert dropped and transport.outbox.bytes <= 262_144
        # The policy itself (Low first, then oldest, never the one in flight) is unit-tested in test_core.
        assert any(m.priority == "Low" for m in dropped)
        hub.release_pubacks()
        await until(lambda: not len(transport.outbox))
    counters = transport.counters()
    assert counters["dropped"] == len(dropped) > 0
    assert len(distinct_ids(hub)) + len(dropped) == len(batch)


async def test_edge_hub_restart_with_downtime(hub: HubEmulator, module: Identity,
                                              demo_messages: list[OutgoingMessage]) -> None:
    transport = EdgeTransport(settings())
    async with asyncio.timeout(LIMIT_S), running(transport):
        await until(lambda: transport.state is LinkState.CONNECTED)
        await hub.restart(downtime_s=1.5)
        transport.submit(demo_messages)
        await until(lambda: len(distinct_ids(hub)) == len(demo_messages))
    assert transport.stats.reconnects >= 1


async def test_failed_reported_patch_is_retried(hub: HubEmulator, module: Identity) -> None:
    transport = EdgeTransport(settings(), health=lambda: {"version": "test"})
    async with asyncio.timeout(LIMIT_S), running(transport):
        await until(lambda: transport.state is LinkState.CONNECTED)
        await until(lambda: "leafguard" in hub.twin(module)["reported"])
        hub.fail_twin_requests(503, count=2)
        transport.report_leaf("plc1", {CFG: {"maxMessageSizeInBytes": {"value": 8192}}})
        await until(lambda: "plc1" in hub.twin(module)["reported"].get("leaves", {}))
    assert transport.stats.reported_failures >= 1
