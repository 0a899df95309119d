"""Steady IoT traffic over minutes of packet time (the benchmark generator's mix, its clock stretched)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from testkit.gen_capture import START_TS, frames, write_pcap


def steady_capture(  # noqa: PLR0913 (a builder: each argument is one knob of the generated traffic)
    path: Path, *, minutes: float, leaves: int = 10, count: int = 20_000, seed: int = 11,
    offset_s: float = 0.0,
) -> Path:
    """``count`` frames of ``leaves`` leaves spread over ``minutes`` of packet time, starting ``offset_s`` after the
    generator's start (cached by name). The same seed gives the same first leaves whatever ``leaves`` is."""
    if path.exists():
        return path
    raw = list(frames(seed, leaves, count))
    span = raw[-1][0] - START_TS
    scale = minutes * 60.0 / span

    def stretched() -> Iterator[tuple[float, bytes]]:
        for ts, frame in raw:
            yield START_TS + offset_s + (ts - START_TS) * scale, frame

    write_pcap(path, stretched())
    return path


def empty_capture(path: Path) -> Path:
    """A capture file with no frames (a restart that only has to send what the spool holds)."""
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    return path


def conflict_capture(path: Path, *, addresses: int) -> Path:
    """``addresses`` leaf addresses, each announced by ARP from one MAC and then from another: one
    ``address_conflict`` per address, so more than 10,000 alerts in one run from 20,002 frames (cached)."""
    if path.exists():
        return path
    from testkit.gen_capture import arp, ether

    first, second, broadcast = bytes.fromhex("02aa00000001"), bytes.fromhex("02bb00000001"), b"\xff" * 6

    def stream() -> Iterator[tuple[float, bytes]]:
        ts = START_TS
        for a in range(addresses):
            ip = bytes([10, 2 + (a >> 16), (a >> 8) & 0xFF, a & 0xFF])
            for mac in (first, second):
                ts += 0.001
                yield ts, ether(broadcast, mac, 0x0806, arp(2, mac, ip, broadcast, ip))

    write_pcap(path, stream())
    return path
