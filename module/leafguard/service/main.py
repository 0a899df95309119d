"""`leafguard run`: one asyncio.Runner on uvloop, one root TaskGroup, ordered shutdown.

Tasks (all children of the root group, all named):

* ``leafguard.source``: live capture (:class:`~leafguard.capture.live.LiveCapture`, its own threads and
  supervisors) or a paced replay of capture files; either way batches land in one bounded queue.
* ``leafguard.pipeline``: batches → the analyzer → the Defender agents → the output: the local folder, or in
  edge mode (inside IoT Edge) the hub transport.
* ``leafguard.periodic``: wall-clock ticks (live), desired-properties polling, capture-drop diagnostics, and the
  atomic rewrite of ``leaves.json`` / ``conversations.json`` / ``stats.json``.
* ``leafguard.http``: ``/healthz`` and ``/metrics`` (edge mode: port 9600 by default), served from
  :meth:`Service.snapshot`.
* ``leafguard.hub`` (edge mode): :class:`~leafguard.hub.transport.EdgeTransport`, the edge hub connection.

SIGINT/SIGTERM only set an event. Shutdown then runs in order against a deadline: stop the source (capture
threads joined), drain what is queued into the analyzer, stop the periodic task, flush the agents (their last
messages) and write the final files (edge mode: flush the transport's outbox, close the client), close HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import uvloop

from leafguard import __version__
from leafguard.agent.fleet import make_fleet
from leafguard.capture.batch import FrameBatch
from leafguard.capture.caps import CAP_NET_RAW, raise_permitted
from leafguard.capture.live import interface_macs
from leafguard.detect.thresholds import THRESHOLD_KEYS
from leafguard.documents import check_document
from leafguard.errors import CaptureError, ConfigurationError, LeafGuardError
from leafguard.hub.spool import FsyncPolicy
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from leafguard.service.files import write_json_atomic
from leafguard.service.gateway import (
    DETECTION_KEYS,
    CaptureDefaults,
    GatewaySettingsFile,
    RunDefaults,
    apply_capture_section,
    apply_intervals_section,
    apply_network_section,
    apply_uplink_section,
    parse_detection,
    parse_leaf_entries,
    unknown_keys,
)
from leafguard.service.outputs import EdgeOutput, LocalOutput, ServiceOutput
from leafguard.service.settings import ServiceSettings
from leafguard.service.snapshot import (
    DownTracker,
    MetricLabels,
    ServiceSnapshot,
    build_snapshot,
    capture_up,
    interfaces_of,
    uplink_up,
)
from leafguard.service.state import Restored, StateKeeper, StateSettings
from leafguard.service.triage import Triage

if TYPE_CHECKING:
    from leafguard.hub.leaf_clients import LeafClients
    from leafguard.hub.methods import MethodDispatcher
    from leafguard.hub.transport import EdgeTransport

log = logging.getLogger("leafguard.service")

_UNSEEN = object()
"""A settings section not applied yet: differs from every section a document can hold, null included."""

REPLAY_QUEUE_BATCHES = 64


def run_service(args: argparse.Namespace) -> int:
    # Before any thread starts (capabilities are per thread): a non-root image's permitted CAP_NET_RAW.
    raise_permitted(CAP_NET_RAW)
    settings = ServiceSettings.from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Start-up (restoring the state and its journal, replaying the spool) can take seconds: a stop asked for
    # meanwhile is kept and honoured once the loop runs, instead of killing the process half-way.
    early: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    service = Service(settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(service.run(early))


class Service:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.analyzer = Analyzer(settings.analyzer)
        self.fleet = make_fleet()
        self.out: ServiceOutput
        self.methods: MethodDispatcher | None = None
        if settings.edge is not None:
            edge = EdgeOutput.open(settings, self.fleet)
            self.out = edge
            self.analyzer.detectors.forward = []
            self._serve_methods(edge.transport, edge.leaves)
        else:
            assert settings.local_dir is not None
            self.out = LocalOutput(settings.local_dir, self.fleet)
        self.capture: Any = None
        self.queue: asyncio.Queue[FrameBatch] = asyncio.Queue(REPLAY_QUEUE_BATCHES)
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        self.labels = MetricLabels.from_env()
        self._capture_down = DownTracker(time.monotonic())
        self._uplink_down = DownTracker(time.monotonic())
        self.batches = 0
        self.replay_done = False
        self._drops_reported = 0
        self._drops_counted = 0
        self.capture_filter: dict[str, Any] = {"extraFilter": settings.extra_filter, "error": None}
        """The capture section in force (the extra filter; live: the interfaces and promiscuous mode too), and
        why the last change was refused (if it was)."""
        if settings.live:
            self.capture_filter |= {"interfaces": list(settings.interfaces), "promiscuous": settings.promiscuous}
        self.write_interval_s = settings.write_interval_s
        self._run_defaults = RunDefaults(
            write_interval_s=settings.write_interval_s if settings.local_dir is not None else None,
            reported_interval_s=settings.edge.reported_interval_s if settings.edge is not None else None,
            uplink_max_bytes=(
                None if settings.edge is None
                else settings.spool.max_bytes if settings.spool is not None
                else settings.edge.outbox_max_bytes
            ),
        )  # fmt: skip
        # Sections of the settings document and what is in force of each (``error``: why the last was refused).
        self.section_status: dict[str, dict[str, Any]] = {
            "network": {
                "leafNets": [str(n) for n in settings.analyzer.leaf_nets],
                "gatewayMacs": sorted(settings.analyzer.gateway_macs),
                "error": None,
            },
            "intervals": {
                "writeIntervalS": self._run_defaults.write_interval_s,
                "reportedIntervalS": self._run_defaults.reported_interval_s,
                "error": None,
            },
            "uplink": {"maxBytes": self._run_defaults.uplink_max_bytes, "error": None},
        }
        self._sections: dict[str, object] = dict.fromkeys(self.section_status, _UNSEEN)
        self.settings_warnings: list[str] = []
        """Keys of the settings document in force that nothing reads."""
        self._gateway_file = GatewaySettingsFile(settings.local_dir) if settings.local_dir is not None else None
        # The sections of the settings document last applied (`_UNSEEN`: none yet, or an unreadable one since).
        self._gateway_section: object = _UNSEEN
        self._leaf_map_section: object = _UNSEEN
        self.leaf_map_status: dict[str, Any] = {"leaves": 0, "error": None}
        self.detection_status: dict[str, Any] = _detection_status(settings.analyzer) | {"error": None}
        self._detection_section: object = _UNSEEN
        self.triage = Triage(self.analyzer)
        self._last_drop_report = 0.0
        self.state: StateKeeper | None = None
        self.restored: Restored | None = None
        self.replay_frames = 0
        """Frames of the replay handed to the analyzer (with those a restored state skipped)."""
        self._open_state(settings)
        if settings.live:
            from leafguard.capture.live import CaptureSettings, LiveCapture

            try:
                cs = CaptureSettings(
                    interfaces=settings.interfaces,
                    promiscuous=settings.promiscuous,
                    extra_filter=settings.extra_filter,
                )
            except ValueError as exc:
                raise CaptureError(str(exc)) from exc
            self.capture = LiveCapture(cs)
            self.queue = self.capture.queue

    def _open_state(self, settings: ServiceSettings) -> None:
        """The saved state of the data directory (``--local-dir`` / ``--data-dir``), restored before any input."""
        import os

        directory = settings.local_dir if settings.local_dir is not None else (
            settings.spool.directory if settings.spool is not None else None)
        state_settings = StateSettings.from_env(directory, os.environ)
        if state_settings is None:
            return
        spool = settings.spool
        # The journal is as durable as the spool beside it (local mode: the spool's default policy).
        state = self.state = StateKeeper(
            state_settings, self.fleet, self.analyzer.detectors,
            fsync=spool.fsync if spool is not None else FsyncPolicy.INTERVAL,
            fsync_interval_s=spool.fsync_interval_s if spool is not None else 1.0)
        restored = state.load(time.time())
        self.replay_frames = rolled_back = self.out.resume(restored, settings.pcap)
        if rolled_back:
            state.discard_journal()  # the resumed replay takes those inputs in again
        else:
            # The same capture again (edge mode: what was sent cannot be taken back): the agents as the journal
            # left them, and the replay resumes after the frames its inputs came from.
            saved = restored.replay_of(settings.pcap) if restored is not None else None
            restored = state.replay_journal(restored, resuming=saved is not None)
            found = state.journal_read
            if saved is not None:
                # No batch after the save: the state's own position.
                marked = found.frames if found is not None else None
                self.replay_frames = marked if marked is not None else saved.frames
                log.info("state: resuming the replay of %s after %d frames", settings.pcap, self.replay_frames)
        self.restored = restored
        state.start_journal(restored)
        if restored is not None and not rolled_back:
            self.out.reconcile(restored)
        if state.journal_replayed or (state.journal_read is not None and state.journal_read.error):
            # The state now holds what the journal had: saved at once, so the journal starts again from it.
            self._save_state(time.monotonic())
        self._publish_state()

    def _clock(self) -> float | None:
        """The service's clock: wall-clock time live, packet time of a replay (a restored one before any frame)."""
        if self.settings.live:
            return time.time()
        if self.analyzer.now is not None:
            return self.analyzer.now
        return self.restored.clock if self.restored is not None else None

    def _save_state(self, mono: float) -> None:
        if self.state is not None:
            self.state.write(self.state.document(mono, **self._state_position()))
            self._publish_state()

    async def _save_state_in_thread(self, mono: float) -> None:
        if self.state is not None:
            await self.state.save_async(mono, **self._state_position())
            self._publish_state()

    def _state_position(self) -> dict[str, Any]:
        """The clock and where the output stands, saved with the state (see `leafguard.service.state`)."""
        from leafguard.service.state import ReplayPosition

        pcap = self.settings.pcap
        return {
            "clock": self._clock(),
            **self.out.position(),
            "replay": ReplayPosition.of(pcap, self.replay_frames) if pcap is not None and not self.settings.live
            else None,
        }

    def _publish_state(self) -> None:
        if self.state is not None:
            # With the next health report: a save is no change of state worth a patch of its own.
            self.out.publish_gateway_status({"state": self.state.status()}, refresh=False)

    async def run(self, early_signals: Sequence[int] = ()) -> int:
        """Until SIGINT or SIGTERM (``early_signals``: those that came while the service was being set up)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        if early_signals:
            log.info("stop requested during start-up (signal %d)", early_signals[0])
            self.stopping.set()
        source = (
            "capture on " + ", ".join(self.settings.interfaces)
            if self.settings.live
            else f"replay of {self.settings.pcap}"
        )
        if self.settings.edge is not None:
            log.info("leafguard %s: %s, edge mode as %s", __version__, source, self.settings.edge.identity)
        else:
            log.info("leafguard %s: %s, local mode in %s", __version__, source, self.settings.local_dir)
        # Settings already in place (a leaf map, a filter) apply before the first frame is analysed.
        self._poll_gateway_settings(time.time())
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = {
                    "source": tg.create_task(self._source(), name="leafguard.source"),
                    "pipeline": tg.create_task(self._pipeline(), name="leafguard.pipeline"),
                    "periodic": tg.create_task(self._periodic(), name="leafguard.periodic"),
                }
                tasks["output"] = tg.create_task(self.out.run(), name="leafguard.output")
                http = await self._start_http()
                await self.stopping.wait()
                log.info("stopping")
                await self._shutdown(tasks)
                if http is not None:
                    await http.cleanup()
        except* LeafGuardError as group:
            # An expected failure (no CAP_NET_RAW, bad filter): the CLI prints it as one line.
            raise group.exceptions[0] from None
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        log.info("stopped cleanly after %d batches", self.batches)
        if (up := self.out.uplink_counters()) is not None:
            log.info("uplink: %d messages sent (%d bytes), %d dropped, %d still queued",
                     up["sent"], up["sent_bytes"], up["dropped"], up["queued"])
        return 0

    def _serve_methods(self, transport: EdgeTransport, leaves: LeafClients | None) -> None:
        """Direct methods on the module (edge mode), answered from the service's parts."""
        from leafguard.hub.methods import MethodDispatcher
        from leafguard.service.control import DetectionControl, ServiceControl

        def clock() -> float | None:
            return time.time() if self.settings.live else self.analyzer.now

        control = ServiceControl(
            analyzer=self.analyzer,
            fleet=self.fleet,
            transport=transport,
            snapshot=self.snapshot,
            clock=clock,
            managed_macs=lambda: leaves.managed_macs() if leaves is not None else (),
            leaves=leaves,
        )
        self.methods = MethodDispatcher(control, DetectionControl(self.analyzer, clock))
        transport.method_handler = self.methods.handle

    async def _start_http(self) -> Any:
        s = self.settings
        if s.http_port is None:
            return None
        from leafguard.service.http import start_http

        try:
            return await start_http(self, s.http_host, s.http_port, s.health_down_after_s)
        except OSError as exc:
            # Monitoring is not worth stopping the guarding for (and a restart loop would not free the port).
            log.error("cannot serve /healthz and /metrics on %s:%d: %s", s.http_host, s.http_port, exc.strerror or exc)
            return None

    def snapshot(self) -> ServiceSnapshot:
        """The statistics of this moment, for ``/metrics``, ``/healthz`` and the ``getStats`` method."""
        mono = time.monotonic()
        interfaces = interfaces_of(self.capture) if self.capture is not None else None
        counters = self.out.uplink_counters()
        return build_snapshot(
            version=__version__,
            started_at=self.started_at,
            taken_at=time.time(),
            batches=self.batches,
            labels=self.labels,
            analyzer=self.analyzer,
            fleet=self.fleet,
            interfaces=interfaces,
            capture_down_for_s=self._capture_down.update(capture_up(interfaces), mono) if interfaces else None,
            uplink=counters,
            uplink_down_for_s=self._uplink_down.update(uplink_up(counters), mono) if counters else None,
            managed_leaves=self.out.managed_leaves,
            method_calls=self.methods.calls if self.methods is not None else None,
            state=self.state.snapshot() if self.state is not None else None,
        )

    def _track_outages(self) -> None:
        """Sample capture and uplink state every tick, so outages are timed between scrapes too."""
        mono = time.monotonic()
        if self.capture is not None:
            self._capture_down.update(capture_up(interfaces_of(self.capture)), mono)
        if (counters := self.out.uplink_counters()) is not None:
            self._uplink_down.update(uplink_up(counters), mono)

    async def _shutdown(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        deadline = self.settings.shutdown_deadline_s
        for name in ("source", "pipeline", "periodic"):
            task = tasks[name]
            task.cancel()
            # We cancelled it ourselves, so its CancelledError is expected; anything else propagates.
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(deadline):
                    await task
            if name == "pipeline":
                while not self.queue.empty():
                    self._process(self.queue.get_nowait())
        # Drops seen since the last tick still reach the agents' final statistics.
        self._report_capture_drops(time.time())
        self.out.close(self._clock())
        # Send what is queued against the deadline, then close the connections; the output's task ends with them.
        await self.out.shutdown(deadline)
        await tasks["output"]
        # Last, so that it records the output as the final flush left it (the agents' caches are empty now).
        self._save_state(time.monotonic())
        if self.state is not None:
            self.state.close()
        self._write_files()

    async def _source(self) -> None:
        if self.capture is not None:
            await self.capture.run()
            return
        from leafguard.capture.replay import PcapReplay, slice_batch

        assert self.settings.pcap is not None
        speed = self.settings.replay_speed
        replay = PcapReplay([self.settings.pcap], speed=speed if speed > 0 else float("inf"))
        skip = self.replay_frames  # analysed before a restart (a restored state)
        async for frames in replay:
            batch = frames
            if skip:
                if len(frames) <= skip:
                    skip -= len(frames)
                    continue
                batch, skip = slice_batch(frames, skip, len(frames)), 0
            # Overflow policy "block": a replay waits for the pipeline rather than losing frames.
            await self.queue.put(batch)
        self.replay_done = True
        if self.settings.stop_after_replay:
            log.info("demo replay finished: %d frames; stopping, the final flush sends the security messages",
                     replay.frames)
            self.stopping.set()
            return
        log.info("replay finished: %d frames; waiting for SIGINT/SIGTERM", replay.frames)

    async def _pipeline(self) -> None:
        while True:
            batch = await self.queue.get()
            self._process(batch)
            # Give the periodic task and signal handling a turn between large batches.
            await asyncio.sleep(0)

    def _process(self, batch: FrameBatch) -> None:
        self.analyzer.feed(batch)
        self.replay_frames += len(batch)
        self.out.after_batch(self.analyzer)
        self.batches += 1
        fresh = self.analyzer.detectors.forward
        if fresh:
            # Drained every batch: memory holds one batch's findings, the stream upstream has no cap.
            self.analyzer.detectors.forward = []
            self.out.submit_alerts([a.to_json() for a in fresh], time.monotonic())
        if self.state is not None:
            self.state.commit_journal(time.monotonic(), frames=None if self.settings.live else self.replay_frames)

    async def _periodic(self) -> None:
        s = self.settings
        next_write = next_poll = 0.0
        while True:
            mono = time.monotonic()
            now = time.time()
            self._track_outages()
            self.out.housekeeping(mono, None if s.live else self._clock())
            if s.live:
                self.out.tick(now, self.analyzer.leaf_views)
                self._report_capture_drops(now)
            if self.state is not None:
                self.state.commit_journal(mono)
                if self.state.due(mono):
                    await self._save_state_in_thread(mono)
            arrived = self.out.desired_arrived
            if mono >= next_poll or (arrived is not None and arrived.is_set()):
                if arrived is not None:
                    arrived.clear()
                # The agents' clock (a restored one before any frame): settings apply whenever the agents can tick.
                clock = self._clock()
                if clock is not None:
                    for identity, outcome in self.out.poll_desired(clock):
                        log.info(
                            "desired properties for %s %s", identity, "applied" if outcome.accepted else "rejected"
                        )
                    self._poll_gateway_settings(clock)
                # No clock yet (a replay before its first batch): try again at the next tick.
                next_poll = mono + s.desired_poll_interval_s if clock is not None else mono
            # A shorter write interval from the settings takes effect now, not after the longer one ends.
            next_write = min(next_write, mono + self.write_interval_s)
            if mono >= next_write and s.local_dir is not None:
                self._write_files()
                next_write = mono + self.write_interval_s
            if arrived is None:
                await asyncio.sleep(s.tick_interval_s)
            else:
                # A desired patch is applied as the SDK delivers it, not at the next poll (#10 point 5).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(s.tick_interval_s):
                        await arrived.wait()

    def _poll_gateway_settings(self, now: float) -> None:
        """Apply changed gateway settings (``DIR/gateway.json`` locally, the module twin in edge mode)."""
        doc: dict[str, Any]
        try:
            if self._gateway_file is not None:
                changed, doc = self._gateway_file.changed()
                if not changed:
                    return
            else:
                desired = self.out.module_desired()
                if desired is not None and self.restored is not None and desired.version is None and not desired.doc:
                    return  # the twin has not come yet: the settings restored with the state stay in force
                doc = dict(desired.doc) if desired is not None else {}
                # Before anything compares its sections: a hostile document must not exhaust the recursion limit.
                check_document(doc, "module twin desired properties")
        except ConfigurationError as exc:
            self._reject_gateway_document(str(exc))
            return
        capture, leaf_map, detection = doc.get("capture"), doc.get("leafMap"), doc.get("detection")
        self.triage.apply(doc.get("mute"), doc.get("learn"), now)
        if self.triage.error:
            log.warning("mute/learn settings rejected, those in force stay: %s", self.triage.error)
        if detection != self._detection_section:
            self._detection_section = detection
            try:
                settings = self.analyzer.set_detection(**parse_detection(detection))
            except ConfigurationError as exc:
                self.detection_status["error"] = str(exc)
                log.warning("detection settings rejected, those in force stay: %s", exc)
            else:
                self.detection_status.update(_detection_status(settings), error=None)
        if capture != self._gateway_section:
            self._gateway_section = capture
            interfaces = self.capture_filter.get("interfaces")
            apply_capture_section(self.capture, capture, self.capture_filter, self._capture_defaults())
            if self.capture_filter["error"]:
                log.warning("capture settings rejected, those in force stay: %s", self.capture_filter["error"])
            elif self.capture_filter.get("interfaces") != interfaces:
                self._sections["network"] = _UNSEEN  # the gateway's own MACs are the new interfaces' too
        self._apply_sections(doc)
        if leaf_map != self._leaf_map_section:
            self._leaf_map_section = leaf_map
            try:
                entries = parse_leaf_entries(leaf_map)
            except ConfigurationError as exc:
                self.leaf_map_status["error"] = str(exc)
                log.warning("leaf map rejected, the map in force stays: %s", exc)
            else:
                mapping = {mac: entry.device_id for mac, entry in entries.items()}
                self.fleet.set_leaf_map(mapping, now)
                self.out.set_leaf_entries(entries)
                self.leaf_map_status.update(leaves=len(mapping), error=None)
        self._publish_gateway_status()

    def _capture_defaults(self) -> CaptureDefaults:
        s = self.settings
        return CaptureDefaults(s.extra_filter, s.interfaces, s.promiscuous)

    def _apply_sections(self, doc: dict[str, Any]) -> None:
        """The network, intervals and uplink sections, each applied as a whole when it changed."""
        warnings = unknown_keys(doc)
        if warnings != self.settings_warnings:
            self.settings_warnings = warnings
            if warnings:
                log.warning("gateway settings: nothing reads %s", ", ".join(warnings))
        transport = self.out.uplink()
        for name, status in self.section_status.items():
            section = doc.get(name)
            if section == self._sections[name]:
                continue
            self._sections[name] = section
            if name == "network":
                apply_network_section(
                    self.analyzer, section, status, self.settings.analyzer,
                    lambda: interface_macs(self.capture_filter.get("interfaces", ())),
                )  # fmt: skip
            elif name == "intervals":
                apply_intervals_section(transport, self._set_write_interval, section, status, self._run_defaults)
            else:
                apply_uplink_section(transport, section, status, self._run_defaults)
            if status["error"]:
                log.warning("%s settings rejected, those in force stay: %s", name, status["error"])

    def _set_write_interval(self, seconds: float) -> None:
        self.write_interval_s = seconds

    def _reject_gateway_document(self, error: str) -> None:
        """A settings document nobody can read: every section reports it, and every setting in force stays.

        The sections remembered are forgotten, so that the next readable document is applied section by section
        even where it equals what was in force before: the errors then describe that document, not this one.
        """
        if self.leaf_map_status["error"] != error:  # the twin is read again every poll: say it once
            log.warning("gateway settings rejected, those in force stay: %s", error)
        for status in (self.capture_filter, self.leaf_map_status, self.detection_status, *self.section_status.values()):
            status["error"] = error
        self._gateway_section = self._leaf_map_section = self._detection_section = _UNSEEN
        self._sections = dict.fromkeys(self.section_status, _UNSEEN)
        self.triage.forget(error)
        self._publish_gateway_status()

    def _publish_gateway_status(self) -> None:
        self.out.publish_gateway_status({
            "captureFilter": dict(self.capture_filter),
            "leafMap": dict(self.leaf_map_status),
            "detection": dict(self.detection_status),
            "triage": self.triage.status(self.analyzer.now or time.time()),
            "settings": self._settings_status(),
        })  # fmt: skip

    def _settings_status(self) -> dict[str, Any]:
        return {name: dict(status) for name, status in self.section_status.items()} | {
            "warnings": list(self.settings_warnings)
        }

    def _report_capture_drops(self, now: float) -> None:
        """Frames lost before the analyzer reach every leaf's agent: counted into its next DroppedEventsStatistics
        (an operational event) at once, and announced by a Diagnostic warning at most once per interval."""
        if self.capture is None:
            return
        stats = self.capture.stats()
        total = self.capture.dropped_total()  # interfaces removed live keep their drops in it
        delta = total - self._drops_counted
        if delta <= 0:
            return
        self._drops_counted = total
        self.fleet.record_capture_drops(delta)
        if now - self._last_drop_report < self.settings.drop_report_interval_s:
            return
        detail = ", ".join(
            f"{name}: kernel {st.kernel_drops}, queue {st.queue_drops}" for name, st in sorted(stats.items())
        )
        message = f"capture dropped {total - self._drops_reported} frames since the last report ({detail})"
        log.warning(message)
        self.fleet.diagnostic("Warning", message, now)
        self._drops_reported = total
        self._last_drop_report = now

    def stats(self, capture: dict[str, Any] | None = None) -> dict[str, Any]:
        if capture is None and self.analyzer.stats.packets:
            capture = self.analyzer.capture_report()
        report_capture = capture or {}
        out: dict[str, Any] = {
            "version": __version__,
            "started_at": self.started_at,
            "updated_at": time.time(),
            "batches": self.batches,
            "replay_done": self.replay_done,
            "capture_filter": self.capture_filter,
            "detection": self.detection_status,
            "triage": self.triage.status(self.analyzer.now or time.time()),
            "leaf_map": self.leaf_map_status,
            "settings": self._settings_status(),
            "capture": report_capture,
            "agents": dataclasses.asdict(self.fleet.stats()) | {"leaves": len(self.fleet.agents())},
        }
        if (uplink := self.out.uplink_counters()) is not None:
            out["uplink"] = uplink
        if self.state is not None:
            out["state"] = self.state.status()
        if self.capture is not None:
            out["interfaces"] = {name: st.as_dict() for name, st in self.capture.stats().items()}
        return out

    def _write_files(self) -> None:
        base = self.settings.local_dir
        if base is None:
            return
        report = self.analyzer.report()
        write_json_atomic(base / "leaves.json", {"updated_at": time.time(), "leaves": report["leaves"]})
        write_json_atomic(
            base / "conversations.json", {"updated_at": time.time(), "conversations": report["conversations"]}
        )
        write_json_atomic(base / "alerts.json", {"updated_at": time.time(), "alerts": report["alerts"]})
        write_json_atomic(base / "stats.json", self.stats(report["capture"]))


def _detection_status(settings: AnalyzerSettings) -> dict[str, Any]:
    """The detection settings in force, under the names operators set them with."""
    limits = settings.thresholds
    return {
        key: getattr(limits if key in THRESHOLD_KEYS else settings, field) for key, field in DETECTION_KEYS.items()
    }
