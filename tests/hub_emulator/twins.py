"""Twin documents: desired and reported sections with their `$version`, merged the way IoT Hub merges patches.

A patch is a JSON merge: objects merge recursively, `null` deletes, anything else replaces. Each section
counts its own `$version`, starting at 1 for a new twin, and the hub's size rule (keys and string values by
UTF-8 length, numbers 8 bytes, booleans 4) bounds each section to 32 KB. Depth is limited like the hub's (10).

A refused patch is answered with status 400 and error code 400004 (ArgumentInvalid): the hub documents that it
rejects such patches "with an error" but not which, and the SDK surfaces every status >= 300 the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

SECTION_LIMIT_BYTES = 32 * 1024
MAX_DEPTH = 10

JsonObject = dict[str, Any]


class TwinError(Exception):
    """A patch the hub refuses; `status` is the twin response status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def twin_size(value: Any) -> int:
    """IoT Hub's twin size rule (learn "Understand and use device twins", "Twin size")."""
    if isinstance(value, dict):
        return sum(len(k.encode()) + twin_size(v) for k, v in value.items() if not k.startswith("$"))
    if isinstance(value, bool):
        return 4
    if isinstance(value, int | float):
        return 8
    if isinstance(value, str):
        # Control characters (C0 and C1) do not count.
        return len("".join(c for c in value if not (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0)).encode())
    if isinstance(value, list):
        return sum(twin_size(v) for v in value)
    return 0


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of objects, counted up to `limit + 1`; iterative, since a parsed document may nest deeper
    than Python's recursion limit (orjson accepts 1024 levels)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth) for v in item.values())
    return deepest


def merge(target: JsonObject, patch: JsonObject) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            sub = target.get(key)
            if not isinstance(sub, dict):
                sub = target[key] = {}
            merge(sub, value)
        else:
            target[key] = copy.deepcopy(value)


@dataclass(slots=True)
class Section:
    properties: JsonObject = field(default_factory=dict)
    version: int = 1

    def document(self) -> JsonObject:
        return {**copy.deepcopy(self.properties), "$version": self.version}

    def apply(self, patch: Any) -> int:
        """Merge `patch` atomically (all or nothing) and return the new `$version`."""
        if not isinstance(patch, dict):
            raise TwinError(400, "twin patch must be a JSON object")
        patch = {k: v for k, v in patch.items() if k != "$version"}
        if _depth(patch, MAX_DEPTH) > MAX_DEPTH:
            raise TwinError(400, f"twin patch nests deeper than {MAX_DEPTH} levels")
        candidate = copy.deepcopy(self.properties)
        merge(candidate, patch)
        size = twin_size(candidate)
        if size > SECTION_LIMIT_BYTES:
            raise TwinError(400, f"twin section would be {size} bytes, over {SECTION_LIMIT_BYTES}")
        self.properties = candidate
        self.version += 1
        return self.version


@dataclass(slots=True)
class Twin:
    desired: Section = field(default_factory=Section)
    reported: Section = field(default_factory=Section)

    def document(self) -> JsonObject:
        """The body of a twin GET response."""
        return {"desired": self.desired.document(), "reported": self.reported.document()}
