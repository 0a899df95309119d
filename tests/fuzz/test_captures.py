"""Mutated captures through `leafguard analyze` (both readers, with and without security messages) and through
`leafguard run --pcap`: every run ends in a report or in one line of error, never in a traceback.

CI runs a few hundred seeded cases; ``LEAFGUARD_FUZZ_CASES`` (per combination) and ``LEAFGUARD_FUZZ_SEED`` make a
longer or different run locally. An input that fails is written to ``LEAFGUARD_FUZZ_KEEP`` (a folder) when set:
move it to ``tests/fuzz/regressions/``, where every file is run through the same checks on every run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from leafguard.capture import forked
from leafguard.cli import main
from testkit.wait import wait_for
from tests.fuzz.captures import Record, cases, demo_records, pcapng
from tests.service.helpers import read_stats

CASES = int(os.environ.get("LEAFGUARD_FUZZ_CASES", "40"))
SEED = int(os.environ.get("LEAFGUARD_FUZZ_SEED", "20261203"))
REGRESSIONS = Path(__file__).parent / "regressions"


def _check_analyze(path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str | None:
    """None if the run ended well; otherwise what went wrong."""
    try:
        rc = main(argv)
    except BaseException:  # a crash of any kind is the finding (the test reports it, nothing is swallowed)
        capsys.readouterr()
        return traceback.format_exc(limit=-3)
    out, err = capsys.readouterr()
    if "Traceback" in err:
        return f"traceback on stderr: {err[-2000:]}"
    if rc == 2:
        lines = err.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("leafguard: ") or path.name not in lines[0]:
            return f"exit 2 without one line naming the file: {err[-500:]!r}"
        return None
    if rc != 0:
        return f"exit status {rc}: {err[-500:]!r}"
    if "--json" in argv:
        report = json.loads(out)
        if report["capture"]["packets"] < 0:
            return "negative frame count"
    return None


def _keep(path: Path) -> None:
    keep = os.environ.get("LEAFGUARD_FUZZ_KEEP")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def _analyze_argv(path: Path, reader: str, messages: Path | None) -> list[str]:
    argv = ["analyze", str(path), "--json"]
    if reader == "in_process":
        argv.append("--single-process")
    if messages is not None:
        argv += ["--security-messages", str(messages)]
    return argv


@pytest.fixture(params=["in_process", "forked"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name: str = request.param
    if name == "forked":
        if len(os.sched_getaffinity(0)) < 2:
            pytest.skip("the forked reader runs only with two or more CPUs")
        # Every file, however small, goes through the reader process.
        monkeypatch.setattr(forked, "MIN_FILE_BYTES", 0)
    return name


@pytest.mark.parametrize("messages", [False, True], ids=["report", "security-messages"])
def test_mutated_captures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reader: str, messages: bool
) -> None:
    failures = []
    ran = 0
    for case in cases(SEED, CASES):
        path = case.write(tmp_path)
        argv = _analyze_argv(path, reader, tmp_path / "messages.jsonl" if messages else None)
        problem = _check_analyze(path, argv, capsys)
        ran += 1
        if problem is not None:
            failures.append(f"{case.name}: {problem}")
            _keep(path)
        path.unlink()
    assert not failures, "\n".join(failures)
    assert ran == CASES


def test_a_failure_is_detected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The checks themselves can fail: a file that is not a capture ends in one line, and a missing one too."""
    path = tmp_path / "garbage.pcap"
    path.write_bytes(b"not a capture at all")
    assert _check_analyze(path, ["analyze", str(path), "--json"], capsys) is None
    assert main(["analyze", str(path), "--json"]) == 2
    assert "garbage.pcap" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.pcap*")), ids=lambda p: p.name)
def test_regressions(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], reader: str) -> None:
    for messages in (None, tmp_path / "messages.jsonl"):
        problem = _check_analyze(path, _analyze_argv(path, reader, messages), capsys)
        assert problem is None, problem


def test_far_future_frame_times_are_written_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue #12 defect 1: a pcapng interface counting whole seconds in 64-bit ticks puts frames past year 9999;
    the security messages are still written, with times at the end of the range datetime can write."""
    recs = demo_records()
    path = tmp_path / "far-future.pcapng"
    path.write_bytes(pcapng([Record(r.ts, r.frame, r.wirelen) for r in recs], tsresol=0x80, epb_ticks=1 << 62).data)
    out = tmp_path / "messages.jsonl"
    assert main(["analyze", str(path), "--json", "--security-messages", str(out), "--single-process"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["capture"]["first_ts"] == float(1 << 62)
    messages = [json.loads(line) for line in out.read_text().splitlines()]
    assert messages
    stamps = {ev["TimestampUTC"] for m in messages for ev in m["body"]["Events"]}
    assert stamps == {"9999-12-31T23:59:59.998Z"}


RUN_CASES = int(os.environ.get("LEAFGUARD_FUZZ_RUN_CASES", "6"))


def test_mutated_captures_through_run(tmp_path: Path) -> None:
    """`leafguard run --pcap` on mutated captures: the replay ends, the service stays up until SIGTERM and exits
    0, or it refuses the file with one line (exit 2)."""
    failures = []
    for case in list(cases(SEED + 1, RUN_CASES)):
        path = case.write(tmp_path)
        out = tmp_path / f"out-{case.name}"
        out.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-m", "leafguard", "run", "--pcap", str(path), "--replay-speed", "0",
             "--local-dir", str(out), "--write-interval", "0.2"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_for(lambda p=proc, o=out: p.poll() is not None or read_stats(o)["replay_done"], timeout_s=30)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        if "Traceback" in err or rc not in (0, 2):
            failures.append(f"{case.name}: exit {rc}: {err[-1500:]}")
            _keep(path)
        elif rc == 2 and not err.strip().splitlines()[-1].startswith("leafguard: "):
            failures.append(f"{case.name}: exit 2 without the one-line error: {err[-500:]}")
    assert not failures, "\n".join(failures)
