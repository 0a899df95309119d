"""The lab's cases: real attack tools, bounded in count and time, aimed only at the lab's own namespaces, and the
benign work of the leaves (always running, so every case has it around the attack, and the benign case is that
work alone).

Each case names the alert types it must raise (``expect``) and those it may raise besides, because they are also
true of it (``allowed``: an ARP poisoner also moves an address, the FTP cracker also logs in in cleartext);
anything else raised during a case is a false alarm.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testkit.lab.topology import GW_IP, HOSTS, SCRIPTS, SWEEP_NET, AttackLab

TARGET = HOSTS["target"][1]
TARGET6 = HOSTS["target"][2]
PASSWORDS = [f"guess{i:03d}" for i in range(60)]
BENIGN_S = 15.0
S = frozenset


@dataclass(frozen=True)
class Case:
    name: str
    expect: frozenset[str]
    run: Callable[[AttackLab], None]
    allowed: frozenset[str] = frozenset()
    slow: bool = False
    tool: str = ""
    """The command line, as the scorecard prints it."""
    settle_s: float = 1.0
    """Capture kept running after the tool ends (late answers; UDP probes are judged unanswered after 3 s)."""


def _attacker(al: AttackLab, *cmd: str, timeout: float = 60) -> None:
    # Exit status is not asserted: nmap and hydra exit 0, hping3 1 when no answer, timeout 124; what matters is
    # the traffic, which the case's capture records.
    al.ns["attacker"].run("timeout", str(timeout), *cmd, check=False, timeout=timeout + 10)


def _nmap(*args: str) -> Callable[[AttackLab], None]:
    def run(al: AttackLab) -> None:
        _attacker(al, "nmap", "-n", *args)

    return run


def _hping(*args: str) -> Callable[[AttackLab], None]:
    def run(al: AttackLab) -> None:
        _attacker(al, "hping3", "-q", *args, timeout=20)

    return run


def _hydra(service: str) -> Callable[[AttackLab], None]:
    def run(al: AttackLab) -> None:
        words = al.work / "passwords.txt"
        words.write_text("\n".join(PASSWORDS) + "\n")
        # From the lab's directory: hydra writes its restore file into the current one. Its default 16 tasks;
        # a 5 s wait for answers (the default 32 s only makes the last tasks linger after sshd drops them).
        _attacker(
            al,
            "env",
            "-C",
            str(al.work),
            "hydra",
            "-l",
            "admin",
            "-P",
            str(words),
            "-w",
            "5",
            "-I",
            f"{service}://{TARGET}",
            timeout=25,
        )

    return run


def _ncrack_mqtt(al: AttackLab) -> None:
    """ncrack's MQTT module (hydra has none) against the target's mosquitto, which has a password: one CONNECT per
    guess, each refused with CONNACK 5 (not authorised)."""
    words = al.work / "passwords.txt"
    words.write_text("\n".join(PASSWORDS) + "\n")
    _attacker(al, "ncrack", "--user", "admin", "-P", str(words), f"mqtt://{TARGET}", timeout=25)


def _arp_scan(al: AttackLab) -> None:
    _attacker(al, "arp-scan", "-I", "eth0", "--localnet", "--retry=1", timeout=20)


def _solicit(al: AttackLab, times: int) -> None:
    """The sensor asks for the target's MAC (a neighbour solicitation each time: its cache is flushed first), and
    sends it a CoAP datagram."""
    sensor = al.ns["sensor"]
    for _ in range(times):
        sensor.run("ip", "-6", "neigh", "flush", "dev", "eth0", check=False)
        sensor.python(_COAP6, TARGET6, timeout=10)
        time.sleep(0.3)


_COAP6 = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(bytes([0x40, 1, 0, 1]), (sys.argv[1], 5683))
try:
    s.recvfrom(64)
except TimeoutError:
    pass
"""


def _parasite6(al: AttackLab) -> None:
    proc = al.ns["attacker"].popen(
        "timeout", "15", "atk6-parasite6", "eth0", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(1.0)
    _solicit(al, 5)
    proc.terminate()
    proc.wait(10)


def _fake_advertise6(al: AttackLab) -> None:
    _solicit(al, 2)  # the target's own advertisement binds its address first
    _attacker(al, "atk6-fake_advertise6", "eth0", TARGET6, timeout=3)


def _arp_poison(al: AttackLab) -> None:
    time.sleep(3.0)  # the victim's own traffic to the cloud first: its gateway is known
    victim = al.ips["sensor"]
    _attacker(al, "python3", str(SCRIPTS / "arp_poison.py"), "eth0", victim, HOSTS["sensor"][0], GW_IP, "4", timeout=20)
    # Give the victim its gateway back, so that the cases after this one see a healthy segment.
    al.ns["sensor"].run("ip", "neigh", "flush", "dev", "eth0", check=False)


def benign_case(seconds: float) -> Case:
    """The leaves' work alone for ``seconds``: CI's case is short (the live run judges minutes of the same work);
    the scorecard runs one longer than the longest window (``scanWindowS``, 300 s) with ``--benign-s``."""

    def run(al: AttackLab) -> None:
        time.sleep(seconds)

    return Case("benign", S(), run, slow=seconds > BENIGN_S, tool=f"leaves only ({seconds:g} s)")


CASES: list[Case] = [
    Case("nmap_syn_scan", S({"port_scan"}), _nmap("-Pn", "-sS", "-p", "1-200", TARGET), tool="nmap -sS"),
    Case("nmap_connect_scan", S({"port_scan"}), _nmap("-Pn", "-sT", "-p", "1-200", TARGET), tool="nmap -sT"),
    Case("nmap_fin_scan", S({"stealth_scan"}), _nmap("-Pn", "-sF", "-p", "1-200", TARGET), tool="nmap -sF"),
    Case("nmap_null_scan", S({"stealth_scan"}), _nmap("-Pn", "-sN", "-p", "1-200", TARGET), tool="nmap -sN"),
    Case("nmap_xmas_scan", S({"stealth_scan"}), _nmap("-Pn", "-sX", "-p", "1-200", TARGET), tool="nmap -sX"),
    Case("nmap_ack_scan", S({"stealth_scan"}), _nmap("-Pn", "-sA", "-p", "1-200", TARGET), tool="nmap -sA"),
    Case(
        "nmap_udp_scan",
        S({"udp_scan"}),
        _nmap("-Pn", "-sU", "-p", "1-200", "--max-retries", "1", "--host-timeout", "25s", TARGET),
        tool="nmap -sU",
        settle_s=4.0,
    ),
    Case("nmap_os_detection", S({"port_scan"}), _nmap("-Pn", "-O", "--top-ports", "100", TARGET), tool="nmap -O"),
    Case("nmap_arp_discovery", S({"arp_sweep"}), _nmap("-sn", "-PR", "10.88.0.0/24"), tool="nmap -sn -PR"),
    Case("arp_scan", S({"arp_sweep"}), _arp_scan, tool="arp-scan --localnet"),
    Case(
        "nmap_icmp_sweep",
        S({"icmp_sweep"}),
        _nmap("-sn", "-PE", "--disable-arp-ping", "--max-retries", "0", "--max-rtt-timeout", "200ms", SWEEP_NET),
        tool="nmap -sn -PE",
    ),
    Case(
        "hping3_syn_flood",
        S({"flood"}),
        _hping("-S", "-p", "9", "-i", "u500", "-c", "4000", TARGET),
        tool="hping3 -S -i u500 -c 4000",
    ),
    Case(
        "hping3_udp_flood",
        S({"flood"}),
        _hping("--udp", "-p", "9", "-i", "u500", "-c", "4000", TARGET),
        tool="hping3 --udp -i u500 -c 4000",
    ),
    Case(
        "hping3_icmp_flood",
        S({"flood"}),
        _hping("--icmp", "-i", "u500", "-c", "4000", TARGET),
        tool="hping3 --icmp -i u500 -c 4000",
    ),
    Case("hydra_ssh", S({"connection_brute_force"}), _hydra("ssh"), tool="hydra ssh (16 tasks)"),
    Case(
        "hydra_ftp",
        S({"brute_force", "cleartext_login"}),
        _hydra("ftp"),
        allowed=S({"connection_brute_force"}),
        tool="hydra ftp (16 tasks)",
    ),
    Case(
        "ncrack_mqtt",
        S({"brute_force", "cleartext_login"}),
        _ncrack_mqtt,
        allowed=S({"connection_brute_force"}),
        tool="ncrack mqtt (default timing)",
    ),
    Case("parasite6", S({"nd_spoofing"}), _parasite6, allowed=S({"address_conflict"}), tool="atk6-parasite6"),
    Case(
        "fake_advertise6",
        S({"nd_spoofing"}),
        _fake_advertise6,
        allowed=S({"address_conflict"}),
        tool="atk6-fake_advertise6",
    ),
    Case(
        "arp_poisoning",
        S({"arp_spoofing", "gateway_impersonation"}),
        _arp_poison,
        allowed=S({"address_conflict"}),
        tool="scapy ARP replies",
    ),
    Case(
        "nmap_slow_scan_T2",
        S({"port_scan"}),
        _nmap("-Pn", "-sS", "-T2", "-p", "1-20", TARGET),
        slow=True,
        tool="nmap -sS -T2 (0.4 s per probe)",
    ),
    benign_case(BENIGN_S),
]


def case_pcap(directory: Path, case: Case) -> Path:
    return directory / f"{case.name}.pcap"
