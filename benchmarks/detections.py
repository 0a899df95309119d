"""The detection scorecard (issue #14 point 4): every lab case and every shared capture, per alert type.

    sudo python3 -m benchmarks.detections [--no-lab] [--no-shared] [--benign-s SECONDS] [--json FILE] [--markdown]

* Lab cases (`testkit/lab`, as `tests/lab` runs them: real tools in network namespaces this run creates, bounded,
  aimed only at them; root and the Debian tools of ``.ci/run``): each case is captured to pcap on the gateway's
  bridge and analysed afresh. The benign case (the leaves' work alone) lasts ``--benign-s`` (330 s: longer than
  every rule's window, the 300 s of the scans included; CI's lab runs 15 s of it and judges the whole live run
  instead).
* Shared captures (``/work/shared/pcaps``, or ``LEAFGUARD_SHARED_PCAPS``): labelled below from their MANIFEST.md.

Per alert type: true positives (cases of that class that raised it), false negatives (cases of that class that
did not), false alarms (alerts of that type in cases where it is neither expected nor also true), and the time
from the first attack frame to the first alert, in packet time (lab: the attacker's first frame; shared captures:
the first frame from the MAC the alert names, else the capture's first frame).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "module"), str(REPO)]

from leafguard.capture.pcapfile import read_batches  # noqa: E402
from leafguard.observe.analyzer import Analyzer  # noqa: E402

S = frozenset
SHARED_LABELS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # capture: (classes it holds, alert types also true of it). From MANIFEST.md's "Port scans", "Telnet / FTP
    # cleartext logins", "ARP spoofing" rows and each file's contents column.
    "chrissanders_arppoison.pcapng": (S({"arp_spoofing", "gateway_impersonation"}), S({"address_conflict"})),
    "chrissanders_synscan.pcapng": (S({"port_scan"}), S()),
    "esnet_masscan_tcp_0_1000.pcap": (S({"port_scan"}), S()),
    "ppa_portscan.pcap": (S({"port_scan"}), S()),
    "evilfingers_nmap_XMAS_TREE_SCAN.pcap": (S({"stealth_scan"}), S()),
    "zeek_nmap-vsn.pcap": (S({"arp_sweep"}), S()),  # also SYNs to port 80 of 7 hosts: below address_scan's 25
    "ppa_ftp-crack.pcap": (S({"brute_force", "cleartext_login", "connection_brute_force"}), S()),
    "ppa_ftp.pcap": (S({"cleartext_login"}), S()),
    "ndpi_telnet.pcap": (S({"cleartext_login"}), S()),
    "zeek_var-services-std-ports.pcap": (S({"cleartext_login"}), S()),
    "ndpi_mqtt.pcapng": (S({"cleartext_login"}), S()),
    "zeek_mqtt.pcap": (S({"cleartext_login"}), S()),
}
RECON_BELOW_SCALE = {
    # Reconnaissance, but smaller than any class: counted neither as a miss nor, if raised, as a false alarm.
    "esnet_nmap_80_all.pcap": "nmap -A against 2 ports of one host (OS probes, NSE over HTTP)",
    "zeek_vnc-scanner.pcap": "one VNC handshake probe",
}


@dataclass
class Outcome:
    name: str
    source: str
    expect: frozenset[str]
    allowed: frozenset[str]
    alerts: list[dict[str, Any]]
    delays: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def found(self) -> set[str]:
        return {a["type"] for a in self.alerts}

    def false_alarms(self) -> list[dict[str, Any]]:
        if self.note:
            return []
        ok = self.expect | self.allowed
        return [a for a in self.alerts if a["type"] not in ok]


def shared_outcomes(directory: Path) -> list[Outcome]:
    out = []
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".pcap", ".pcapng", ".cap")):
        an = Analyzer()
        first_by_mac: dict[str, float] = {}
        start: float | None = None
        for batch in read_batches(path):
            an.feed(batch)
            if batch.linktype == 1:
                for i in range(len(batch)):
                    off = batch.offsets[i]
                    mac = batch.data[off + 6 : off + 12].hex(":")
                    first_by_mac.setdefault(mac, batch.timestamps[i])
            if start is None and len(batch):
                start = batch.timestamps[0]
        an.finish()
        expect, allowed = SHARED_LABELS.get(path.name, (S(), S()))
        o = Outcome(path.name, "shared", expect, allowed, an.alerts(), note=RECON_BELOW_SCALE.get(path.name, ""))
        for a in o.alerts:
            t0 = first_by_mac.get(a["mac"] or "", start or a["ts"])
            o.delays.setdefault(a["type"], a["ts"] - t0)
        out.append(o)
    return out


def lab_outcomes(work: Path, benign_s: float) -> list[Outcome]:
    from testkit.lab.cases import CASES, benign_case
    from testkit.lab.runner import judge, record
    from testkit.lab.topology import build, missing_tools
    from testkit.netns import Lab

    missing = missing_tools()
    if missing or os.geteuid() != 0:
        print(f"lab skipped: needs root and {missing}", file=sys.stderr)
        return []
    out = []
    with Lab() as lab:
        al = build(lab, work)
        for case in [c if c.name != "benign" else benign_case(benign_s) for c in CASES]:
            pcap = work / f"{case.name}.pcap"
            got = judge(al, case, pcap, record(al, case, pcap))
            o = Outcome(case.name, "lab", case.expect, case.allowed, got.alerts)
            for kind in got.found:
                delay = got.time_to_alert(kind)
                if delay is not None:
                    o.delays[kind] = delay
            out.append(o)
            print(f"  {case.name}: {sorted(got.found)}", file=sys.stderr)
    return out


def scorecard(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    types = sorted({t for o in outcomes for t in o.expect | o.found})
    rows: dict[str, dict[str, Any]] = {}
    for t in types:
        tp = [o for o in outcomes if t in o.expect and t in o.found]
        fn = [o for o in outcomes if t in o.expect and t not in o.found]
        fa = [a for o in outcomes for a in o.false_alarms() if a["type"] == t]
        delays = [o.delays[t] for o in tp if t in o.delays and o.source == "lab"]
        rows[t] = {
            "tp": len(tp),
            "fn": len(fn),
            "missed": [o.name for o in fn],
            "false_alarms": len(fa),
            "false_alarm_cases": sorted({o.name for o in outcomes for a in o.false_alarms() if a["type"] == t}),
            "recall": len(tp) / (len(tp) + len(fn)) if tp or fn else None,
            "lab_delay_median_s": statistics.median(delays) if delays else None,
            "lab_delay_max_s": max(delays) if delays else None,
        }
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(rows: dict[str, dict[str, Any]], outcomes: list[Outcome], benign_s: float) -> str:
    lines = [
        "| alert type | TP | FN | false alarms | recall | time to alert, lab (median / max, packet s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for t, r in rows.items():
        recall = "-" if r["recall"] is None else f"{100 * r['recall']:.0f} %"
        lines.append(
            f"| `{t}` | {r['tp']} | {r['fn']} | {r['false_alarms']} | {recall} | "
            f"{_fmt(r['lab_delay_median_s'])} / {_fmt(r['lab_delay_max_s'])} |"
        )
    benign = [o for o in outcomes if not o.expect and not o.note]
    noisy = [o.name for o in benign if o.alerts]
    lines.append("")
    lines.append(
        f"Cases without an attack: {len(benign)} ({sum(o.source == 'lab' for o in benign)} lab, of {benign_s:g} s, "
        f"{sum(o.source == 'shared' for o in benign)} shared captures); with any alert: {noisy or 'none'}."
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-lab", action="store_true", help="skip the lab (no root needed)")
    ap.add_argument("--no-shared", action="store_true", help="skip the shared captures")
    ap.add_argument(
        "--benign-s",
        type=float,
        default=330.0,
        metavar="SECONDS",
        help="how long the lab's benign case lasts (default 330: past every rule's window)",
    )
    ap.add_argument("--json", metavar="FILE", help="write the outcomes and the scorecard as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown only")
    args = ap.parse_args()
    outcomes: list[Outcome] = []
    if not args.no_shared:
        shared = Path(os.environ.get("LEAFGUARD_SHARED_PCAPS", "/work/shared/pcaps"))
        if shared.is_dir():
            outcomes += shared_outcomes(shared)
        else:
            print(f"shared captures skipped: {shared} is not a directory", file=sys.stderr)
    if not args.no_lab:
        with tempfile.TemporaryDirectory(prefix="leafguard-scorecard-") as tmp:
            outcomes += lab_outcomes(Path(tmp), args.benign_s)
    rows = scorecard(outcomes)
    if args.json:
        doc = {
            "scorecard": rows,
            "cases": [
                {"name": o.name, "source": o.source, "expect": sorted(o.expect),
                 "found": dict(Counter(a["type"] for a in o.alerts)), "delays_s": o.delays, "note": o.note}
                for o in outcomes
            ],
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2))
    print(markdown(rows, outcomes, args.benign_s))
    if not args.markdown:
        for o in outcomes:
            extra = [a["summary"] for a in o.false_alarms()]
            missed = sorted(o.expect - o.found)
            if extra or missed:
                print(f"{o.source} {o.name}: missed {missed}, false alarms {extra}")
    ok = all(r["fn"] == 0 and r["false_alarms"] == 0 for r in rows.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
