"""The port-scan and address-scan windows of `Detectors` (the first item in a slot, the dict from the second,
nothing once the finding is raised) against a plain model of the rule: per key, a window of distinct items that
starts again after ``scan_window_s``, one finding the first time it holds the threshold's count."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from leafguard.detect.detectors import Detectors
from leafguard.detect.evidence import LoginResult, SynSent
from leafguard.detect.thresholds import Thresholds
from leafguard.observe.addresses import ip_text

HOSTS = [bytes([10, 0, 0, i]) for i in range(4)] + [bytes([0xFE, 0x80]) + bytes(13) + bytes([i]) for i in range(2)]


def _model(syns: list[SynSent], t: Thresholds) -> list[tuple[str, float, Any, Any, float]]:
    """(type, ts, key, sorted items, first_ts) of each finding."""
    out: list[tuple[str, float, Any, Any, float]] = []
    windows: dict[tuple[str, Any], tuple[float, list[Any], bool]] = {}
    for e in syns:
        for kind, key, item, threshold in (
            ("port_scan", (e.src_ip, e.dst_ip), e.dst_port, t.port_scan_ports),
            ("address_scan", (e.src_ip, e.dst_port), e.dst_ip, t.address_scan_hosts),
        ):
            start, items, alerted = windows.get((kind, key), (e.ts, [], False))
            if e.ts - start > t.scan_window_s:
                start, items, alerted = e.ts, [], False
            if not alerted and item not in items:
                items = [*items, item]
                if len(items) >= threshold:
                    alerted = True
                    out.append((kind, e.ts, key, sorted(items), start))
            windows[kind, key] = (start, items, alerted)
    return out


@st.composite
def _syns(draw: st.DrawFn) -> list[SynSent]:
    n = draw(st.integers(1, 120))
    ts = 1000.0
    out: list[SynSent] = []
    for _ in range(n):
        ts += draw(st.sampled_from([0.0, 0.5, 3.0, 40.0]))
        v6 = draw(st.booleans())
        pool = HOSTS[4:] if v6 else HOSTS[:4]
        src, dst = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
        out.append(SynSent(ts, src, dst, draw(st.integers(20, 26)), b"\x02\x00\x00\x00\x00\x01"))
    return out


@settings(max_examples=150, deadline=None)
@given(_syns(), st.integers(2, 4), st.integers(2, 4))
def test_scan_findings_are_the_plain_rules(syns: list[SynSent], ports: int, hosts: int) -> None:
    t = Thresholds(port_scan_ports=ports, address_scan_hosts=hosts, scan_window_s=60.0)
    d = Detectors(thresholds=t)
    for e in syns:
        d.process([e])
    got = []
    for a in d.alerts:
        ev = a.evidence
        items = ev["ports"] if a.type == "port_scan" else ev["hosts"]
        got.append((a.type, a.ts, ev["scanner"], items, ev["first_ts"]))
    want = []
    for kind, ts, key, items, start in _model(syns, t):
        shown = items if kind == "port_scan" else sorted(ip_text(h) for h in items)
        want.append((kind, ts, ip_text(key[0]), shown, start))
    assert got == want


def test_failed_logins_are_counted_past_the_threshold_once() -> None:
    t = Thresholds(brute_force_failures=3, scan_window_s=60.0)
    d = Detectors(thresholds=t)
    client, server = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    for i in range(5):
        d.process([LoginResult(100.0 + i, None, "ftp", client, server, 21, "u", "Fail")])
    d.process([LoginResult(200.0, None, "ftp", client, server, 21, "u", "Fail")])  # a new window
    for i in range(2):
        d.process([LoginResult(201.0 + i, None, "ftp", client, server, 21, "u", "Fail")])
    found = [a for a in d.alerts if a.type == "brute_force"]
    got = [(a.ts, a.evidence["failures"], a.evidence["first_ts"]) for a in found]
    assert got == [(102.0, 3, 100.0), (202.0, 3, 200.0)]
