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

import numpy as np

from leafguard.detect.alerts import Alert
from leafguard.detect.pairtable import PairTable
from leafguard.detect.probes import WEB_PORTS, TcpControl
from leafguard.detect.scans import Sink, mac_text
from leafguard.detect.thresholds import Thresholds
from leafguard.detect.windows import DistinctCounter
from leafguard.observe.addresses import ip_text

_NO_MAC = -1
"""A connection's ``mac`` cell when its SYN came without one (MACs are 48-bit, so never negative)."""


class ConnectionBruteForce:
    def __init__(self, thresholds: Thresholds, sink: Sink, max_tracked: int = 65_536) -> None:
        self.t = thresholds
        self._max = max_tracked
        self._sink = sink
        self._open = PairTable(max_tracked)
        """Connections (client, client port, server, server port) from their SYN until they end, in the order they
        opened (the oldest goes when the table is full)."""
        self._start = self._open.column(np.float64)
        """Each connection's SYN time."""
        self._mac = self._open.column(np.int64)
        """Its client's MAC (from the SYN) as a number, or `_NO_MAC`."""
        self._accepted = self._open.column(np.uint8)
        """1 once the server answered SYN-ACK."""
        self._short: DistinctCounter[tuple[bytes, bytes, int]] = DistinctCounter()

    def tcp(self, r: TcpControl) -> None:
        f = r.flags
        if f & 0x02 and not f & 0x10:  # SYN: a client opens
            if r.dport in WEB_PORTS:
                return
            self._opened(r)
            return
        if f & 0x12 == 0x12:  # SYN-ACK: the server accepts
            pos = self._open.find(r.dst, r.dport, r.src, r.sport)
            if pos >= 0:
                self._accepted[pos] = 1
            return
        if f & 0x05:
            self._ended(r)

    def _ended(self, r: TcpControl) -> None:
        # FIN or RST, from either side, ends it; only a FIN ends a session that was held. A RST right after the
        # SYN-ACK is a SYN scan's answer to an open port, or a connection flood: neither is a login attempt.
        table = self._open
        client, cport, server, sport = r.src, r.sport, r.dst, r.dport
        pos = table.find(client, cport, server, sport)
        if pos < 0:
            client, cport, server, sport = r.dst, r.dport, r.src, r.sport
            pos = table.find(client, cport, server, sport)
            if pos < 0:
                return
        accepted, start, mac = self._accepted[pos], self._start[pos], self._mac[pos]
        table.remove(pos)
        if not accepted or not r.flags & 0x01 or r.ts - start > self.t.short_connection_s:
            return
        t = self.t
        w = self._short.add((client, server, sport), cport, r.ts, t.brute_force_connections, t.brute_force_window_s)
        if w is None:
            return
        mac_s = mac_text(None if mac == _NO_MAC else mac.to_bytes(6, "big"))
        self._sink(
            Alert(
                "connection_brute_force", "high", r.ts, mac_s,
                f"{ip_text(client)} opened {len(w.items)} short connections to {ip_text(server)}:{sport} "
                f"within {t.brute_force_window_s:g} s (password guessing)",
                {"client": ip_text(client), "server": ip_text(server), "port": sport, "connections": len(w.items),
                 "short_connection_s": t.short_connection_s, "first_ts": w.start},
            )
        )  # fmt: skip

    def _opened(self, r: TcpControl) -> None:
        """A client's SYN: the connection is tracked from now (a SYN again on an open one starts it afresh, in its
        place in the order); when the table is full, the connection that opened first goes."""
        table = self._open
        if table.count >= self._max:
            table.remove(table.oldest())
        pos, _ = table.put(r.src, r.sport, r.dst, r.dport)
        self._start[pos] = r.ts
        self._mac[pos] = _NO_MAC if r.src_mac is None else int.from_bytes(r.src_mac, "big")
        self._accepted[pos] = 0
