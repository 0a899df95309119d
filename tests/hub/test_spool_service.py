"""`leafguard run` in edge mode with a data directory, as real processes against the hub emulator: an edgeHub
outage, kill -9 during it, a corrupt byte in the spool, and a restart that delivers what was spooled."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from leafguard.agent.config import CONFIG_OBJECT_NAME as CFG
from leafguard.hub.spool import Spool, SpoolSettings
from testkit.wait import until
from tests.hub.captures import empty_capture, steady_capture
from tests.hub.helpers import MODULE, Running, service_env
from tests.hub_emulator import HubEmulator

LIMIT_S = 90.0
FAST_AGENTS = {
    CFG: {
        "highPriorityMessageFrequency": {"value": "PT30S"},
        "lowPriorityMessageFrequency": {"value": "PT1M"},
        "aggregationEnabledConnectionCreate": {"value": False},
        # While the link is down the agents hold their events until a message is full: small messages keep the
        # spool busy during the outage.
        "maxMessageSizeInBytes": {"value": 8192},
    }
}


@pytest.fixture
async def hub() -> Any:
    async with HubEmulator.start(thread=True) as emulator:
        yield emulator


async def start(hub: HubEmulator, module: Any, capture: Path, data_dir: Path, speed: str) -> Running:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(capture), "--replay-speed", speed,
        "--data-dir", str(data_dir),
        env=service_env(hub, module) | {"LEAFGUARD_HTTP_PORT": "off"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    return Running(proc)


def spooled(data_dir: Path, scratch: Path) -> list[str]:
    """The message ids waiting in a spool (read from a copy: opening a spool compacts it)."""
    shutil.copytree(data_dir, scratch)
    spool, recovery = Spool.open(SpoolSettings(scratch))
    spool.close(0.0)
    return [m.message_id for m in recovery.messages]


def corrupt_one_put(data_dir: Path) -> None:
    """Flip one byte in the body of the last message put in the newest segment."""
    seg = sorted((data_dir / "spool").glob("*.seg"))[-1]
    data = bytearray(seg.read_bytes())
    at = data.rfind(b'"Events":[')
    assert at > 0
    data[at + 20] ^= 0x55
    seg.write_bytes(bytes(data))


async def test_outage_kill_9_corrupt_byte_and_restart_deliver_everything_spooled(
        hub: HubEmulator, tmp_path: Path) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    await hub.set_desired(module, FAST_AGENTS)
    capture = steady_capture(tmp_path / "steady.pcap", minutes=10)
    data_dir = tmp_path / "data"

    first = await start(hub, module, capture, data_dir, speed="60")  # 10 minutes of packet time in 10 s
    try:
        async with asyncio.timeout(LIMIT_S):
            # The twin's agent settings are in force once the leaves report them; then edgeHub goes away.
            await until(lambda: len(hub.twin(module)["reported"].get("leaves", {})) > 0)
            hub.refuse_connections()
            assert hub.drop_connection(module) == 1
            before_outage = {m.message_id for m in hub.messages(MODULE)}
            await until(lambda: first.saw("replay finished"))
            await asyncio.sleep(1.5)  # the last messages of the replay reach the spool
    finally:
        first.proc.send_signal(signal.SIGKILL)
        await first.wait()
    assert first.proc.returncode == -signal.SIGKILL
    waiting = spooled(data_dir, tmp_path / "copy1")
    assert len(waiting) >= 10, "the outage left messages in the spool"

    corrupt_one_put(data_dir)
    hub.accept_connections()
    second = await start(hub, module, empty_capture(tmp_path / "empty.pcap"), data_dir, speed="0")
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: second.saw("spool in "))
            await until(lambda: len(set(waiting) - {m.message_id for m in hub.messages(MODULE)}) <= 1)
            await until(lambda: hub.twin(module)["reported"].get("leafguard", {}).get("uplink", {})
                        .get("spool_corrupt_records") == 1)
    finally:
        second.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT_S):
            code = await second.wait()
    assert code == 0, "".join(second.err)
    assert second.saw(f"{len(waiting) - 1} messages") and second.saw("1 corrupt and 0 torn records skipped")

    received = [m.message_id for m in hub.messages(MODULE) if m.message_id]
    missing = set(waiting) - set(received)
    assert len(missing) == 1, "only the corrupted message is lost"
    # Duplicates only among the messages that were in flight when the connection was dropped.
    dupes = [mid for mid, n in Counter(received).items() if n > 1]
    assert len(dupes) <= 16 and not set(dupes) & set(waiting) - before_outage
    uplink = hub.twin(module)["reported"]["leafguard"]["uplink"]
    assert uplink["durable"] is True and uplink["spool_lost_to_corruption"] == 1
    # The books balance across both runs and the corruption: generated = sent + dropped (nothing pending).
    spool, _recovery = Spool.open(SpoolSettings(data_dir))
    c = spool.counters
    spool.close(0.0)
    assert c.accepted == c.acked + c.dropped and c.dropped == c.lost_to_corruption == 1
    assert c.acked == len(set(received)), "every acknowledged message arrived, each id once or as a duplicate"
    assert os.listdir(data_dir / "spool")
