"""Capture files: both formats, both byte orders, nanosecond stamps, several interfaces, and bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgWriter, wrpcap

from leafguard.capture import pcapfile
from leafguard.capture.pcapfile import FileStats, read_batches
from leafguard.errors import CaptureFileError


def _packets(n: int) -> list[Ether]:
    out = []
    for i in range(n):
        p = (
            Ether(src="00:11:22:33:44:55")
            / IP(src="10.0.0.1", dst="10.0.0.2")
            / UDP(sport=1000 + i, dport=9)
            / (b"x" * i)
        )
        p.time = 1_700_000_000 + i * 0.5
        out.append(p)
    return out


def _all(path: Path, **kw: object) -> list[tuple[float, bytes, int, int]]:
    frames = []
    for b in read_batches(path, **kw):  # type: ignore[arg-type]
        for i in range(len(b)):
            frames.append((b.timestamps[i], b.frame(i), b.wirelens[i], b.linktype))
    return frames


def test_pcap_frames_times_and_lengths(tmp_path: Path) -> None:
    pkts = _packets(50)
    f = tmp_path / "a.pcap"
    wrpcap(str(f), pkts)
    frames = _all(f, batch_frames=7)
    assert [fr[1] for fr in frames] == [bytes(p) for p in pkts]
    assert [fr[0] for fr in frames] == pytest.approx([float(p.time) for p in pkts])
    assert {fr[3] for fr in frames} == {1}


def _write_pcap(path: Path, frames: list[bytes], endian: str, magic: int, snaplen_cut: int | None = None) -> None:
    out = struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)
    for i, raw in enumerate(frames):
        cap = raw[:snaplen_cut] if snaplen_cut else raw
        out += struct.pack(endian + "IIII", 1_700_000_000 + i, 123456789, len(cap), len(raw)) + cap
    path.write_bytes(out)


def test_big_endian_and_nanosecond_pcap(tmp_path: Path) -> None:
    raws = [bytes(p) for p in _packets(3)]
    f = tmp_path / "be.pcap"
    _write_pcap(f, raws, ">", 0xA1B23C4D, snaplen_cut=20)
    frames = _all(f)
    assert [fr[1] for fr in frames] == [r[:20] for r in raws]
    assert [fr[2] for fr in frames] == [len(r) for r in raws]
    assert frames[1][0] == pytest.approx(1_700_000_001.123456789)


def test_pcapng_with_two_link_types(tmp_path: Path) -> None:
    f = tmp_path / "multi.pcapng"
    eth = _packets(3)
    ip_only = [IP(src="10.0.0.3", dst="10.0.0.4") / UDP(sport=1, dport=2)]
    ip_only[0].time = 1_700_000_100
    with PcapNgWriter(str(f)) as w:
        for p in eth[:2]:
            w.write(p)
        w.linktype = 101
        for p in ip_only:
            w.write(p)
    frames = _all(f)
    assert [fr[3] for fr in frames][:2] == [1, 1]
    assert len(frames) == 3


@pytest.mark.parametrize("cut", [0, 1, 7, 30])
def test_pcapng_read_in_small_chunks_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int) -> None:
    # Blocks cross chunk ends everywhere; memory then stays bounded by the chunk, not the file.
    f = tmp_path / "chunks.pcapng"
    with PcapNgWriter(str(f)) as w:
        for p in _packets(400):
            w.write(p)
    if cut:
        f.write_bytes(f.read_bytes()[:-cut])
    whole_stats, chunked_stats = FileStats(str(f)), FileStats(str(f))
    whole = _all(f, stats=whole_stats)
    monkeypatch.setattr(pcapfile, "CHUNK_BYTES", 1000)
    batches = list(read_batches(f, stats=chunked_stats))
    chunked = _all(f, stats=FileStats(str(f)))
    assert chunked == whole
    assert len(whole) == (400 if not cut else 399)
    assert chunked_stats.truncated_records == whole_stats.truncated_records == (1 if cut else 0)
    assert len({b.file_offset for b in batches}) > 20
    assert max(len(b.data) for b in batches) < 4 * 1000


def test_cut_last_record_is_counted_not_fatal(tmp_path: Path) -> None:
    f = tmp_path / "cut.pcap"
    wrpcap(str(f), _packets(5))
    f.write_bytes(f.read_bytes()[:-10])
    st = FileStats(str(f))
    frames = list(read_batches(f, stats=st))
    assert sum(len(b) for b in frames) == 4
    assert st.truncated_records == 1


BAD_FILES = [
    (b"", "not a capture file"),
    (b"hello world, not a capture at all", "not a pcap or pcapng file"),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 147), "unsupported link type 147"),
    (
        struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack("<IIII", 0, 0, 10_000_000, 10),
        "corrupt record",
    ),
]
"""Files that are not captures LeafGuard reads, and what the error says."""


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    f = tmp_path / "bad.pcap"
    f.write_bytes(content)
    with pytest.raises(CaptureFileError) as err:
        list(read_batches(f))
    assert str(f) in str(err.value)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CaptureFileError, match="cannot open"):
        list(read_batches(tmp_path / "nope.pcap"))
