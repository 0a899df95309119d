"""Capture files (pcap and pcapng) read into `FrameBatch`es without per-frame objects.

The file is read in large chunks; each batch references one chunk and the offsets of its frames in it, so a
million-frame file costs a handful of big reads and one struct unpack per record. A record cut off by the end
of the file (a capture that was still being written) ends the file and is counted, as tcpdump and tshark do;
anything that cannot be a capture file, or a link type the decoder does not know, is a `CaptureFileError`
naming the file and the problem.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leafguard.capture.batch import LINKTYPE_NAMES, SUPPORTED_LINKTYPES, FrameBatch
from leafguard.errors import CaptureFileError

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D

BLOCK_IDB = 0x00000001
BLOCK_PB = 0x00000002  # obsolete packet block, still written by old tools
BLOCK_SPB = 0x00000003
BLOCK_EPB = 0x00000006

CHUNK_BYTES = 8 << 20
_HEADER_BYTES = np.arange(16, dtype=np.int64)
MAX_RECORD_BYTES = 1 << 18  # larger than any snap length in use; a bigger value means a corrupt file


@dataclass(slots=True)
class FileStats:
    """What reading one file found besides its frames."""

    path: str
    truncated_records: int = 0
    """Records cut off by the end of the file (counted, never fatal)."""


def _new_batch(linktype: int, data: bytes, src: str, file_offset: int) -> FrameBatch:
    return FrameBatch(
        linktype=linktype,
        data=data,
        offsets=array("q"),
        caplens=array("q"),
        wirelens=array("q"),
        timestamps=array("d"),
        source=src,
        file_offset=file_offset,
    )


def _unsupported(path: Path, linktype: int) -> CaptureFileError:
    return CaptureFileError(
        f"{path}: unsupported link type {linktype}; LeafGuard reads "
        + ", ".join(sorted(LINKTYPE_NAMES.values()))
    )


def read_batches(
    path: str | Path, *, batch_frames: int = 8192, stats: FileStats | None = None
) -> Iterator[FrameBatch]:
    """Yield the frames of a pcap or pcapng file in capture order, in batches of one link type."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise CaptureFileError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    with fh:
        head = fh.read(24)
        if len(head) < 4:
            raise CaptureFileError(f"{path}: not a capture file (empty or shorter than a header)")
        magic_le = struct.unpack_from("<I", head)[0]
        magic_be = struct.unpack_from(">I", head)[0]
        st = stats if stats is not None else FileStats(str(path))
        if magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) or magic_be in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            yield from _read_pcap(path, fh, head, batch_frames, st)
        elif magic_le == PCAPNG_SHB:
            fh.seek(0)
            yield from _read_pcapng(path, fh, batch_frames, st)
        else:
            raise CaptureFileError(f"{path}: not a pcap or pcapng file (magic 0x{magic_le:08x})")


def _read_pcap(path: Path, fh: object, head: bytes, batch_frames: int, st: FileStats) -> Iterator[FrameBatch]:
    import io

    assert isinstance(fh, io.BufferedReader)
    if len(head) < 24:
        raise CaptureFileError(f"{path}: truncated pcap file header")
    endian = "<" if struct.unpack_from("<I", head)[0] in (PCAP_MAGIC_US, PCAP_MAGIC_NS) else ">"
    magic, _vmaj, _vmin, _zone, _sig, _snaplen, network = struct.unpack(endian + "IHHiIII", head)
    linktype = network & 0x0FFFFFFF
    if linktype not in SUPPORTED_LINKTYPES:
        raise _unsupported(path, linktype)
    divisor = 1e9 if magic == PCAP_MAGIC_NS else 1e6
    caplen_at = struct.Struct(endian + "I").unpack_from
    dt = np.dtype(np.uint32).newbyteorder("<" if endian == "<" else ">")
    src = str(path)
    carry = b""
    eof = False
    while not eof:
        chunk = fh.read(CHUNK_BYTES)
        if not chunk:
            eof = True
        data = carry + chunk if carry else chunk
        n = len(data)
        data_at = fh.tell() - n
        pos = 0
        # The record walk is the one sequential step; it only follows the captured lengths. Everything else in
        # the record headers is gathered afterwards for all records at once.
        records: list[int] = []
        append = records.append
        while pos + 16 <= n:
            caplen = caplen_at(data, pos + 8)[0]
            end = pos + 16 + caplen
            if end > n:
                if caplen > MAX_RECORD_BYTES:
                    raise CaptureFileError(
                        f"{path}: corrupt record at byte {fh.tell() - n + pos}: captured length {caplen}"
                    )
                break
            append(pos)
            pos = end
        if records:
            rec = np.asarray(records, dtype=np.int64)
            # Records sit at any byte offset: gather each 16-byte header, then read it as four integers.
            raw = np.frombuffer(data, dtype=np.uint8)[rec[:, None] + _HEADER_BYTES]
            heads = raw.view(dt).reshape(-1, 4)
            stamps = heads[:, 0] + heads[:, 1] / divisor
            caplens = heads[:, 2].astype(np.int64)
            wirelens = np.maximum(heads[:, 3].astype(np.int64), caplens)
            offsets = rec + 16
            for lo in range(0, len(records), batch_frames):
                hi = lo + batch_frames
                yield FrameBatch(
                    linktype=linktype,
                    data=data,
                    offsets=array("q", offsets[lo:hi].tobytes()),
                    caplens=array("q", caplens[lo:hi].tobytes()),
                    wirelens=array("q", wirelens[lo:hi].tobytes()),
                    timestamps=array("d", stamps[lo:hi].astype(np.float64).tobytes()),
                    source=src,
                    file_offset=data_at,
                )
        carry = data[pos:]
        if eof and carry:
            st.truncated_records += 1


def _read_pcapng(path: Path, fh: object, batch_frames: int, st: FileStats) -> Iterator[FrameBatch]:
    import io

    assert isinstance(fh, io.BufferedReader)
    src = str(path)
    endian = "<"
    # Per section: interface id -> (linktype, timestamp units per second)
    interfaces: list[tuple[int, int]] = []
    # The file is read in chunks, as pcap files are; a block that crosses the end of a chunk is carried over.
    data = b""
    base = 0
    """File offset of ``data[0]``."""
    pos = 0
    eof = False
    current: FrameBatch | None = None
    last_ts = 0.0
    while True:
        need = 12
        blen = btype = 0
        while True:
            if len(data) - pos >= need:
                if need == 12:
                    btype, endian = _block_type(path, data, pos, base, endian)
                    blen = struct.unpack_from(endian + "I", data, pos + 4)[0]
                    if blen < 12 or blen % 4:
                        raise CaptureFileError(f"{path}: corrupt pcapng block at byte {base + pos} (length {blen})")
                    need = blen
                    continue
                break
            if eof:
                break
            if current is not None and current.offsets:
                yield current  # its frames live in the buffer that is about to be replaced
            current = None
            chunk = fh.read(max(CHUNK_BYTES, need))
            eof = not chunk
            base += pos
            data = data[pos:] + chunk
            pos = 0
        if len(data) - pos < need:
            if len(data) > pos:
                st.truncated_records += 1
            break
        body = pos + 8
        if btype == PCAPNG_SHB:
            interfaces = []
        elif btype == BLOCK_IDB:
            linktype = struct.unpack_from(endian + "H", data, body)[0]
            tick = _idb_tick(data, body + 8, pos + blen - 4, endian)
            interfaces.append((linktype, tick))
        elif btype in (BLOCK_EPB, BLOCK_PB, BLOCK_SPB):
            ticks = -1
            if btype == BLOCK_SPB:
                iface = 0
                wirelen = struct.unpack_from(endian + "I", data, body)[0]
                frame_at = body + 4
                caplen = min(wirelen, blen - 16)
            else:
                if btype == BLOCK_EPB:
                    iface, ts_hi, ts_lo, caplen, wirelen = struct.unpack_from(endian + "IIIII", data, body)
                else:
                    iface, _drops, ts_hi, ts_lo, caplen, wirelen = struct.unpack_from(
                        endian + "HHIIII", data, body
                    )
                frame_at = body + 20
                ticks = (ts_hi << 32) | ts_lo
            if iface >= len(interfaces):
                raise CaptureFileError(
                    f"{path}: packet block at byte {base + pos} names unknown interface {iface}"
                )
            linktype, tick = interfaces[iface]
            # Simple packet blocks carry no time; they take the previous frame's.
            if ticks >= 0:
                # Whole seconds plus the fraction, as the pcap reader does, so both formats give equal floats.
                last_ts = ticks // tick + (ticks % tick) / tick
            if caplen > blen:
                raise CaptureFileError(f"{path}: corrupt packet block at byte {base + pos}")
            if linktype not in SUPPORTED_LINKTYPES:
                raise _unsupported(path, linktype)
            if current is None or current.linktype != linktype or len(current.offsets) >= batch_frames:
                if current is not None and current.offsets:
                    yield current
                current = _new_batch(linktype, data, src, base)
            current.offsets.append(frame_at)
            current.caplens.append(caplen)
            current.wirelens.append(wirelen if wirelen >= caplen else caplen)
            current.timestamps.append(last_ts)
        pos += blen
    if current is not None and current.offsets:
        yield current


def _block_type(path: Path, data: bytes, pos: int, base: int, endian: str) -> tuple[int, str]:
    """The type of the block at ``pos``, and the byte order from there on (a section header sets it)."""
    btype: int = struct.unpack_from(endian + "I", data, pos)[0]
    if btype != PCAPNG_SHB:
        return btype, endian
    if struct.unpack_from("<I", data, pos + 8)[0] == PCAPNG_BOM:
        return btype, "<"
    if struct.unpack_from(">I", data, pos + 8)[0] == PCAPNG_BOM:
        return btype, ">"
    raise CaptureFileError(f"{path}: corrupt pcapng section header at byte {base + pos}")


def _idb_tick(data: bytes, opt: int, end: int, endian: str) -> int:
    """Timestamp units per second from the if_tsresol option (default: microseconds)."""
    while opt + 4 <= end:
        code, olen = struct.unpack_from(endian + "HH", data, opt)
        if code == 0:
            break
        if code == 9 and olen >= 1:
            res = data[opt + 4]
            return int(2 ** (res & 0x7F)) if res & 0x80 else int(10 ** (res & 0x7F))
        opt += 4 + ((olen + 3) & ~3)
    return 1_000_000
