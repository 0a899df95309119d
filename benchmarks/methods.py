"""What one direct method call and one scrape cost at 10,000 leaves, on the loop they must not block.

    python3 -m benchmarks.methods [--leaves 10000] [--frames 300000] [--repeat 20]

The capture comes from `testkit.gen_capture` (cached). The analyzer and the fleet (an agent per leaf, from the
security-message pump) are built from it. Then each operation runs ``--repeat`` times the way the service runs
it: the dispatcher with the service's adapter, and the snapshot plus the Prometheus text. The median and the
worst time are printed. They are what the loop is held for, to be compared with the transport's 1 s tick and
with IoT Hub's 30 s method timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from leafguard import __version__
from leafguard.agent.fleet import make_fleet
from leafguard.agent.pump import SecurityMessagePump
from leafguard.capture.pcapfile import read_batches
from leafguard.hub.methods import MethodDispatcher
from leafguard.hub.settings import EdgeSettings
from leafguard.hub.transport import EdgeTransport
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from leafguard.service.control import DetectionControl, ServiceControl
from leafguard.service.metrics import render_snapshot
from leafguard.service.snapshot import MetricLabels, ServiceSnapshot, build_snapshot
from testkit.gen_capture import ensure_capture


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) * 1e3, max(runs) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--leaves", type=int, default=10_000)
    ap.add_argument("--frames", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    path = ensure_capture(args.frames, leaves=args.leaves)
    analyzer = Analyzer(AnalyzerSettings())
    fleet = make_fleet()
    pump = SecurityMessagePump(fleet, lambda messages: None)
    for batch in read_batches(path):
        analyzer.feed(batch)
        pump.after_batch(analyzer)
    transport = EdgeTransport(EdgeSettings(hub_hostname="hub", device_id="edge1", module_id="leafguard",
                                           gateway_hostname="edge1"))

    def snapshot() -> ServiceSnapshot:
        return build_snapshot(
            version=__version__, started_at=0.0, taken_at=time.time(), batches=0, labels=MetricLabels.from_env(),
            analyzer=analyzer, fleet=fleet, interfaces=None, capture_down_for_s=None,
            uplink=transport.counters(), uplink_down_for_s=None, managed_leaves=None,
        )  # fmt: skip

    control = ServiceControl(analyzer=analyzer, fleet=fleet, transport=transport, snapshot=snapshot,
                             clock=lambda: analyzer.now)  # fmt: skip
    methods = MethodDispatcher(control, DetectionControl(analyzer, lambda: analyzer.now))
    macs = control.leaf_page(None, args.leaves * 2).macs
    last = macs[-1]
    identity = fleet.identity_for(last)
    loop = asyncio.new_event_loop()

    def call(name: str, payload: object) -> Callable[[], Any]:
        def run() -> Any:
            result = loop.run_until_complete(methods.handle(name, payload))
            assert result.status == 200, result
            return result

        return run

    print(f"{len(macs)} leaves, {len(fleet.agents())} agents ({args.frames} frames); ms per call, median / worst "
          f"of {args.repeat}:")  # fmt: skip
    rows = [
        ("getInventory first page (100)", call("getInventory", {})),
        ("getInventory page of 200", call("getInventory", {"pageSize": 200, "cursor": macs[len(macs) // 2]})),
        ("getInventory one leaf by mac", call("getInventory", {"mac": last})),
        ("getInventory one leaf by identity", call("getInventory", {"identity": identity})),
        ("getStats", call("getStats", {})),
        ("/metrics (snapshot + text)", lambda: render_snapshot(snapshot())),
        ("mute (one rule, replaced each time)", call("mute", {"type": "new_peer", "mac": last, "forS": 600})),
        ("learn, every leaf", call("learn", {})),
    ]
    for label, fn in rows:
        median, worst = timed(fn, args.repeat)
        print(f"  {label:36s} {median:8.2f} / {worst:8.2f}")
    # flush once: it packs what every agent has queued (repeats would find the queues empty). A probe task
    # measures the longest the loop was held between two of its turns.
    events = sum(t.pending for t in fleet.totals.totals().values())
    gaps: list[float] = []

    async def flush_with_probe() -> Any:
        done = asyncio.Event()

        async def probe() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async with asyncio.TaskGroup() as tg:
            tg.create_task(probe(), name="benchmark.probe")
            result = await methods.handle("flush", {})
            done.set()
        return result

    t0 = time.perf_counter()
    result = loop.run_until_complete(flush_with_probe())
    total = (time.perf_counter() - t0) * 1e3
    print(f"  flush, once: {events} events -> {result.payload['messages']} messages in {total:.0f} ms, the loop held "
          f"at most {max(gaps) * 1e3:.1f} ms at a time")
    loop.close()


if __name__ == "__main__":
    main()
