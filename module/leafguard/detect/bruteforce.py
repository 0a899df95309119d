"""Password guessing seen from the connection pattern alone (``connection_brute_force``), for encrypted services.

Rule: one client opens ``brute_force_connections`` connections to one service (server address and port) within
``brute_force_window_s``, each accepted (the server answered SYN-ACK) and closed with a FIN less than
``short_connection_s`` after it opened (a RST ending it first is a scan's or a flood's, not a session's). A guessing
tool against SSH (hydra, medusa, ncrack) makes exactly this: the server drops the connection after a few failed
passwords, and the tool reconnects.

Web ports (80, 443, 8080, 8443) are left out: HTTP clients and polled REST APIs open one short connection per
request at any rate, which is the same pattern with nothing wrong; failed cleartext logins there, and everywhere,
are the ``brute_force`` rule's (it reads the login exchange itself).
"""

from __future__ import annotations

from collections import OrderedDict

from leafguard.detect.alerts import Alert
from leafguard.detect.probes import WEB_PORTS, TcpControl
from leafguard.detect.scans import Sink, ip_text, mac_text
from leafguard.detect.thresholds import Thresholds
from leafguard.detect.windows import DistinctCounter


class _Conn:
    __slots__ = ("accepted", "mac", "start")

    def __init__(self, start: float, mac: bytes | None) -> None:
        self.start = start
        self.mac = mac
        self.accepted = False


class ConnectionBruteForce:
    def __init__(self, thresholds: Thresholds, sink: Sink, max_tracked: int = 65_536) -> None:
        self.t = thresholds
        self._max = max_tracked
        self._sink = sink
        self._open: OrderedDict[tuple[bytes, int, bytes, int], _Conn] = OrderedDict()
        """Connections by (client, client port, server, server port), from their SYN until they end."""
        self._short: DistinctCounter[tuple[bytes, bytes, int]] = DistinctCounter()

    def tcp(self, r: TcpControl) -> None:
        f = r.flags
        if f & 0x02 and not f & 0x10:  # SYN: a client opens
            if r.dport in WEB_PORTS:
                return
            if len(self._open) >= self._max:
                self._open.popitem(last=False)
            self._open[(r.src, r.sport, r.dst, r.dport)] = _Conn(r.ts, r.src_mac)
            return
        if f & 0x12 == 0x12:  # SYN-ACK: the server accepts
            conn = self._open.get((r.dst, r.dport, r.src, r.sport))
            if conn is not None:
                conn.accepted = True
            return
        if not f & 0x05:
            return
        # FIN or RST, from either side, ends it; only a FIN ends a session that was held. A RST right after the
        # SYN-ACK is a SYN scan's answer to an open port, or a connection flood: neither is a login attempt.
        key = (r.src, r.sport, r.dst, r.dport)
        conn = self._open.pop(key, None)
        if conn is None:
            key = (r.dst, r.dport, r.src, r.sport)
            conn = self._open.pop(key, None)
        if conn is None or not conn.accepted or not f & 0x01 or r.ts - conn.start > self.t.short_connection_s:
            return
        client, cport, server, sport = key
        t = self.t
        w = self._short.add((client, server, sport), cport, r.ts, t.brute_force_connections, t.brute_force_window_s)
        if w is None:
            return
        self._sink(
            Alert(
                "connection_brute_force", "high", r.ts, mac_text(conn.mac),
                f"{ip_text(client)} opened {len(w.items)} short connections to {ip_text(server)}:{sport} "
                f"within {t.brute_force_window_s:g} s (password guessing)",
                {"client": ip_text(client), "server": ip_text(server), "port": sport, "connections": len(w.items),
                 "short_connection_s": t.short_connection_s, "first_ts": w.start},
            )
        )  # fmt: skip
