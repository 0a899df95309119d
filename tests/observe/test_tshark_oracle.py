"""tshark as the oracle for `leafguard analyze --json` on every real capture in ../shared/pcaps.

For each capture, one tshark run prints per-frame fields *and* the `-z conv,tcp -z conv,udp` tables
(the tables come after the field lines), and `leafguard analyze FILE --json` runs twice: with the
default leaf side, and with `--leaf-net 0.0.0.0/0 --leaf-net ::/0` ("all-leaf") so that every unicast
source MAC becomes a leaf and its counters and DHCP names can be checked whatever its addresses.
All of them run in a thread pool, started for every selected capture when the first test needs one.

What is compared, exactly (no tolerance but the microsecond resolution of the timestamps):

* capture.packets / capture.bytes / first_ts / last_ts = tshark's frame count, sum of frame.len and
  the earliest/latest frame.time_epoch (to the microsecond). Earliest/latest, not first/last frame:
  merged traces are not in time order (ndpi_natpmp's last frame is 0.25 s before its 7th,
  zeek_vnc-scanner's 16th frame is the latest).
* (a) per unicast MAC reported as a leaf (all-leaf run: every unicast source MAC, and no other MAC):
  packets/bytes out = frames whose Ethernet source is that MAC,
  packets/bytes in = frames whose Ethernet destination is that MAC, from the per-frame fields.
  Linux SLL has no destination address and its source address is `sll.src.eth`, not `eth.src`: there
  the out counters are checked against `sll.src.eth` and the in counters cannot be checked.
  The default leaf *set* is checked in both directions where the contract is unambiguous: every
  unicast source MAC with a private/link-local/ULA address, or with no IP address at all, is a leaf;
  no MAC whose addresses are all globally routable is a leaf; every leaf is a real source MAC. A MAC's
  addresses are the outer IP source addresses of its frames, the sender address of its ARP packets
  (chrissanders_arppoison: the attacker only forwards public traffic but claims 172.16.0.1 in ARP) and
  the address a DHCP ACK gives it (zeek_dhcp: the client only ever sends from 0.0.0.0 and is given the
  public 128.2.6.x, so by default it is not leaf-side; the all-leaf run covers its DHCP names).
* (g) leaf.ips (default run) = the MAC's addresses (the three sources above) that are RFC 1918,
  link-local or ULA, unless the default cap of 32 addresses is reached.
* (b) per TCP/UDP 5-tuple and direction: packets and bytes, derived from the per-frame fields, and the
  derivation itself is checked against tshark's conversation tables (second, independent route). Also
  per 5-tuple: the a side (initiator) from its first frame (SYN sender; the receiver if that frame is a
  SYN-ACK, i.e. the capture missed the SYN; else the first sender), first_seen/last_seen = its
  earliest/latest frame time, and for TCP the state: README's state table (S0, REJ, EST, CLOSED, OTHER,
  reuse after CLOSED/REJ back to S0) replayed on tshark's tcp.flags of its frames in capture order.
  Decisions, case by case (each one was checked against tshark 4.0 on this corpus):
    - ICMP/ICMPv6 errors quote the IP+TCP/UDP header of the packet they answer; tshark then prints two
      ip.src values and one tcp/udp port (esnet_nmap_80_all, ndpi_iphone, ndpi_alexa-app, HueBridge,
      WeMo, D-LinkCam). tshark's conversation tables do NOT count these frames (its TCP/UDP dissectors
      do not tap headers inside an ICMP error), and neither may we: an ICMP error is not a packet of
      that flow. The derivation skips every frame whose protocol stack has icmp/icmpv6 before tcp/udp.
    - Encapsulation that carries a real TCP/UDP packet is counted on the innermost IP header that
      directly carries the TCP/UDP header, as tshark's tables do: IPv6-in-IPv4 (6in4, protocol 41) and
      PPPoE sessions in ndpi_syslog, 802.1Q in several files.
    - IP fragments: there are none in this corpus (checked with `ip.flags.mf==1 or ip.frag_offset>0
      or ipv6.fragment`). tshark would count a fragmented datagram once, on the frame that completes its
      reassembly, while LeafGuard counts every fragment frame in the 5-tuple (see
      tests/decode/test_generated_captures.py); a capture with fragments needs that handled here.
    - UDP-in-UDP tunnels (VXLAN, Teredo, GTP): none in this corpus. The derivation counts a frame in its
      first TCP/UDP header only; tshark would also count the inner one, and the self-check
      (test_tshark_conv_tables_agree_with_fields) would point at it.
    - tshark splits a reused 5-tuple into several conversations (new TCP stream after FIN/RST); rows
      are summed per 5-tuple. Its "->" columns are A-to-B and "<-" B-to-A, where A is tshark's first
      address, not necessarily our initiator: everything is compared as *directed* 5-tuples.
    - tshark prints byte counts of 10,000 and more in kB, truncated (format_size: value // 1000); such a
      cell is the exact interval [v*1000, v*1000+999], and the sums of those intervals must contain the
      per-frame total.
* (c) DHCP (all-leaf run): per client MAC (dhcp.hw.mac_addr of BOOTREQUEST messages only; replies carry the server's
  own options, e.g. zeek_dhcp's OFFER/ACK with vendor class `ArubaAP`), the leaf's dhcp.hostname /
  vendor_class / param_request_list are the last value the client sent (messages without the option do
  not clear it), and leaf.hostnames contains every DHCP hostname the client sent. MACs that never sent a
  BOOTREQUEST have no DHCP hostname or vendor class. (tshark labels the MAC inside option 61 as
  dhcp.hw.mac_addr too, so the first occurrence is chaddr.)
* (d) TCP services (all-leaf run): a leaf's services with protocol tcp are exactly the source ports of the
  SYN-ACKs it sent (outside ICMP errors).
* (e) DNS queries (all-leaf run): the names in the question section of DNS queries (QR=0) a MAC sent over
  UDP to port 53, 5353 (mDNS) or 5355 (LLMNR). There is no DNS over TCP in this corpus (checked).
  Per-leaf name lists are capped (256 in the default settings): the test asks for equality when the report
  counts no evicted names, else that ours is a subset of tshark's of the capped size. Runs of U+FFFD are
  collapsed on both sides (see _fffd: iodine's binary labels).
* (h) hostnames (all-leaf run): see test_hostnames.
* (f) TLS SNI (all-leaf run): the server_name of every TLS ClientHello a MAC sent over TCP, same cap rule.
  (No ClientHello over UDP/QUIC in this corpus: checked.)
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import threading
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PCAPS, SHARED, run_analyze, shared_pcaps

pytestmark = pytest.mark.tshark

TSHARK = shutil.which("tshark")
CAPTURES = shared_pcaps()
SEP = "\x1f"  # occurrence aggregator: cannot appear in a hostname tshark prints
FIELDS = (
    "frame.len",
    "frame.time_epoch",
    "frame.protocols",
    "eth.src",
    "eth.dst",
    "sll.src.eth",
    "ip.src",
    "ip.dst",
    "ipv6.src",
    "ipv6.dst",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.flags",
    "udp.srcport",
    "udp.dstport",
    "arp.src.proto_ipv4",
    "dns.flags.response",
    "dns.qry.name",
    "dns.resp.type",
    "tls.handshake.type",
    "nbns.flags.opcode",
    "nbns.flags.response",
    "nbns.name",
    "nbns.nb_flags.group",
    "tls.handshake.extensions_server_name",
    "dhcp.type",
    "dhcp.option.dhcp",
    "dhcp.ip.your",
    "dhcp.hw.mac_addr",
    "dhcp.option.hostname",
    "dhcp.option.vendor_class_id",
    "dhcp.option.request_list_item",
)
MAX_IPS_PER_LEAF = 32  # the default cap of leaf.ips
UNSPECIFIED = {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")}
LEAF_NETS = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "fe80::/10", "fc00::/7")
]

Directed = tuple[str, str, int, str, int]  # proto, src, sport, dst, dport


def _unicast(mac: str) -> bool:
    return bool(mac) and not int(mac[:2], 16) & 1


def _addr(text: str) -> str:
    return str(ipaddress.ip_address(text))


def _undirected(key: Directed) -> tuple[Any, ...]:
    proto, a, ap, b, bp = key
    return (proto, *sorted([(a, ap), (b, bp)]))


def _tcp_states(events: list[tuple[Directed, int]]) -> dict[tuple[Any, ...], str]:
    """README's TCP state table replayed on tshark's per-frame flags, in capture order, per 5-tuple."""
    state: dict[tuple[Any, ...], str] = {}
    initiator: dict[tuple[Any, ...], tuple[str, int]] = {}
    for key, flags in events:
        ident = _undirected(key)
        syn, ack, fin, rst = flags & 0x02, flags & 0x10, flags & 0x01, flags & 0x04
        if ident not in state:
            initiator[ident] = _initiator(key, flags)
            state[ident] = "S0" if syn and not ack else "EST" if syn else "OTHER"
            continue
        forward, now = key[1:3] == initiator[ident], state[ident]
        if syn and ack:
            if not forward and now in ("S0", "REJ"):
                state[ident] = "EST"  # the attempt was answered
        elif syn:
            if forward and now in ("CLOSED", "REJ"):
                state[ident] = "S0"  # the 5-tuple is reused by a new attempt
        elif rst:
            if now == "S0" and not forward:
                state[ident] = "REJ"
            elif now == "EST":
                state[ident] = "CLOSED"
        elif fin and now == "EST":
            state[ident] = "CLOSED"
    return state


def _initiator(key: Directed, flags: int) -> tuple[str, int]:
    """The contract's a side from the first frame of a 5-tuple: SYN sender, SYN-ACK receiver, else sender."""
    _, src, sport, dst, dport = key
    syn, ack = flags & 0x02, flags & 0x10
    return (dst, dport) if syn and ack else (src, sport)


@dataclass
class TsharkView:
    """Everything the tests need from one tshark run over one capture."""

    frames: int = 0
    bytes: int = 0
    first_ts: float = float("inf")
    last_ts: float = float("-inf")
    sll: bool = False
    out: Counter[str] = field(default_factory=Counter)
    out_bytes: Counter[str] = field(default_factory=Counter)
    in_: Counter[str] = field(default_factory=Counter)
    in_bytes: Counter[str] = field(default_factory=Counter)
    src_ips: dict[str, set[ipaddress.IPv4Address | ipaddress.IPv6Address]] = field(
        default_factory=lambda: defaultdict(set)
    )
    flows: Counter[Directed] = field(default_factory=Counter)
    flow_bytes: Counter[Directed] = field(default_factory=Counter)
    icmp_quoted: Counter[Directed] = field(default_factory=Counter)
    opener: dict[tuple[Any, ...], tuple[Directed, int]] = field(default_factory=dict)  # first frame, TCP flags
    tcp_events: list[tuple[Directed, int]] = field(default_factory=list)  # every TCP frame: 5-tuple, flags
    span: dict[tuple[Any, ...], list[float]] = field(default_factory=dict)  # earliest, latest timestamp
    conv_frames: Counter[Directed] = field(default_factory=Counter)
    conv_bytes_lo: Counter[Directed] = field(default_factory=Counter)
    conv_bytes_hi: Counter[Directed] = field(default_factory=Counter)
    dhcp_hostnames: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    dhcp_vendor: dict[str, str] = field(default_factory=dict)
    dhcp_prl: dict[str, list[int]] = field(default_factory=dict)
    dhcp_clients: set[str] = field(default_factory=set)
    syn_ack_ports: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    dns_queries: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    tls_sni: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    nbns_registered: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    mdns_answer_frames: int = 0
    mdns_names: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


CONV_ROW = re.compile(
    r"^(?P<a>\S+):(?P<ap>\d+)\s+<->\s+(?P<b>\S+):(?P<bp>\d+)\s+"
    r"(?P<fba>\d+) (?P<bba>\d+) (?P<uba>bytes|kB)\s+(?P<fab>\d+) (?P<bab>\d+) (?P<uab>bytes|kB)\s"
)


def _byte_interval(value: str, unit: str) -> tuple[int, int]:
    if unit == "bytes":
        return int(value), int(value)
    return int(value) * 1000, int(value) * 1000 + 999  # tshark's format_size truncates to kB


def parse_tshark(text: str) -> TsharkView:
    view = TsharkView()
    proto = ""
    for line in text.splitlines():
        if line.startswith("TCP Conversations"):
            proto = "tcp"
        elif line.startswith("UDP Conversations"):
            proto = "udp"
        m = CONV_ROW.match(line) if proto else None
        if m:
            a, b = _addr(m["a"]), _addr(m["b"])
            ab: Directed = (proto, a, int(m["ap"]), b, int(m["bp"]))
            ba: Directed = (proto, b, int(m["bp"]), a, int(m["ap"]))
            for key, frames, size, unit in (
                (ab, m["fab"], m["bab"], m["uab"]),
                (ba, m["fba"], m["bba"], m["uba"]),
            ):
                if int(frames):
                    lo, hi = _byte_interval(size, unit)
                    view.conv_frames[key] += int(frames)
                    view.conv_bytes_lo[key] += lo
                    view.conv_bytes_hi[key] += hi
            continue
        if proto or "\t" not in line:
            continue  # field lines all come before the statistics
        _frame(view, dict(zip(FIELDS, line.split("\t"), strict=True)))
    return view


def _frame(view: TsharkView, row: dict[str, str]) -> None:
    def first(name: str) -> str:
        return row[name].split(SEP)[0]

    size = int(row["frame.len"])
    ts = float(row["frame.time_epoch"])
    view.frames += 1
    view.bytes += size
    view.first_ts = min(view.first_ts, ts)
    view.last_ts = max(view.last_ts, ts)
    stack = row["frame.protocols"].split(":")
    if stack[0] == "sll":
        view.sll = True
        src, dst = first("sll.src.eth"), ""
    else:
        src, dst = first("eth.src"), first("eth.dst")
    if src:
        view.out[src] += 1
        view.out_bytes[src] += size
        addrs = view.src_ips.setdefault(src, set())
        ip_layers = [p for p in stack if p in ("ip", "ipv6")]
        if ip_layers:  # the outer IP header says who the sender is
            addrs.add(ipaddress.ip_address(first(ip_layers[0] + ".src")))
        if row["arp.src.proto_ipv4"]:
            addrs.add(ipaddress.ip_address(first("arp.src.proto_ipv4")))
    if dst:
        view.in_[dst] += 1
        view.in_bytes[dst] += size
    transport = next((p for p in stack if p in ("tcp", "udp")), None)
    if transport:
        below = stack[: stack.index(transport)]
        ip_layer = [p for p in below if p in ("ip", "ipv6")][-1]
        key: Directed = (
            transport,
            _addr(row[ip_layer + ".src"].split(SEP)[-1]),
            int(first(transport + ".srcport")),
            _addr(row[ip_layer + ".dst"].split(SEP)[-1]),
            int(first(transport + ".dstport")),
        )
        if "icmp" in below or "icmpv6" in below:
            view.icmp_quoted[key] += 1  # ICMP error quoting a header: not a packet of that flow
        else:
            view.flows[key] += 1
            view.flow_bytes[key] += size
            ident = _undirected(key)
            flags = int(first("tcp.flags"), 16) if transport == "tcp" else 0
            view.opener.setdefault(ident, (key, flags))
            if transport == "tcp":
                view.tcp_events.append((key, flags))
            if flags & 0x12 == 0x12 and src:
                view.syn_ack_ports[src].add(key[2])
            if transport == "udp" and key[2] == 5353 and row["dns.resp.type"]:
                view.mdns_answer_frames += 1
            if transport == "udp" and key[4] in (53, 5353, 5355) and row["dns.flags.response"][:1] == "0" and src:
                view.dns_queries[src].update(row["dns.qry.name"].split(SEP))
            if transport == "tcp" and "1" in row["tls.handshake.type"].split(SEP) and src:
                view.tls_sni[src].update(n for n in row["tls.handshake.extensions_server_name"].split(SEP) if n)
            span = view.span.setdefault(ident, [ts, ts])
            span[0], span[1] = min(span[0], ts), max(span[1], ts)
    if (
        src
        and first("nbns.flags.response") == "0"
        and first("nbns.flags.opcode") in ("5", "8", "9")  # registration, refresh
        and "1" not in row["nbns.nb_flags.group"].split(SEP)
    ):
        m = re.fullmatch(r"(.+)<(00|20)>", first("nbns.name"))
        if m:
            view.nbns_registered[src].add(m[1].rstrip())
    if row["dhcp.option.dhcp"].split(SEP)[0] == "5" and first("dhcp.ip.your") not in ("", "0.0.0.0"):
        view.src_ips.setdefault(first("dhcp.hw.mac_addr"), set()).add(ipaddress.ip_address(first("dhcp.ip.your")))
    if row["dhcp.type"].split(SEP)[0] == "1":  # BOOTREQUEST: the client's own options
        client = first("dhcp.hw.mac_addr")
        view.dhcp_clients.add(client)
        if row["dhcp.option.hostname"]:
            view.dhcp_hostnames[client].append(first("dhcp.option.hostname"))
        if row["dhcp.option.vendor_class_id"]:
            view.dhcp_vendor[client] = first("dhcp.option.vendor_class_id")
        if row["dhcp.option.request_list_item"]:
            view.dhcp_prl[client] = [int(x) for x in row["dhcp.option.request_list_item"].split(SEP)]


def run_tshark(path: Path) -> TsharkView:
    assert TSHARK
    args = [TSHARK, "-n", "-r", str(path), "-T", "fields", "-E", "separator=/t", "-E", "occurrence=a"]
    args += ["-E", f"aggregator={SEP}", "-z", "conv,tcp", "-z", "conv,udp"]
    for name in FIELDS:
        args += ["-e", name]
    proc = subprocess.run(args, capture_output=True, text=True, check=False, errors="surrogateescape")
    assert proc.returncode == 0, f"tshark failed on {path.name}: {proc.stderr[-2000:]}"
    view = parse_tshark(proc.stdout)
    if view.mdns_answer_frames:
        _mdns_names(path, view)
    return view


def _resource_records(node: Any) -> Any:
    if isinstance(node, dict):
        if "dns.resp.type" in node:
            yield node
        for value in node.values():
            yield from _resource_records(value)
    elif isinstance(node, list):
        for value in node:
            yield from _resource_records(value)


def _mdns_names(path: Path, view: TsharkView) -> None:
    """Names of the A/AAAA records each MAC sent from port 5353, from tshark's JSON tree.

    A second tshark run, only for captures with mDNS records: in `-T fields` output, dns.resp.name and
    dns.resp.type cannot be paired, because tshark gives SRV, NSEC and some other records a type but no
    dns.resp.name (SRV gets dns.srv.service/proto/name instead). The JSON tree keeps each record together.
    """
    assert TSHARK
    args = [TSHARK, "-n", "-r", str(path), "-Y", "udp.srcport==5353 and dns.resp.type", "-T", "json"]
    proc = subprocess.run([*args, "-J", "eth sll mdns"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"tshark -T json failed on {path.name}: {proc.stderr[-2000:]}"
    for packet in json.loads(proc.stdout or "[]"):
        layers = packet["_source"]["layers"]
        src = (layers.get("eth") or {}).get("eth.src") or (layers.get("sll") or {}).get("sll.src.eth")
        for rr in _resource_records(layers.get("mdns", {})):
            if src and rr["dns.resp.type"] in ("1", "28") and rr.get("dns.resp.name"):
                view.mdns_names[src].add(rr["dns.resp.name"])


ALL_LEAF = ("--leaf-net", "0.0.0.0/0", "--leaf-net", "::/0")


def run_leafguard(path: Path, *extra: str) -> dict[str, Any]:
    return run_analyze(path, *extra, timeout_s=240)


class _Runs:
    """Both runs of every selected capture, started together on the first request, in a thread pool."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None
        self.jobs: dict[str, tuple[Future[TsharkView], Future[dict[str, Any]], Future[dict[str, Any]]]] = {}

    def start(self, names: list[str]) -> None:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=max(2, (os.cpu_count() or 2) + 1))
            for name in names:
                if name not in self.jobs:
                    path = PCAPS / name
                    self.jobs[name] = (
                        self.pool.submit(run_tshark, path),
                        self.pool.submit(run_leafguard, path),
                        self.pool.submit(run_leafguard, path, *ALL_LEAF),
                    )

    def get(self, name: str) -> tuple[TsharkView, dict[str, Any]]:
        """tshark's view and our report with the default leaf side."""
        self.start([name])
        tshark, ours, _ = self.jobs[name]
        return tshark.result(), ours.result()

    def get_all_leaf(self, name: str) -> tuple[TsharkView, dict[str, Any]]:
        """tshark's view and our report with every address on the leaf side."""
        self.start([name])
        tshark, _, ours = self.jobs[name]
        return tshark.result(), ours.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest) -> Any:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared captures live there (set LEAFGUARD_SHARED)")
    if TSHARK is None:
        pytest.skip("tshark is not installed: it is the oracle of these tests (apt-get install tshark)")
    state = _Runs()
    selected = [
        item.callspec.params["capture"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "capture" in item.callspec.params
    ]
    state.start(list(dict.fromkeys(selected)))
    yield state
    state.close()


def _params() -> list[Any]:
    if not CAPTURES:
        return [pytest.param("", marks=pytest.mark.skip(reason=f"{PCAPS} is absent or empty"))]
    return [p.name for p in CAPTURES]


def _diff(title: str, ours: dict[Any, Any], theirs: dict[Any, Any], limit: int = 25) -> str:
    keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    lines = [f"{title}: {len(keys)} differ (ours vs tshark)"]
    lines += [f"  {k}: ours={ours.get(k)} tshark={theirs.get(k)}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"  ... and {len(keys) - limit} more")
    return "\n".join(lines)


@pytest.mark.parametrize("capture", _params())
def test_capture_totals(runs: _Runs, capture: str) -> None:
    view, ours = runs.get(capture)
    cap = ours["capture"]
    assert (cap["packets"], cap["bytes"]) == (view.frames, view.bytes), "frame count / sum of frame.len"
    assert cap["first_ts"] == pytest.approx(view.first_ts, abs=1e-6)
    assert cap["last_ts"] == pytest.approx(view.last_ts, abs=1e-6)


def _leaves(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    leaves = {leaf["mac"]: leaf for leaf in report["leaves"]}
    assert len(leaves) == len(report["leaves"]), "a MAC is reported twice"
    for mac in leaves:
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac), f"MAC not lower-case colon form: {mac!r}"
    return leaves


@pytest.mark.parametrize("capture", _params())
def test_leaf_set(runs: _Runs, capture: str) -> None:
    """Default leaf side: private, link-local or ULA addresses, or no IP address at all."""
    view, ours = runs.get(capture)
    leaves = set(_leaves(ours))
    fake = {mac for mac in leaves if not _unicast(mac) or mac not in view.out}
    assert not fake, f"leaves that are not unicast source MACs in {capture}: {sorted(fake)}"
    required = {
        mac
        for mac, ips in view.src_ips.items()
        if _unicast(mac)
        and mac in view.out
        and (not (ips - UNSPECIFIED) or any(ip in net for ip in ips for net in LEAF_NETS if ip.version == net.version))
    }
    public_only = {mac for mac, ips in view.src_ips.items() if ips - UNSPECIFIED and all(ip.is_global for ip in ips)}
    detail = {mac: sorted(map(str, view.src_ips.get(mac, ()))) for mac in (required - leaves) | (public_only & leaves)}
    assert not required - leaves, f"leaf-side MACs missing from leaves[]: {sorted(required - leaves)}; {detail}"
    assert not public_only & leaves, f"MACs with only global addresses reported as leaves: {detail}"

    # (g) leaf.ips: its leaf-side addresses (RFC 1918, link-local, ULA; README), from the same three sources.
    wrong = []
    for leaf in ours["leaves"]:
        got = {ipaddress.ip_address(x) for x in leaf["ips"]}
        want = {
            ip
            for ip in view.src_ips.get(leaf["mac"], set())
            if ip not in UNSPECIFIED and any(ip in net for net in LEAF_NETS if net.version == ip.version)
        }
        if got != want and not (len(got) >= MAX_IPS_PER_LEAF and got < want):
            wrong.append(
                f"{leaf['mac']}: only ours {sorted(map(str, got - want))}, only tshark {sorted(map(str, want - got))}"
            )
    assert not wrong, f"{capture} leaf ips differ:\n" + "\n".join(wrong)


@pytest.mark.parametrize("capture", _params())
def test_leaf_counters(runs: _Runs, capture: str) -> None:
    """All-leaf run: every unicast source MAC is a leaf; its in/out frames and bytes equal tshark's."""
    view, ours = runs.get_all_leaf(capture)
    leaves = _leaves(ours)
    sources = {mac for mac in view.out if _unicast(mac)}
    assert set(leaves) == sources, _diff(
        f"{capture} leaves (all-leaf run) vs unicast source MACs",
        dict.fromkeys(leaves, "leaf"),
        dict.fromkeys(sources, "source"),
    )
    ours_out = {m: (leaf["packets_out"], leaf["bytes_out"]) for m, leaf in leaves.items()}
    their_out = {m: (view.out[m], view.out_bytes[m]) for m in leaves}
    assert ours_out == their_out, _diff(f"{capture} packets_out/bytes_out per leaf", ours_out, their_out)
    if view.sll:
        # Linux cooked capture: no destination MAC in the frame, so tshark cannot tell whose frames came in.
        return
    ours_in = {m: (leaf["packets_in"], leaf["bytes_in"]) for m, leaf in leaves.items()}
    their_in = {m: (view.in_[m], view.in_bytes[m]) for m in leaves}
    assert ours_in == their_in, _diff(f"{capture} packets_in/bytes_in per leaf", ours_in, their_in)


def test_tshark_conv_tables_agree_with_fields(runs: _Runs) -> None:
    """The oracle checks itself: per-frame derivation == tshark's conversation tables, for every capture."""
    if not CAPTURES:
        pytest.skip(f"{PCAPS} is absent or empty")
    problems = []
    for path in CAPTURES:
        fut = runs.jobs.get(path.name)
        view = fut[0].result() if fut else run_tshark(path)
        if dict(view.flows) != dict(view.conv_frames):
            problems.append(_diff(f"{path.name} frames per directed 5-tuple", dict(view.flows), dict(view.conv_frames)))
        for key, total in view.flow_bytes.items():
            if not view.conv_bytes_lo[key] <= total <= view.conv_bytes_hi[key]:
                problems.append(
                    f"{path.name} {key}: fields say {total} B, conv table says "
                    f"[{view.conv_bytes_lo[key]}, {view.conv_bytes_hi[key]}]"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("capture", _params())
def test_conversations(runs: _Runs, capture: str) -> None:
    view, ours = runs.get(capture)
    packets: Counter[Directed] = Counter()
    size: Counter[Directed] = Counter()
    for conv in ours["conversations"]:
        proto = conv["protocol"]
        assert proto in ("tcp", "udp"), conv
        a, b = _addr(conv["a_addr"]), _addr(conv["b_addr"])
        ab: Directed = (proto, a, int(conv["a_port"]), b, int(conv["b_port"]))
        ba: Directed = (proto, b, int(conv["b_port"]), a, int(conv["a_port"]))
        packets[ab] += conv["packets_ab"]
        size[ab] += conv["bytes_ab"]
        packets[ba] += conv["packets_ba"]
        size[ba] += conv["bytes_ba"]
    ours_map = {k: (packets[k], size[k]) for k in packets | size if packets[k] or size[k]}
    their_map = {k: (view.flows[k], view.flow_bytes[k]) for k in view.flows}
    assert ours_map == their_map, _diff(f"{capture} (packets, bytes) per directed 5-tuple", ours_map, their_map)

    # Initiator and first/last seen, per 5-tuple (earliest report entry if a 5-tuple is reported more than once).
    earliest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for conv in ours["conversations"]:
        key = (conv["protocol"], _addr(conv["a_addr"]), int(conv["a_port"]), _addr(conv["b_addr"]), int(conv["b_port"]))
        ident = _undirected(key)
        if ident not in earliest or conv["first_seen"] < earliest[ident]["first_seen"]:
            earliest[ident] = {"a": key[1:3], "first_seen": conv["first_seen"], "last_seen": conv["last_seen"]}
    problems = []
    for ident, got in sorted(earliest.items()):
        if ident not in view.opener:
            continue  # already reported above
        opener, flags = view.opener[ident]
        want = _initiator(opener, flags)
        if got["a"] != want:
            problems.append(f"{ident}: a side ours={got['a']} tshark={want} (first frame {opener}, flags {flags:#05x})")
        lo, hi = view.span[ident]
        if abs(got["first_seen"] - lo) > 1e-6 or abs(got["last_seen"] - hi) > 1e-6:
            problems.append(
                f"{ident}: first/last seen ours=({got['first_seen']}, {got['last_seen']}) tshark=({lo}, {hi})"
            )
    assert not problems, f"{capture}: {len(problems)} conversations differ\n" + "\n".join(problems[:25])

    # TCP state, per 5-tuple: README's table replayed on tshark's flags (last entry if reported twice).
    ours_state = {
        _undirected(("tcp", _addr(c["a_addr"]), int(c["a_port"]), _addr(c["b_addr"]), int(c["b_port"]))): c["state"]
        for c in ours["conversations"]
        if c["protocol"] == "tcp"
    }
    want_state = _tcp_states(view.tcp_events)
    assert ours_state == want_state, _diff(f"{capture} TCP state per 5-tuple", ours_state, want_state)


@pytest.mark.parametrize("capture", _params())
def test_dhcp_names(runs: _Runs, capture: str) -> None:
    view, ours = runs.get_all_leaf(capture)
    leaves = {leaf["mac"]: leaf for leaf in ours["leaves"]}
    problems = []
    for client in sorted(view.dhcp_clients):
        leaf = leaves.get(client)
        if leaf is None:
            problems.append(f"DHCP client {client} is not reported as a leaf")
            continue
        dhcp = leaf.get("dhcp") or {}
        names = view.dhcp_hostnames.get(client, [])
        expect = {
            "hostname": names[-1] if names else None,
            "vendor_class": view.dhcp_vendor.get(client),
            "param_request_list": view.dhcp_prl.get(client),
        }
        got = {k: dhcp.get(k) or None for k in expect}
        if got != expect:
            problems.append(f"{client}: dhcp ours={got} tshark={expect}")
        missing = set(names) - set(leaf.get("hostnames") or [])
        if missing:
            problems.append(f"{client}: hostnames {leaf.get('hostnames')} lack DHCP names {sorted(missing)}")
    for mac, leaf in leaves.items():
        dhcp = leaf.get("dhcp") or {}
        if mac not in view.dhcp_clients and (dhcp.get("hostname") or dhcp.get("vendor_class")):
            problems.append(f"{mac} never sent a DHCP request but has dhcp={dhcp} (server options taken as its own?)")
    assert not problems, f"{capture}:\n" + "\n".join(problems)


def _fffd(name: str) -> str:
    """Collapse runs of U+FFFD. Names with bytes that are not UTF-8 (ndpi_dns-tunnel-iodine's binary labels)
    are decoded with replacement characters on both sides, but tshark (GLib) and Python's "replace" handler
    emit different numbers of U+FFFD for the same invalid bytes; everything else must be equal."""
    return re.sub("\ufffd+", "\ufffd", name)


def _names_check(
    capture: str, what: str, ours: dict[str, list[str]], theirs: dict[str, set[str]], evicted: int
) -> list[str]:
    problems = []
    for mac in sorted(set(ours) | set(theirs)):
        got = {_fffd(n) for n in ours.get(mac, [])}
        want = {_fffd(n) for n in theirs.get(mac, set())}
        if got == want:
            continue
        if evicted and got < want and len(got) >= 256:
            continue  # capped list: the report says names were evicted
        problems.append(
            f"{capture} {mac} {what}: only ours {sorted(got - want)[:10]}, only tshark {sorted(want - got)[:10]} "
            f"(ours {len(got)}, tshark {len(want)})"
        )
    return problems


@pytest.mark.parametrize("capture", _params())
def test_services_dns_sni(runs: _Runs, capture: str) -> None:
    view, ours = runs.get_all_leaf(capture)
    leaves = _leaves(ours)
    evicted = int(ours["capture"].get("evicted_names") or 0)
    problems = []
    services = {m: {s["port"] for s in leaf["services"] if s["protocol"] == "tcp"} for m, leaf in leaves.items()}
    want_services = {m: view.syn_ack_ports.get(m, set()) for m in leaves}
    if services != want_services:
        problems.append(_diff(f"{capture} TCP services (SYN-ACK source ports) per leaf", services, want_services))
    dns = {m: leaf["dns_queries"] for m, leaf in leaves.items() if leaf["dns_queries"]}
    problems += _names_check(capture, "dns_queries", dns, {m: q for m, q in view.dns_queries.items() if q}, evicted)
    sni = {m: leaf["tls_sni"] for m, leaf in leaves.items() if leaf["tls_sni"]}
    problems += _names_check(capture, "tls_sni", sni, {m: n for m, n in view.tls_sni.items() if n}, evicted)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("capture", _params())
def test_hostnames(runs: _Runs, capture: str) -> None:
    """(h) hostnames (all-leaf run): every unique NetBIOS name a MAC registered (tshark: name-registration or
    refresh requests, suffix <00> or <20>, not a group name) and the name of every mDNS A/AAAA record it sent
    from port 5353 (any section) are among its hostnames (unless the list is at its cap), and every hostname is a
    name: no control characters, never the NetBIOS wildcard "*" (NBSTAT node-status queries and answers
    carry "*" padded with NULs, ndpi_netbios frames 55, 129, 174, 187)."""
    view, ours = runs.get_all_leaf(capture)
    problems = []
    for mac, leaf in _leaves(ours).items():
        names = leaf.get("hostnames") or []
        missing = view.nbns_registered.get(mac, set()) - set(names)
        if missing:
            problems.append(f"{mac}: registered NetBIOS names {sorted(missing)} missing from hostnames {names}")
        missing = view.mdns_names.get(mac, set()) - set(names)
        if missing and len(names) < 256:
            problems.append(f"{mac}: names of its mDNS A/AAAA records {sorted(missing)} missing from {names}")
        bad = [n for n in names if n.startswith("*") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in n)]
        if bad:
            problems.append(f"{mac}: hostnames that are not names: {bad!r}")
    assert not problems, f"{capture}:\n" + "\n".join(problems)
