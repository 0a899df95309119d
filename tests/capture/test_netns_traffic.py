"""End to end on real traffic: leaves in their own namespaces do real work through a bridge that LeafGuard watches.

Topology (all inside namespaces this test creates, addresses 10.77.0.0/24 never leave them)::

    leaf1 (10.77.0.11, static) ─┐
    leaf2 (10.77.0.12, static) ─┼── br0 in "gw" (LeafGuard captures here, promiscuous) ──── srv (10.77.0.1)
    leaf3 (DHCP from dnsmasq)  ─┘                                                           dnsmasq: DNS + DHCP
                                                                                            TCP 8883, UDP 5683

The oracles are independent of LeafGuard: each socket reports what it sent and received, the kernel's interface
counters give every leaf's frames out, and a tcpdump on each leaf's own interface gives the frames delivered to
it. LeafGuard's inventory and conversations must equal them exactly.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from leafguard.capture.live import CaptureSettings, InterfaceState, LiveCapture
from leafguard.capture.pcapfile import read_batches
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.settings import AnalyzerSettings
from testkit.netns import Lab, Netns, needs_root
from testkit.wait import wait_for

pytestmark = [
    pytest.mark.netns,
    needs_root,
    pytest.mark.skipif(
        not (shutil.which("dnsmasq") and shutil.which("tcpdump")), reason="needs dnsmasq and tcpdump"
    ),
    pytest.mark.timeout(120),
]

SRV_IP = "10.77.0.1"
SRV_MAC = "02:77:00:00:00:01"
LEAVES = {"leaf1": ("02:77:00:00:01:01", "10.77.0.11"), "leaf2": ("02:77:00:00:01:02", "10.77.0.12"),
          "leaf3": ("02:77:00:00:01:03", "")}
DNS_NAME = "hub.lab.test"
DHCP_HOSTNAME = "leaf-three"

SERVER = textwrap.dedent(
    """
    import socket, threading
    def tcp():
        s = socket.socket()
        s.bind(("10.77.0.1", 8883))
        s.listen()
        while True:
            c, _ = s.accept()
            with c:
                n = 0
                while d := c.recv(65536):
                    n += len(d)
                c.sendall(b"R" * (n // 2 + 1))
    def udp():
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("10.77.0.1", 5683))
        while True:
            d, a = u.recvfrom(65536)
            u.sendto(d[::-1] + b"!", a)
    threading.Thread(target=tcp, daemon=True).start()
    threading.Thread(target=udp, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
    """
)

# Each action reports what its socket did; the test compares LeafGuard with these facts.
CLIENT = textwrap.dedent(
    """
    import json, socket, struct, sys
    ip, actions = sys.argv[1], json.loads(sys.argv[2])
    out = []
    for a in actions:
        if a["kind"] == "tcp":
            s = socket.socket()
            s.bind((ip, 0))
            local = s.getsockname()
            try:
                s.connect((a["host"], a["port"]))
            except ConnectionRefusedError:
                out.append(dict(a, local=local, refused=True))
                s.close()
                continue
            s.sendall(b"L" * a["size"])
            s.shutdown(socket.SHUT_WR)
            got = 0
            while d := s.recv(65536):
                got += len(d)
            s.close()
            out.append(dict(a, local=local, refused=False, sent=a["size"], received=got))
        elif a["kind"] == "udp":
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind((ip, 0))
            u.settimeout(3)
            got = []
            for size in a["sizes"]:
                u.sendto(b"U" * size, (a["host"], a["port"]))
                got.append(len(u.recvfrom(65536)[0]))
            out.append(dict(a, local=u.getsockname(), received=got))
            u.close()
        elif a["kind"] == "dns":
            q = struct.pack("!HHHHHH", 0x4C47, 0x0100, 1, 0, 0, 0)
            q += b"".join(bytes([len(p)]) + p.encode() for p in a["name"].split(".")) + b"\\0"
            q += struct.pack("!HH", 1, 1)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind((ip, 0))
            u.settimeout(3)
            u.sendto(q, (a["host"], 53))
            r = u.recvfrom(65536)[0]
            out.append(dict(a, local=u.getsockname(), sent=len(q), received=len(r), answer=list(r[-4:])))
            u.close()
    print(json.dumps(out))
    """
)

DHCP_CLIENT = textwrap.dedent(
    """
    import sys
    from scapy.all import BOOTP, DHCP, IP, UDP, Ether, conf, get_if_hwaddr, mac2str, srp1
    conf.checkIPaddr = False
    mac = get_if_hwaddr("eth0")
    def msg(kind, extra):
        return (Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                / UDP(sport=68, dport=67) / BOOTP(chaddr=mac2str(mac), xid=0x4C470003, flags=0x8000)
                / DHCP(options=[("message-type", kind), ("hostname", sys.argv[1]),
                                ("param_req_list", [1, 3, 6, 15])] + extra + ["end"]))
    offer = srp1(msg("discover", []), iface="eth0", timeout=5, verbose=0)
    ip = offer[BOOTP].yiaddr
    ack = srp1(msg("request", [("requested_addr", ip), ("server_id", "10.77.0.1")]), iface="eth0",
               timeout=5, verbose=0)
    assert ack is not None and ack[BOOTP].yiaddr == ip
    print(ip)
    """
)


@dataclass
class Net:
    lab: Lab
    gw: Netns
    srv: Netns
    leaves: dict[str, Netns]
    ips: dict[str, str] = field(default_factory=dict)
    tcpdumps: dict[str, tuple[subprocess.Popen[bytes], Path]] = field(default_factory=dict)

    def endpoints(self) -> dict[str, Netns]:
        return {**self.leaves, "srv": self.srv}

    def tx(self) -> dict[str, tuple[int, int]]:
        return {
            name: (ns.sysfs_counter("eth0", "tx_packets"), ns.sysfs_counter("eth0", "tx_bytes"))
            for name, ns in self.endpoints().items()
        }


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    with Lab() as lab:
        gw = lab.netns("gw")
        srv = lab.netns("srv")
        leaves = {name: lab.netns(name) for name in LEAVES}
        ports = []
        for i, (name, ns) in enumerate({**leaves, "srv": srv}.items()):
            port = f"p{i}"
            lab.veth(gw, port, ns, "eth0", up=False)
            mac = SRV_MAC if name == "srv" else LEAVES[name][0]
            ns.run("ip", "link", "set", "eth0", "address", mac)
            ports.append(port)
        lab.bridge(gw, "br0", ports)
        gw.up(*ports)
        srv.addr("eth0", f"{SRV_IP}/24")
        for name, ns in leaves.items():
            if LEAVES[name][1]:
                ns.addr("eth0", f"{LEAVES[name][1]}/24")
        for ns in (srv, *leaves.values()):
            ns.up("eth0")
        yield Net(lab, gw, srv, leaves, {name: ip for name, (_, ip) in LEAVES.items() if ip})


def start_services(net: Net, tmp_path: Path) -> None:
    server = net.srv.popen("python3", "-c", SERVER, stdout=subprocess.PIPE)
    assert server.stdout is not None
    assert server.stdout.readline().strip() == b"ready"
    net.srv.popen(
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-ping",
        "--bind-interfaces", "--interface=eth0", f"--listen-address={SRV_IP}", "--except-interface=lo",
        f"--address=/{DNS_NAME}/{SRV_IP}", "--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h",
        "--dhcp-authoritative", f"--dhcp-leasefile={tmp_path / 'leases'}",
        f"--pid-file={tmp_path / 'dnsmasq.pid'}", "--user=root", "--group=root", "--log-facility=-",
        stderr=subprocess.DEVNULL,
    )
    for name, ns in net.leaves.items():
        pcap = tmp_path / f"{name}.pcap"
        # Immediate mode: otherwise frames in libpcap's last unretired ring block are lost when it stops.
        proc = ns.popen("tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-s", "0", "-w", str(pcap),
                        stderr=subprocess.PIPE)
        assert proc.stderr is not None
        assert b"listening on eth0" in proc.stderr.readline()
        net.tcpdumps[name] = (proc, pcap)
    deadline = time.monotonic() + 10
    while net.srv.run("ss", "-lun", check=False).stdout.count(f"{SRV_IP}:53") == 0:
        assert time.monotonic() < deadline, "dnsmasq did not start"
        time.sleep(0.05)


def make_traffic(net: Net) -> dict[str, list[dict[str, Any]]]:
    leaf3_ip = net.leaves["leaf3"].python(DHCP_CLIENT, DHCP_HOSTNAME).stdout.strip()
    net.leaves["leaf3"].addr("eth0", f"{leaf3_ip}/24")
    net.ips["leaf3"] = leaf3_ip
    plans: dict[str, list[dict[str, Any]]] = {
        "leaf1": [
            {"kind": "dns", "host": SRV_IP, "name": DNS_NAME},
            {"kind": "tcp", "host": SRV_IP, "port": 8883, "size": 3000},
            {"kind": "tcp", "host": SRV_IP, "port": 1884},
        ],
        "leaf2": [
            {"kind": "udp", "host": SRV_IP, "port": 5683, "sizes": [10, 200, 1000]},
            {"kind": "dns", "host": SRV_IP, "name": DNS_NAME},
            {"kind": "tcp", "host": SRV_IP, "port": 8883, "size": 100_000},
        ],
        "leaf3": [
            {"kind": "tcp", "host": SRV_IP, "port": 8883, "size": 10},
            {"kind": "tcp", "host": SRV_IP, "port": 22},
            {"kind": "udp", "host": SRV_IP, "port": 5683, "sizes": [1, 2]},
        ],
    }
    done = {}
    for name, plan in plans.items():
        out = net.leaves[name].python(CLIENT, net.ips[name], json.dumps(plan)).stdout
        done[name] = json.loads(out)
    return done


def stop_tcpdumps(net: Net) -> None:
    for proc, _ in net.tcpdumps.values():
        proc.send_signal(signal.SIGINT)
    for proc, _ in net.tcpdumps.values():
        proc.wait(10)


def delivered_to(pcap: Path, mac: str) -> tuple[int, int]:
    """Frames (and their wire bytes) a leaf's own interface received addressed to its MAC."""
    want = bytes.fromhex(mac.replace(":", ""))
    n = size = 0
    for batch in read_batches(pcap):
        for i in range(len(batch)):
            if batch.frame(i)[:6] == want:
                n += 1
                size += batch.wirelens[i]
    return n, size


def tcp_oracle(pcap: Path) -> dict[tuple[str, int, str, int], tuple[int, int, int]]:
    """Per directed TCP 5-tuple at the leaf: frames, wire bytes, payload bytes."""
    out: Counter[tuple[tuple[str, int, str, int], int]] = Counter()
    for batch in read_batches(pcap):
        for i in range(len(batch)):
            f = batch.frame(i)
            if f[12:14] != b"\x08\x00" or f[23] != 6:
                continue
            ihl = (f[14] & 0x0F) * 4
            total = struct.unpack_from("!H", f, 16)[0]
            sport, dport = struct.unpack_from("!HH", f, 14 + ihl)
            doff = (f[14 + ihl + 12] >> 4) * 4
            key = (".".join(map(str, f[26:30])), sport, ".".join(map(str, f[30:34])), dport)
            out[(key, 0)] += 1
            out[(key, 1)] += batch.wirelens[i]
            out[(key, 2)] += total - ihl - doff
    keys = {k for k, _ in out}
    return {k: (out[(k, 0)], out[(k, 1)], out[(k, 2)]) for k in keys}


def caught_up(analyzer: Analyzer, cap: LiveCapture, total: int) -> bool:
    return analyzer.stats.packets >= total and cap.queue.empty()


async def settle(cond: Callable[[], bool]) -> None:
    """Wait for ``cond`` (the caller bounds the wait with asyncio.timeout)."""
    while True:
        if cond():
            return
        await asyncio.sleep(0.02)


async def capture_all(net: Net, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Run LiveCapture + Analyzer on br0 while the leaves work; the report, the facts, capture stats."""
    analyzer = Analyzer(AnalyzerSettings())
    cap = LiveCapture(CaptureSettings(interfaces=("br0",), netns=net.gw.name, block_timeout_ms=20))
    before = net.tx()

    async def feed() -> None:
        while True:
            analyzer.feed(await cap.get())

    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(cap.run(), name="capture")
        feeder = tg.create_task(feed(), name="feed")
        async with asyncio.timeout(5):
            await settle(lambda: cap.stats()["br0"].state is InterfaceState.RUNNING)
        start_services(net, tmp_path)
        facts = await asyncio.to_thread(make_traffic, net)
        # Every frame on the segment entered the bridge through one port, so br0 sees each exactly once.
        # Kernels may still send a late ACK or ARP: wait until the counters are quiet and all is analysed.
        async with asyncio.timeout(10):
            while True:
                after = net.tx()
                sent_total = sum(after[n][0] - before[n][0] for n in after)
                await settle(functools.partial(caught_up, analyzer, cap, sent_total))
                await asyncio.sleep(0.3)
                if net.tx() == after and analyzer.stats.packets == sent_total:
                    break
        # The leaves' own captures stop only now, so they include any late frame the counters include.
        await asyncio.to_thread(stop_tcpdumps, net)
        assert net.tx() == after, "traffic after the quiet period: the oracles would disagree"
        runner.cancel()
        feeder.cancel()
    stats = cap.stats()["br0"].as_dict()
    counters = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in after}
    return analyzer.report(), {"actions": facts, "tx": counters, "sent_total": sent_total}, stats


def conversation(report: dict[str, Any], proto: str, a: tuple[str, int], b: tuple[str, int]) -> dict[str, Any]:
    for c in report["conversations"]:
        if c["protocol"] == proto and (c["a_addr"], c["a_port"], c["b_addr"], c["b_port"]) == (*a, *b):
            return c  # type: ignore[no-any-return]
    raise AssertionError(f"no {proto} conversation {a} -> {b} in {report['conversations']}")


async def test_inventory_and_conversations_equal_what_the_leaves_did(net: Net, tmp_path: Path) -> None:
    report, facts, stats = await capture_all(net, tmp_path)
    assert_matches(report, facts, stats, net)


def assert_matches(report: dict[str, Any], facts: dict[str, Any], stats: dict[str, Any], net: Net) -> None:
    # Nothing was lost on the way, and the analyzer saw exactly the frames the endpoints sent.
    assert stats["kernel_drops"] == 0 and stats["queue_drops"] == 0
    assert report["capture"]["packets"] == stats["frames"] == facts["sent_total"]
    assert report["capture"]["bytes"] == sum(b for _, b in facts["tx"].values())

    leaves = {leaf["mac"]: leaf for leaf in report["leaves"]}
    macs = {name: mac for name, (mac, _) in LEAVES.items()} | {"srv": SRV_MAC}
    assert set(leaves) == set(macs.values())
    ips = net.ips | {"srv": SRV_IP}
    for name, mac in macs.items():
        leaf = leaves[mac]
        assert leaf["ips"] == [ips[name]], name
        assert (leaf["packets_out"], leaf["bytes_out"]) == facts["tx"][name], name
        if name != "srv":
            assert (leaf["packets_in"], leaf["bytes_in"]) == delivered_to(net.tcpdumps[name][1], mac), name

    # Names: the DHCP exchange with dnsmasq, and the DNS queries the leaves' sockets made.
    leaf3 = leaves[macs["leaf3"]]
    assert leaf3["dhcp"]["hostname"] == DHCP_HOSTNAME
    assert leaf3["dhcp"]["param_request_list"] == [1, 3, 6, 15]
    assert DHCP_HOSTNAME in leaf3["hostnames"]
    for name in ("leaf1", "leaf2"):
        assert leaves[macs[name]]["dns_queries"] == [DNS_NAME]
        assert leaves[macs[name]]["services"] == []
    # Services: what answered on the server (the refused ports 1884 and 22 are not). The DHCP server answers
    # from a different 5-tuple than the broadcast request (0.0.0.0:68 -> 255.255.255.255:67), which the core
    # does not (yet) pair into a service, so udp/67 may or may not be listed.
    services = {(s["protocol"], s["port"]) for s in leaves[SRV_MAC]["services"]}
    assert {("tcp", 8883), ("udp", 5683), ("udp", 53)} <= services <= {
        ("tcp", 8883), ("udp", 5683), ("udp", 53), ("udp", 67)
    }

    # Conversations: UDP exactly from the sockets, TCP from the sockets' payload and the leaf's own tcpdump.
    n_tcp = n_udp = 0
    for name, actions in facts["actions"].items():
        tcp_seen = tcp_oracle(net.tcpdumps[name][1])
        for act in actions:
            local = (act["local"][0], act["local"][1])
            if act["kind"] == "dns":
                c = conversation(report, "udp", local, (SRV_IP, 53))
                assert act["answer"] == [10, 77, 0, 1]
                assert (c["packets_ab"], c["bytes_ab"]) == (1, 42 + act["sent"])
                assert (c["packets_ba"], c["bytes_ba"]) == (1, 42 + act["received"])
                n_udp += 1
            elif act["kind"] == "udp":
                c = conversation(report, "udp", local, (SRV_IP, act["port"]))
                assert act["received"] == [s + 1 for s in act["sizes"]]
                assert (c["packets_ab"], c["bytes_ab"]) == (len(act["sizes"]), sum(42 + s for s in act["sizes"]))
                assert (c["packets_ba"], c["bytes_ba"]) == (
                    len(act["sizes"]), sum(42 + s for s in act["received"])
                )
                n_udp += 1
            else:
                c = conversation(report, "tcp", local, (SRV_IP, act["port"]))
                ab = tcp_seen[(*local, SRV_IP, act["port"])]
                ba = tcp_seen[(SRV_IP, act["port"], *local)]
                assert (c["packets_ab"], c["bytes_ab"]) == ab[:2]
                assert (c["packets_ba"], c["bytes_ba"]) == ba[:2]
                if act["refused"]:
                    assert (c["packets_ab"], c["packets_ba"]) == (1, 1)
                    assert (ab[2], ba[2]) == (0, 0)
                else:
                    # The oracle agrees with the sockets about the payload, so its frame counts are the truth.
                    assert (ab[2], ba[2]) == (act["sent"], act["received"])
                n_tcp += 1
    assert (n_tcp, n_udp) == (5, 4)
    # Besides those, only the DHCP exchange: every conversation is accounted for.
    dhcp = [c for c in report["conversations"] if 67 in (c["a_port"], c["b_port"])]
    assert len(report["conversations"]) == n_tcp + n_udp + len(dhcp)
    assert dhcp and all(c["protocol"] == "udp" for c in dhcp)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def analysed_at_least(total: int, stats: dict[str, Any]) -> bool:
    return int(stats.get("capture", {}).get("packets", 0)) >= total


def wait_for_file(path: Path, cond: Callable[[dict[str, Any]], bool], within: float = 15.0) -> dict[str, Any]:
    got: dict[str, Any] = wait_for(lambda: (data := read_json(path)) and cond(data) and data, timeout_s=within)
    return got


def test_leafguard_run_writes_the_same_inventory(net: Net, tmp_path: Path) -> None:
    """The service end to end: ``leafguard run --interface br0 --local-dir DIR`` in the gateway namespace."""
    out = tmp_path / "out"
    before = net.tx()
    log_path = tmp_path / "leafguard.log"
    # A file, not a pipe: a pipe nobody reads fills up and would block the service's logging.
    with log_path.open("wb") as log_file:
        proc = net.gw.popen(
            sys.executable, "-m", "leafguard", "run", "--interface", "br0", "--local-dir", str(out),
            "--write-interval", "0.2", stderr=log_file,
        )
    running = wait_for_file(
        out / "stats.json", lambda d: d.get("interfaces", {}).get("br0", {}).get("state") == "running"
    )
    assert running["interfaces"]["br0"]["opens"] == 1
    start_services(net, tmp_path)
    facts = make_traffic(net)
    while True:
        after = net.tx()
        total = sum(after[n][0] - before[n][0] for n in after)
        wait_for_file(out / "stats.json", functools.partial(analysed_at_least, total))
        time.sleep(0.3)
        if net.tx() == after:
            break
    stop_tcpdumps(net)
    assert net.tx() == after, "traffic after the quiet period: the oracles would disagree"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log_path.read_text()
    stats = read_json(out / "stats.json")
    report = {
        "capture": stats["capture"],
        "leaves": read_json(out / "leaves.json")["leaves"],
        "conversations": read_json(out / "conversations.json")["conversations"],
    }
    counters = {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in after}
    assert_matches(report, {"actions": facts, "tx": counters, "sent_total": total}, stats["interfaces"]["br0"], net)
