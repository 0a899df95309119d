"""A minimal MQTT client for tests that must send what the SDK never sends (bad tokens, QoS 2, huge messages)."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from typing import Self

from tests.hub_emulator import mqtt, sas
from tests.hub_emulator.emulator import MQTT_PORT, HubEmulator
from tests.hub_emulator.identities import Identity

API_QUERY = "?api-version=2019-10-01&DeviceClientType=raw-test-client"


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._ids = itertools.count(1)

    @classmethod
    async def open(cls, hub: HubEmulator) -> Self:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=hub.ca_pem)
        reader, writer = await asyncio.open_connection(hub.host, MQTT_PORT, ssl=ctx, server_hostname=hub.host)
        return cls(reader, writer)

    @classmethod
    async def connect(cls, hub: HubEmulator, identity: Identity, *, token: str | None = None,
                      username: str | None = None, client_id: str | None = None,
                      clean_session: bool = False, keep_alive_s: int = 60) -> tuple[Self, mqtt.Connack]:
        """Open a link and CONNECT as `identity` (a valid token and user name unless given)."""
        client = await cls.open(hub)
        resource = f"{hub.hub_hostname}/devices/{identity.device_id}"
        if identity.module_id is not None:
            resource += f"/modules/{identity.module_id}"
        token = token if token is not None else sas.generate(resource, identity.primary_key)
        username = username if username is not None else f"{hub.hub_hostname}/{identity.id}/{API_QUERY}"
        client.send(mqtt.encode_connect(mqtt.Connect(
            client_id if client_id is not None else identity.id, clean_session, keep_alive_s, "MQTT", 4,
            username, token.encode())))
        connack = await client.receive()
        assert isinstance(connack, mqtt.Connack), connack
        return client, connack

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        packet_id = next(self._ids) if qos else None
        self.send(mqtt.encode_publish(mqtt.Publish(topic, payload, qos, packet_id)))
        return packet_id or 0

    def subscribe(self, *filters: str) -> int:
        packet_id = next(self._ids)
        self.send(mqtt.encode_subscribe(mqtt.Subscribe(packet_id, [(f, 1) for f in filters])))
        return packet_id

    async def receive(self, timeout_s: float = 5.0) -> mqtt.Packet:
        async with asyncio.timeout(timeout_s):
            first, body = await mqtt.read_packet(self.reader, 1 << 24)
        return mqtt.decode(first, body)

    async def receive_publish(self, timeout_s: float = 5.0) -> mqtt.Publish:
        """The next PUBLISH, skipping acks."""
        while True:
            packet = await self.receive(timeout_s)
            if isinstance(packet, mqtt.Publish):
                return packet

    async def closed_by_server(self, timeout_s: float = 5.0) -> bool:
        """Read until the server closes the link; True if it did within the timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            self.writer.transport.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
