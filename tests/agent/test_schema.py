"""Official-schema validation: the validator itself, and every message from every shared capture."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import orjson
import pytest

from leafguard.agent.config import CONFIG_OBJECT_NAME
from tests.agent.schema import errors, samples
from tests.conftest import shared_pcaps


def test_validator_accepts_the_valid_samples(shared_dir: Path) -> None:
    valid = samples()["valid"]
    assert len(valid) == 13
    for i, msg in enumerate(valid):
        assert errors(msg) == [], i


def test_validator_rejects_the_invalid_samples(shared_dir: Path) -> None:
    invalid = samples()["invalid"]
    assert len(invalid) == 6
    for i, msg in enumerate(invalid):
        assert errors(msg), i


def test_validator_checks_formats(shared_dir: Path) -> None:
    good = samples()["valid"][0]
    bad_ip = orjson.loads(orjson.dumps(good))
    bad_ip["Events"][0]["Payload"][0]["LocalAddress"] = "not-an-ip"
    assert errors(bad_ip)
    bad_time = orjson.loads(orjson.dumps(good))
    bad_time["Events"][0]["TimestampUTC"] = "yesterday"
    assert errors(bad_time)
    aggregated = orjson.loads(orjson.dumps(good))
    aggregated["Events"][0]["Category"] = "Aggregated"
    with pytest.raises(AssertionError):  # tolerated only for ConnectionCreate
        errors(aggregated)


HAVE_ANALYZER = importlib.util.find_spec("leafguard.observe.analyzer") is not None and (
    importlib.util.find_spec("leafguard.capture.pcapfile") is not None
)
PCAPS = shared_pcaps()


@pytest.mark.skipif(not HAVE_ANALYZER, reason="leafguard.observe.analyzer (the observation core) is not there yet")
@pytest.mark.skipif(not PCAPS, reason="../shared/pcaps is absent")
@pytest.mark.parametrize("pcap", PCAPS, ids=[p.name for p in PCAPS])
@pytest.mark.parametrize("variant", ["defaults", "small-aggregation-off"])
def test_every_message_of_every_capture_validates(pcap: Path, variant: str, tmp_path: Path) -> None:
    from leafguard.agent.offline import write_security_messages

    config = None
    if variant != "defaults":
        config = tmp_path / "agent-config.json"
        props = {
            "maxMessageSizeInBytes": 8192,
            "maxLocalCacheSizeInBytes": 65536,
            "highPriorityMessageFrequency": "PT10S",
            "lowPriorityMessageFrequency": "PT1M",
            "snapshotFrequency": "PT5M",
            "aggregationEnabledConnectionCreate": False,
            "eventPriorityConnectionCreate": "high",
        }
        config.write_bytes(orjson.dumps({CONFIG_OBJECT_NAME: {k: {"value": v} for k, v in props.items()}}))
    out = tmp_path / "messages.jsonl"
    n = write_security_messages([pcap], out, config)
    lines = out.read_bytes().splitlines()
    assert len(lines) == n
    limit = 8192 if config else 204800
    identities: set[str] = set()
    for line in lines:
        rec: dict[str, Any] = orjson.loads(line)
        assert set(rec) == {"identity", "properties", "body"}
        identities.add(rec["identity"])
        assert rec["properties"]["$.ifid"] == "urn:azureiot:Security:SecurityAgent:1"
        assert rec["properties"]["MessagePriority"] in {"High", "Low"}
        assert len(orjson.dumps(rec["body"])) <= limit
        problems = errors(rec["body"])
        assert problems == [], (rec["identity"], problems[:3])
    if n:
        assert all(i.startswith("leaf-") for i in identities)
