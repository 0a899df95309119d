"""Hostile settings documents against a running service: ``gateway.json`` and ``desired/<identity>.json``
locally, module-twin patches through the hub emulator in edge mode. After each bad document the service is still
running, the settings in force are those of the last good document and the error is reported; after the next
good document the settings are updated and the errors are gone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from leafguard.agent.config import CONFIG_OBJECT_NAME as CFG
from leafguard.demo import SENSOR, demo_capture
from testkit.wait import until, wait_for
from tests.fuzz.settings import SECTIONS, WHOLE, hostile_documents, nested
from tests.hub_emulator import HubEmulator
from tests.hub_emulator.twins import TwinError
from tests.service.helpers import read_json, read_stats

CASES = int(os.environ.get("LEAFGUARD_FUZZ_SETTINGS_CASES", "12"))
SEED = int(os.environ.get("LEAFGUARD_FUZZ_SEED", "20261203"))
STATUS = {"leafMap": "leaf_map", "detection": "detection", "capture": "capture_filter"}
TWIN_STATUS = {"leafMap": "leafMap", "detection": "detection", "capture": "captureFilter"}
"""Where each section's status is, in stats.json and in the module's reported `leafguard` section."""


def _good(i: int) -> dict[str, Any]:
    """Good document number ``i``: each one changes a setting, so that applying it shows."""
    return {
        "leafMap": {SENSOR[0]: f"sensor-{i}"},
        "detection": {"silentAfterS": 60 + i},
        "capture": None,
        "aKeyNobodyReads": {"note": i},
    }


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    tmp.replace(path)


def _in_force(stats: dict[str, Any], i: int) -> bool:
    return (
        stats["leaf_map"] == {"leaves": 1, "error": None}
        and stats["detection"]["silentAfterS"] == 60 + i
        and stats["detection"]["error"] is None
        and stats["capture_filter"]["error"] is None
    )


def _start(out: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {"LEAFGUARD_SETTINGS_POLL_S": "0.2"}
    return subprocess.Popen(
        [sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
         "--local-dir", str(out), "--write-interval", "0.1"],
        stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> str:
    assert proc.poll() is None, "the service stopped by itself"
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    text = err.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def test_hostile_gateway_documents(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    gateway = out / "gateway.json"
    _write(gateway, json.dumps(_good(0)))
    proc = _start(out)
    try:
        wait_for(lambda: _in_force(read_stats(out), 0))
        for i, doc in enumerate(hostile_documents(SEED, CASES, _good), start=1):
            _write(gateway, doc.text)
            attacked = SECTIONS if doc.attacks == WHOLE else (doc.attacks,)
            stats = wait_for(lambda a=attacked: (s := read_stats(out)) and all(s[STATUS[x]]["error"] for x in a) and s)
            assert proc.poll() is None, f"{doc.name}: the service stopped"
            # The settings in force are the last good document's.
            assert stats["leaf_map"]["leaves"] == 1, doc.name
            assert stats["detection"]["silentAfterS"] == 60 + i - 1, doc.name
            _write(gateway, json.dumps(_good(i)))
            wait_for(lambda n=i: _in_force(read_stats(out), n))
    finally:
        err = _stop(proc)
    assert err.count("gateway settings rejected") + err.count("rejected, ") >= CASES


def test_hostile_desired_documents_of_a_leaf(tmp_path: Path) -> None:
    """A leaf's desired file: bad ones are rejected whole (its reported configuration stays), good ones apply."""
    out = tmp_path / "out"
    (out / "desired").mkdir(parents=True)
    leaf = "leaf-" + SENSOR[0].replace(":", "")
    desired = out / "desired" / f"{leaf}.json"
    reported = out / "twins" / f"{leaf}.json"

    def size_in_force() -> Any:
        return read_json(reported)[CFG]["maxMessageSizeInBytes"]["value"]

    bad_docs = [
        "{oops",
        "[]",
        json.dumps({CFG: {"maxMessageSizeInBytes": {"value": "big"}}}),
        json.dumps({CFG: {"maxMessageSizeInBytes": {"value": 10**30}}}),
        json.dumps({CFG: [1]}),
        "{" + f'"{CFG}": ' + nested(1000) + "}",
        json.dumps({CFG: {"maxMessageSizeInBytes": {"value": 8192}}, "pad": "x" * (1 << 20)}),
    ]
    _write(desired, json.dumps({CFG: {"maxMessageSizeInBytes": {"value": 8192}}}))
    proc = _start(out)
    try:
        wait_for(lambda: size_in_force() == 8192)
        for n, text in enumerate(bad_docs):
            _write(desired, text)
            time.sleep(1.0)  # five polls: a rejected document changes nothing a test could wait for
            assert size_in_force() == 8192 + n * 1024, text[:80]
            assert proc.poll() is None
            _write(desired, json.dumps({CFG: {"maxMessageSizeInBytes": {"value": 8192 + (n + 1) * 1024}}}))
            wait_for(lambda m=n: size_in_force() == 8192 + (m + 1) * 1024)
    finally:
        _stop(proc)
    messages = [json.loads(line) for line in (out / "messages.jsonl").read_text().splitlines()]
    rejected = [ev for m in messages if m["identity"] == leaf for ev in m["body"]["Events"]
                if ev["Name"] == "ConfigurationError"]  # fmt: skip
    assert len(rejected) >= len(bad_docs), [ev["Payload"] for ev in rejected]


EDGE_CASES = int(os.environ.get("LEAFGUARD_FUZZ_TWIN_CASES", "10"))


async def test_hostile_module_twin_patches() -> None:
    """Edge mode: patches the hub refuses (too deep, too large) change nothing; patches it accepts but the module
    cannot use (wrong types, unknown settings, nulls) are reported in the module's reported `leafguard` section
    and the settings in force stay; a good patch then applies and clears the error."""
    async with HubEmulator.start(thread=True) as hub:
        module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "LEAFGUARD_"))}
        env |= hub.edge_environment(module)
        env |= {"LEAFGUARD_REPORTED_INTERVAL_S": "0.2", "LEAFGUARD_SETTINGS_POLL_S": "0.2"}
        await hub.set_desired(module, _twin_good(0))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

        def health() -> dict[str, Any]:
            section: dict[str, Any] = hub.twin(module)["reported"].get("leafguard", {})
            return section

        def in_force(i: int) -> bool:
            h = health()
            detection, leaf_map = h.get("detection", {}), h.get("leafMap", {})
            return (
                detection.get("silentAfterS") == 60 + i
                and detection.get("error") is None
                and leaf_map.get("error") is None
                and leaf_map.get("leaves") == 1
                and h.get("captureFilter", {}).get("error") is None
            )

        try:
            async with asyncio.timeout(120):
                await until(lambda: in_force(0))
                for deep in ({"detection": {"x": _deep(12)}}, {"padding": "x" * 40_000}):
                    version = hub.twin(module)["desired"]["$version"]
                    with pytest.raises(TwinError) as refused:
                        await hub.set_desired(module, deep)
                    assert refused.value.status == 400
                    assert hub.twin(module)["desired"]["$version"] == version
                for i, doc in enumerate(hostile_documents(SEED, EDGE_CASES, _twin_good), start=1):
                    # A twin is always an object, and the hub refuses the deep and the large (above): whole-document
                    # attacks are for files only.
                    if doc.attacks != WHOLE:
                        await hub.set_desired(module, {doc.attacks: json.loads(doc.text)[doc.attacks]})
                        key = TWIN_STATUS[doc.attacks]
                        await until(lambda k=key: health().get(k, {}).get("error"))
                        assert proc.returncode is None, doc.name
                        assert health()["detection"]["silentAfterS"] == 60 + i - 1, doc.name
                        assert health()["leafMap"]["leaves"] == 1, doc.name
                    # Nulls delete what the bad patch merged in; then the next good settings.
                    await hub.set_desired(module, dict.fromkeys(SECTIONS))
                    await hub.set_desired(module, _twin_good(i))
                    await until(lambda n=i: in_force(n))
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        assert b"Traceback" not in err


def _twin_good(i: int) -> dict[str, Any]:
    return {"leafMap": {SENSOR[0]: f"sensor-{i}"}, "detection": {"silentAfterS": 60 + i}, "capture": None}


def _deep(depth: int) -> object:
    doc: object = "x"
    for _ in range(depth):
        doc = {"k": doc}
    return doc
