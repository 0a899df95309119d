"""Hostile settings documents, generated from a seed: each one attacks one section (or the whole document) and
leaves the other sections as the good document had them, so that a test knows what must stay in force."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SECTIONS = ("leafMap", "detection", "capture")
WHOLE = "document"


@dataclass(frozen=True, slots=True)
class Hostile:
    name: str
    text: str
    """The file's content (not always JSON, not always UTF-8 once encoded with ``errors="surrogateescape"``)."""
    attacks: str
    """The section whose status must report an error, or `WHOLE` (every section reports it)."""


def nested(depth: int, leaf: str = '"x"') -> str:
    """JSON nested ``depth`` levels deep, as text (the json module itself would recurse)."""
    return '{"k":[' * (depth // 2) + leaf + "]}" * (depth // 2)


def _section_values(rng: random.Random, section: str) -> list[object]:
    junk: list[object] = [5, "text", [1, 2], True, 1e308, -1]
    if section == "leafMap":
        return [
            *junk,
            {"not-a-mac": "x"},
            {"5c:cf:7f:07:ae:fb": 7},
            {"5c:cf:7f:07:ae:fb": "spaces are not allowed"},
            {"5c:cf:7f:07:ae:fb": "a", "00:0e:8c:aa:bb:01": "a"},
            {"5c:cf:7f:07:ae:fb": "é" * 200},
            {"5c:cf:7f:07:ae:fb": {"deviceId": ["x"]}},
            {"": None},
        ]
    if section == "detection":
        return [
            *junk,
            {"learningPeriodS": "soon"},
            {"silentAfterS": -5},
            {"silentAfterS": 0},
            {"floodRatePerS": True},
            {"noSuchSetting": 1},
            {"": None},
            {"silentAfterS": [60]},
            {rng.choice(["learningPeriodS", "silentAfterS"]): float("inf")},
        ]
    return [*junk, {"extraFilter": 5}, {"extraFilter": ["tcp"]}, {"extraFilter": "tcp port"}]


def hostile_documents(seed: int, count: int, good_for: Callable[[int], dict[str, object]]) -> Iterator[Hostile]:
    """``count`` documents; number ``i`` (from 1) keeps what it does not attack as ``good_for(i - 1)`` has it."""
    rng = random.Random(seed)
    for i in range(1, count + 1):
        good = good_for(i - 1)
        kind = rng.choice([*SECTIONS, *SECTIONS, WHOLE])
        if kind == WHOLE:
            text = rng.choice(
                [
                    "{not json",
                    "",
                    "[]",
                    "null",
                    '"a string"',
                    json.dumps(good)[:-3],
                    '{"leafMap": ' + nested(1000) + "}",
                    '{"detection": ' + nested(12) + "}",
                    json.dumps(good | {"padding": "x" * (1 << 20)}),
                    json.dumps(good | {"many": list(range(10_001))}),
                    "\udcff\udcfe{}",
                ]
            )
            yield Hostile(f"{i}-document", text, WHOLE)
            continue
        value = rng.choice(_section_values(rng, kind))
        doc = good | {kind: value}
        if kind == "capture" and value == {"extraFilter": "tcp port"}:
            value = {"extraFilter": 5}  # a replay cannot apply a filter at all: keep the attack about the shape
            doc = good | {kind: value}
        text = json.dumps(doc, allow_nan=True)
        yield Hostile(f"{i}-{kind}", text, kind)
