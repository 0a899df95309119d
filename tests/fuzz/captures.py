"""Capture files written byte by byte, and seeded mutations of them, for the fuzz tests.

The base captures hold the demo network's frames (DHCP, DNS, mDNS, TLS, a cleartext MQTT login, ...), so a
mutation reaches every decoder; they are written here rather than with scapy so that each header's offset is
known and a mutation can aim at length fields, options and time stamps, not only at random bytes.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from leafguard.demo import demo_capture

LINKTYPES = (0, 1, 101, 113, 276, 105, 127, 12345, 0xFFFF)
"""Link types a mutation sets: the supported ones (Ethernet, raw IP, SLL, SLL2) and some that are not."""


@dataclass(frozen=True, slots=True)
class Record:
    ts: float
    frame: bytes
    wirelen: int


@dataclass(frozen=True, slots=True)
class Capture:
    """A capture's bytes, and where its fields are (for aimed mutations)."""

    data: bytes
    kind: str
    """``pcap`` or ``pcapng``."""
    endian: str
    headers: tuple[int, ...]
    """Offsets of the file header and of every record or block header."""
    linktype_at: tuple[int, ...]
    """Offsets of the 16-bit (pcapng) or 32-bit (pcap) link-type fields."""
    options_at: tuple[int, ...] = ()
    """Offsets of interface options (pcapng)."""


def demo_records() -> list[Record]:
    """The frames of the embedded demo capture (a little-endian microsecond pcap that LeafGuard writes)."""
    data = demo_capture().read_bytes()
    out, pos = [], 24
    while pos + 16 <= len(data):
        sec, usec, caplen, wirelen = struct.unpack_from("<IIII", data, pos)
        out.append(Record(sec + usec / 1e6, data[pos + 16 : pos + 16 + caplen], wirelen))
        pos += 16 + caplen
    return out


def pcap(records: list[Record], *, endian: str = "<", nanos: bool = False, linktype: int = 1) -> Capture:
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    parts = [struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)]
    headers, pos = [0], 24
    scale = 1_000_000_000 if nanos else 1_000_000
    for rec in records:
        ticks = round(rec.ts * scale)
        headers.append(pos)
        parts.append(struct.pack(endian + "IIII", ticks // scale, ticks % scale, len(rec.frame), rec.wirelen))
        parts.append(rec.frame)
        pos += 16 + len(rec.frame)
    return Capture(b"".join(parts), "pcap", endian, tuple(headers), (20,))


def _block(endian: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = 12 + len(body)
    return struct.pack(endian + "II", btype, length) + body + struct.pack(endian + "I", length)


def pcapng(
    records: list[Record],
    *,
    endian: str = "<",
    tsresol: int | None = None,
    linktype: int = 1,
    epb_ticks: int | None = None,
) -> Capture:
    """One section, one interface, enhanced packet blocks; ``tsresol`` is the if_tsresol byte (None: the default
    microseconds); ``epb_ticks`` replaces every block's time stamp with that raw 64-bit tick count."""
    shb = _block(endian, 0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    options = b""
    if tsresol is not None:
        options = struct.pack(endian + "HH", 9, 1) + bytes([tsresol]) + b"\0\0\0" + struct.pack(endian + "HH", 0, 0)
    idb = _block(endian, 1, struct.pack(endian + "HHI", linktype, 0, 65535) + options)
    parts, headers = [shb, idb], [0, len(shb)]
    pos = len(shb) + len(idb)
    if tsresol is None:
        per_s = 1_000_000
    else:
        per_s = 2 ** (tsresol & 0x7F) if tsresol & 0x80 else 10 ** (tsresol & 0x7F)
    for rec in records:
        ticks = epb_ticks if epb_ticks is not None else int(rec.ts * per_s) & 0xFFFFFFFFFFFFFFFF
        body = struct.pack(endian + "IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(rec.frame), rec.wirelen)
        block = _block(endian, 6, body + rec.frame)
        headers.append(pos)
        parts.append(block)
        pos += len(block)
    return Capture(
        b"".join(parts), "pcapng", endian, tuple(headers), (len(shb) + 8,), (len(shb) + 16,) if options else ()
    )


# -- mutations ---------------------------------------------------------------------------------------------

Mutation = Callable[[random.Random, Capture], bytes]


def _flip_bits(rng: random.Random, cap: Capture) -> bytes:
    data = bytearray(cap.data)
    for _ in range(rng.randint(1, 8)):
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def _flip_header_bits(rng: random.Random, cap: Capture) -> bytes:
    """Bit flips in record and block headers: lengths, interface ids, time stamps."""
    data = bytearray(cap.data)
    for _ in range(rng.randint(1, 3)):
        at = rng.choice(cap.headers) + rng.randrange(24 if cap.kind == "pcapng" else 16)
        if at < len(data):
            data[at] ^= 1 << rng.randrange(8)
    return bytes(data)


def _truncate(rng: random.Random, cap: Capture) -> bytes:
    return cap.data[: rng.randrange(len(cap.data))]


def _bad_length(rng: random.Random, cap: Capture) -> bytes:
    """A record's or block's length set to something else: 0, odd, tiny, huge, past the end."""
    data = bytearray(cap.data)
    at = rng.choice(cap.headers[1:] or cap.headers)
    field = at + 4 if cap.kind == "pcapng" else at + 8
    value = rng.choice([0, 1, 3, 7, 11, 12, 13, 0x7FFFFFFF, 0xFFFFFFFF, len(data), rng.randrange(1 << 20)])
    struct.pack_into(cap.endian + "I", data, field, value)
    return bytes(data)


def _linktype(rng: random.Random, cap: Capture) -> bytes:
    data = bytearray(cap.data)
    fmt = cap.endian + ("H" if cap.kind == "pcapng" else "I")
    for at in cap.linktype_at:
        struct.pack_into(fmt, data, at, rng.choice(LINKTYPES))
    return bytes(data)


def _extreme_time(rng: random.Random, cap: Capture) -> bytes:
    """Every record at one extreme time stamp (the largest a header holds, zero, a wrap)."""
    data = bytearray(cap.data)
    hi = rng.choice([0, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF])
    lo = rng.choice([0, 999_999, 0xFFFFFFFF])
    for at in cap.headers[1:]:
        if cap.kind == "pcapng":
            if at + 20 <= len(data) and struct.unpack_from(cap.endian + "I", data, at)[0] == 6:
                struct.pack_into(cap.endian + "II", data, at + 12, hi, lo)
        else:
            struct.pack_into(cap.endian + "II", data, at, hi, lo)
    return bytes(data)


def _bad_option(rng: random.Random, cap: Capture) -> bytes:
    """The interface option (if_tsresol) given a length past the block, or an extreme resolution."""
    if not cap.options_at:
        return _flip_header_bits(rng, cap)
    data = bytearray(cap.data)
    at = cap.options_at[0]
    if rng.random() < 0.5:
        struct.pack_into(cap.endian + "H", data, at + 2, rng.choice([0, 2, 255, 0xFFFF]))
    else:
        data[at + 4] = rng.choice([0x00, 0x7F, 0x80, 0xBF, 0xFF, 0x3F, 30])
    return bytes(data)


def _insert_garbage(rng: random.Random, cap: Capture) -> bytes:
    at = rng.choice(cap.headers)
    return cap.data[:at] + rng.randbytes(rng.randint(1, 64)) + cap.data[at:]


MUTATIONS: dict[str, Mutation] = {
    "flip_bits": _flip_bits,
    "flip_header_bits": _flip_header_bits,
    "truncate": _truncate,
    "bad_length": _bad_length,
    "linktype": _linktype,
    "extreme_time": _extreme_time,
    "bad_option": _bad_option,
    "insert_garbage": _insert_garbage,
}


def base_captures() -> list[tuple[str, Capture]]:
    """The captures every mutation starts from: both formats, both byte orders, several resolutions."""
    recs = demo_records()
    return [
        ("pcap-le-us", pcap(recs)),
        ("pcap-be-ns", pcap(recs, endian=">", nanos=True)),
        ("pcapng-le", pcapng(recs)),
        ("pcapng-be-ns", pcapng(recs, endian=">", tsresol=9)),
        ("pcapng-le-2pow", pcapng(recs, tsresol=0x80 | 20)),
    ]


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    data: bytes
    suffix: str

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}{self.suffix}"
        path.write_bytes(self.data)
        return path


def cases(seed: int, count: int) -> Iterator[Case]:
    """``count`` mutated captures, the same ones for the same seed."""
    rng = random.Random(seed)
    bases = base_captures()
    names = sorted(MUTATIONS)
    for i in range(count):
        base_name, cap = bases[i % len(bases)]
        mutation = names[(i // len(bases)) % len(names)] if i < len(bases) * len(names) else rng.choice(names)
        data = MUTATIONS[mutation](rng, cap)
        if rng.random() < 0.25:  # a second mutation on top, now and then
            data = MUTATIONS[rng.choice(names)](rng, Capture(data, cap.kind, cap.endian, cap.headers, cap.linktype_at))
        yield Case(f"{seed}-{i}-{base_name}-{mutation}", data, "." + cap.kind)
