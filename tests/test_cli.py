"""`leafguard analyze`: the summary, the JSON contract, determinism and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from leafguard.cli import main
from leafguard.demo import demo_capture

LEAF_FIELDS = {
    "mac", "ips", "vendor", "hostnames", "dhcp", "randomized_mac", "first_seen", "last_seen", "packets_out",
    "bytes_out", "packets_in", "bytes_in", "services", "dns_queries", "tls_sni",
}  # fmt: skip
CONV_FIELDS = {
    "protocol", "a_addr", "a_port", "b_addr", "b_port", "packets_ab", "bytes_ab", "packets_ba", "bytes_ba",
    "first_seen", "last_seen", "state",
}  # fmt: skip
CAPTURE_FIELDS = {
    "files", "packets", "bytes", "first_ts", "last_ts", "link_types", "decode_errors", "truncated", "evicted_flows",
}  # fmt: skip


def _analyze(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "leafguard", "analyze", *args], capture_output=True, timeout=120)


def test_json_contract_and_determinism() -> None:
    first = _analyze("--demo", "--json")
    second = _analyze(str(demo_capture()), "--json")
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert set(doc["capture"]) >= CAPTURE_FIELDS
    assert doc["leaves"] and all(set(leaf) >= LEAF_FIELDS for leaf in doc["leaves"])
    assert set(doc["leaves"][0]["dhcp"]) == {"hostname", "vendor_class", "param_request_list"}
    assert doc["conversations"] and all(set(c) >= CONV_FIELDS for c in doc["conversations"])
    assert first.stdout == second.stdout
    sensor = next(leaf for leaf in doc["leaves"] if leaf["mac"] == "5c:cf:7f:07:ae:fb")
    assert sensor["vendor"] == "Espressif Inc."
    assert sensor["dhcp"]["param_request_list"] == [1, 3, 6, 15]
    assert sensor["tls_sni"] == ["telemetry.example-cloud.net"]
    assert sensor["dns_queries"] == ["telemetry.example-cloud.net"]


def test_summary_lists_leaves_and_conversations() -> None:
    proc = _analyze("--demo")
    text = proc.stdout.decode()
    assert proc.returncode == 0
    assert "Leaves (" in text and "Top conversations" in text
    assert "Siemens AG" in text and "ESP_07AEFB" in text and "REJ" in text


def test_demo_summary_shows_the_alerts_and_the_defender_messages_per_leaf(tmp_path: Path) -> None:
    """The demo's screen ends with an alert table and, per leaf, the Defender messages the run would send with
    their events by type; the counts are those of the messages themselves (``--security-messages``)."""
    proc = _analyze("--demo")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    report = json.loads(_analyze("--demo", "--json").stdout)
    assert f"Alerts ({len(report['alerts'])})" in text
    for alert in report["alerts"]:
        assert f"{alert['type']:<17} {alert['severity']:<8} {alert['mac']:<18} {alert['summary']}" in text
    out = tmp_path / "messages.jsonl"
    assert _analyze(str(demo_capture()), "--security-messages", str(out)).returncode == 0
    messages = [json.loads(line) for line in out.read_text().splitlines()]
    identities = sorted({m["identity"] for m in messages})
    assert f"Defender security messages: {len(messages)} for {len(identities)} leaves (events by type)" in text
    for identity in identities:
        mine = [m for m in messages if m["identity"] == identity]
        events = [e["Name"] for m in mine for e in m["body"]["Events"]]
        row = next(line for line in text.splitlines() if line.strip().startswith(identity))
        assert f"{len(mine):>3} msg  {len(events):>4} events" in row
        for name in set(events):
            assert f"{name} {events.count(name)}" in row


def test_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all, sorry")
    proc = _analyze(str(bad), "--json")
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode().count("\n") == 1 and str(bad) in proc.stderr.decode()
    assert main(["analyze"]) == 2
    assert main(["analyze", "--demo", "--leaf-net", "not-a-net"]) == 2
    assert main(["analyze", "--demo", "--silent-after", "0"]) == 2
    assert main(["analyze", "--demo", "--gateway-mac", "00:11:22"]) == 2


def test_security_messages_file(tmp_path: Path) -> None:
    out = tmp_path / "msgs.jsonl"
    proc = _analyze("--demo", "--json", "--security-messages", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and {"identity", "properties", "body"} == set(lines[0])
    leaves = {leaf["mac"].replace(":", "") for leaf in json.loads(proc.stdout)["leaves"]}
    assert {m["identity"].removeprefix("leaf-") for m in lines} <= leaves


def test_reader_process_gives_the_single_process_report(tmp_path: Path) -> None:
    from leafguard.capture.forked import MIN_FILE_BYTES
    from testkit.gen_capture import frames, write_pcap

    mix = tmp_path / "mix.pcap"
    write_pcap(mix, frames(3, 40, 40_000))
    assert mix.stat().st_size >= MIN_FILE_BYTES  # large enough for the default to fork a reader
    # The same file twice: each reading forks its own reader (the first one before the analysis is imported).
    forked = _analyze(str(mix), str(mix), "--json")
    single = _analyze(str(mix), str(mix), "--json", "--single-process")
    assert forked.returncode == single.returncode == 0, forked.stderr + single.stderr
    assert forked.stdout == single.stdout
    assert json.loads(forked.stdout)["capture"]["packets"] == 80_000


def test_a_reader_that_goes_away_is_no_traceback(tmp_path: Path) -> None:
    from testkit.gen_capture import frames, write_pcap

    mix = tmp_path / "mix.pcap"
    write_pcap(mix, frames(5, 40, 20_000))  # a report far larger than a pipe's buffer
    proc = subprocess.Popen(
        [sys.executable, "-m", "leafguard", "analyze", str(mix), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100).startswith(b"{")
    proc.stdout.close()  # as `| head` does
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode(errors="replace")
