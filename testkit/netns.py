"""Network namespaces, veth pairs and bridges for tests that need real kernel frames.

Everything a :class:`Lab` creates lives in namespaces named ``lgt-<pid>-<n>-<role>``; deleting a namespace
deletes the links inside it, so cleanup is "kill our processes, delete our namespaces", done in ``close()``
(also on failure: ``with Lab() as lab``). Namespaces left by a killed test run are
swept when their pid is gone. Traffic stays inside these namespaces: the root namespace gets no link.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import pytest

PREFIX = "lgt"
_counter = itertools.count()

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 to create network namespaces (CI runs as root)",
)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def sweep_stale() -> None:
    """Delete namespaces of earlier test runs whose process no longer exists."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}-(\d+)-\d+-[\w-]+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _ip("netns", "del", name, check=False)


@dataclass
class Netns:
    name: str
    lab: Lab

    def run(self, *cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", self.name, *cmd]
        return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a long-running process in the namespace; the lab kills it on close."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.name, *cmd], start_new_session=True, **kwargs
        )
        self.lab.processes.append(proc)
        return proc

    def python(self, code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-c", code, *args, timeout=timeout)

    def addr(self, ifname: str, cidr: str) -> None:
        self.run("ip", "addr", "add", cidr, "dev", ifname)

    def up(self, *ifnames: str) -> None:
        for ifname in ifnames:
            self.run("ip", "link", "set", ifname, "up")

    def sysfs_counter(self, ifname: str, counter: str) -> int:
        # /sys shows the mounting namespace's links; `ip netns exec` remounts it for the target namespace.
        return int(self.run("cat", f"/sys/class/net/{ifname}/statistics/{counter}").stdout)

    def mac(self, ifname: str) -> str:
        return self.run("cat", f"/sys/class/net/{ifname}/address").stdout.strip()


@dataclass
class Lab:
    """A set of namespaces owned by one test."""

    tag: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}-{next(_counter)}")
    namespaces: list[Netns] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __enter__(self) -> Lab:
        sweep_stale()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def netns(self, role: str, *, ipv6: bool = False) -> Netns:
        ns = Netns(f"{self.tag}-{role}", self)
        _ip("netns", "add", ns.name)
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        if not ipv6:
            # Without this every new link sends router solicitations and MLD reports the test did not ask for.
            for key in ("all", "default"):
                ns.run("sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1")
        return ns

    def veth(self, a: Netns, a_if: str, b: Netns, b_if: str, *, up: bool = True) -> None:
        _ip("link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if, "netns", b.name)
        if up:
            a.up(a_if)
            b.up(b_if)

    def bridge(self, ns: Netns, name: str, ports: Sequence[str]) -> None:
        # No STP and no multicast snooping: either would make the bridge send frames of its own.
        ns.run(
            "ip", "link", "add", name, "type", "bridge", "forward_delay", "0", "stp_state", "0",
            "mcast_snooping", "0",
        )
        for port in ports:
            ns.run("ip", "link", "set", port, "master", name)
        ns.up(name)

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns.name, check=False)
        self.namespaces.clear()


DHCP_CLIENT = """
import sys
from scapy.all import BOOTP, DHCP, IP, UDP, Ether, conf, get_if_hwaddr, mac2str, srp1
conf.checkIPaddr = False
iface, hostname, server = sys.argv[1:4]
mac = get_if_hwaddr(iface)
def msg(kind, extra):
    return (Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
            / UDP(sport=68, dport=67) / BOOTP(chaddr=mac2str(mac), xid=0x4C470003, flags=0x8000)
            / DHCP(options=[("message-type", kind), ("hostname", hostname),
                            ("param_req_list", [1, 3, 6, 15])] + extra + ["end"]))
offer = srp1(msg("discover", []), iface=iface, timeout=5, verbose=0)
ip = offer[BOOTP].yiaddr
ack = srp1(msg("request", [("requested_addr", ip), ("server_id", server)]), iface=iface, timeout=5, verbose=0)
assert ack is not None and ack[BOOTP].yiaddr == ip
print(ip)
"""


def dhcp_lease(ns: Netns, ifname: str, hostname: str, server: str) -> str:
    """Take a lease from the DHCP server at ``server`` (a real DISCOVER/OFFER/REQUEST/ACK exchange, with scapy) and
    return the address offered; the caller configures it."""
    return ns.python(DHCP_CLIENT, ifname, hostname, server).stdout.strip()
