"""Scans that send no SYN, UDP port scans, ICMP echo sweeps and ARP sweeps (pure; packet time is the clock).

* ``stealth_scan``: TCP probes that cannot belong to a connection, counted per (prober, target) by distinct
  target port: segments with none of SYN, ACK and RST (nmap ``-sN`` NULL, ``-sF`` FIN, ``-sX`` Xmas), and
  RSTs without ACK that a target sends for a segment of no connection it has, on a port pair whose SYN was never
  seen (the answers to nmap ``-sA`` ACK, ``-sW`` window and ``-sM`` Maimon probes). Suricata's ET SCAN rules
  key on the same flag combinations; the count and window are Zeek's (15 ports within 5 min).
* ``udp_scan``: UDP probes that failed, per (prober, target) by distinct port: answered with ICMP port
  unreachable, or with no UDP answer after ``udp_reply_timeout_s`` (Zeek counts failed attempts, 15 in 5 min).
* ``icmp_sweep``: echo requests from one address to 25 distinct addresses within 5 min (Zeek's address scan).
* ``arp_sweep``: who-has requests from one MAC for 25 distinct addresses within 60 s.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from leafguard.detect.alerts import Alert
from leafguard.detect.pairtable import PairTable
from leafguard.detect.probes import ArpFrame, EchoRequest, PortUnreachable, TcpControl, UdpFirst
from leafguard.detect.thresholds import Thresholds
from leafguard.detect.windows import DistinctCounter
from leafguard.observe import addresses
from leafguard.observe.addresses import ip_text

SERVICE_SOURCE_PORTS = frozenset(range(1024)) | {1900, 3702, 5353, 5355, 5683}
"""A datagram from these ports is a service answering (SSDP and mDNS answer multicast queries by unicast, from a
conversation never seen in the other direction), never a probe: scanners send from high ports."""
Sink = Callable[[Alert], None]


def mac_text(raw: bytes | None) -> str | None:
    """A finding's MAC as text; None when the frame came without one."""
    return addresses.mac_text(raw) if raw is not None else None


def _multicast(ip: bytes) -> bool:
    if len(ip) == 4:
        return ip[0] >= 224 or ip == b"\xff\xff\xff\xff" or ip[3] == 255
    return ip[0] == 0xFF


class Scans:
    def __init__(
        self,
        thresholds: Thresholds,
        sink: Sink,
        gateway_macs: frozenset[bytes] = frozenset(),
        max_tracked: int = 65_536,
    ) -> None:
        self.t = thresholds
        self._max = max_tracked
        self._sink = sink
        self.gateway_macs = gateway_macs
        """The gateway's own MACs (their ARP requests are no sweep); replaced live by the gateway settings."""
        self._stealth: DistinctCounter[tuple[bytes, bytes]] = DistinctCounter()
        self._udp: DistinctCounter[tuple[bytes, bytes]] = DistinctCounter()
        self._icmp: DistinctCounter[bytes] = DistinctCounter()
        self._arp: DistinctCounter[bytes] = DistinctCounter()
        self._syns = PairTable(max_tracked)
        """Port pairs whose SYN was seen (either direction is looked up): a RST there is a connection's. The
        oldest goes when full (nothing else leaves)."""
        self._pending: OrderedDict[tuple[bytes, bytes, int], tuple[float, bytes | None]] = OrderedDict()
        """UDP datagrams that opened a conversation and have no answer yet (in time order), with their MAC."""
        self.deadline = math.inf
        """When the oldest pending probe counts as failed (the caller calls `expire` from then on)."""
        self._macs: OrderedDict[bytes, bytes] = OrderedDict()
        """Last MAC seen for a prober's address (alerts name it)."""

    # ------------------------------------------------------------------------------------------ TCP

    def tcp(self, r: TcpControl) -> None:
        f = r.flags
        if f & 0x02:  # SYN: a connection (or a SYN scan, which port_scan counts)
            syns = self._syns
            if syns.count >= self._max:
                syns.remove(syns.oldest())
            syns.put(r.src, r.sport, r.dst, r.dport)
            return
        if not f & (0x10 | 0x04):  # no ACK, no RST (and no SYN): NULL, FIN, Xmas...
            self._remember_mac(r.src, r.src_mac)
            self._stealth_probe(r.src, r.dst, r.dport, r.ts, _flag_name(f))
        elif f & 0x04 and not f & 0x10:
            # A RST without ACK answers a segment that carried an ACK and belongs to no connection.
            syns = self._syns
            if syns.find(r.dst, r.dport, r.src, r.sport) >= 0 or syns.find(r.src, r.sport, r.dst, r.dport) >= 0:
                return
            self._stealth_probe(r.dst, r.src, r.sport, r.ts, "ACK answered by RST")

    def _stealth_probe(self, prober: bytes, target: bytes, port: int, ts: float, kind: str) -> None:
        t = self.t
        w = self._stealth.add((prober, target), port, ts, t.stealth_scan_ports, t.scan_window_s)
        if w is None:
            return
        self._sink(
            Alert(
                "stealth_scan", "high", ts, mac_text(self._macs.get(prober)),
                f"{ip_text(prober)} probed {len(w.items)} ports of {ip_text(target)} without a SYN ({kind}) "
                f"within {t.scan_window_s:g} s",
                {"scanner": ip_text(prober), "target": ip_text(target), "probe": kind,
                 "ports": sorted(int(p) for p in w.items)[:50], "first_ts": w.start},  # type: ignore[call-overload]
            )
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ UDP

    def udp(self, r: UdpFirst) -> None:
        self.expire(r.ts)
        pending = self._pending
        reply = (r.dst, r.src, r.sport)
        if reply in pending:
            del pending[reply]  # answered: the port is open
            self._deadline()
            return
        if r.answers or _multicast(r.dst) or r.src == r.dst or r.sport in SERVICE_SOURCE_PORTS:
            return
        if len(pending) >= self._max:
            pending.popitem(last=False)
            self._deadline()
        key = (r.src, r.dst, r.dport)
        if key not in pending:
            pending[key] = (r.ts, r.src_mac)
            self._deadline()

    def unreachable(self, r: PortUnreachable) -> None:
        self.expire(r.ts)
        # The quoted datagram names the probe; drop it from the pending ones (whatever its source port).
        got = self._pending.pop((r.prober, r.target, r.dport), None)
        if got is not None:
            self._remember_mac(r.prober, got[1])
            self._deadline()
        self._udp_failed(r.prober, r.target, r.dport, r.ts)

    def expire(self, now: float) -> None:
        """Probes still unanswered ``udp_reply_timeout_s`` after they were sent count as failed, at that time."""
        pending = self._pending
        timeout = self.t.udp_reply_timeout_s
        while pending:
            key = next(iter(pending))
            sent, mac = pending[key]
            if now - sent < timeout:
                # Entries are in capture order; a capture whose clock steps back ends the scan here, safely.
                break
            del pending[key]
            self._remember_mac(key[0], mac)
            self._udp_failed(key[0], key[1], key[2], sent + timeout)
        self._deadline()

    def expire_at_new_timeout(self) -> None:
        """The thresholds changed: the oldest probe's deadline with the new timeout."""
        self._deadline()

    def _deadline(self) -> None:
        # A microsecond early: `expire` itself decides, with the exact comparison, and must not be called late.
        pending = self._pending
        self.deadline = pending[next(iter(pending))][0] + self.t.udp_reply_timeout_s - 1e-6 if pending else math.inf

    def _udp_failed(self, prober: bytes, target: bytes, port: int, ts: float) -> None:
        t = self.t
        w = self._udp.add((prober, target), port, ts, t.udp_scan_ports, t.scan_window_s)
        if w is None:
            return
        self._sink(
            Alert(
                "udp_scan", "high", ts, mac_text(self._macs.get(prober)),
                f"{ip_text(prober)} probed {len(w.items)} UDP ports of {ip_text(target)} that did not answer "
                f"(or answered port unreachable) within {t.scan_window_s:g} s",
                {"scanner": ip_text(prober), "target": ip_text(target),
                 "ports": sorted(int(p) for p in w.items)[:50], "first_ts": w.start},  # type: ignore[call-overload]
            )
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ sweeps

    def echo(self, r: EchoRequest) -> None:
        if _multicast(r.dst):
            return
        t = self.t
        w = self._icmp.add(r.src, r.dst, r.ts, t.icmp_sweep_hosts, t.scan_window_s)
        if w is None:
            return
        hosts = sorted(w.items, key=lambda b: (len(b), b))  # type: ignore[arg-type]
        self._sink(
            Alert(
                "icmp_sweep", "high", r.ts, mac_text(r.src_mac),
                f"{ip_text(r.src)} sent echo requests to {len(w.items)} addresses within {t.scan_window_s:g} s",
                {"scanner": ip_text(r.src), "hosts": [ip_text(h) for h in hosts[:50]],  # type: ignore[arg-type]
                 "first_ts": w.start},
            )
        )  # fmt: skip

    def arp(self, r: ArpFrame) -> None:
        if r.op != 1 or r.target_ip == r.sender_ip or r.src_mac in self.gateway_macs:
            return
        t = self.t
        w = self._arp.add(r.src_mac, r.target_ip, r.ts, t.arp_sweep_hosts, t.arp_sweep_window_s)
        if w is None:
            return
        hosts = sorted(w.items)  # type: ignore[type-var]
        self._sink(
            Alert(
                "arp_sweep", "high", r.ts, mac_text(r.src_mac),
                f"{mac_text(r.src_mac)} asked who has {len(w.items)} addresses within {t.arp_sweep_window_s:g} s",
                {"mac": mac_text(r.src_mac), "sender_ip": ip_text(r.sender_ip),
                 "hosts": [ip_text(h) for h in hosts[:50]], "first_ts": w.start},  # type: ignore[arg-type]
            )
        )  # fmt: skip

    def _remember_mac(self, ip: bytes, mac: bytes | None) -> None:
        if mac is None:
            return
        if ip not in self._macs and len(self._macs) >= self._max:
            self._macs.popitem(last=False)
        self._macs[ip] = mac


def _flag_name(flags: int) -> str:
    if flags & 0x3F == 0:
        return "NULL"
    if flags & 0x29 == 0x29:
        return "Xmas"
    if flags & 0x01:
        return "FIN"
    return f"flags 0x{flags:02x}"
