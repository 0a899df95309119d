"""The durable uplink, measured: the spool's write and replay rates per fsync policy, recovery after kill -9 with
a full spool, messages delivered per second through the hub emulator (real SDK, TLS) with and without a PUBACK
delay, one message in flight against the default window, and events per message under load.

    python3 -m benchmarks.uplink [--messages 20000] [--delivered 200] [--frames 300000] [--dir DIR]

Every message is a real Defender security message (those of the demo capture, sent again and again). Spools are
written in temporary directories under ``--dir`` (default: the system's temporary directory); the emulator
listens on loopback only. The figures are in the README's "Durable uplink" table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import orjson

from leafguard.agent.messages import OutgoingMessage
from leafguard.agent.offline import write_security_messages
from leafguard.demo import demo_capture
from leafguard.hub.link import LinkState
from leafguard.hub.outbox import Outbox
from leafguard.hub.settings import EdgeSettings
from leafguard.hub.spool import DEFAULT_SPOOL_MAX_BYTES, FsyncPolicy, Spool, SpoolSettings
from leafguard.hub.transport import EdgeTransport

COMMIT_EVERY = 16
"""Messages per commit: the service commits once per batch of messages it queues."""
DEFAULT_WINDOW = cast(int, next(f.default for f in dataclasses.fields(EdgeSettings) if f.name == "inflight_window"))


def demo_messages() -> list[OutgoingMessage]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "messages.jsonl"
        write_security_messages([demo_capture()], path)
        docs = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [
        OutgoingMessage(d["identity"], orjson.dumps(d["body"]), d["properties"]["MessagePriority"],
                        len(d["body"]["Events"]))
        for d in docs
    ]  # fmt: skip


def cycle(messages: list[OutgoingMessage], n: int) -> Iterator[OutgoingMessage]:
    for i in range(n):
        yield messages[i % len(messages)]


# -- the spool on its own -------------------------------------------------------------------------------------


def spool_rates(messages: list[OutgoingMessage], n: int, policy: FsyncPolicy, base: Path) -> dict[str, float]:
    """Write ``n`` messages through the outbox into the spool, close it, replay it: the rates of both."""
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        settings = SpoolSettings(Path(tmp), max_bytes=4 * DEFAULT_SPOOL_MAX_BYTES, fsync=policy)
        spool, _ = Spool.open(settings)
        outbox = Outbox(settings.max_bytes, spool)
        size = 0
        t0 = time.perf_counter()
        for i, message in enumerate(cycle(messages, n), 1):
            outbox.put(message)
            size += len(message.body)
            if i % COMMIT_EVERY == 0:
                outbox.commit(time.monotonic())
        outbox.commit(time.monotonic())
        write_s = time.perf_counter() - t0
        fsyncs = spool.fsyncs
        spool.close(time.monotonic())
        t0 = time.perf_counter()
        spool, recovery = Spool.open(settings)
        replay_s = time.perf_counter() - t0
        assert len(recovery.messages) == n, (len(recovery.messages), n)
        spool.close(time.monotonic())
    mb = size / 1e6
    return {"write_msgs_s": n / write_s, "write_mb_s": mb / write_s, "replay_msgs_s": n / replay_s,
            "replay_mb_s": mb / replay_s, "fsyncs": float(fsyncs)}  # fmt: skip


FILL = """
import sys, time
from pathlib import Path
from benchmarks.uplink import demo_messages
from leafguard.hub.outbox import Outbox
from leafguard.hub.spool import Spool, SpoolSettings
settings = SpoolSettings(Path(sys.argv[1]))
spool, _ = Spool.open(settings)
outbox = Outbox(settings.max_bytes, spool)
messages = demo_messages()
i = 0
while outbox.stats.dropped == 0:
    outbox.put(messages[i % len(messages)])
    i += 1
    if i % 16 == 0:
        outbox.commit(time.monotonic())
outbox.commit(time.monotonic())
print(len(outbox), outbox.bytes, flush=True)
time.sleep(600)
"""


def recovery_after_kill(base: Path) -> dict[str, float]:
    """A process fills a spool of the default budget until the policy drops, and is killed with SIGKILL; the spool
    is then opened again as a restarted module opens it."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root / "module"), str(root)])}
        proc = subprocess.Popen([sys.executable, "-c", FILL, tmp], stdout=subprocess.PIPE, env=env, cwd=root)
        assert proc.stdout is not None
        queued, queued_bytes = (int(x) for x in proc.stdout.readline().split())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.perf_counter()
        spool, recovery = Spool.open(SpoolSettings(Path(tmp)))
        outbox = Outbox(spool.settings.max_bytes, spool)
        outbox.recover(recovery)
        elapsed = time.perf_counter() - t0
        recovered = len(outbox)
        spool.close(time.monotonic())
    return {"queued": float(queued), "recovered": float(recovered), "mib": queued_bytes / 2**20,
            "recovery_s": elapsed, "torn": float(recovery.torn_records),
            "corrupt": float(recovery.corrupt_records)}  # fmt: skip


# -- through the emulator -------------------------------------------------------------------------------------


async def delivered_rate(messages: list[OutgoingMessage], n: int, delay_s: float, window: int) -> float:
    """Messages per second the transport gets acknowledged through the emulator (real SDK, TLS)."""
    from testkit.wait import until
    from tests.hub_emulator import HubEmulator

    async with HubEmulator.start(thread=True) as hub:
        module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
        saved = dict(os.environ)
        os.environ.update(hub.edge_environment(module))  # the SDK's edge client reads its environment
        try:
            settings = dataclasses.replace(EdgeSettings.from_env(os.environ), inflight_window=window)
            transport = EdgeTransport(settings)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(transport.run(), name="bench.transport")
                try:
                    async with asyncio.timeout(300):
                        await until(lambda: transport.state is LinkState.CONNECTED)
                        hub.delay_pubacks(delay_s)
                        t0 = time.perf_counter()
                        transport.submit(list(cycle(messages, n)))
                        await until(lambda: transport.outbox.stats.acked >= n, interval_s=0.002)
                        elapsed = time.perf_counter() - t0
                finally:
                    await transport.shutdown(5.0)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return n / elapsed


def events_per_message(frames: int, base: Path, delay_s: float) -> dict[str, float]:
    """``leafguard run`` in edge mode on a generated capture replayed as fast as it goes, its agents at their
    default configuration, the hub acknowledging each message after ``delay_s``: what the emulator receives."""
    from testkit.gen_capture import ensure_capture
    from tests.hub_emulator import HubEmulator

    capture = ensure_capture(frames)

    async def run() -> dict[str, float]:
        async with HubEmulator.start(thread=True, max_messages=1_000_000) as hub:
            module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
            hub.delay_pubacks(delay_s)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "LEAFGUARD_"))}
            env |= hub.edge_environment(module) | {"LEAFGUARD_HTTP_PORT": "off"}
            with tempfile.TemporaryDirectory(dir=base) as tmp:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "leafguard", "run", "--pcap", str(capture), "--replay-speed", "0",
                    "--data-dir", tmp, env=env, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                # The replay is over once nothing has arrived for 5 s; SIGTERM's final flush sends the rest.
                last, quiet_since, started = -1, time.monotonic(), time.monotonic()
                while time.monotonic() - quiet_since < 5 and time.monotonic() - started < 600:
                    count = len(hub.messages(module))
                    if count != last:
                        last, quiet_since = count, time.monotonic()
                    await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
            bodies = [orjson.loads(m.body) for m in hub.messages(module)]
        counts = [len(doc["Events"]) for doc in bodies if isinstance(doc, dict) and "Events" in doc]
        return {"messages": float(len(counts)), "events": float(sum(counts)),
                "mean": statistics.fmean(counts) if counts else 0.0,
                "median": float(statistics.median(counts)) if counts else 0.0}  # fmt: skip

    return asyncio.run(run())


def state_cost(leaves: int, events_per_leaf: int, base: Path) -> dict[str, float]:
    """The saved state (``state.json``) of ``leaves`` agents with ``events_per_leaf`` events each in their caches
    and aggregation maps: the time taken on the loop, the time to encode and write it (a thread), its size, and
    the time to restore it at start-up."""
    from leafguard.agent.config import AgentConfig
    from leafguard.agent.fleet import Fleet
    from leafguard.detect.detectors import Detectors
    from leafguard.observe.model import ConnectionSeen, LoginSeen
    from leafguard.service.state import StateKeeper, StateSettings

    t0 = 1_767_225_600.0
    fleet = Fleet(AgentConfig(), max_leaves=leaves)
    for i in range(leaves):
        mac = f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        for j in range(events_per_leaf):
            fleet.observe(
                LoginSeen(t0 + j, mac, "telnet", "In", "10.0.0.2", 23, "10.0.0.66", 40000 + j, "admin", "Fail")
                if j % 2 else
                ConnectionSeen(t0 + j, mac, "Out", "tcp", "10.0.0.2", 50000, "10.0.0.9", 1000 + j, "EST", 1234)
            )  # fmt: skip
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        keeper = StateKeeper(StateSettings(Path(tmp)), fleet, Detectors())
        started = time.perf_counter()
        doc = keeper.document(0.0, clock=t0 + events_per_leaf)
        taken = time.perf_counter() - started
        keeper.write(doc)
        written = time.perf_counter() - started - taken
        size = (Path(tmp) / "state.json").stat().st_size
        started = time.perf_counter()
        StateKeeper(StateSettings(Path(tmp)), Fleet(AgentConfig(), max_leaves=leaves), Detectors()).load(t0)
        loaded = time.perf_counter() - started
    return {"events": float(fleet.stats().pending), "taken_s": taken, "written_s": written, "mb": size / 1e6,
            "restored_s": loaded}


def journal_cost(observations: int, leaves: int, base: Path) -> dict[str, float]:
    """The event journal beside the state: the same observations into two fleets side by side, one journalling
    (committed every 256, the service's batches), one not; then a restart's read and replay of that journal."""
    from leafguard.agent.config import AgentConfig
    from leafguard.agent.fleet import Fleet
    from leafguard.observe.model import ConnectionSeen
    from leafguard.service.journal import EventJournal

    t0 = 1_767_225_600.0
    seen = [ConnectionSeen(t0 + i * 0.001, f"02:00:00:00:{i % leaves >> 8 & 255:02x}:{i % leaves & 255:02x}", "Out",
                           "tcp", "10.0.0.2", 50000 + i % 10_000, "10.0.0.9", 1000 + i % 50_000, "EST", 1234)
            for i in range(observations)]  # fmt: skip

    def feed(fleet: Fleet, journal: EventJournal | None) -> float:
        started = time.perf_counter()
        for i in range(0, len(seen), 256):
            for obs in seen[i : i + 256]:
                fleet.observe(obs)
            fleet.tick(seen[min(i + 255, len(seen) - 1)].ts)
            if journal is not None:
                journal.commit(time.monotonic())
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory(dir=base) as tmp:
        journal = EventJournal(Path(tmp))
        journal.start(1, 0)
        plain, journalled = Fleet(AgentConfig()), Fleet(AgentConfig())
        journalled.journal = journal
        without = feed(plain, None)
        with_journal = feed(journalled, journal)
        journal.close()
        size = journal.segment_bytes
        started = time.perf_counter()
        found = EventJournal(Path(tmp)).read(None)
        read = time.perf_counter() - started
        started = time.perf_counter()
        Fleet(AgentConfig()).replay(found.ops)
        replayed = time.perf_counter() - started
    return {"without_us": without / observations * 1e6, "with_us": with_journal / observations * 1e6,
            "bytes": size / observations, "read_s": read, "replay_s": replayed, "mib": size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000, help="messages written per fsync policy")
    ap.add_argument("--delivered", type=int, default=200, help="messages sent through the emulator per case")
    ap.add_argument("--frames", type=int, default=300_000, help="frames of the generated capture under load")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the spools are written")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["spool", "kill", "emulator", "load", "state", "journal"])
    args = ap.parse_args()
    messages = demo_messages()
    mean_size = statistics.fmean(len(m.body) for m in messages)
    print(f"{len(messages)} demo messages, mean body {mean_size:,.0f} bytes; spools under {args.dir}")

    if "spool" not in args.skip:
        print(f"\nspool, {args.messages:,} messages, a commit every {COMMIT_EVERY}:")
        print(f"{'fsync':>9} {'write msg/s':>12} {'write MB/s':>11} {'replay msg/s':>13} {'replay MB/s':>12} fsyncs")
        for policy in FsyncPolicy:
            r = spool_rates(messages, args.messages, policy, args.dir)
            print(f"{policy.value:>9} {r['write_msgs_s']:12,.0f} {r['write_mb_s']:11.1f} "
                  f"{r['replay_msgs_s']:13,.0f} {r['replay_mb_s']:12.1f} {r['fsyncs']:6.0f}")  # fmt: skip

    if "kill" not in args.skip:
        r = recovery_after_kill(args.dir)
        print(f"\nkill -9 with a full default spool: {r['recovered']:,.0f} of {r['queued']:,.0f} messages "
              f"({r['mib']:.1f} MiB) recovered in {r['recovery_s']:.2f} s "
              f"({r['torn']:.0f} torn, {r['corrupt']:.0f} corrupt records)")  # fmt: skip

    if "emulator" not in args.skip:
        print(f"\ndelivered through the emulator, {args.delivered} messages per case (msg/s):")
        for delay in (0.0, 0.05):
            one = asyncio.run(delivered_rate(messages, args.delivered, delay, 1))
            many = asyncio.run(delivered_rate(messages, args.delivered, delay, DEFAULT_WINDOW))
            print(f"  PUBACK after {delay * 1000:3.0f} ms: window 1 {one:8.1f}, window {DEFAULT_WINDOW} "
                  f"{many:8.1f} ({many / one:.1f}x)")

    if "load" not in args.skip:
        print(f"\nunder load ({args.frames:,} frames replayed at full speed, default agent configuration):")
        for delay in (0.0, 0.05):
            r = events_per_message(args.frames, args.dir, delay)
            print(f"  PUBACK after {delay * 1000:3.0f} ms: {r['messages']:6,.0f} security messages, "
                  f"{r['events']:7,.0f} events, {r['mean']:5.1f} events per message (median {r['median']:.0f})")

    if "state" not in args.skip:
        print("\nsaved state (state.json), 20 events per leaf waiting in the caches and aggregation maps:")
        for leaves in (100, 1000, 10_000):
            r = state_cost(leaves, 20, args.dir)
            print(f"  {leaves:6,} leaves: taken on the loop in {r['taken_s'] * 1000:6.0f} ms, encoded and written in "
                  f"{r['written_s'] * 1000:6.0f} ms ({r['mb']:5.1f} MB), restored in {r['restored_s'] * 1000:6.0f} ms")

    if "journal" not in args.skip:
        r = journal_cost(200_000, 1000, args.dir)
        print(f"\nevent journal, 200,000 observations of 1,000 leaves, a commit every 256: "
              f"{r['without_us']:.2f} us per observation without, {r['with_us']:.2f} us with "
              f"({r['with_us'] / r['without_us']:.2f}x), {r['bytes']:.0f} bytes each ({r['mib']:.1f} MiB); "
              f"a restart reads it in {r['read_s']:.2f} s and applies it in {r['replay_s']:.2f} s")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
