"""The forked reader gives the batches, errors and counts the in-process reader gives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from leafguard.capture import forked, pcapfile
from leafguard.capture.batch import FrameBatch
from leafguard.capture.forked import ReaderProcessError, read_batches_forked
from leafguard.capture.pcapfile import FileStats, read_batches
from leafguard.errors import CaptureFileError
from tests.capture.test_pcapfile import BAD_FILES
from tests.conftest import shared_pcaps


def _frames(n: int) -> list[Ether]:
    out = []
    for i in range(n):
        p = Ether(src="00:11:22:33:44:55") / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=i) / (b"x" * (i % 300))
        p.time = 1_700_000_000 + i * 0.25
        out.append(p)
    return out


def _content(batches: list[FrameBatch]) -> list[tuple[int, list[float], list[bytes], list[int], list[int]]]:
    return [
        (
            b.linktype,
            list(b.timestamps),
            [b.frame(i) for i in range(len(b))],
            list(b.caplens),
            list(b.wirelens),
        )
        for b in batches
    ]


def _both(path: Path, **kw: int) -> tuple[list[FrameBatch], FileStats, list[FrameBatch], FileStats]:
    inline_stats, forked_stats = FileStats(str(path)), FileStats(str(path))
    inline = list(read_batches(path, stats=inline_stats, **kw))
    got = list(read_batches_forked(path, stats=forked_stats, **kw))
    return inline, inline_stats, got, forked_stats


def test_many_chunks_and_a_cut_last_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pcapfile, "CHUNK_BYTES", 4096)  # the child is forked: it reads with this too
    f = tmp_path / "many.pcap"
    wrpcap(str(f), _frames(3000))
    f.write_bytes(f.read_bytes()[:-7])
    inline, inline_stats, got, forked_stats = _both(f, batch_frames=100)
    assert len({b.file_offset for b in got}) > 50  # the file really came in many stretches
    assert _content(got) == _content(inline)
    assert sum(len(b) for b in got) == 2999
    assert forked_stats.truncated_records == inline_stats.truncated_records == 1


@pytest.mark.parametrize("path", shared_pcaps(), ids=lambda p: p.name)
def test_shared_captures_read_alike(path: Path) -> None:
    inline, inline_stats, got, forked_stats = _both(path)
    assert _content(got) == _content(inline)
    assert forked_stats.truncated_records == inline_stats.truncated_records


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_file_errors_are_raised_in_the_parent_as_they_are(tmp_path: Path, content: bytes, message: str) -> None:
    f = tmp_path / "bad.pcap"
    f.write_bytes(content)
    with pytest.raises(CaptureFileError) as inline:
        list(read_batches(f))
    with pytest.raises(CaptureFileError) as got:
        list(read_batches_forked(f))
    assert str(got.value) == str(inline.value)
    assert message in str(got.value)


def test_prepare_runs_in_the_child_and_its_result_reaches_the_batch(tmp_path: Path) -> None:
    f = tmp_path / "p.pcap"
    wrpcap(str(f), _frames(500))
    got = list(read_batches_forked(f, batch_frames=64, prepare=lambda b: (os.getpid(), len(b), b.frame(0))))
    assert [b.prepared[1] for b in got] == [len(b) for b in got]  # type: ignore[index]
    assert [b.prepared[2] for b in got] == [b.frame(0) for b in got]  # type: ignore[index]
    pids = {b.prepared[0] for b in got}  # type: ignore[index]
    assert len(pids) == 1
    assert os.getpid() not in pids


def test_a_bug_in_the_child_is_raised_not_swallowed(tmp_path: Path) -> None:
    f = tmp_path / "p.pcap"
    wrpcap(str(f), _frames(10))

    def broken(b: FrameBatch) -> object:
        raise ZeroDivisionError("prepare bug")

    with pytest.raises(ReaderProcessError, match="ZeroDivisionError: prepare bug"):
        list(read_batches_forked(f, prepare=broken))


def test_stopping_early_stops_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pcapfile, "CHUNK_BYTES", 4096)
    f = tmp_path / "big.pcap"
    wrpcap(str(f), _frames(3000))
    children_before = set(_children())
    gen = read_batches_forked(f, batch_frames=10)
    next(gen)
    assert set(_children()) - children_before  # the reader is running
    gen.close()
    assert set(_children()) == children_before  # stopped and reaped: no zombie left


def test_worth_forking_only_for_large_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "small.pcap"
    wrpcap(str(f), _frames(10))
    assert not forked.worth_forking(f)
    assert not forked.worth_forking(tmp_path / "missing.pcap")
    monkeypatch.setattr(forked, "MIN_FILE_BYTES", 0)
    assert forked.worth_forking(f) == (len(os.sched_getaffinity(0)) >= 2)


def _children() -> list[int]:
    me = os.getpid()
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Field 4, after the parenthesised command name (which may itself contain spaces).
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(entry.name))
    return out
