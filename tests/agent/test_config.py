"""The agent configuration contract, case by case (defender-spec §1.2-§2)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from leafguard.agent.config import (
    CONFIG_OBJECT_NAME,
    TWIN_KEYS,
    AgentConfig,
    AgentConfigError,
    Priority,
    format_duration,
    merge_desired_patch,
    parse_duration,
)
from leafguard.errors import ConfigurationError
from tests.conftest import SHARED

TWIN = SHARED / "schemas" / "defender-security-module-twin"


def desired(**props: Any) -> dict[str, Any]:
    """A desired document with each keyword wrapped as {"value": …}."""
    return {CONFIG_OBJECT_NAME: {k: {"value": v} for k, v in props.items()}}


def test_defaults_match_the_official_default_file(shared_dir: object) -> None:
    doc = json.loads((TWIN / "azureiotsecurity_default.json").read_text())
    official = doc["properties"]["desired"][CONFIG_OBJECT_NAME]
    reported = AgentConfig().reported_section()
    for key, wrapper in official.items():
        assert reported[key] == wrapper, key
    # The official file is itself a valid desired document that changes nothing.
    outcome = AgentConfig().apply_desired(doc["properties"]["desired"])
    assert outcome.accepted and outcome.config == AgentConfig() and outcome.issues == ()


def test_every_schema_property_is_read_and_reported(shared_dir: object) -> None:
    schema = json.loads((TWIN / "azureiotsecurity_schema.json").read_text())
    props = json.dumps(schema)
    official = set(
        json.loads((TWIN / "azureiotsecurity_default.json").read_text())["properties"]["desired"][CONFIG_OBJECT_NAME]
    )
    assert official <= set(TWIN_KEYS)
    assert all(k in props for k in official)
    reported = AgentConfig().reported_section()
    assert official <= set(reported)
    assert "hubResourceId" in reported and "baselineCustomChecksEnabled" in reported


def test_absent_object_empty_object_and_null_values_mean_defaults() -> None:
    base = AgentConfig()
    changed = base.apply_desired(desired(maxMessageSizeInBytes=65536)).config
    docs: list[dict[str, Any]] = [
        {},
        {CONFIG_OBJECT_NAME: {}},
        {CONFIG_OBJECT_NAME: None},
        {CONFIG_OBJECT_NAME: {"snapshotFrequency": None}},
    ]
    for doc in docs:
        outcome = changed.apply_desired(doc)
        assert outcome.accepted, doc
        assert outcome.config == base, doc


def test_values_are_parsed_and_reported_in_csharp_style() -> None:
    outcome = AgentConfig().apply_desired(
        desired(
            highPriorityMessageFrequency="PT1M",
            lowPriorityMessageFrequency="P1D",
            snapshotFrequency="PT1H30M",
            maxLocalCacheSizeInBytes=1_048_576,
            maxMessageSizeInBytes=65536,
            eventPriorityLogin="low",
            eventPriorityConnectionCreate="HIGH",
            eventPriorityListeningPorts="oFf",
            aggregationEnabledConnectionCreate=False,
            aggregationIntervalConnectionCreate="PT10M",
            hubResourceId="/subscriptions/x",
        )
    )
    assert outcome.accepted and outcome.issues == ()
    c = outcome.config
    assert c.high_priority_message_frequency_s == 60
    assert c.low_priority_message_frequency_s == 86400
    assert c.snapshot_frequency_s == 5400
    assert (c.priority_login, c.priority_connection_create, c.priority_listening_ports) == (
        Priority.LOW,
        Priority.HIGH,
        Priority.OFF,
    )
    rep = outcome.reported[CONFIG_OBJECT_NAME]
    assert rep["eventPriorityLogin"] == {"value": "Low"}
    assert rep["eventPriorityConnectionCreate"] == {"value": "High"}
    assert rep["eventPriorityListeningPorts"] == {"value": "Off"}
    assert rep["lowPriorityMessageFrequency"] == {"value": "P1D"}
    assert rep["snapshotFrequency"] == {"value": "PT1H30M"}
    assert rep["aggregationEnabledConnectionCreate"] == {"value": False}
    assert rep["aggregationIntervalConnectionCreate"] == {"value": "PT10M"}
    assert rep["maxMessageSizeInBytes"] == {"value": 65536}
    assert rep["hubResourceId"] == {"value": "/subscriptions/x"}
    # Every key is reported in the {"value": …} wrapper.
    assert set(rep) >= set(TWIN_KEYS) - {"baselineCustomChecksFilePath", "baselineCustomChecksFileHash"}
    assert all(set(v) == {"value"} for v in rep.values())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("PT7M", 420),
        ("PT5H", 18000),
        ("PT13H", 46800),
        ("PT1H", 3600),
        ("PT0.5S", 0.5),
        ("PT1.5M", 90),
        ("P1W", 7 * 86400),
        ("P1M", 30 * 86400),
        ("P1Y", 365 * 86400),
        ("P1DT2H3M4S", 93784),
    ],
)
def test_iso_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "P", "PT", "7M", "PT7", "P1.5DT1H", "PT-1M", "pt7m", "PT0S", "P0D", "1 hour"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# The table: (case, desired Defender object, bad keys). Each one must be rejected atomically.
TYPE_MISMATCHES: list[tuple[str, Any, list[str]]] = [
    ("duration as number", {"highPriorityMessageFrequency": {"value": 420}}, ["highPriorityMessageFrequency"]),
    ("duration not ISO", {"lowPriorityMessageFrequency": {"value": "5 hours"}}, ["lowPriorityMessageFrequency"]),
    ("zero duration", {"snapshotFrequency": {"value": "PT0S"}}, ["snapshotFrequency"]),
    ("int as string", {"maxMessageSizeInBytes": {"value": "65536"}}, ["maxMessageSizeInBytes"]),
    ("int as float", {"maxLocalCacheSizeInBytes": {"value": 65536.5}}, ["maxLocalCacheSizeInBytes"]),
    ("int as bool", {"maxLocalCacheSizeInBytes": {"value": True}}, ["maxLocalCacheSizeInBytes"]),
    ("unknown priority", {"eventPriorityLogin": {"value": "Medium"}}, ["eventPriorityLogin"]),
    ("priority as number", {"eventPriorityDiagnostic": {"value": 1}}, ["eventPriorityDiagnostic"]),
    (
        "bool as string",
        {"aggregationEnabledConnectionCreate": {"value": "true"}},
        ["aggregationEnabledConnectionCreate"],
    ),
    ("value null", {"eventPriorityLogin": {"value": None}}, ["eventPriorityLogin"]),
    ("value missing", {"eventPriorityLogin": {}}, ["eventPriorityLogin"]),
    ("not wrapped", {"eventPriorityLogin": "High"}, ["eventPriorityLogin"]),
    ("string as number", {"hubResourceId": {"value": 5}}, ["hubResourceId"]),
    ("message size too small", {"maxMessageSizeInBytes": {"value": 4096}}, ["maxMessageSizeInBytes"]),
    ("message size too large", {"maxMessageSizeInBytes": {"value": 262145}}, ["maxMessageSizeInBytes"]),
    ("cache too small", {"maxLocalCacheSizeInBytes": {"value": 8191}}, ["maxLocalCacheSizeInBytes"]),
    ("negative cache", {"maxLocalCacheSizeInBytes": {"value": -1}}, ["maxLocalCacheSizeInBytes"]),
    (
        "several bad keys among good ones",
        {
            "eventPriorityLogin": {"value": "Off"},
            "snapshotFrequency": {"value": "tomorrow"},
            "maxMessageSizeInBytes": {"value": "big"},
            "eventPriorityConnectionCreate": {"value": "High"},
        },
        ["snapshotFrequency", "maxMessageSizeInBytes"],
    ),
    ("object not an object", "everything High", [CONFIG_OBJECT_NAME]),
    ("object is a list", [1, 2], [CONFIG_OBJECT_NAME]),
]


@pytest.mark.parametrize(("case", "section", "bad"), TYPE_MISMATCHES, ids=[c[0] for c in TYPE_MISMATCHES])
def test_type_mismatch_is_atomic(case: str, section: Any, bad: list[str]) -> None:
    previous = AgentConfig().apply_desired(desired(eventPriorityLogin="Low", maxMessageSizeInBytes=65536)).config
    outcome = previous.apply_desired({CONFIG_OBJECT_NAME: section})
    assert not outcome.accepted
    assert outcome.config is previous  # nothing changed, not even the good keys of the same update
    assert outcome.reported == previous.reported()  # reported back unchanged
    assert [i.name for i in outcome.issues] == bad
    assert all(i.error_type == "TypeMismatch" for i in outcome.issues)
    for issue in outcome.issues:
        assert "Couldn't parse the following configurations: " + ", ".join(bad) in issue.message
    if bad == ["maxMessageSizeInBytes"]:
        assert outcome.issues[0].used == "65536"  # the value still in force
    with pytest.raises(ConfigurationError):
        AgentConfig.parse({CONFIG_OBJECT_NAME: section})


ADVISORIES: list[tuple[str, dict[str, Any], list[tuple[str, str, str]]]] = [
    ("defaults are fine", {}, []),
    (
        "message size not a multiple of 4096",
        {"maxMessageSizeInBytes": 10000},
        [("maxMessageSizeInBytes", "NotOptimal", "10000")],
    ),
    (
        "cache smaller than message size",
        {"maxLocalCacheSizeInBytes": 16384, "maxMessageSizeInBytes": 65536},
        [("maxLocalCacheSizeInBytes", "Conflict", "16384")],
    ),
    (
        "high frequency longer than low",
        {"highPriorityMessageFrequency": "PT6H", "lowPriorityMessageFrequency": "PT1H"},
        [("highPriorityMessageFrequency", "Conflict", "PT6H")],
    ),
    ("equal frequencies are fine", {"highPriorityMessageFrequency": "PT1H", "lowPriorityMessageFrequency": "PT1H"}, []),
    (
        "all three at once",
        {
            "maxMessageSizeInBytes": 10000,
            "maxLocalCacheSizeInBytes": 9000,
            "highPriorityMessageFrequency": "P1D",
        },
        [
            ("maxMessageSizeInBytes", "NotOptimal", "10000"),
            ("maxLocalCacheSizeInBytes", "Conflict", "9000"),
            ("highPriorityMessageFrequency", "Conflict", "P1D"),
        ],
    ),
]


@pytest.mark.parametrize(("case", "props", "expected"), ADVISORIES, ids=[c[0] for c in ADVISORIES])
def test_advisory_checks_do_not_block(case: str, props: dict[str, Any], expected: list[tuple[str, str, str]]) -> None:
    outcome = AgentConfig().apply_desired(desired(**props))
    assert outcome.accepted
    assert [(i.name, i.error_type, i.used) for i in outcome.issues] == expected
    assert outcome.config.reported_section() != AgentConfig().reported_section() or not props


def test_direct_construction_out_of_range_raises_our_error() -> None:
    with pytest.raises(AgentConfigError):
        AgentConfig(max_message_size_bytes=1)


def test_patch_is_merged_into_the_whole_desired_document() -> None:
    whole = {
        "$version": 3,
        CONFIG_OBJECT_NAME: {"eventPriorityLogin": {"value": "Off"}, "maxMessageSizeInBytes": {"value": 65536}},
        "leafguard": {"mute": True},
    }
    patch = {"$version": 4, CONFIG_OBJECT_NAME: {"snapshotFrequency": {"value": "PT1H"}}}
    merged = merge_desired_patch(whole, patch)
    c = AgentConfig().apply_desired(merged).config
    # The patch did not reset the keys it does not mention (C's "patch = whole object" bug).
    assert c.priority_login is Priority.OFF and c.max_message_size_bytes == 65536 and c.snapshot_frequency_s == 3600
    assert merged["$version"] == 4 and merged["leafguard"] == {"mute": True}
    # null in a patch removes the key, which then takes its default.
    removed = merge_desired_patch(merged, {CONFIG_OBJECT_NAME: {"eventPriorityLogin": None}})
    assert AgentConfig().apply_desired(removed).config.priority_login is Priority.HIGH
    # A patch without the object changes nothing.
    assert AgentConfig().apply_desired(merge_desired_patch(merged, {"other": 1})).config == c
