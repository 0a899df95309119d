"""The emulator's pieces without the SDK: codec, SAS, twins, property bags, and raw MQTT against the broker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from tests.hub_emulator import HubEmulator, mqtt, sas
from tests.hub_emulator.messages import MessageLog, decode_bag, encode_bag, message_from_topic, parse_event_topic
from tests.hub_emulator.rawclient import RawClient
from tests.hub_emulator.twins import Section, TwinError, twin_size

HUB = "lg-emulator.azure-devices.net"


@pytest.fixture
async def hub() -> AsyncIterator[HubEmulator]:
    async with HubEmulator.start() as emulator:
        yield emulator


# ---- codec -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "packet",
    [
        mqtt.Publish("devices/d/messages/events/", b"x" * 300, 1, 7, dup=True),
        mqtt.Publish("a/b", b"", 0, None, retain=True),
    ],
)
def test_publish_round_trip(packet: mqtt.Publish) -> None:
    data = mqtt.encode_publish(packet)
    first, rest = data[0], data[1:]
    # Skip the remaining-length varint.
    while rest[0] & 0x80:
        rest = rest[1:]
    assert mqtt.decode(first, rest[1:]) == packet


def test_connect_round_trip() -> None:
    packet = mqtt.Connect("d/m", False, 60, "MQTT", 4, "host/d/m/?api-version=1", b"SharedAccessSignature x")
    data = mqtt.encode_connect(packet)
    assert mqtt.decode(data[0], data[2:]) == packet


def test_remaining_length_over_four_bytes_is_malformed() -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
        with pytest.raises(mqtt.MalformedPacket):
            await mqtt.read_packet(reader, 1 << 30)

    asyncio.run(run())


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("$iothub/twin/res/#", "$iothub/twin/res/200/?$rid=1", True),
        ("$iothub/methods/POST/#", "$iothub/methods/POST/reboot/?$rid=1", True),
        ("devices/d/modules/m/inputs/#", "devices/d/modules/m/inputs/in1/%24.mid=1", True),
        ("devices/d/modules/m/inputs/#", "devices/d/modules/m/inputs", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("#", "$iothub/twin/res/200", False),
        ("$iothub/twin/PATCH/properties/desired/#", "$iothub/twin/res/200/?$rid=1", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert mqtt.topic_matches(topic_filter, topic) is matches


# ---- SAS ---------------------------------------------------------------------------------------------------


def test_sas_verifies_sdk_style_token_over_the_raw_resource() -> None:
    key = base64.b64encode(b"k" * 32).decode()
    token = sas.parse(sas.generate(f"{HUB}/devices/d1/modules/m1", key))
    assert token.resource_raw == urllib.parse.quote(f"{HUB}/devices/d1/modules/m1", safe="")
    assert "%2F" in token.resource_raw  # the SDK's upper-case escapes are what was signed
    sas.verify(token, ["AAAA", key])
    # Lower-casing the escapes changes the signed string, as in edgeHub.
    lowered = sas.SasToken(token.resource_raw.replace("%2F", "%2f"), token.signature, token.expiry_raw)
    with pytest.raises(sas.SasError, match="signature"):
        sas.verify(lowered, [key])


def test_sas_expiry_allows_five_minutes_of_skew() -> None:
    key = base64.b64encode(b"k" * 32).decode()
    now = time.time()
    token = sas.parse(sas.generate(f"{HUB}/devices/d1", key, ttl_s=-200, now=now))
    sas.verify(token, [key], now=now)
    with pytest.raises(sas.SasError, match="expired"):
        sas.verify(token, [key], now=now + 101)


def test_sas_signature_is_hmac_of_sr_newline_se() -> None:
    key = base64.b64encode(b"secret").decode()
    token = sas.parse(sas.generate(f"{HUB}/devices/d1", key, now=1000.0))
    expected = hmac.digest(b"secret", f"{token.resource_raw}\n{token.expiry_raw}".encode(), hashlib.sha256)
    assert token.signature == expected and token.expiry == 4600


@pytest.mark.parametrize("bad", ["sr=a&sig=b&se=1", "SharedAccessSignature sr=a&se=1",
                                 "SharedAccessSignature sr=a&sig=%%%&se=1", "SharedAccessSignature sr=a&sig=AA==&se=x"])
def test_sas_parse_rejects_malformed(bad: str) -> None:
    with pytest.raises(sas.SasError):
        sas.parse(bad)


# ---- twins and bags ----------------------------------------------------------------------------------------


def test_twin_patch_merges_deletes_and_counts_versions() -> None:
    section = Section()
    assert section.apply({"a": {"b": 1, "c": 2}, "d": "x"}) == 2
    assert section.apply({"a": {"b": None}, "d": None, "$version": 99}) == 3
    assert section.document() == {"a": {"c": 2}, "$version": 3}


def test_twin_size_limit_refuses_whole_patch() -> None:
    section = Section()
    with pytest.raises(TwinError) as err:
        section.apply({"big": "x" * 32 * 1024})
    assert err.value.status == 400
    assert section.version == 1 and section.properties == {}
    assert twin_size({"ab": "cd", "n": 1, "t": True, "$version": 5}) == 2 + 2 + 1 + 8 + 1 + 4


def test_property_bag_decodes_sdk_encoding() -> None:
    topic = ("devices/dev1/modules/mod1/messages/events/%24.on=out%201&%24.mid=abc&%24.ct=application%2Fjson"
             "&%24.ce=utf-8&%24.ifid=urn%3Aazureiot%3ASecurity%3ASecurityAgent%3A1&a=1%2F2&b=x%20y&plus=a+b&flag")
    event = parse_event_topic(topic)
    assert event is not None
    assert (event.device_id, event.module_id) == ("dev1", "mod1")
    assert event.bag == {"$.on": "out 1", "$.mid": "abc", "$.ct": "application/json", "$.ce": "utf-8",
                         "$.ifid": "urn:azureiot:Security:SecurityAgent:1", "a": "1/2", "b": "x y",
                         "plus": "a+b", "flag": None}
    assert decode_bag(encode_bag({"k y": "v/w", "n": None})) == {"k y": "v/w", "n": None}


def test_message_log_is_bounded_and_counts() -> None:
    log = MessageLog(capacity=3)
    topic = parse_event_topic("devices/d/messages/events/")
    assert topic is not None
    for i in range(5):
        log.append(message_from_topic("d", topic, "t", str(i).encode(), dup=False, retain=False))
    assert [m.body for m in log.items()] == [b"2", b"3", b"4"]
    assert (log.total, log.evicted) == (5, 2)
    log.clear()
    assert log.items() == [] and log.total == 5


@pytest.mark.parametrize("topic", ["devices/d/messages/events", "devices/d/messages/events/",
                                   "devices/d/modules/m/messages/events", "devices/d/modules/m/messages/events/"])
def test_event_topic_variants(topic: str) -> None:
    assert parse_event_topic(topic) is not None


@pytest.mark.parametrize("topic", ["devices/d/messages/devicebound", "devices/d/modules/m/inputs/x", "a/b/c/d"])
def test_non_event_topics(topic: str) -> None:
    assert parse_event_topic(topic) is None


# ---- raw MQTT against the broker ---------------------------------------------------------------------------


async def test_connect_checks_identity_user_name_and_token(hub: HubEmulator) -> None:
    dev = hub.add_device("d1")
    other = hub.add_device("d2")
    ok, connack = await RawClient.connect(hub, dev)
    assert connack == mqtt.Connack(False, 0)
    await ok.close()
    wrong_audience = sas.generate(f"{HUB}/devices/d2", dev.primary_key)
    cases = {
        "token for another identity": {"token": wrong_audience},
        "other identity's key": {"token": sas.generate(f"{HUB}/devices/d1", other.primary_key)},
        "expired": {"token": sas.generate(f"{HUB}/devices/d1", dev.primary_key, ttl_s=-600)},
        "client id differs": {"client_id": "d2"},
        "no api-version": {"username": f"{HUB}/d1/?DeviceClientType=x"},
        "foreign host": {"username": f"elsewhere.azure-devices.net/d1/{'?api-version=1'}"},
    }
    for name, kwargs in cases.items():
        client, connack = await RawClient.connect(hub, dev, **kwargs)  # type: ignore[arg-type]
        assert connack.code == mqtt.ConnackCode.NOT_AUTHORIZED, name
        assert await client.closed_by_server(), name
        await client.close()
    assert hub.stats.auth_failures == len(cases)
    # The secondary key and the gateway host name are accepted too.
    secondary = sas.generate(f"{hub.host}/devices/d1", dev.secondary_key)
    client, connack = await RawClient.connect(hub, dev, token=secondary)
    assert connack.code == 0
    await client.close()


async def test_module_may_sign_with_its_device_key(hub: HubEmulator) -> None:
    hub.add_device("edge1", edge=True)
    module = hub.add_module("edge1", "m1")
    token = sas.generate(f"{HUB}/devices/edge1/modules/m1", hub.identity("edge1").primary_key)
    client, connack = await RawClient.connect(hub, module, token=token)
    assert connack.code == 0
    await client.close()


async def test_scope_admits_only_the_edge_devices_modules_and_children(hub: HubEmulator) -> None:
    edge = hub.add_device("edge1", edge=True)
    other_edge = hub.add_device("edge2", edge=True)
    admitted = [hub.add_module(edge, "m1"), hub.add_device("child", parent=edge)]
    refused = [hub.add_device("stranger"), hub.add_module(other_edge, "m1"), hub.add_device("other", parent=other_edge)]
    hub.scope_to(edge)
    for identity, code in [(i, 0) for i in admitted] + [(i, mqtt.ConnackCode.NOT_AUTHORIZED) for i in refused]:
        client, connack = await RawClient.connect(hub, identity)
        assert connack.code == code, identity
        await client.close()


async def test_refuse_connections_answers_the_configured_code(hub: HubEmulator) -> None:
    dev = hub.add_device("d1")
    hub.refuse_connections(3)
    client, connack = await RawClient.connect(hub, dev)
    assert connack.code == mqtt.ConnackCode.SERVER_UNAVAILABLE
    await client.close()
    hub.accept_connections()
    client, connack = await RawClient.connect(hub, dev)
    assert connack.code == 0
    await client.close()


async def test_new_connection_drops_the_old_one_and_keeps_the_session(hub: HubEmulator) -> None:
    dev = hub.add_device("d1")
    first, _ = await RawClient.connect(hub, dev)
    first.subscribe("$iothub/twin/res/#")
    assert isinstance(await first.receive(), mqtt.Suback)
    second, connack = await RawClient.connect(hub, dev)
    assert connack == mqtt.Connack(True, 0)  # session present: the subscription survived
    assert await first.closed_by_server()
    assert hub.stats.kicked == 1
    assert [c.subscriptions for c in hub.connections()] == [["$iothub/twin/res/#"]]
    await first.close()
    await second.close()
    # clean_session=True starts over.
    third, connack = await RawClient.connect(hub, dev, clean_session=True)
    assert connack == mqtt.Connack(False, 0)
    await third.close()


async def test_pingreq_and_dup_republish_are_answered(hub: HubEmulator) -> None:
    dev = hub.add_device("d1")
    client, _ = await RawClient.connect(hub, dev)
    client.send(mqtt.encode_bare(mqtt.PacketType.PINGREQ))
    assert await client.receive() == mqtt.Bare(mqtt.PacketType.PINGRESP)
    for dup in (False, True):
        client.send(mqtt.encode_publish(mqtt.Publish("devices/d1/messages/events/", b"m", 1, 5, dup=dup)))
        assert await client.receive() == mqtt.PacketIdOnly(mqtt.PacketType.PUBACK, 5)
    assert [m.dup for m in hub.messages(dev)] == [False, True]
    await client.close()


@pytest.mark.parametrize(
    ("topic", "qos", "size"),
    [
        ("devices/d1/messages/events/", 2, 10),  # no QoS 2 on IoT Hub
        ("devices/d2/messages/events/", 1, 10),  # another identity's topic
        ("some/other/topic", 1, 10),
        ("devices/d1/messages/events/", 1, 262145),  # over 256 KB
    ],
)
async def test_hub_closes_the_connection_on_forbidden_publish(hub: HubEmulator, topic: str, qos: int,
                                                              size: int) -> None:
    dev = hub.add_device("d1")
    hub.add_device("d2")
    client, _ = await RawClient.connect(hub, dev)
    client.publish(topic, b"x" * size, qos)
    assert await client.closed_by_server()
    assert hub.messages() == []
    assert hub.stats.protocol_errors == 1
    await client.close()


async def test_message_at_the_limit_is_accepted(hub: HubEmulator) -> None:
    dev = hub.add_device("d1")
    client, _ = await RawClient.connect(hub, dev)
    client.publish("devices/d1/messages/events/k=v", b"x" * (262144 - 2))
    assert isinstance(await client.receive(), mqtt.PacketIdOnly)
    assert len(hub.messages()[0].body) == 262142
    await client.close()


async def test_reported_patch_statuses(hub: HubEmulator) -> None:
    dev = hub.add_device("d1")
    client, _ = await RawClient.connect(hub, dev)
    client.subscribe("$iothub/twin/res/#")
    client.publish("$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"a": 1}')
    assert (await client.receive_publish()).topic == "$iothub/twin/res/204/?$rid=1&$version=2"
    client.publish("$iothub/twin/PATCH/properties/reported/?$rid=2", b'{"a": ')
    assert (await client.receive_publish()).topic == "$iothub/twin/res/400/?$rid=2"
    client.publish("$iothub/twin/PATCH/properties/reported/?$rid=3", orjson.dumps({"b": "x" * 40000}))
    assert (await client.receive_publish()).topic == "$iothub/twin/res/400/?$rid=3"
    client.publish("$iothub/twin/GET/?$rid=4", b" ")
    response = await client.receive_publish()
    assert response.topic == "$iothub/twin/res/200/?$rid=4"
    assert orjson.loads(response.payload) == {"desired": {"$version": 1}, "reported": {"a": 1, "$version": 2}}
    await client.close()


async def test_twin_requests_without_subscription_follow_the_switch(hub: HubEmulator) -> None:
    dev = hub.add_device("d1")
    client, _ = await RawClient.connect(hub, dev)
    client.publish("$iothub/twin/GET/?$rid=1", b" ")
    assert isinstance(await client.receive(), mqtt.PacketIdOnly)  # PUBACK, then nothing
    with pytest.raises(TimeoutError):
        await client.receive(timeout_s=0.3)
    hub.answer_unsubscribed_twin_requests = True
    client.publish("$iothub/twin/GET/?$rid=2", b" ")
    assert (await client.receive_publish()).topic == "$iothub/twin/res/200/?$rid=2"
    await client.close()


async def test_twin_failure_injection_then_recovery(hub: HubEmulator) -> None:
    dev = hub.add_device("d1")
    client, _ = await RawClient.connect(hub, dev)
    client.subscribe("$iothub/twin/res/#")
    hub.fail_twin_requests(429, count=2)
    for rid in ("1", "2", "3"):
        client.publish(f"$iothub/twin/GET/?$rid={rid}", b" ")
    topics = [(await client.receive_publish()).topic for _ in range(3)]
    assert topics == ["$iothub/twin/res/429/?$rid=1", "$iothub/twin/res/429/?$rid=2", "$iothub/twin/res/200/?$rid=3"]
    await client.close()


async def test_offline_input_is_queued_and_resent_with_dup_until_acked(hub: HubEmulator) -> None:
    hub.add_device("edge1", edge=True)
    module = hub.add_module("edge1", "m1")
    client, _ = await RawClient.connect(hub, module)
    client.subscribe("devices/edge1/modules/m1/inputs/#")
    await client.receive()
    await client.close()
    await asyncio.sleep(0.05)
    assert await hub.send_to_input(module, "in1", "hello", {"$.mid": "1", "k": "v"})
    client, connack = await RawClient.connect(hub, module)
    assert connack.session_present
    first = await client.receive_publish()
    assert first.topic == "devices/edge1/modules/m1/inputs/in1/%24.mid=1&k=v" and first.dup and first.qos == 1
    await client.close()  # no PUBACK: it comes again
    client, _ = await RawClient.connect(hub, module)
    again = await client.receive_publish()
    assert again.packet_id == first.packet_id
    client.send(mqtt.encode_ack(mqtt.PacketType.PUBACK, again.packet_id or 0))
    client.send(mqtt.encode_bare(mqtt.PacketType.PINGREQ))
    await client.receive()
    assert hub.broker.sessions["edge1/m1"].outbound == {}
    await client.close()


async def test_keep_alive_timeout_closes_idle_connection(hub: HubEmulator) -> None:
    dev = hub.add_device("d1")
    client, _ = await RawClient.connect(hub, dev, keep_alive_s=1)
    started = time.monotonic()
    assert await client.closed_by_server(timeout_s=3)
    assert 1.4 < time.monotonic() - started < 2.5
    await client.close()


async def test_several_emulators_use_different_addresses() -> None:
    async with HubEmulator.start() as one, HubEmulator.start() as two:
        assert one.host != two.host
        assert one.ca_pem != two.ca_pem
        for emulator in (one, two):
            client, connack = await RawClient.connect(emulator, emulator.add_device("d1"))
            assert connack.code == 0
            await client.close()


async def test_close_leaves_no_tasks_behind() -> None:
    before = asyncio.all_tasks()
    async with HubEmulator.start() as hub:
        client, _ = await RawClient.connect(hub, hub.add_device("d1"))
        hub.delay_pubacks(30)
        client.publish("devices/d1/messages/events/", b"never acked")
        await asyncio.sleep(0.05)
        assert len(hub.connections()) == 1
    assert asyncio.all_tasks() == before
    assert await client.closed_by_server()
    await client.close()


async def test_emulator_starts_fast() -> None:
    started = time.perf_counter()
    async with HubEmulator.start():
        elapsed = time.perf_counter() - started
    assert elapsed < 1.0


# ---- HTTP: workload and control ----------------------------------------------------------------------------


async def test_workload_api_trust_bundle_and_sign(hub: HubEmulator) -> None:
    hub.add_device("edge1", edge=True)
    module = hub.add_module("edge1", "m1")
    base = hub.workload_uri("edge1")
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "trust-bundle", params={"api-version": "2019-01-30"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["certificate"] == hub.ca_pem
        body = orjson.dumps({"keyId": "primary", "algo": "HMACSHA256", "data": base64.b64encode(b"abc").decode()})
        url = f"{base}modules/m1/genid/{module.generation_id}/sign"
        async with http.post(url, params={"api-version": "2019-01-30"}, data=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["digest"] == sas.sign(module.primary_key, "abc")
        async with http.post(f"{base}modules/m1/genid/wrong/sign", params={"api-version": "2019-01-30"},
                             data=body) as resp:
            assert resp.status == 404
        async with http.get(base + "trust-bundle") as resp:
            assert resp.status == 400


async def test_control_api(hub: HubEmulator) -> None:
    url = hub.http_url + "/control"
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/identities", json={"device_id": "edge1", "edge": True}) as resp:
            assert resp.status == 201
        async with http.post(url + "/identities", json={"device_id": "edge1", "module_id": "m1"}) as resp:
            described = await resp.json()
            assert described["edge_environment"]["IOTEDGE_MODULEID"] == "m1"
        async with http.patch(url + "/twins/edge1/m1", json={"interval": 5}) as resp:
            assert await resp.json() == {"$version": 2}
        async with http.get(url + "/twins/edge1/m1") as resp:
            assert (await resp.json())["desired"] == {"interval": 5, "$version": 2}
        async with http.post(url + "/faults", json={"refuse": 3, "twin_failure": {"status": 500, "count": 1}}) as r:
            faults = await r.json()
            assert faults["refuse"] == 3 and faults["twin_failure"] == {"status": 500, "count": 1}
        async with http.get(url + "/connections") as resp:
            assert await resp.json() == []
        hub.accept_connections()
        client, _ = await RawClient.connect(hub, hub.identity("edge1/m1"))
        client.publish("devices/edge1/modules/m1/messages/events/%24.on=alerts", b"{}")
        await hub.wait_for_messages(1)
        async with http.get(url + "/messages", params={"identity": "edge1/m1"}) as resp:
            body = await resp.json()
            assert body["total"] == 1 and body["messages"][0]["system"] == {"$.on": "alerts"}
        async with http.get(url + "/connections") as resp:
            assert [c["client_id"] for c in await resp.json()] == ["edge1/m1"]
        async with http.delete(url + "/connections/edge1/m1") as resp:
            assert await resp.json() == {"dropped": 1}
        assert await client.closed_by_server()
        await client.close()
        async with http.delete(url + "/messages") as resp:
            assert resp.status == 200
        assert hub.messages() == []
        async with http.get(url + "/twins/nobody") as resp:
            assert resp.status == 404
        async with http.post(url + "/restart", json={}) as resp:
            assert resp.status == 200


def _nested(depth: int) -> bytes:
    """`{"n": {"n": ... {"leaf": 1}}}` as text: orjson would refuse to serialise past 254 levels."""
    return b'{"n":' * (depth - 1) + b'{"leaf":1}' + b"}" * (depth - 1)


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        (orjson.dumps({"big": "x" * (33 * 1024)}), "over 32768"),
        (_nested(11), "deeper than 10"),
        # Deeper than Python's recursion limit but within orjson's: the depth check itself must not recurse.
        (_nested(1010), "deeper than 10"),
    ],
    ids=["too-large", "too-deep", "deeper-than-recursion-limit"],
)
async def test_control_api_refuses_bad_desired_patch_with_400_and_reason(
        hub: HubEmulator, patch: bytes, reason: str) -> None:
    hub.add_device("d1")
    url = hub.http_url + "/control/twins/d1"
    async with aiohttp.ClientSession() as http:
        async with http.patch(url, data=patch, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["errorCode"] == 400004 and reason in body["message"]
        async with http.get(url) as resp:
            assert (await resp.json())["desired"] == {"$version": 1}, "a refused patch changes nothing"
