"""The limits every settings document meets before anything compares, merges or walks it.

Settings arrive from operators and from files anyone with access to the data folder can write: ``gateway.json``
and ``desired/<identity>.json`` locally, the module twin's desired properties in edge mode. A document that
breaks a limit is rejected as a whole with a `ConfigurationError` naming the limit, and the settings in force
stay. The limits are the hub's where it has one, so a document that works locally also fits a twin:

* nesting: at most `MAX_DEPTH` levels of objects and arrays (IoT Hub's limit for twin properties is 10);
* size: a file of at most `MAX_DOCUMENT_BYTES`;
* entries: no object or array with more than `MAX_ENTRIES` members (a leaf map names at most that many leaves;
  the leaf table itself holds 20,000, and a twin's 32 KB hold far fewer).

The check walks the document with an explicit stack, so a hostile document cannot exhaust the interpreter's
recursion limit here (comparing or copying it would: that is why this runs first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from leafguard.errors import ConfigurationError

MAX_DEPTH = 10
MAX_DOCUMENT_BYTES = 1 << 20
MAX_ENTRIES = 10_000


def check_document(doc: object, where: str) -> None:
    """Raise ConfigurationError if ``doc`` (parsed JSON) nests deeper than `MAX_DEPTH` levels or holds a
    container of more than `MAX_ENTRIES` members; ``where`` names the document in the message."""
    stack: list[tuple[object, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth + 1 > MAX_DEPTH:
            raise ConfigurationError(f"{where}: nests deeper than {MAX_DEPTH} levels of objects and arrays")
        if len(value) > MAX_ENTRIES:
            raise ConfigurationError(f"{where}: an object or array holds {len(value)} entries, over {MAX_ENTRIES}")
        stack.extend((child, depth + 1) for child in children)


def read_document(path: Path) -> Any:
    """A settings file's JSON, checked against every limit; ConfigurationError says what is wrong with it."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(f"{path}: not readable: {exc.strerror or exc}") from exc
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ConfigurationError(f"{path}: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigurationError(f"{path}: not JSON: {exc}") from exc
    check_document(doc, str(path))
    return doc
