"""The validator the agent tests use: the official Defender message schema with format checking.

Every schema file is loaded into one registry keyed by its ``$id`` (its file name). Format checking is on, as the
schemas README requires (the ip ``oneOf`` of ipv4/ipv6 only works with it); ``date-time`` is RFC 3339 with a space
accepted in place of ``T``, as ajv (the schema authors' validator) accepts.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import rfc3339_validator  # type: ignore[import-untyped]
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from tests.conftest import SHARED

MESSAGE_SCHEMAS = SHARED / "schemas" / "defender-security-message"


def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if len(value) > 10 and value[10] == " ":
        value = value[:10] + "T" + value[11:]
    return bool(rfc3339_validator.validate_rfc3339(value))


@functools.cache
def message_validator() -> jsonschema.Draft7Validator:
    if not MESSAGE_SCHEMAS.is_dir():
        pytest.skip(f"{MESSAGE_SCHEMAS} is absent: the official Defender schemas live in ../shared")
    resources = []
    for path in sorted(MESSAGE_SCHEMAS.glob("*.json")):
        if path.name == "samples.json":
            continue
        doc = json.loads(path.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc, default_specification=DRAFT7)))
    registry: Registry[Any] = Registry().with_resources(resources)
    root = json.loads((MESSAGE_SCHEMAS / "messageRoot.json").read_text())
    checker = copy.deepcopy(jsonschema.Draft7Validator.FORMAT_CHECKER)
    checker.checks("date-time")(_date_time)
    return jsonschema.Draft7Validator(root, registry=registry, format_checker=checker)


def samples() -> dict[str, list[Any]]:
    data: dict[str, list[Any]] = json.loads((MESSAGE_SCHEMAS / "samples.json").read_text())
    return data


def tolerated(body: dict[str, Any]) -> dict[str, Any]:
    """The body with the one tolerated deviation undone: ``Category: "Aggregated"`` validated as Triggered."""
    out = copy.deepcopy(body)
    for event in out.get("Events", []):
        if event.get("Category") == "Aggregated":
            assert event["Name"] == "ConnectionCreate", event
            event["Category"] = "Triggered"
    return out


def errors(body: Any) -> list[str]:
    """Schema errors of a message body (after :func:`tolerated`), as short strings."""
    doc = tolerated(body) if isinstance(body, dict) else body
    out = []
    for err in message_validator().iter_errors(doc):
        worst = jsonschema.exceptions.best_match(err.context or [err])
        out.append(f"{list(worst.absolute_path)}: {worst.message}")
    return out


def shared_schema_dir() -> Path:
    return MESSAGE_SCHEMAS
