"""The attack rules in a file's reader process (`detect.reader_rules`): `analyze` finds what one process finds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from leafguard.capture.forked import MIN_FILE_BYTES
from testkit.gen_capture import frames, write_pcap

SCANNER = ("02:00:00:00:00:0a", "10.20.0.66")
TARGET = ("02:00:00:00:00:02", "10.20.0.2")


def _analyze(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "leafguard", "analyze", *args], capture_output=True, timeout=120)


def test_the_reader_process_finds_what_the_analysis_would(tmp_path: Path) -> None:
    stream = list(frames(3, 40, 40_000))
    end = stream[-1][0]
    eth = Ether(src=SCANNER[0], dst=TARGET[0])
    ip = IP(src=SCANNER[1], dst=TARGET[1])
    # A NULL scan mid-capture (raised during a batch), and UDP probes at the end that nothing answers: they are
    # judged when the input ends, 10 s later, with a frame no rule reads (a mid-flow segment's ACK).
    at = len(stream) // 2
    stealth = [(stream[at][0], bytes(eth / ip / TCP(sport=40000, dport=port, flags=""))) for port in range(1, 16)]
    udp = [(end + port * 0.01, bytes(eth / ip / UDP(sport=40001, dport=port))) for port in range(16)]
    last = (end + 10, bytes(Ether(src=TARGET[0], dst=SCANNER[0]) / IP(src=TARGET[1], dst=SCANNER[1]) / TCP(flags="A")))
    mix = tmp_path / "mix.pcap"
    write_pcap(mix, iter([*stream[:at], *stealth, *stream[at:], *udp, last]))
    assert mix.stat().st_size >= MIN_FILE_BYTES  # large enough for a reader process
    forked = _analyze(str(mix), "--json")
    single = _analyze(str(mix), "--json", "--single-process")
    assert forked.returncode == single.returncode == 0, forked.stderr + single.stderr
    assert forked.stdout == single.stdout
    found = {a["type"] for a in json.loads(forked.stdout)["alerts"]}
    assert {"stealth_scan", "udp_scan"} <= found
