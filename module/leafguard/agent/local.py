"""Local transport: security messages to a JSONL file, twins to a folder, desired properties from a folder.

Layout of a local-mode folder ``DIR`` (``leafguard run`` outside IoT Edge):

* ``DIR/messages.jsonl``: every message, one JSON object per line:
  ``{"identity": "<leaf identity>", "properties": {"$.ifid": …, "$.ct": …, "$.ce": …, "MessagePriority": …},
  "body": {<the security message>}}`` — the same lines ``leafguard analyze --security-messages FILE`` writes;
* ``DIR/twins/<identity>.json``: the leaf's reported properties (``{"ms_iotn:…Configuration": {…}}``),
  rewritten whenever they change;
* ``DIR/desired/<identity>.json``: the leaf's desired properties, the same shape as ``--agent-config``; the
  service polls the folder (:class:`DesiredDir`) and applies a changed file at once. A deleted file means "no
  desired properties" (defaults); a file that is not JSON is a rejected configuration (TypeMismatch, previous
  configuration kept).
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import orjson

from leafguard.agent.config import ConfigOutcome
from leafguard.agent.fleet import Fleet, ViewsProvider
from leafguard.agent.messages import OutgoingMessage
from leafguard.agent.pump import AnalyzerLike, SecurityMessagePump
from leafguard.documents import MAX_DOCUMENT_BYTES, check_document
from leafguard.errors import ConfigurationError

MESSAGES_FILE = "messages.jsonl"
TWINS_DIR = "twins"
DESIRED_DIR = "desired"


# -- messages ----------------------------------------------------------------------------------------------


class JsonlMessageWriter:
    """Writes messages as JSONL lines to a file (appending, or truncating first); flushes each batch."""

    def __init__(self, path: Path | str, *, append: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] = self.path.open("ab" if append else "wb")
        self._closed_at = 0
        self.lines = 0

    def write(self, messages: Iterable[OutgoingMessage]) -> None:
        wrote = False
        for msg in messages:
            self._fh.write(msg.jsonl_line())
            self.lines += 1
            wrote = True
        if wrote:
            self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._closed_at = self._fh.tell()
        self._fh.close()

    @property
    def offset(self) -> int:
        """The file's length: every line written so far is complete (each batch is flushed)."""
        return self._closed_at if self._fh.closed else self._fh.tell()

    def cut_torn_tail(self) -> int:
        """A line cut short by kill -9 or a power cut (the file does not end with a newline) is removed, so the
        next line starts clean; returns the bytes removed."""
        self._fh.flush()
        size = os.fstat(self._fh.fileno()).st_size
        keep = 0
        with self.path.open("rb") as fh:
            pos = size
            while pos > 0:
                start = max(0, pos - 65536)
                fh.seek(start)
                at = fh.read(pos - start).rfind(b"\n")
                if at >= 0:
                    keep = start + at + 1
                    break
                pos = start
        if keep < size:
            self._fh.truncate(keep)
        return size - keep

    def rollback(self, offset: int) -> int:
        """Cut the file back to ``offset`` (a saved state's length): the lines after it are written again by the
        resumed run. Returns the lines removed."""
        removed = sum(1 for _ in self.lines_after(offset))
        self._fh.flush()
        self._fh.truncate(offset)
        return removed

    def bodies_since(self, offset: int) -> Iterable[tuple[str, bytes]]:
        return self.lines_after(offset)

    def lines_after(self, offset: int) -> Iterable[tuple[str, bytes]]:
        """``(identity, body)`` of every complete line after ``offset`` (lines that do not parse are skipped)."""
        self._fh.flush()
        with self.path.open("rb") as fh:
            fh.seek(offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(doc, dict) and isinstance(doc.get("body"), dict):
                    yield str(doc.get("identity")), orjson.dumps(doc["body"])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- twins -------------------------------------------------------------------------------------------------


def identity_filename(identity: str) -> str:
    """A safe file name for an identity (device ids cannot contain ``/``; anything odd is %-quoted)."""
    return urllib.parse.quote(identity, safe="-_.:@+=,!()$'*#") + ".json"


def identity_from_filename(name: str) -> str:
    return urllib.parse.unquote(name.removesuffix(".json"))


class TwinsDirWriter:
    """Writes each leaf's reported properties to ``DIR/<identity>.json`` (atomically, only when changed)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last: dict[str, bytes] = {}

    def write(self, identity: str, reported: Mapping[str, Any]) -> bool:
        """Returns whether the file was (re)written."""
        data = orjson.dumps(reported, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        if self._last.get(identity) == data:
            return False
        path = self.directory / identity_filename(identity)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._last[identity] = data
        return True

    def remove(self, identity: str) -> None:
        """The identity is no longer used (a leaf was renamed): its file goes."""
        (self.directory / identity_filename(identity)).unlink(missing_ok=True)
        self._last.pop(identity, None)


# -- desired properties --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DesiredChange:
    """A desired-properties file that appeared, changed or disappeared."""

    identity: str
    desired: Any
    """The parsed document; ``{}`` when the file was deleted; a description string when it is not JSON."""


class DesiredDir:
    """Polls ``DIR/<identity>.json`` files and yields the ones whose content changed since the last scan."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._stat: dict[str, tuple[int, int]] = {}
        self._digest: dict[str, bytes] = {}

    def scan(self) -> list[DesiredChange]:
        """The changes since the previous scan (every file, on the first scan); cheap when nothing changed."""
        out: list[DesiredChange] = []
        seen: set[str] = set()
        try:
            entries = sorted(p for p in self.directory.iterdir() if p.suffix == ".json" and p.is_file())
        except FileNotFoundError:
            entries = []
        for path in entries:
            ident = identity_from_filename(path.name)
            seen.add(ident)
            try:
                st = path.stat()
                key = (st.st_mtime_ns, st.st_size)
                if self._stat.get(ident) == key:
                    continue
                with path.open("rb") as fh:
                    raw = fh.read(MAX_DOCUMENT_BYTES + 1)  # a larger file is rejected unread
            except FileNotFoundError:
                continue
            self._stat[ident] = key
            digest = hashlib.sha256(raw).digest()
            if self._digest.get(ident) == digest:
                continue
            self._digest[ident] = digest
            out.append(DesiredChange(ident, parse_desired_bytes(raw)))
        for ident in sorted(set(self._digest) - seen):
            del self._digest[ident]
            self._stat.pop(ident, None)
            out.append(DesiredChange(ident, {}))
        return out


def parse_desired_bytes(raw: bytes) -> Any:
    """A desired document from file content; a description string if it is not JSON or breaks a limit of
    `leafguard.documents` (rejected when applied, as any document that is not an object)."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        return f"larger than {MAX_DOCUMENT_BYTES} bytes"
    try:
        doc = orjson.loads(raw)
        check_document(doc, "desired document")
    except orjson.JSONDecodeError as exc:
        return f"invalid JSON: {exc}"
    except ConfigurationError as exc:
        return str(exc)
    return doc


def apply_desired_changes(
    fleet: Fleet, changes: Iterable[DesiredChange], now: float, twins: TwinsDirWriter | None = None
) -> list[tuple[str, ConfigOutcome]]:
    """Apply each change to its leaf and write the reported properties back (accepted or not)."""
    out: list[tuple[str, ConfigOutcome]] = []
    for change in changes:
        outcome = fleet.apply_desired(change.identity, change.desired, now)
        if twins is not None:
            twins.write(change.identity, outcome.reported)
        out.append((change.identity, outcome))
    return out


class LocalAgentOutput:
    """Everything ``leafguard run`` in local mode needs from the agent side, over one folder ``DIR``.

    Messages are appended to ``DIR/messages.jsonl``, reported properties written to ``DIR/twins/``, desired
    properties read from ``DIR/desired/`` (call :meth:`poll_desired` every few seconds). Single-threaded: call
    every method from the event loop.
    """

    def __init__(self, directory: Path | str, fleet: Fleet) -> None:
        self.directory = Path(directory)
        self.fleet = fleet
        self.messages = JsonlMessageWriter(self.directory / MESSAGES_FILE, append=True)
        self.twins = TwinsDirWriter(self.directory / TWINS_DIR)
        self.desired = DesiredDir(self.directory / DESIRED_DIR)
        (self.directory / DESIRED_DIR).mkdir(parents=True, exist_ok=True)
        self._pump = SecurityMessagePump(fleet, self.messages.write)

    def after_batch(self, analyzer: AnalyzerLike) -> None:
        """After every ``analyzer.feed(batch)``: observations, a tick at packet time, new twins."""
        self._pump.after_batch(analyzer)
        self._sync_twins()

    def tick(self, now: float, views: ViewsProvider | None = None) -> None:
        """A clock tick (wall-clock time live, so that timers fire while the network is quiet)."""
        self.messages.write(self.fleet.tick(now, views))
        self._sync_twins()

    def poll_desired(self, now: float) -> list[tuple[str, ConfigOutcome]]:
        """Apply the desired files that changed since the last poll; returns what was applied."""
        applied = apply_desired_changes(self.fleet, self.desired.scan(), now)
        self._sync_twins()
        return applied

    def module_desired(self) -> None:
        """Local mode has no module twin: the gateway settings come from ``DIR/gateway.json``."""
        return

    def publish_gateway_status(self, status: Mapping[str, Any]) -> None:
        """Nothing to publish: ``stats.json`` carries the gateway status locally."""

    def close(self, now: float | None) -> None:
        """The shutdown flush (when the clock ever started), then close the message file."""
        try:
            if now is not None:
                self.messages.write(self.fleet.shutdown(now))
            self._sync_twins()
        finally:
            self.messages.close()

    def _sync_twins(self) -> None:
        for identity in self.fleet.take_retired():
            self.twins.remove(identity)
        for identity, reported in self.fleet.take_reported_changes().items():
            self.twins.write(identity, reported)


