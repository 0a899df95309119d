"""MQTT 3.1.1 wire codec, sans I/O (OASIS MQTT 3.1.1, section 2 and 3).

Only what IoT Hub speaks: no will handling beyond parsing, no QoS 2 delivery. The decoder takes one packet's
fixed-header byte and body; `read_packet` is the only function that touches a stream. Client-side encoders
(`encode_connect`, `encode_subscribe`) exist so tests can speak raw MQTT to the broker where the SDK refuses
to (oversized messages, QoS 2, foreign topics).
"""

from __future__ import annotations

import asyncio
import enum
import struct
from dataclasses import dataclass, field


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnackCode(enum.IntEnum):
    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


SUBACK_FAILURE = 0x80


class MalformedPacket(Exception):
    """The bytes do not form a valid MQTT 3.1.1 packet; the server must close the connection (3.1.1 §4.8)."""


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    clean_session: bool
    keep_alive_s: int
    protocol_name: str
    protocol_level: int
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    packet_id: int | None = None
    dup: bool = False
    retain: bool = False


@dataclass(frozen=True, slots=True)
class PacketIdOnly:
    """PUBACK, PUBREC, PUBREL, PUBCOMP and UNSUBACK carry nothing but a packet id."""

    kind: PacketType
    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    topics: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topics: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool
    code: int


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    codes: list[int]


@dataclass(frozen=True, slots=True)
class Bare:
    """PINGREQ, PINGRESP and DISCONNECT have no variable header."""

    kind: PacketType


Packet = Connect | Publish | PacketIdOnly | Subscribe | Unsubscribe | Connack | Suback | Bare


async def read_packet(reader: asyncio.StreamReader, max_body: int) -> tuple[int, bytes]:
    """Read one packet: (first byte, body). Raises IncompleteReadError at EOF, MalformedPacket on junk.

    `max_body` bounds memory: a peer announcing more is cut off before the body is read.
    """
    first = (await reader.readexactly(1))[0]
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise MalformedPacket("remaining length longer than four bytes")
    if length > max_body:
        raise MalformedPacket(f"packet of {length} bytes exceeds the {max_body}-byte limit")
    return first, await reader.readexactly(length)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u8(self) -> int:
        if self.pos + 1 > len(self.data):
            raise MalformedPacket("truncated")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise MalformedPacket("truncated")
        (value,) = struct.unpack_from("!H", self.data, self.pos)
        self.pos += 2
        return int(value)

    def blob(self) -> bytes:
        size = self.u16()
        if self.pos + size > len(self.data):
            raise MalformedPacket("truncated string")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def text(self) -> str:
        try:
            return self.blob().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacket("string is not UTF-8") from exc

    def rest(self) -> bytes:
        return self.data[self.pos :]

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def decode(first: int, body: bytes) -> Packet:
    """Decode one packet from its first byte and body (3.1.1 §3)."""
    try:
        kind = PacketType(first >> 4)
    except ValueError as exc:
        raise MalformedPacket(f"reserved packet type {first >> 4}") from exc
    flags = first & 0x0F
    cur = _Cursor(body)
    match kind:
        case PacketType.CONNECT:
            return _decode_connect(cur)
        case PacketType.PUBLISH:
            qos = (flags >> 1) & 0x03
            if qos == 3:
                raise MalformedPacket("PUBLISH with QoS 3")
            topic = cur.text()
            packet_id = cur.u16() if qos else None
            return Publish(topic, cur.rest(), qos, packet_id, bool(flags & 0x08), bool(flags & 0x01))
        case (PacketType.PUBACK | PacketType.PUBREC | PacketType.PUBREL | PacketType.PUBCOMP
              | PacketType.UNSUBACK):
            return PacketIdOnly(kind, cur.u16())
        case PacketType.SUBSCRIBE:
            if flags != 0x02:
                raise MalformedPacket("SUBSCRIBE flags must be 0010")
            sub = Subscribe(cur.u16())
            while not cur.done:
                sub.topics.append((cur.text(), cur.u8() & 0x03))
            if not sub.topics:
                raise MalformedPacket("SUBSCRIBE without topics")
            return sub
        case PacketType.UNSUBSCRIBE:
            if flags != 0x02:
                raise MalformedPacket("UNSUBSCRIBE flags must be 0010")
            unsub = Unsubscribe(cur.u16())
            while not cur.done:
                unsub.topics.append(cur.text())
            return unsub
        case PacketType.CONNACK:
            session_present = cur.u8() & 0x01
            return Connack(bool(session_present), cur.u8())
        case PacketType.SUBACK:
            packet_id = cur.u16()
            return Suback(packet_id, list(cur.rest()))
        case _:
            return Bare(kind)


def _decode_connect(cur: _Cursor) -> Connect:
    name = cur.text()
    level = cur.u8()
    flags = cur.u8()
    keep_alive = cur.u16()
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")
    client_id = cur.text()
    will_topic = will_payload = None
    if flags & 0x04:
        will_topic = cur.text()
        will_payload = cur.blob()
    username = cur.text() if flags & 0x80 else None
    password = cur.blob() if flags & 0x40 else None
    return Connect(client_id, bool(flags & 0x02), keep_alive, name, level, username, password, will_topic,
                   will_payload)


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _length(len(body)) + body


def encode_connack(session_present: bool, code: int) -> bytes:
    return _packet(0x20, bytes([1 if session_present else 0, code]))


def encode_publish(msg: Publish) -> bytes:
    flags = (0x08 if msg.dup else 0) | (msg.qos << 1) | (0x01 if msg.retain else 0)
    header = _string(msg.topic)
    if msg.qos:
        if msg.packet_id is None:
            raise ValueError("QoS > 0 needs a packet id")
        header += struct.pack("!H", msg.packet_id)
    return _packet(0x30 | flags, header + msg.payload)


def encode_ack(kind: PacketType, packet_id: int) -> bytes:
    # PUBREL is the only ack with mandatory flags 0010 (3.1.1 §3.6.1).
    flags = 0x02 if kind is PacketType.PUBREL else 0
    return _packet((kind << 4) | flags, struct.pack("!H", packet_id))


def encode_suback(packet_id: int, codes: list[int]) -> bytes:
    return _packet(0x90, struct.pack("!H", packet_id) + bytes(codes))


def encode_bare(kind: PacketType) -> bytes:
    return _packet(kind << 4, b"")


def encode_connect(msg: Connect) -> bytes:
    flags = (0x02 if msg.clean_session else 0) | (0x80 if msg.username is not None else 0)
    flags |= 0x40 if msg.password is not None else 0
    body = _string(msg.protocol_name) + bytes([msg.protocol_level, flags])
    body += struct.pack("!H", msg.keep_alive_s) + _string(msg.client_id)
    if msg.username is not None:
        body += _string(msg.username)
    if msg.password is not None:
        body += _string(msg.password)
    return _packet(0x10, body)


def encode_subscribe(msg: Subscribe) -> bytes:
    body = struct.pack("!H", msg.packet_id) + b"".join(_string(t) + bytes([q]) for t, q in msg.topics)
    return _packet(0x82, body)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7 matching of `+` and `#`; `$` topics only match filters that spell out the `$` level."""
    if topic.startswith("$") and topic_filter[:1] in {"+", "#"}:
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level not in {"+", t_levels[i]}:
            return False
    return len(f_levels) == len(t_levels)
