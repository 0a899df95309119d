"""The durable spool: messages waiting for the uplink, on disk, crash-safe, replayed in order after a restart.

Layout: ``DATA_DIR/spool/NNNNNNNNNNNNNNNN.seg``, append-only segments. Every record is framed::

    magic b"LG" | kind (1 byte) | payload length (u32 LE) | CRC32 of kind+length+payload (u32 LE) | payload

Kinds: ``H`` a counters snapshot (the first record of every segment), ``P`` a message put (sequence number,
message id, identity, priority, output, then the body), ``C`` a copy of a live message made by compaction
(same sequence number and id, not counted again), ``A`` acknowledged, ``D`` dropped (identity), ``X``
rejected on arrival (counted as accepted and dropped at once), ``R`` drops handed to the leaf's agent.

Replay reads the segments in order; a record whose CRC or length is wrong is **corrupt**: it is skipped (the
reader resynchronises on the next valid frame), counted and reported, and never stops the module; a record cut
short by the end of a file (kill -9 or power loss during the write) is **torn**, counted the same way.
Counters are the last snapshot plus the records after it, so ``acked + dropped + pending == accepted`` holds
across restarts; a message lost to corruption is counted as dropped (``lost_to_corruption``). After replay
every live message is copied into a fresh segment (fsynced) and the old segments are deleted, so a corrupt
segment is read, and counted, once.

While running, a segment is rotated at ``segment_bytes``; an old segment goes when its last live message is
acknowledged or dropped; when the files exceed twice the budget the oldest segment's live messages are copied
forward (compaction) and it is deleted. Order on replay is the sequence number, so copies never reorder.

Durability (``fsync``): a record is written with one ``write(2)`` before the call returns, so it survives
kill -9 of the module whatever the policy; ``fsync`` decides what survives a power cut: ``always`` (every
commit, the caller commits once per batch of messages), ``interval`` (at most ``fsync_interval_s`` of
records at risk; the default), ``never`` (the kernel's writeback, typically 30 s). Measured costs: README
("Data directory") and ``benchmarks/uplink.py``.

Synchronous file I/O on the caller's thread (the event loop): appends are small and sequential (page cache);
an ``always`` fsync on slow flash is the exception, documented with its cost.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from leafguard.agent.messages import OutgoingMessage, Trigger
from leafguard.errors import ConfigurationError
from leafguard.hub.alerts import AlertMessage

log = logging.getLogger("leafguard.spool")

MAGIC = b"LG"
_FRAME = struct.Struct("<2sBII")
FRAME_BYTES = _FRAME.size
MAX_RECORD_BYTES = 1024 * 1024
"""No record is larger (a body is at most 256 KiB); a longer length field is corruption."""
_SEQ = struct.Struct("<Q")
_META_LEN = struct.Struct("<I")

DEFAULT_SPOOL_MAX_BYTES = 64 * 1024 * 1024
"""Message bytes the spool holds by default: about 15 minutes of a 100-leaf gateway's traffic at the default
message rate, a few percent of a small gateway's flash."""
DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024
SPOOL_DIR = "spool"


class Kind(enum.IntEnum):
    HEADER = ord("H")
    PUT = ord("P")
    COPY = ord("C")
    ACK = ord("A")
    DROP = ord("D")
    REJECT = ord("X")
    REPORTED = ord("R")
    JOURNAL_START = ord("S")
    """The first record of a journal segment (`leafguard.service.journal`), not of the spool."""
    JOURNAL_INPUT = ord("J")
    """One input of the fleet in a journal segment."""
    JOURNAL_FRAMES = ord("F")
    """In a journal segment: how many frames of the replayed capture the inputs before it came from."""


class FsyncPolicy(enum.Enum):
    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    directory: Path
    """The data directory; the spool lives in its ``spool/`` folder."""
    max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    fsync: FsyncPolicy = FsyncPolicy.INTERVAL
    fsync_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_bytes < 262_144:
            raise ConfigurationError("spool: max_bytes must hold at least one largest message (256 KiB)")
        if self.segment_bytes < 65_536:
            raise ConfigurationError("spool: segment_bytes must be at least 64 KiB")
        if not self.fsync_interval_s > 0:
            raise ConfigurationError("spool: fsync_interval_s must be positive")

    @property
    def spool_dir(self) -> Path:
        return self.directory / SPOOL_DIR


@dataclass(frozen=True, slots=True)
class Location:
    """Where a put record's payload is: segment number, payload offset, payload length."""

    segment: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A live message found by replay (bodies stay on disk until sent)."""

    seq: int
    message_id: str
    identity: str
    priority: str
    alert: bool
    """A LeafGuard alert (output ``alerts``), not a Defender security message."""
    size: int
    location: Location
    events: int = 1


@dataclass(slots=True)
class SpoolCounters:
    """Persisted with the spool (every segment starts with a snapshot)."""

    accepted: int = 0
    acked: int = 0
    dropped: int = 0
    corrupt_records: int = 0
    torn_records: int = 0
    lost_to_corruption: int = 0
    """Messages whose record was corrupt: counted as dropped (their leaf is unknown)."""
    next_seq: int = 0
    unreported: dict[str, int] = field(default_factory=dict)
    """Drops per leaf identity not yet handed to the leaf's agent (its next MessageStatistics ``TotalFailed``)."""

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "accepted": self.accepted,
                "acked": self.acked,
                "dropped": self.dropped,
                "corrupt_records": self.corrupt_records,
                "torn_records": self.torn_records,
                "lost_to_corruption": self.lost_to_corruption,
                "next_seq": self.next_seq,
                "unreported": self.unreported,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> SpoolCounters:
        doc = orjson.loads(raw)
        unreported = doc.get("unreported", {})
        return cls(
            accepted=int(doc["accepted"]),
            acked=int(doc["acked"]),
            dropped=int(doc["dropped"]),
            corrupt_records=int(doc.get("corrupt_records", 0)),
            torn_records=int(doc.get("torn_records", 0)),
            lost_to_corruption=int(doc.get("lost_to_corruption", 0)),
            next_seq=int(doc.get("next_seq", 0)),
            unreported={str(k): int(v) for k, v in unreported.items()},
        )


@dataclass(frozen=True, slots=True)
class Recovery:
    """What replay found."""

    messages: list[StoredMessage]
    """Live messages, oldest (lowest sequence number) first."""
    segments: int
    records: int
    corrupt_records: int
    torn_records: int
    lost_to_corruption: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    offset: int
    """Offset of the payload in the file."""
    payload: bytes


@dataclass(slots=True)
class ScanResult:
    records: list[Record]
    corrupt: int = 0
    torn: int = 0


def frame(kind: Kind, payload: bytes) -> bytes:
    head = struct.pack("<BI", kind, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return _FRAME.pack(MAGIC, kind, len(payload), crc) + payload


def _valid_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """(kind, length) of a valid record at ``pos``, else None."""
    if pos + FRAME_BYTES > len(data):
        return None
    magic, kind, length, crc = _FRAME.unpack_from(data, pos)
    if magic != MAGIC or length > MAX_RECORD_BYTES or kind not in _KINDS:
        return None
    end = pos + FRAME_BYTES + length
    if end > len(data):
        return None
    payload = memoryview(data)[pos + FRAME_BYTES : end]
    if zlib.crc32(payload, zlib.crc32(struct.pack("<BI", kind, length))) != crc:
        return None
    return kind, length


_KINDS = frozenset(int(k) for k in Kind)
LOST_PUT = -1
"""The pseudo-kind :func:`scan` gives a put record that failed its checksum or was cut short."""


def scan(data: bytes) -> ScanResult:
    """Every valid record of a segment's bytes, in order; corrupt regions and a torn tail counted. Pure."""
    out = ScanResult([])
    pos = 0
    n = len(data)
    while pos < n:
        found = _valid_at(data, pos)
        if found is not None:
            kind, length = found
            start = pos + FRAME_BYTES
            out.records.append(Record(kind, start, bytes(data[start : start + length])))
            pos += FRAME_BYTES + length
            continue
        # A frame header that still reads as a put (a flipped byte in the body, a cut-short write) marks a lost
        # message at this point of the log, so the counters after the last snapshot count it as generated.
        if _header_says_put(data, pos):
            out.records.append(Record(LOST_PUT, pos, b""))
        # Resynchronise on the next frame that checks out.
        nxt = data.find(MAGIC, pos + 1)
        while nxt != -1 and _valid_at(data, nxt) is None:
            nxt = data.find(MAGIC, nxt + 1)
        if nxt == -1:
            if _looks_torn(data, pos):
                out.torn += 1
            else:
                out.corrupt += 1
            break
        out.corrupt += 1
        pos = nxt
    return out


def _header_says_put(data: bytes, pos: int) -> bool:
    return data[pos : pos + 2] == MAGIC and len(data) > pos + 2 and data[pos + 2] == Kind.PUT


def _looks_torn(data: bytes, pos: int) -> bool:
    """A record cut short by the end of the file: a plausible frame (or part of one) whose end is past EOF."""
    tail = data[pos:]
    if len(tail) < FRAME_BYTES:
        return MAGIC.startswith(tail[:2]) if tail else False
    magic, kind, length, _crc = _FRAME.unpack_from(tail, 0)
    return magic == MAGIC and kind in _KINDS and length <= MAX_RECORD_BYTES and FRAME_BYTES + length > len(tail)


# -- message payloads ------------------------------------------------------------------------------------------


def encode_put(seq: int, message_id: str, message: OutgoingMessage) -> bytes:
    meta: dict[str, Any] = {
        "mid": message_id,
        "id": message.identity,
        "p": message.priority,
        "n": message.event_count,
    }
    if message.hub_resource_id:
        meta["h"] = message.hub_resource_id
    if isinstance(message, AlertMessage):
        meta["o"] = message.output
        meta["t"] = message.alert_type
    raw = orjson.dumps(meta)
    return _SEQ.pack(seq) + _META_LEN.pack(len(raw)) + raw + message.body


def decode_put(payload: bytes) -> tuple[int, dict[str, Any], bytes]:
    (seq,) = _SEQ.unpack_from(payload, 0)
    (meta_len,) = _META_LEN.unpack_from(payload, _SEQ.size)
    start = _SEQ.size + _META_LEN.size
    meta: dict[str, Any] = orjson.loads(payload[start : start + meta_len])
    return seq, meta, payload[start + meta_len :]


def message_from(meta: dict[str, Any], body: bytes) -> OutgoingMessage:
    priority: Trigger = "Low" if meta["p"] == "Low" else "High"
    if "o" in meta:
        return AlertMessage(
            identity=meta["id"], body=body, priority=priority, event_count=int(meta["n"]),
            output=meta["o"], alert_type=meta.get("t", ""),
        )
    return OutgoingMessage(meta["id"], body, priority, int(meta["n"]), meta.get("h", ""))


def _seq_identity(seq: int, identity: str) -> bytes:
    return _SEQ.pack(seq) + identity.encode()


def _parse_seq_identity(payload: bytes) -> tuple[int, str]:
    (seq,) = _SEQ.unpack_from(payload, 0)
    return seq, payload[_SEQ.size :].decode(errors="replace")


# -- the spool ---------------------------------------------------------------------------------------------------


class Spool:
    """Append-only segments with a live index; open with :meth:`open` (replays and compacts)."""

    def __init__(self, settings: SpoolSettings) -> None:
        self.settings = settings
        self.dir = settings.spool_dir
        self.counters = SpoolCounters()
        self._live: dict[int, Location] = {}
        self._seg_live: dict[int, int] = {}
        self._seg_size: dict[int, int] = {}
        self._readers: dict[int, int] = {}
        self._active = -1
        self._fd = -1
        self._dirty = False
        self._last_sync = 0.0
        self.fsyncs = 0

    # -- opening ---------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: SpoolSettings) -> tuple[Spool, Recovery]:
        spool = cls(settings)
        return spool, spool._recover()

    def _segments(self) -> list[int]:
        out = []
        for path in self.dir.glob("*.seg"):
            try:
                out.append(int(path.stem))
            except ValueError:
                log.warning("spool: ignoring %s (not a segment name)", path.name)
        return sorted(out)

    def _path(self, segment: int) -> Path:
        return self.dir / f"{segment:016d}.seg"

    def _recover(self) -> Recovery:
        started = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        old = self._segments()
        c = SpoolCounters()
        live: dict[int, tuple[int, Record, dict[str, Any]]] = {}
        records = corrupt = torn = 0
        for segment in old:
            try:
                data = self._path(segment).read_bytes()
            except OSError as exc:
                log.error("spool: cannot read segment %d (%s): skipped", segment, exc.strerror or exc)
                corrupt += 1
                continue
            result = scan(data)
            corrupt += result.corrupt
            torn += result.torn
            for rec in result.records:
                records += 1
                try:
                    self._replay_one(c, live, segment, rec)
                except (ValueError, KeyError, struct.error) as exc:
                    # A record that checks out but does not parse (a bug, or a future format): counted, skipped.
                    log.warning("spool: unreadable %s record in segment %d: %r", chr(rec.kind), segment, exc)
                    corrupt += 1
        c.corrupt_records += corrupt
        c.torn_records += torn
        unaccounted = c.accepted - c.acked - c.dropped - len(live)
        lost = 0
        if unaccounted > 0:
            # Put records that did not survive: their messages are lost, and counted (leaf unknown).
            lost = unaccounted
            c.dropped += lost
            c.lost_to_corruption += lost
        elif unaccounted < 0:
            # Accepted counts lost with a corrupt snapshot: the log's own records are the truth.
            c.accepted -= unaccounted
        if live:
            c.next_seq = max(c.next_seq, max(live) + 1)
        self.counters = c
        # A fresh segment with the reconciled snapshot, the live messages copied into it in order, made durable,
        # and only then the old segments deleted: a crash at any point leaves a replayable spool.
        self._active = (old[-1] + 1) if old else 0
        self._open_active()
        messages: list[StoredMessage] = []
        for seq in sorted(live):
            segment, rec, meta = live[seq]
            loc = self._write(Kind.COPY, rec.payload)
            self._index(seq, loc)
            size = loc.length - _body_offset(rec.payload)
            messages.append(
                StoredMessage(seq, meta["mid"], meta["id"], meta["p"], "o" in meta, size, loc, int(meta["n"]))
            )
        os.fsync(self._fd)
        self.fsyncs += 1
        self._dirty = False
        for segment in old:
            self._path(segment).unlink(missing_ok=True)
        _fsync_dir(self.dir)
        if corrupt or torn:
            log.warning(
                "spool: %d corrupt and %d torn records skipped on replay (%d messages lost with them)",
                corrupt, torn, lost,
            )
        return Recovery(messages, len(old), records, corrupt, torn, lost, time.perf_counter() - started)

    @staticmethod
    def _replay_one(
        c: SpoolCounters, live: dict[int, tuple[int, Record, dict[str, Any]]], segment: int, rec: Record
    ) -> None:
        kind = rec.kind
        if kind == LOST_PUT:
            # A put that did not survive (corrupt or torn): generated, and lost (reconciled as dropped).
            c.accepted += 1
        elif kind == Kind.HEADER:
            # A snapshot is the whole truth at its point in the log (corruption counts of earlier replays included;
            # this replay adds its own afterwards).
            snap = SpoolCounters.from_json(rec.payload)
            for f in dataclasses.fields(SpoolCounters):
                setattr(c, f.name, getattr(snap, f.name))
        elif kind in (Kind.PUT, Kind.COPY):
            seq, meta, _body = decode_put(rec.payload)
            if kind == Kind.PUT and seq not in live:
                c.accepted += 1
            live[seq] = (segment, rec, meta)
            c.next_seq = max(c.next_seq, seq + 1)
        elif kind == Kind.ACK:
            (seq,) = _SEQ.unpack_from(rec.payload, 0)
            live.pop(seq, None)
            c.acked += 1
        elif kind in (Kind.DROP, Kind.REJECT):
            seq, identity = _parse_seq_identity(rec.payload)
            if kind == Kind.REJECT:
                c.accepted += 1
                c.next_seq = max(c.next_seq, seq + 1)
            else:
                live.pop(seq, None)
            c.dropped += 1
            c.unreported[identity] = c.unreported.get(identity, 0) + 1
        elif kind == Kind.REPORTED:
            (n,) = _SEQ.unpack_from(rec.payload, 0)
            identity = rec.payload[_SEQ.size :].decode(errors="replace")
            left = c.unreported.get(identity, 0) - n
            if left > 0:
                c.unreported[identity] = left
            else:
                c.unreported.pop(identity, None)

    # -- writing ---------------------------------------------------------------------------------------------

    def _open_active(self) -> None:
        path = self._path(self._active)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._seg_size[self._active] = os.fstat(self._fd).st_size
        self._seg_live.setdefault(self._active, 0)
        self._write(Kind.HEADER, self.counters.to_json())

    def _write(self, kind: Kind, payload: bytes) -> Location:
        data = frame(kind, payload)
        offset = self._seg_size[self._active]
        written = os.write(self._fd, data)
        while written < len(data):  # a regular file short-writes only when the disk is full; finish or raise
            written += os.write(self._fd, data[written:])
        self._seg_size[self._active] = offset + len(data)
        self._dirty = True
        return Location(self._active, offset + FRAME_BYTES, len(payload))

    def _index(self, seq: int, loc: Location) -> None:
        old = self._live.get(seq)
        if old is not None:
            self._unpin(old.segment)
        self._live[seq] = loc
        self._seg_live[loc.segment] = self._seg_live.get(loc.segment, 0) + 1

    def _unpin(self, segment: int) -> None:
        left = self._seg_live.get(segment, 0) - 1
        self._seg_live[segment] = left
        if left <= 0 and segment != self._active:
            self._delete(segment)

    def _delete(self, segment: int) -> None:
        fd = self._readers.pop(segment, None)
        if fd is not None:
            os.close(fd)
        self._path(segment).unlink(missing_ok=True)
        self._seg_live.pop(segment, None)
        self._seg_size.pop(segment, None)

    def append(self, seq: int, message_id: str, message: OutgoingMessage) -> Location:
        """Persist a new message (one write); its sequence number orders replay."""
        loc = self._write(Kind.PUT, encode_put(seq, message_id, message))
        self.counters.accepted += 1
        self.counters.next_seq = max(self.counters.next_seq, seq + 1)
        self._index(seq, loc)
        self._maybe_rotate()
        return loc

    def reject(self, seq: int, identity: str) -> None:
        """A new message that did not fit: accepted and dropped at once."""
        self._write(Kind.REJECT, _seq_identity(seq, identity))
        self.counters.accepted += 1
        self.counters.next_seq = max(self.counters.next_seq, seq + 1)
        self._count_drop(identity)

    def ack(self, seq: int) -> None:
        loc = self._live.pop(seq, None)
        if loc is None:
            return
        self._write(Kind.ACK, _SEQ.pack(seq))
        self.counters.acked += 1
        self._unpin(loc.segment)
        self._maybe_rotate()

    def drop(self, seq: int, identity: str) -> None:
        loc = self._live.pop(seq, None)
        if loc is None:
            return
        self._write(Kind.DROP, _seq_identity(seq, identity))
        self._count_drop(identity)
        self._unpin(loc.segment)

    def mark_reported(self, identity: str, count: int) -> None:
        """``count`` drops of ``identity`` were handed to its agent (they leave ``unreported``)."""
        if count <= 0:
            return
        self._write(Kind.REPORTED, _SEQ.pack(count) + identity.encode())
        left = self.counters.unreported.get(identity, 0) - count
        if left > 0:
            self.counters.unreported[identity] = left
        else:
            self.counters.unreported.pop(identity, None)

    def _count_drop(self, identity: str) -> None:
        self.counters.dropped += 1
        self.counters.unreported[identity] = self.counters.unreported.get(identity, 0) + 1

    def commit(self, now: float) -> None:
        """The end of a batch of writes: fsync per the policy (``now``: monotonic seconds)."""
        if not self._dirty:
            return
        policy = self.settings.fsync
        if policy is FsyncPolicy.ALWAYS or (
            policy is FsyncPolicy.INTERVAL and now - self._last_sync >= self.settings.fsync_interval_s
        ):
            self.sync(now)

    def sync(self, now: float) -> None:
        if self._dirty and self._fd >= 0:
            os.fsync(self._fd)
            self.fsyncs += 1
            self._dirty = False
        self._last_sync = now

    def _maybe_rotate(self) -> None:
        if self._seg_size[self._active] < self.settings.segment_bytes:
            return
        if self._dirty:
            os.fsync(self._fd)
            self.fsyncs += 1
        os.close(self._fd)
        previous = self._active
        self._active += 1
        self._open_active()
        if self._seg_live.get(previous, 0) <= 0:
            self._delete(previous)
        self._compact()

    def set_max_bytes(self, max_bytes: int) -> None:
        """A new budget (gateway settings): compaction keeps the files within twice it from the next rotation."""
        self.settings = dataclasses.replace(self.settings, max_bytes=max_bytes)

    def _compact(self) -> None:
        """Copy the oldest segment's live messages forward while the files exceed twice the budget."""
        budget = 2 * self.settings.max_bytes
        while self.disk_bytes > budget:
            oldest = min(s for s in self._seg_size if s != self._active) if len(self._seg_size) > 1 else None
            if oldest is None:
                return
            for seq, loc in sorted((s, loc) for s, loc in self._live.items() if loc.segment == oldest):
                new = self._write(Kind.COPY, self._read_payload(loc))
                self._index(seq, new)
            if oldest in self._seg_size:
                self._delete(oldest)
            if self._seg_size[self._active] >= self.settings.segment_bytes:
                os.close(self._fd)
                self._active += 1
                self._open_active()

    # -- reading ---------------------------------------------------------------------------------------------

    def _read_payload(self, loc: Location) -> bytes:
        fd = self._readers.get(loc.segment)
        if fd is None:
            fd = self._readers[loc.segment] = os.open(self._path(loc.segment), os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, loc.length, loc.offset)
        if len(data) != loc.length:
            raise OSError(f"spool segment {loc.segment}: short read")
        return data

    def load(self, seq: int) -> tuple[str, OutgoingMessage]:
        """The message id and message of a live sequence number (read from its segment)."""
        _seq, meta, body = decode_put(self._read_payload(self._live[seq]))
        return meta["mid"], message_from(meta, body)

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._live)

    @property
    def disk_bytes(self) -> int:
        return sum(self._seg_size.values())

    def close(self, now: float) -> None:
        """Make everything durable and close the files (a clean stop)."""
        if self._fd < 0:
            return
        self._write(Kind.HEADER, self.counters.to_json())
        self.sync(now)
        os.close(self._fd)
        self._fd = -1
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()


def _body_offset(payload: bytes) -> int:
    (meta_len,) = _META_LEN.unpack_from(payload, _SEQ.size)
    return _SEQ.size + _META_LEN.size + int(meta_len)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
