"""Command line: `leafguard analyze` (capture files) and `leafguard run` (the service)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TextIO

import orjson

from leafguard import __version__
from leafguard.errors import LeafGuardError

BATCH_FRAMES = 16384
"""Frames per batch for `analyze`: fewer per-batch steps than 8192, measured faster; 32768 was slower again."""

if TYPE_CHECKING:
    from leafguard.agent.offline import OfflineMessageWriter
    from leafguard.capture.batch import FrameBatch
    from leafguard.capture.forked import ForkedReader
    from leafguard.detect.alerts import Alert
    from leafguard.detect.reader_rules import AttackRulesInReader
    from leafguard.observe.analyzer import Analyzer
    from leafguard.observe.settings import AnalyzerSettings


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="leafguard", description="Passive security monitoring of IoT leaf devices.")
    ap.add_argument("--version", action="version", version=f"leafguard {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    an = sub.add_parser("analyze", help="analyse capture files and print the leaf inventory and conversations")
    an.add_argument("captures", nargs="*", metavar="CAPTURE", help="pcap or pcapng files")
    an.add_argument("--demo", action="store_true", help="analyse a small built-in capture of a plant network")
    an.add_argument("--json", action="store_true", help="print one JSON document instead of a summary")
    _analysis_options(an, gateway_help="the gateway's own MAC (repeatable)")
    an.add_argument("--security-messages", metavar="FILE", help="write the Defender messages as JSON lines")
    an.add_argument("--agent-config", metavar="FILE", help="desired properties (Defender object) for every leaf")
    an.add_argument("--top", type=int, default=15, help="conversations shown in the summary (default 15)")
    an.add_argument(
        "--single-process",
        action="store_true",
        help="read capture files in this process (by default a helper process reads large files when there are "
        "two or more CPUs, so that reading overlaps the analysis)",
    )

    run = sub.add_parser("run", help="run the service (IoT Edge module, or local mode outside IoT Edge)")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--interface", action="append", metavar="IF", help="capture on this interface (repeatable)")
    src.add_argument("--pcap", metavar="FILE", help="replay a capture file instead of capturing")
    src.add_argument(
        "--demo",
        action="store_true",
        help="replay the built-in plant network (as analyze --demo), then stop: the final flush sends the messages",
    )
    run.add_argument("--replay-speed", type=float, default=1.0, help="replay speed factor; 0 = as fast as possible")
    run.add_argument("--local-dir", metavar="DIR", help="local mode: write leaves, messages and twins here")
    run.add_argument(
        "--data-dir",
        metavar="DIR",
        help="durable spool and state (LEAFGUARD_DATA_DIR; local mode: the --local-dir); none: memory only",
    )
    _analysis_options(
        run, gateway_help="the gateway's own MAC (repeatable; the capture interfaces' own MACs are added)"
    )
    run.add_argument("--write-interval", type=float, default=5.0, help="seconds between leaves.json rewrites")
    run.add_argument("--extra-filter", metavar="BPF", help="extra capture filter expression")
    run.add_argument("--no-promisc", action="store_true", help="do not put interfaces in promiscuous mode")
    run.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve /healthz and /metrics on this port (LEAFGUARD_HTTP_PORT; default 9600 in edge mode, off locally)",
    )
    run.add_argument("--http-host", metavar="ADDR", help="address to serve them on (LEAFGUARD_HTTP_HOST; 127.0.0.1)")
    run.add_argument("--leaf-secrets", metavar="FILE",
                     help="managed leaves' keys: JSON device id -> key or connection string (LEAFGUARD_LEAF_SECRETS)")
    run.add_argument("--leaf-group-key-file", metavar="FILE",
                     help="enrolment group key, each leaf's key derived from it (LEAFGUARD_LEAF_GROUP_KEY_FILE)")
    return ap


def _analysis_options(p: argparse.ArgumentParser, *, gateway_help: str) -> None:
    """The options of the analysis core and its detectors, the same for both commands."""
    p.add_argument("--leaf-net", action="append", metavar="CIDR", help="leaf-side network (repeatable)")
    p.add_argument("--gateway-mac", action="append", metavar="MAC", help=gateway_help)
    p.add_argument(
        "--learning-period", type=float, metavar="SECONDS", help="alert on leaves first seen after this long"
    )
    p.add_argument(
        "--silent-after", type=float, metavar="SECONDS", help="alert on leaves that send nothing for this long"
    )
    p.add_argument(
        "--flood-rate", type=float, metavar="FRAMES_PER_S", help="alert on leaves that send faster (over 10 s)"
    )


def entry() -> NoReturn:
    """The console script and ``python -m leafguard``."""
    argv = sys.argv[1:]
    try:
        code = main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of our output went away (`leafguard analyze big.pcap | head`): not an error worth a
        # traceback. Later writes (the interpreter's final flush) go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    if argv[:1] == ["analyze"]:
        # Everything is written and every file closed: freeing the analysis state object by object (a second
        # or so per ten million frames) would only delay the exit.
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "analyze":
            return _analyze(args)
        from leafguard.service.main import run_service

        return run_service(args)
    except LeafGuardError as exc:
        print(f"leafguard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _analyze(args: argparse.Namespace) -> int:
    captures: list[str] = list(args.captures)
    if args.demo:
        from leafguard.demo import demo_capture

        captures.append(str(demo_capture()))
    if not captures:
        print("leafguard analyze: give capture files, or --demo", file=sys.stderr)
        return 2
    # The first file's reader process starts before the analysis modules (and numpy) are imported here: the two
    # processes import at the same time, and the first batch is ready sooner.
    readers: dict[str, ForkedReader] = {}
    if not args.single_process:
        from leafguard.capture.forked import start_reader, worth_forking

        if worth_forking(captures[0]):
            # One file: its reader process runs the attack rules too (see `detect.reader_rules`).
            rules = _attack_rules(args) if len(captures) == 1 else None
            readers[captures[0]] = start_reader(
                captures[0], batch_frames=BATCH_FRAMES, prepare=_classify, rules=rules
            )
    try:
        return _analyze_captures(args, captures, readers)
    finally:
        for reader in readers.values():
            reader.close()


def _settings(args: argparse.Namespace) -> AnalyzerSettings:
    from leafguard.observe.settings import AnalyzerSettings

    return AnalyzerSettings.from_cli(
        args.leaf_net, args.gateway_mac, args.learning_period, args.silent_after, args.flood_rate
    )


def _attack_rules(args: argparse.Namespace) -> AttackRulesInReader:
    from leafguard.detect.reader_rules import AttackRulesInReader

    return AttackRulesInReader(_settings(args))


def _classify(batch: FrameBatch) -> object:
    """`fastpath.classify`, imported on first use (in the reader process)."""
    from leafguard.observe.fastpath import classify

    return classify(batch)


def _analyze_captures(args: argparse.Namespace, captures: list[str], readers: dict[str, ForkedReader]) -> int:
    messages_path: str | None = args.security_messages
    scratch = None
    if args.demo and not args.json and messages_path is None:
        # The demo shows what LeafGuard is for: the Defender messages it would send, summarised after the tables.
        import tempfile

        scratch = tempfile.mkdtemp(prefix="leafguard-demo-")
        messages_path = os.path.join(scratch, "messages.jsonl")
    try:
        return _analyze_into(args, captures, readers, messages_path)
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)


def _analyze_into(
    args: argparse.Namespace, captures: list[str], readers: dict[str, ForkedReader], messages_path: str | None
) -> int:
    from leafguard.observe.analyzer import Analyzer

    analyzer = Analyzer(_settings(args), observations=messages_path is not None)
    writer = None
    if messages_path is not None:
        from leafguard.agent.offline import OfflineMessageWriter

        writer = OfflineMessageWriter(Path(messages_path), args.agent_config)
    progress = _Progress(captures) if sys.stderr.isatty() else None
    with _fewer_collections():
        truncated_records, found_at_end = _feed(args, captures, readers, analyzer, writer, progress)
        if progress is not None:
            progress.done()
        if writer is not None:
            writer.finish(analyzer)
        analyzer.take_findings(found_at_end)  # what the analyzer's own attack rules would find in `finish`
        analyzer.finish()
        report = analyzer.report(conversations=not args.json)
        report["capture"]["truncated"] += truncated_records
        if args.json:
            _write_json(report, analyzer, sys.stdout.buffer)
        else:
            _summary(report, args.top, sys.stdout)
            if messages_path is not None:
                _message_summary(Path(messages_path), sys.stdout)
    return 0


def _message_summary(path: Path, out: TextIO) -> None:
    """Per leaf, the Defender messages the run would send and their events by type."""
    from leafguard.agent.summary import format_message_summary, summarize_messages

    with path.open("rb") as f:
        pairs = [(doc["identity"], doc["body"]) for doc in map(orjson.loads, f)]
    out.write("\n" + format_message_summary(summarize_messages(pairs)) + "\n")


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """The analysis allocates millions of short-lived objects and keeps hundreds of thousands (conversations,
    their keys); at the default threshold the cycle collector walks the survivors again and again, for about a
    tenth of the run. Cycles are rare here, so it runs less often, not never."""
    before = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _feed(
    args: argparse.Namespace,
    captures: list[str],
    readers: dict[str, ForkedReader],
    analyzer: Analyzer,
    writer: OfflineMessageWriter | None,
    progress: _Progress | None,
) -> tuple[int, list[Alert]]:
    """Every capture through the analyzer; the records cut off at the end of files, and the findings at the end
    of the input of attack rules run by a reader process. ``readers``: reader processes already started (more are
    started here, one file at a time, and closed by the caller)."""
    from leafguard.capture.forked import start_reader, worth_forking
    from leafguard.capture.pcapfile import FileStats, read_batches

    truncated_records = 0
    found_at_end: list[Alert] = []
    for path in captures:
        analyzer.add_file(path)
        fstats = FileStats(path)
        reader = readers.pop(path, None)
        if reader is None and not args.single_process and worth_forking(path):
            reader = start_reader(path, batch_frames=BATCH_FRAMES, prepare=_classify)
        try:
            batches = reader.batches(fstats) if reader else read_batches(path, batch_frames=BATCH_FRAMES, stats=fstats)
            for batch in batches:
                analyzer.feed(batch)
                if writer is not None:
                    writer.step(analyzer)
                if progress is not None:
                    progress.update(path, analyzer.stats.packets)
            if reader is not None and isinstance(reader.found_at_end, list):
                found_at_end += reader.found_at_end
        finally:
            if reader is not None:
                reader.close()
        truncated_records += fstats.truncated_records
    return truncated_records, found_at_end


def _write_json(report: dict[str, Any], analyzer: Any, out: BinaryIO) -> None:
    """The report, with one conversation per line, written as it is built (no second copy in memory)."""
    head = orjson.dumps({"capture": report["capture"], "leaves": report["leaves"]}, option=orjson.OPT_INDENT_2)
    out.write(head[: head.rindex(b"}")].rstrip() + b',\n  "conversations": [')
    sep = b"\n    "
    convs = analyzer.iter_conversations()
    # Serialised a few thousand at a time, then split one per line: no value of a conversation contains a brace.
    while chunk := list(itertools.islice(convs, 4096)):
        out.write(sep + orjson.dumps(chunk)[1:-1].replace(b"},{", b"},\n    {"))
        sep = b",\n    "
    out.write(b"\n  ],\n  \"alerts\": ")
    out.write(orjson.dumps(report["alerts"], option=orjson.OPT_INDENT_2).replace(b"\n", b"\n  ") + b"\n}\n")


class _Progress:
    """A one-line progress display on a terminal, shown only once a run has lasted a moment."""

    def __init__(self, files: list[str]) -> None:
        self._total = sum(os.path.getsize(f) for f in files if os.path.exists(f))
        self._start = time.monotonic()
        self._shown = False
        self._last = 0.0

    def update(self, path: str, packets: int) -> None:
        now = time.monotonic()
        if now - self._start < 1.0 or now - self._last < 0.2:
            return
        self._last = now
        self._shown = True
        rate = packets / (now - self._start)
        sys.stderr.write(f"\r{Path(path).name}: {packets:,} frames, {rate:,.0f} frames/s ")
        sys.stderr.flush()

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\n")


def _summary(report: dict[str, Any], top: int, out: TextIO) -> None:
    cap = report["capture"]
    out.write(
        f"{cap['packets']:,} frames, {cap['bytes']:,} bytes in {len(cap['files'])} file(s)"
        f" ({', '.join(cap['link_types'])}); decode errors {cap['decode_errors']}, truncated {cap['truncated']}\n\n"
    )
    leaves = report["leaves"]
    out.write(f"Leaves ({len(leaves)})\n")
    out.write(f"{'MAC':<18} {'IP':<16} {'vendor':<24} {'hostname':<22} {'out pkts':>9} {'in pkts':>9} services\n")
    for leaf in leaves:
        ips = leaf["ips"][0] if leaf["ips"] else "-"
        name = leaf["dhcp"]["hostname"] or (leaf["hostnames"][0] if leaf["hostnames"] else "-")
        svc = ",".join(f"{s['protocol']}/{s['port']}" for s in leaf["services"][:6])
        out.write(
            f"{leaf['mac']:<18} {ips:<16} {(leaf['vendor'] or '-')[:24]:<24} {name[:22]:<22}"
            f" {leaf['packets_out']:>9,} {leaf['packets_in']:>9,} {svc}\n"
        )
    convs = sorted(report["conversations"], key=lambda c: -(c["bytes_ab"] + c["bytes_ba"]))[:top]
    out.write(f"\nTop conversations by bytes ({len(convs)} of {len(report['conversations'])})\n")
    for c in convs:
        out.write(
            f"{c['protocol']:<4} {c['a_addr']}:{c['a_port']} -> {c['b_addr']}:{c['b_port']}"
            f"  {c['packets_ab'] + c['packets_ba']:,} pkts {c['bytes_ab'] + c['bytes_ba']:,} bytes"
            f"  {c['state'] or ''}\n"
        )
    _alert_table(report["alerts"], out)


ALERT_ROWS = 10


def _alert_table(alerts: list[dict[str, Any]], out: TextIO) -> None:
    if not alerts:
        out.write("\nAlerts: none\n")
        return
    out.write(f"\nAlerts ({len(alerts)})\n")
    out.write(f"{'type':<17} {'severity':<8} {'leaf':<18} summary\n")
    for alert in alerts[:ALERT_ROWS]:
        out.write(f"{alert['type']:<17} {alert['severity']:<8} {alert['mac'] or '-':<18} {alert['summary']}\n")
    if len(alerts) > ALERT_ROWS:
        out.write(f"... and {len(alerts) - ALERT_ROWS} more (--json lists them all)\n")
