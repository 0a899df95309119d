"""Detection thresholds: one frozen record, validated as a whole, changed live from the ``detection`` settings.

Where each default comes from (the anchors of issue #14; the README alert table repeats them):

* ``scan_window_s`` 300, ``port_scan_ports`` 15, ``address_scan_hosts`` 25: Zeek's scan policy
  (``policy/misc/scan.zeek``: 15 unique ports of one host, or 25 unique hosts on one port, failed within 5 min).
  The stealth, UDP and ICMP variants use the same counts and window: Zeek counts every failed attempt, whatever
  the probe (a probe answered with RST or ICMP unreachable, or not answered at all).
* ``arp_sweep_hosts`` 25 within ``arp_sweep_window_s`` 60: Zeek's address-scan count; a shorter window than
  Zeek's because a router refreshes the ARP entries of every leaf it talks to (a few per minute on a busy
  segment), while a sweep tool asks for a whole subnet within seconds (arp-scan: 254 requests in ~0.6 s).
* ``udp_reply_timeout_s`` 3: a UDP probe with no answer after 3 s counts as failed. nmap's own initial probe
  timeout is 1 s (``--initial-rtt-timeout``); Linux answers closed ports with ICMP but rate-limits it per peer
  (``net.ipv4.icmp_ratelimit``, 1 s after a burst of 6), so most probes of a fast UDP scan go unanswered.
* ``brute_force_failures`` 10: failed cleartext logins (FTP, Telnet, MQTT...) within the scan window.
* ``brute_force_connections`` 10 within ``brute_force_window_s`` 60, each shorter than ``short_connection_s``
  30: the connection pattern of password guessing against an encrypted service (SSH), where the payload says
  nothing. Suricata's ET SCAN "Potential SSH Scan" rule counts 5 SYNs to port 22 by source in 120 s; Zeek's SSH
  policy (``detect-bruteforcing.zeek``) 30 failed guesses in 30 min. 10 accepted-and-closed connections in a
  minute is above what an operator's scripted SSH use does (with connection sharing) and far below hydra's rate
  (4 tasks: several connections per second).
* ``gateway_memory_s`` 300: a leaf's default gateway that answered within this time is still there, so remote
  traffic going to another MAC is an impersonation, not a router replaced.
* ``binding_memory_s`` 3600: an IPv6 address claimed by a MAC within the hour still belongs to it (as arpwatch's
  flip-flop memory and the ``address_conflict`` rule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from leafguard.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class Thresholds:
    scan_window_s: float = 300.0
    port_scan_ports: int = 15
    address_scan_hosts: int = 25
    stealth_scan_ports: int = 15
    udp_scan_ports: int = 15
    udp_reply_timeout_s: float = 3.0
    icmp_sweep_hosts: int = 25
    arp_sweep_hosts: int = 25
    arp_sweep_window_s: float = 60.0
    brute_force_failures: int = 10
    brute_force_connections: int = 10
    brute_force_window_s: float = 60.0
    short_connection_s: float = 30.0
    gateway_memory_s: float = 300.0
    binding_memory_s: float = 3600.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_s"):
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                    raise ConfigurationError(f"{f.name} must be a number of seconds, more than 0")
            elif isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 100_000:
                raise ConfigurationError(f"{f.name} must be a whole number from 2 to 100000")
        if self.udp_reply_timeout_s >= self.scan_window_s:
            raise ConfigurationError("udp_reply_timeout_s must be shorter than scan_window_s")

    def replace(self, **changes: float) -> Thresholds:
        """A copy with ``changes`` (validated; counts given as whole floats become ints)."""
        names = {f.name: f for f in dataclasses.fields(self)}
        typed: dict[str, float | int] = {}
        for name, value in changes.items():
            if name not in names:
                raise ConfigurationError(f"{name} is not a detection threshold")
            if not name.endswith("_s") and isinstance(value, float):
                if not value.is_integer():
                    raise ConfigurationError(f"{name} must be a whole number from 2 to 100000")
                typed[name] = int(value)
            else:
                typed[name] = value
        return dataclasses.replace(self, **typed)  # type: ignore[arg-type]


THRESHOLD_KEYS = {
    "scanWindowS": "scan_window_s",
    "portScanPorts": "port_scan_ports",
    "addressScanHosts": "address_scan_hosts",
    "stealthScanPorts": "stealth_scan_ports",
    "udpScanPorts": "udp_scan_ports",
    "udpReplyTimeoutS": "udp_reply_timeout_s",
    "icmpSweepHosts": "icmp_sweep_hosts",
    "arpSweepHosts": "arp_sweep_hosts",
    "arpSweepWindowS": "arp_sweep_window_s",
    "bruteForceFailures": "brute_force_failures",
    "bruteForceConnections": "brute_force_connections",
    "bruteForceWindowS": "brute_force_window_s",
    "shortConnectionS": "short_connection_s",
    "gatewayMemoryS": "gateway_memory_s",
    "bindingMemoryS": "binding_memory_s",
}
"""Setting names (as in the ``detection`` section) -> `Thresholds` fields."""
