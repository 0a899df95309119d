"""The uplink end to end: `leafguard run` in edge mode as real processes, the real SDK against the emulator, with
edgeHub refusing, stalling or slow, kill -9 and restarts on the same data directory."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from leafguard.agent.config import CONFIG_OBJECT_NAME as CFG
from testkit.wait import until
from tests.hub.captures import conflict_capture, empty_capture, steady_capture
from tests.hub.helpers import MODULE, Running, service_env
from tests.hub_emulator import HubEmulator

LIMIT_S = 90.0


@pytest.fixture
async def hub() -> Any:
    async with HubEmulator.start(thread=True) as emulator:
        yield emulator


async def start(hub: HubEmulator, module: Any, capture: Path, data_dir: Path | None, speed: str,
                **env: str) -> Running:
    args = ["--data-dir", str(data_dir)] if data_dir is not None else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(capture), "--replay-speed", speed, *args,
        env=service_env(hub, module) | {"LEAFGUARD_HTTP_PORT": "off", "LEAFGUARD_STATE_INTERVAL_S": "0.3"} | env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    return Running(proc)


async def stop(running: Running) -> None:
    running.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(LIMIT_S):
        code = await running.wait()
    assert code == 0, "".join(running.err)


async def kill(running: Running) -> None:
    running.proc.send_signal(signal.SIGKILL)
    await running.wait()


async def run_through(hub: HubEmulator, module: Any, capture: Path, data_dir: Path) -> Running:
    """A run to the end: the whole capture replayed (the rest of it, after a restored state), then a clean stop
    (its final flush sends the rest); the stopped run, for its log."""
    clean = await start(hub, module, capture, data_dir, "0")
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: clean.saw("replay finished"))
    finally:
        await stop(clean)
    return clean


def security_events(hub: HubEmulator) -> list[bytes]:
    """Every Security event the hub received (Defender's EventType), canonical JSON, sorted."""
    out: list[bytes] = []
    for m in hub.messages(MODULE):
        body = orjson.loads(m.body)
        if isinstance(body, dict) and "Events" in body:
            out += [orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in body["Events"]
                    if e["EventType"] == "Security"]
    return sorted(out)


@pytest.mark.parametrize("last_save", ["after the replay", "before the first frame"])
async def test_refused_from_the_start_kill_9_after_the_replay_and_a_restart_lose_no_event(
        hub: HubEmulator, tmp_path: Path, last_save: str) -> None:
    """With the last state saved after the replay, or only before its first frame (a long interval: everything
    the agents hold is in the journal alone), the restart sends every event of the uninterrupted run."""
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    capture = steady_capture(tmp_path / "steady.pcap", minutes=10)

    await run_through(hub, module, capture, tmp_path / "clean")
    reference = security_events(hub)
    assert len(reference) > 300
    hub.clear_messages()

    hub.refuse_connections()
    data_dir = tmp_path / "data"
    journal_only = last_save == "before the first frame"
    interval = {"LEAFGUARD_STATE_INTERVAL_S": "3600"} if journal_only else {}
    first = await start(hub, module, capture, data_dir, "0", **interval)
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: first.saw("replay finished"))
            if not journal_only:
                await asyncio.sleep(1.0)  # a state save after the last frame
    finally:
        await kill(first)
    assert not hub.messages(MODULE)

    hub.accept_connections()
    second = await start(hub, module, empty_capture(tmp_path / "empty.pcap"), data_dir, "0")
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: second.saw("state restored"))
            # What the agents held goes as soon as the link is up; the open aggregation windows close with the
            # final flush, as in the uninterrupted run.
            await until(lambda: security_events(hub))
    finally:
        await stop(second)
    assert security_events(hub) == reference, "event for event, Ids included"
    assert second.saw("inputs of the journal applied again") == journal_only


def all_events(hub: HubEmulator) -> list[dict[str, Any]]:
    """Every event of the security messages received, each message once (a re-sent one has the same id)."""
    bodies = {str(m.message_id): orjson.loads(m.body) for m in hub.messages(MODULE)}
    return [e for b in bodies.values() if isinstance(b, dict) and "Events" in b for e in b["Events"]]


async def test_kill_9_mid_replay_and_a_restart_on_the_same_capture_resume_after_the_journal(
        hub: HubEmulator, tmp_path: Path) -> None:
    """Edge mode cannot take back what it sent, so a restart on the same capture resumes after the frames the
    journal's inputs came from: no event twice, every login and connection of the uninterrupted run."""
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    capture = steady_capture(tmp_path / "steady.pcap", minutes=10)
    await run_through(hub, module, capture, tmp_path / "clean")
    reference = all_events(hub)
    hub.clear_messages()

    data_dir = tmp_path / "data"
    first = await start(hub, module, capture, data_dir, "40", LEAFGUARD_STATE_INTERVAL_S="3600")
    try:
        await asyncio.sleep(6.0)  # 4 of the 10 minutes of packet time
        assert not first.saw("replay finished")
    finally:
        await kill(first)
    second = await run_through(hub, module, capture, data_dir)
    assert second.saw("resuming the replay of")
    got = all_events(hub)
    ids = Counter(e["Id"] for e in got)
    assert not [i for i, n in ids.items() if n > 1], "no event twice"

    def logins(evs: list[dict[str, Any]]) -> list[bytes]:
        return sorted(orjson.dumps([e["TimestampUTC"], e["Payload"]], option=orjson.OPT_SORT_KEYS)
                      for e in evs if e["Name"] == "Login")

    def connections(evs: list[dict[str, Any]]) -> set[tuple[str, ...]]:
        return {(p["Direction"], p["LocalAddress"], p["RemoteAddress"], p["RemotePort"], p["Protocol"])
                for e in evs if e["Name"] == "ConnectionCreate" for p in e["Payload"]}

    assert logins(got) == logins(reference) and logins(reference)
    assert connections(got) >= connections(reference)


FAST_AGENTS = {
    CFG: {
        "highPriorityMessageFrequency": {"value": "PT30S"},
        "lowPriorityMessageFrequency": {"value": "PT1M"},
        "aggregationEnabledConnectionCreate": {"value": False},
        "maxMessageSizeInBytes": {"value": 8192},
    }
}


def received(hub: HubEmulator) -> dict[str, int]:
    """Messages received (security messages and alert batches), by message id (a re-sent one once), with the
    events of the security messages."""
    out: dict[str, int] = {}
    for m in hub.messages(MODULE):
        body = orjson.loads(m.body)
        out[str(m.message_id)] = len(body["Events"]) if isinstance(body, dict) and "Events" in body else 0
    return out


@pytest.mark.parametrize("budget", ["ample", "tight"])
async def test_edge_hub_down_for_the_middle_half_of_ten_minutes(hub: HubEmulator, tmp_path: Path,
                                                                budget: str) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    await hub.set_desired(module, FAST_AGENTS)
    capture = steady_capture(tmp_path / "steady.pcap", minutes=10)
    env = {"LEAFGUARD_SPOOL_MAX_BYTES": "262144"} if budget == "tight" else {}
    service = await start(hub, module, capture, tmp_path / "data", "60", **env)  # 10 minutes in 10 s
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: service.saw("connected to the edge hub"))
            await asyncio.sleep(2.5)
            hub.refuse_connections()
            hub.drop_connection(module)
            await asyncio.sleep(5.0)
            hub.accept_connections()
            await until(lambda: service.saw("replay finished"))
    finally:
        await stop(service)
    uplink = hub.twin(module)["reported"]["leafguard"]["uplink"]
    agents = hub.twin(module)["reported"]["leafguard"]["agents"]
    got = received(hub)
    assert uplink["reconnects"] >= 1 and uplink["queued"] == 0
    assert len(got) == uplink["generated"] - uplink["dropped"], "every message not counted as dropped arrived"
    if budget == "ample":
        assert uplink["dropped"] == 0 and agents["dropped"] == 0
        assert sum(got.values()) == agents["generated"] == agents["sent"], "every event arrived"
    else:
        assert uplink["dropped"] > 0, "the outage overflowed a 256 KiB spool"
        assert uplink["drops_not_yet_reported"] == 0, "every drop reached its leaf's TotalFailed"


async def test_a_slow_uplink_gets_fewer_fuller_messages_than_a_fast_one(hub: HubEmulator, tmp_path: Path) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    desired = {CFG: {k: v for k, v in FAST_AGENTS[CFG].items() if k != "maxMessageSizeInBytes"}}
    await hub.set_desired(module, desired)
    capture = steady_capture(tmp_path / "steady5.pcap", minutes=5, count=10_000)

    async def run(name: str, delay_s: float) -> tuple[dict[str, int], dict[str, Any]]:
        hub.clear_messages()
        hub.delay_pubacks(delay_s)  # one message in flight: at most 1 / delay_s messages a second
        service = await start(hub, module, capture, tmp_path / name, "60", LEAFGUARD_INFLIGHT_WINDOW="1")
        try:
            async with asyncio.timeout(LIMIT_S):
                await until(lambda: service.saw("replay finished"))
                await until(lambda: hub.twin(module)["reported"].get("leafguard", {}).get("uplink", {})
                            .get("queued", 1) == 0)
        finally:
            hub.delay_pubacks(0.0)  # the final flush is not what is compared: let it go within the deadline
            await stop(service)
        return received(hub), hub.twin(module)["reported"]["leafguard"]["agents"]

    fast, fast_agents = await run("fast", 0.0)
    slow, slow_agents = await run("slow", 0.4)
    assert fast_agents["dropped"] == slow_agents["dropped"] == 0
    assert sum(slow.values()) == slow_agents["generated"] and sum(fast.values()) == fast_agents["generated"]
    fast_msgs = [n for n in fast.values() if n]
    slow_msgs = [n for n in slow.values() if n]
    assert len(slow_msgs) < len(fast_msgs) / 2, (len(slow_msgs), len(fast_msgs))
    assert sum(slow_msgs) / len(slow_msgs) > 2 * sum(fast_msgs) / len(fast_msgs)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_stalled_pubacks_hold_memory_within_budget_and_capture_loses_nothing(
        hub: HubEmulator, tmp_path: Path) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    await hub.set_desired(module, FAST_AGENTS)
    capture = steady_capture(tmp_path / "steady.pcap", minutes=10)
    service = await start(hub, module, capture, tmp_path / "data", "60", LEAFGUARD_SEND_TIMEOUT_S="600")
    peak = 0
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: service.saw("connected to the edge hub"))
            hub.stall_pubacks()  # edgeHub takes the messages and never acknowledges them
            base = rss_bytes(service.proc.pid)
            while not service.saw("replay finished"):
                peak = max(peak, rss_bytes(service.proc.pid))
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            health = hub.twin(module)["reported"]["leafguard"]
            assert health["frames"] == 20_000, "every frame analysed while the uplink is stalled"
            assert health["uplink"]["in_flight"] <= 16 and health["uplink"]["queued"] > 16
            hub.release_pubacks()
            await until(lambda: hub.twin(module)["reported"]["leafguard"]["uplink"]["queued"] == 0)
    finally:
        await stop(service)
    assert peak - base < 32 * 1024 * 1024, "the backlog waits on disk, not in memory"
    uplink = hub.twin(module)["reported"]["leafguard"]["uplink"]
    assert uplink["dropped"] == 0 and len(received(hub)) == uplink["generated"]


async def test_more_than_ten_thousand_alerts_in_one_run_all_arrive_upstream(hub: HubEmulator, tmp_path: Path) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    capture = conflict_capture(tmp_path / "conflicts.pcap", addresses=10_050)
    service = await start(hub, module, capture, tmp_path / "data", "0")
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: service.saw("replay finished"))
            await until(lambda: hub.twin(module)["reported"].get("leafguard", {}).get("alerts", {})
                        .get("waiting", 1) == 0)
            await until(lambda: hub.twin(module)["reported"]["leafguard"]["uplink"]["queued"] == 0)
    finally:
        await stop(service)
    alerts: dict[str, str] = {}
    for m in hub.messages(MODULE):
        if m.properties.get("alertCount") is not None:
            alerts.update((a["id"], a["type"]) for a in orjson.loads(m.body))
    health = hub.twin(module)["reported"]["leafguard"]["alerts"]
    assert health["forwarded"] > 10_000 and health["dropped"] == 0
    assert len(alerts) == health["forwarded"], "every alert arrived upstream"
    assert sum(t == "address_conflict" for t in alerts.values()) == 10_050


async def test_the_leaf_map_in_force_survives_a_restart_while_edge_hub_is_down(
        hub: HubEmulator, tmp_path: Path) -> None:
    from leafguard.demo import demo_capture

    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    await hub.set_desired(module, {"leafMap": {"5c:cf:7f:07:ae:fb": "plant1-sensor7"}})
    data_dir = tmp_path / "data"
    first = await start(hub, module, demo_capture(), data_dir, "0")
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: "plant1-sensor7" in hub.twin(module)["reported"].get("leaves", {}))
    finally:
        await stop(first)
    hub.clear_messages()
    hub.refuse_connections()  # the twin, and the leaf map in it, cannot be read by the next run
    second = await start(hub, module, demo_capture(), data_dir, "0")
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: second.saw("replay finished"))
            await asyncio.sleep(1.0)  # a state save after the last frame
    finally:
        await kill(second)
    hub.accept_connections()
    third = await start(hub, module, empty_capture(tmp_path / "empty.pcap"), data_dir, "0")
    try:
        async with asyncio.timeout(LIMIT_S):
            await until(lambda: third.saw("state restored"))
    finally:
        await stop(third)
    identities = {m.properties.get("leafIdentity") for m in hub.messages(MODULE)
                  if m.properties.get("alertCount") is None}
    assert "plant1-sensor7" in identities and "leaf-5ccf7f07aefb" not in identities
