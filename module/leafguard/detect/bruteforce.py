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

from collections import deque

from leafguard.detect.alerts import Alert
from leafguard.detect.probes import WEB_PORTS, TcpControl
from leafguard.detect.scans import Sink, ip_text, mac_text, port_pair
from leafguard.detect.thresholds import Thresholds
from leafguard.detect.windows import DistinctCounter

MAC_CACHE = 4096
"""Client MACs kept to be shared by the connections that name them (cleared when full)."""


class _Conn:
    __slots__ = ("accepted", "key", "mac", "start")

    def __init__(self, key: int, start: float, mac: bytes | None) -> None:
        self.key = key
        self.start = start
        self.mac = mac
        self.accepted = False


class ConnectionBruteForce:
    def __init__(self, thresholds: Thresholds, sink: Sink, max_tracked: int = 65_536) -> None:
        self.t = thresholds
        self._max = max_tracked
        self._sink = sink
        self._open: dict[int, _Conn] = {}
        """Connections by `port_pair` (client, client port, server, server port), from their SYN until they end."""
        self._order: deque[_Conn] = deque()
        """The connections in the order they opened, the oldest first (it goes when the table is full); those that
        ended since are skipped then, and dropped whenever they outnumber the open ones."""
        self._macs: dict[bytes, bytes] = {}
        self._short: DistinctCounter[tuple[bytes, bytes, int]] = DistinctCounter()

    def tcp(self, r: TcpControl) -> None:
        f = r.flags
        if f & 0x02 and not f & 0x10:  # SYN: a client opens
            if r.dport in WEB_PORTS:
                return
            self._opened(port_pair(r.src, r.sport, r.dst, r.dport), r.ts, r.src_mac)
            return
        if f & 0x12 == 0x12:  # SYN-ACK: the server accepts
            conn = self._open.get(port_pair(r.dst, r.dport, r.src, r.sport))
            if conn is not None:
                conn.accepted = True
            return
        if not f & 0x05:
            return
        # FIN or RST, from either side, ends it; only a FIN ends a session that was held. A RST right after the
        # SYN-ACK is a SYN scan's answer to an open port, or a connection flood: neither is a login attempt.
        client, cport, server, sport = r.src, r.sport, r.dst, r.dport
        conn = self._open.pop(port_pair(client, cport, server, sport), None)
        if conn is None:
            client, cport, server, sport = r.dst, r.dport, r.src, r.sport
            conn = self._open.pop(port_pair(client, cport, server, sport), None)
        if conn is None or not conn.accepted or not f & 0x01 or r.ts - conn.start > self.t.short_connection_s:
            return
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

    def _opened(self, key: int, ts: float, mac: bytes | None) -> None:
        """A client's SYN: the connection is tracked from now (a SYN again on an open one starts it afresh, in its
        place in the order); when the table is full, the connection that opened first goes."""
        table = self._open
        if len(table) >= self._max:
            order = self._order
            while (oldest := order.popleft()) is not table.get(oldest.key):
                pass  # it ended already
            del table[oldest.key]
        if mac is not None:
            if len(self._macs) >= MAC_CACHE:
                self._macs.clear()
            mac = self._macs.setdefault(mac, mac)
        conn = table.get(key)
        if conn is not None:
            conn.start, conn.mac, conn.accepted = ts, mac, False
            return
        conn = table[key] = _Conn(key, ts, mac)
        self._order.append(conn)
        if len(self._order) > 2 * len(table) + 1024:
            self._order = deque(c for c in self._order if table.get(c.key) is c)
