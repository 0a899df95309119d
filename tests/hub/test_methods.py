"""Direct methods: the dispatcher over a real analyzer, and the real SDK's method calls through the emulator."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from leafguard.agent.fleet import Fleet
from leafguard.capture.pcapfile import read_batches
from leafguard.demo import demo_capture
from leafguard.hub.methods import MethodDispatcher, MethodResult
from leafguard.hub.settings import EdgeSettings
from leafguard.hub.transport import EdgeTransport
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from leafguard.service.control import DetectionControl, ServiceControl
from leafguard.service.snapshot import ServiceSnapshot
from testkit.wait import until
from tests.hub.helpers import MODULE
from tests.hub_emulator import HubEmulator, Identity

LIMIT_S = 60.0
SENSOR_MAC = "5c:cf:7f:07:ae:fb"


def analyzed_demo() -> dict[str, Any]:
    """`leafguard analyze --demo --json`, the reference the methods' answers are checked against."""
    out = subprocess.run([sys.executable, "-m", "leafguard", "analyze", "--demo", "--json"], check=True,
                         capture_output=True, timeout=60).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def no_snapshot() -> ServiceSnapshot:
    raise AssertionError("not used here")


def feed_demo(analyzer: Analyzer) -> Analyzer:
    for batch in read_batches(demo_capture()):
        analyzer.feed(batch)
    return analyzer


def make_dispatcher(analyzer: Analyzer) -> tuple[MethodDispatcher, Fleet]:
    fleet = Fleet()
    transport = EdgeTransport(EdgeSettings(hub_hostname="hub", device_id="edge1", module_id="leafguard",
                                           gateway_hostname="edge1"))
    control = ServiceControl(analyzer=analyzer, fleet=fleet, transport=transport, snapshot=no_snapshot,
                             clock=lambda: analyzer.now)
    return MethodDispatcher(control, DetectionControl(analyzer, lambda: analyzer.now)), fleet


@pytest.fixture
def dispatcher() -> tuple[MethodDispatcher, Fleet]:
    return make_dispatcher(feed_demo(Analyzer(AnalyzerSettings())))


def call(d: MethodDispatcher, name: str, payload: object = None) -> MethodResult:
    return asyncio.run(d.handle(name, payload))


def test_inventory_pages_with_a_cursor_and_finds_one_leaf(dispatcher: tuple[MethodDispatcher, Fleet]) -> None:
    d, fleet = dispatcher
    reference = {leaf["mac"]: leaf for leaf in analyzed_demo()["leaves"]}
    pages, cursor = [], None
    while True:
        result = call(d, "getInventory", {"pageSize": 2} | ({"cursor": cursor} if cursor else {}))
        assert result.status == 200 and result.payload["total"] == len(reference)
        pages.append([leaf["mac"] for leaf in result.payload["leaves"]])
        for leaf in result.payload["leaves"]:
            inventory = {k: v for k, v in leaf.items() if k not in ("identity", "named", "managed", "agent")}
            assert inventory == reference[leaf["mac"]]
            assert leaf["identity"] == "leaf-" + leaf["mac"].replace(":", "")
            assert leaf["named"] is False and leaf["managed"] is False
        cursor = result.payload["nextCursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [m for p in pages for m in p] == sorted(reference)
    # A cursor is a position in MAC order: it holds even when that leaf is gone (here: a MAC that never was one).
    after = call(d, "getInventory", {"cursor": "3c:52:82:11:22:32", "pageSize": 1}).payload
    assert [leaf["mac"] for leaf in after["leaves"]] == ["3c:52:82:11:22:33"]

    one = call(d, "getInventory", {"mac": SENSOR_MAC.upper().replace(":", "-")})
    assert one.status == 200 and one.payload["leaf"]["mac"] == SENSOR_MAC
    by_id = call(d, "getInventory", {"identity": "leaf-5ccf7f07aefb"})
    assert by_id.payload == one.payload
    fleet.set_leaf_map({SENSOR_MAC: "plant1-sensor7"}, 0.0)
    named = call(d, "getInventory", {"deviceId": "plant1-sensor7"})
    assert named.status == 200
    assert (named.payload["leaf"]["mac"], named.payload["leaf"]["named"]) == (SENSOR_MAC, True)
    assert named.payload["leaf"]["managed"] is False  # no client of its own (nothing gave it one here)


@pytest.mark.parametrize(
    ("method", "payload", "status", "field"),
    [
        ("getInventory", {"mac": "02:00:00:00:00:99"}, 404, "mac"),
        ("getInventory", {"identity": "nobody"}, 404, "identity"),
        ("getInventory", {"pageSize": 0}, 400, "pageSize"),
        ("getInventory", {"pageSize": "10"}, 400, "pageSize"),
        ("getInventory", {"cursor": "page2"}, 400, "cursor"),
        ("getInventory", {"mac": "5c:cf:7f:07:ae"}, 400, "mac"),
        ("getInventory", {"mac": SENSOR_MAC, "pageSize": 5}, 400, "pageSize"),
        ("getInventory", {"leaf": SENSOR_MAC}, 400, "leaf"),
        ("getInventory", [SENSOR_MAC], 400, "payload"),
        ("getStats", {"verbose": True}, 400, "verbose"),
        ("flush", {"waitS": -1}, 400, "waitS"),
        ("flush", {"waitS": 3600}, 400, "waitS"),
        ("flush", {"waitS": True}, 400, "waitS"),
        ("mute", {"type": "nonsense", "forS": 60}, 400, "type"),
        ("mute", {"mac": "everyone", "forS": 60}, 400, "mac"),
        ("mute", {"forS": 60}, 400, "type"),
        ("mute", {"type": "port_scan"}, 400, "forS"),
        ("mute", {"type": "port_scan", "forS": 60, "until": 2e9}, 400, "forS"),
        ("mute", {"type": "port_scan", "forS": 0}, 400, "forS"),
        ("mute", {"type": "port_scan", "until": "tomorrow"}, 400, "until"),
        ("mute", {"type": "port_scan", "forS": 60, "why": "noisy"}, 400, "why"),
        ("learn", {"mac": "02:00:00:00:00:99"}, 404, "mac"),
        ("learn", {"mac": 5}, 400, "mac"),
    ],
)
def test_bad_requests_name_the_field(
    dispatcher: tuple[MethodDispatcher, Fleet], method: str, payload: object, status: int, field: str
) -> None:
    result = call(dispatcher[0], method, payload)
    assert (result.status, result.payload["field"]) == (status, field)
    assert field in result.payload["error"] or field == "payload"


def test_mute_drops_later_alerts_and_learn_counts_the_leaves() -> None:
    analyzer = Analyzer(AnalyzerSettings())
    d, _fleet = make_dispatcher(analyzer)
    # Before any frame the rule counts from the wall clock; the demo's packet times are earlier, so it holds.
    muted = call(d, "mute", {"type": "cleartext_login", "forS": 3600})
    assert muted.status == 200 and muted.payload["muted"]["type"] == "cleartext_login"
    assert muted.payload["rules"] == [muted.payload["muted"]]
    call(d, "mute", {"mac": SENSOR_MAC, "until": 2e9})
    again = call(d, "mute", {"type": "cleartext_login", "forS": 7200})  # the same pair: replaced, not added
    assert len(again.payload["rules"]) == 2
    feed_demo(analyzer)
    # The demo's two cleartext logins (its only alerts) were found and dropped by the rule.
    assert analyzer.detectors.alerts == [] and analyzer.detectors.muting.muted == 2

    assert call(d, "learn", {"mac": SENSOR_MAC}).payload == {"learned": 1}
    assert call(d, "learn").payload == {"learned": len(analyzed_demo()["leaves"])}


def test_unknown_method_is_501_listing_the_methods(dispatcher: tuple[MethodDispatcher, Fleet]) -> None:
    result = call(dispatcher[0], "reboot")
    assert result.status == 501 and "getInventory" in result.payload["error"]
    assert dispatcher[0].calls == {("?", 501): 1}


# -- through the real SDK ----------------------------------------------------------------------------------------


@pytest.fixture
async def hub() -> AsyncIterator[HubEmulator]:
    async with HubEmulator.start(thread=True) as emulator:
        yield emulator



async def test_methods_through_the_sdk_inventory_stats_and_a_flush_that_waits(hub: HubEmulator) -> None:
    module: Identity = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "LEAFGUARD_"))}
    env |= hub.edge_environment(module) | {"LEAFGUARD_HTTP_PORT": "off", "LEAFGUARD_METHOD_TIMEOUT_S": "3"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    reference = analyzed_demo()

    async def invoke(name: str, payload: object = None, timeout_s: float = 10.0) -> Any:
        return await hub.invoke_method(module, name, payload, timeout_s=timeout_s)

    async def stats_when(predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            r = await invoke("getStats")
            return r.payload if r.status == 200 and predicate(r.payload) else None
        got: dict[str, Any] = await until(probe)
        return got

    def security() -> list[Any]:
        return [m for m in hub.messages(MODULE) if m.output_name == "security"]

    try:
        async with asyncio.timeout(LIMIT_S):
            # The module answers once it has subscribed; the replay is done when every frame is analysed and the
            # two alerts (the demo's cleartext logins, batched: one or two messages) are acknowledged.
            stats = await stats_when(lambda s: s["capture"]["analyzed_frames"] == reference["capture"]["packets"]
                                     and s["uplink"]["messages_sent"] >= 1 and s["uplink"]["queue_messages"] == 0)
            assert stats["leaves"]["seen"] == len(reference["leaves"])
            assert [a["type"] for a in stats["alerts"]["by_type"]] == ["cleartext_login"]

            everything = await invoke("getInventory", {"pageSize": 200})
            assert everything.status == 200 and everything.payload["nextCursor"] is None
            assert [leaf["mac"] for leaf in everything.payload["leaves"]] == [x["mac"] for x in reference["leaves"]]
            missing = await invoke("getInventory", {"mac": "02:00:00:00:00:99"})
            assert missing.status == 404 and missing.payload["field"] == "mac"
            bad = await invoke("getInventory", {"pageSize": 0})
            assert bad.status == 400 and "pageSize" in bad.payload["error"]

            # A replay's security messages are built at packet time: none is due yet, all events are queued.
            assert security() == [] and stats["agents"]["by_priority"]
            pending = sum(p["pending"] for p in stats["agents"]["by_priority"])
            assert pending > 0

            # A flush that waits for acknowledgements the hub holds back: it answers when its wait ends, and the
            # loop answers other methods meanwhile.
            hub.stall_pubacks()
            started = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                flush = tg.create_task(invoke("flush", {"waitS": 2}), name="test.flush")
                await asyncio.sleep(0.2)  # the flush is in progress in the module
                quick = await invoke("getStats")
                quick_s = time.monotonic() - started
            waited, waited_s = flush.result(), time.monotonic() - started
            assert quick.status == 200 and quick_s < 1.5
            assert waited.status == 200 and waited.payload["messages"] > 0 and waited.payload["sent"] is False
            assert 2.0 <= waited_s < 4.0
            # Longer than the module's method timeout (3 s here): answered 504 in time, not left to the hub.
            started = time.monotonic()
            late = await invoke("flush", {"waitS": 10}, timeout_s=15)
            assert late.status == 504 and "3 s" in late.payload["error"]
            assert 3.0 <= time.monotonic() - started < 5.0

            hub.release_pubacks()
            done = await invoke("flush", {"waitS": 10}, timeout_s=15)
            # Nothing new to pack; what was held is acknowledged within the wait.
            assert done.status == 200 and done.payload["messages"] == 0 and done.payload["sent"] is True
            assert len(security()) == waited.payload["messages"]
            after = await stats_when(lambda s: True)
            assert sum(p["pending"] for p in after["agents"]["by_priority"]) == 0
            assert after["agents"]["messages"] == waited.payload["messages"]

            muted = await invoke("mute", {"type": "cleartext_login", "mac": SENSOR_MAC, "forS": 600})
            assert muted.status == 200
            assert muted.payload["rules"] == [{"type": "cleartext_login", "mac": SENSOR_MAC,
                                               "until": muted.payload["muted"]["until"]}]
            refused = await invoke("mute", {"type": "cleartext-login", "forS": 600})
            assert refused.status == 400 and refused.payload["field"] == "type"
            learned = await invoke("learn", {})
            assert learned.status == 200 and learned.payload == {"learned": len(reference["leaves"])}
            calls = {(c["method"], c["status"]): c["count"] for c in (await stats_when(lambda s: True))["methods"]}
            assert calls[("getInventory", 404)] == 1 and calls[("getInventory", 400)] == 1
            assert calls[("mute", 200)] == calls[("mute", 400)] == calls[("learn", 200)] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(LIMIT_S):
            _out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def test_transport_answers_503_when_busy_500_for_a_broken_handler_and_stays_up(
    hub: HubEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
    for name, value in hub.edge_environment(module).items():
        monkeypatch.setenv(name, value)
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(name: str, payload: object) -> MethodResult:
        if name == "slow":
            started.set()
            await release.wait()
            return MethodResult(200, {"slow": True})
        if name == "broken":
            raise RuntimeError("a bug in a handler")
        return MethodResult(200, {"echo": payload})

    settings = dataclasses.replace(EdgeSettings.from_env(os.environ), max_concurrent_methods=1)
    transport = EdgeTransport(settings)
    transport.method_handler = handler
    async with asyncio.timeout(LIMIT_S), asyncio.TaskGroup() as tg:
        tg.create_task(transport.run(), name="test.transport")
        try:
            # Answered once the transport has connected and subscribed to methods.
            async def answered() -> bool:
                return bool((await hub.invoke_method(module, "echo", {"n": 0}, timeout_s=2)).status == 200)

            await until(answered, interval_s=0.2)
            slow = tg.create_task(hub.invoke_method(module, "slow", None, timeout_s=10), name="test.slow")
            await started.wait()
            busy = await hub.invoke_method(module, "echo", {"n": 1})
            assert busy.status == 503 and "in progress" in busy.payload["error"]
            release.set()
            assert (await slow).payload == {"slow": True}
            broken = await hub.invoke_method(module, "broken", None)
            assert broken.status == 500 and "module log" in broken.payload["error"]
            # The uplink's tasks survived the bug: the next call is answered.
            assert (await hub.invoke_method(module, "echo", {"n": 2})).payload == {"echo": {"n": 2}}
            assert transport.stats.method_busy == 1
        finally:
            await transport.shutdown(5.0)
