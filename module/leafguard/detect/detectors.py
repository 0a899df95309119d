"""Detectors over time-ordered evidence; pure, bounded, with packet time as the clock.

The observation core records *evidence* (`detect.evidence`: a typed record per kind) while it walks a batch
and counts in bulk (a TCP connection attempt, an address seen from a MAC for the first time, a DHCP server's
reply, a login outcome). The order in which the
two halves of the core meet the evidence is not the capture order, so the detectors only see it at the end of
each batch, sorted by packet time: their findings do not depend on how frames were split into batches or paths.

Thresholds follow what the reference monitors use (Zeek's scan policy: 15 ports of one host, or 25 hosts on
one port, failed within 5 minutes; see `detect.thresholds`, where they are settings); each finding is raised once
per key and window, and every table is capped. Every finding passes `raise_alert`, which applies the mute rules
in force (`detect.muting`) and the cap on kept alerts.
"""

from __future__ import annotations

from collections import OrderedDict
from operator import attrgetter
from typing import Any, TypeVar

from leafguard.detect.alerts import ALERT_SCHEMA_VERSION, Alert, Severity
from leafguard.detect.evidence import (
    AddressSeen,
    ArpAsk,
    ArpClaim,
    ConversationOpened,
    DhcpServerReply,
    Evidence,
    FloodSeen,
    LeafSilent,
    LoginResult,
    NewLeaf,
    ServiceOffered,
    SynSent,
)
from leafguard.detect.muting import Muting
from leafguard.detect.thresholds import Thresholds

# The texts of findings are made once per address or MAC while it recurs, and shared by the findings kept.
from leafguard.observe.addresses import recurring_ip_text as _ip
from leafguard.observe.addresses import recurring_mac_text as _mac

# Alert lives in detect.alerts (detect.muting needs it, and the detectors need the mute rules); it is still
# importable from here.
__all__ = ["ALERT_SCHEMA_VERSION", "MAX_ALERTS", "Alert", "Detectors", "Severity"]

BINDING_MEMORY_S = 3600.0
MAX_TRACKED = 2048
MAX_ALERTS = 10_000
BASELINE_PEERS = 64
"""Peers (address, port, protocol) a leaf may open conversations to during the learning period. A leaf that uses
more has no baseline worth comparing with (a browser, a relay), and gets no ``new_peer`` findings."""
NEW_PEER_ALERTS = 8
"""``new_peer`` findings per leaf and scan window; more are counted in ``suppressed_alerts`` (a leaf that starts
sweeping addresses raises ``address_scan``, not one finding per address)."""




def _pair_key(a: bytes, b: bytes) -> int:
    """Two addresses as one int key (an IPv6 pair's with a leading 1): a tuple of two bytes objects kept for a
    window cost 170 bytes, the int 40."""
    return int.from_bytes(a + b, "big") if len(a) == 4 else int.from_bytes(b"\x01" + a + b, "big")


def _port_key(a: bytes, port: int) -> int:
    """An address and a port as one int key (an IPv6 address's with a leading 1)."""
    return (int.from_bytes(a if len(a) == 4 else b"\x01" + a, "big") << 16) | port


_NO_ITEM: Any = object()


class _Window:
    """Distinct items seen for one key within a window (`Detectors._crossed`). Most windows never see a second
    item (one host probed on a port, one port of a host), so the first is kept in a slot and the dict of items
    made for the second; a window that raised its finding keeps neither (it only waits for its end)."""

    __slots__ = ("alerted", "first", "items", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.first: Any = _NO_ITEM
        self.items: dict[Any, None] | None = None
        """Every item, in the order seen (the first included), from the second on."""
        self.alerted = False


class _Count:
    """Events counted for one key within a window (failed logins, new peers)."""

    __slots__ = ("alerted", "n", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.n = 0
        self.alerted = False


W = TypeVar("W", _Window, _Count)


class Detectors:
    def __init__(self, learning_period_s: float | None = None, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self.muting: Muting = Muting()
        self.learning_period_s = learning_period_s
        self.learning_started: float | None = None
        """Packet time of the first frame: the learning period runs from there."""
        self.alerts: list[Alert] = []
        self.dropped_alerts = 0
        """Findings beyond :data:`MAX_ALERTS` not retained in :attr:`alerts` (memory bound; still forwarded)."""
        self.forward: list[Alert] | None = None
        """A service that sends alerts upstream sets a list here and drains it after every batch: every finding
        is appended, retained or not, so the stream is not capped (only the retained list is)."""
        # The capped tables forget their oldest entry when full: OrderedDicts, whose oldest entry is found in O(1)
        # (a dict's next(iter()) first skips every slot deleted since its last resize; issue #12 defect 6).
        self._ports: OrderedDict[int, _Window] = OrderedDict()
        """Port-scan windows by (scanner, target) (`_pair_key`)."""
        self._hosts: OrderedDict[int, _Window] = OrderedDict()
        """Address-scan windows by (scanner, port) (`_port_key`)."""
        self._bindings: OrderedDict[bytes, dict[bytes, float]] = OrderedDict()
        """Address -> the MACs that held it, with the last time each did (at most 8 per address)."""
        self._dhcp_servers: dict[bytes, bytes] = {}
        self._rogue_reported: set[bytes] = set()
        self._login_failures: OrderedDict[tuple[bytes, bytes, int], _Count] = OrderedDict()
        self._cleartext: OrderedDict[tuple[Any, ...], float] = OrderedDict()
        self._claims: OrderedDict[bytes, dict[bytes, float]] = OrderedDict()
        self._asks: OrderedDict[bytes, dict[bytes, float]] = OrderedDict()
        self._claims_reported: set[tuple[bytes, bytes]] = set()
        self.suppressed_alerts = 0
        # Learned baselines (with a learning period): the leaves seen during it, and what each did then.
        self._baseline: set[bytes] = set()
        self._peers: dict[bytes, set[tuple[bytes, int, str]]] = {}
        self._unbounded: set[bytes] = set()
        self._services: dict[bytes, set[tuple[str, int]]] = {}
        self._peer_alerts: OrderedDict[bytes, _Count] = OrderedDict()
        self._new_reported: set[bytes] = set()
        """Leaves already announced as ``new_device`` (saved with the state: a restart does not announce them again)."""
        self.changes = 0
        """Bumped by everything that may change the saved state (see :meth:`export_state`)."""

    def process(self, evidence: list[Evidence]) -> None:
        """Consume one batch's evidence (any order: it is sorted here)."""
        _order(evidence)
        self.changes += 1
        for e in evidence:
            match e:
                case SynSent():
                    self._syn(e.ts, e.src_ip, e.dst_ip, e.dst_port, e.src_mac)
                case AddressSeen():
                    self._bind(e.ts, e.ip, e.mac)
                case DhcpServerReply():
                    self._dhcp(e.ts, e.server_mac, e.server_ip)
                case LoginResult():
                    self._login(e)
                case ArpClaim() | ArpAsk():
                    self._arp(e.ts, e.ip, e.mac, isinstance(e, ArpClaim))
                case NewLeaf():
                    self._new_leaf(e.ts, e.mac, e.ips, e.vendor)
                case ConversationOpened():
                    self._conversation(e.ts, e.leaf_mac, e.peer_ip, e.peer_port, e.protocol)
                case ServiceOffered():
                    self._service(e.ts, e.leaf_mac, e.protocol, e.port)
                case LeafSilent():
                    self._silent(e.ts, e.leaf_mac, e.last_seen, e.silent_after_s)
                case FloodSeen():
                    self._flood(e)

    def raise_alert(self, alert: Alert) -> None:
        """Keep a finding, unless a mute rule drops it or the list is full (both counted)."""
        if self.muting.drops(alert):
            return
        if self.forward is not None:
            self.forward.append(alert)
        if len(self.alerts) >= MAX_ALERTS:
            self.dropped_alerts += 1
            return
        self.alerts.append(alert)

    def learn(self, macs: list[bytes]) -> None:
        """Accept the current state into the baseline: these leaves are known, and everything each one is using
        now (its peers and services, kept since it joined) is part of its baseline."""
        self.changes += 1
        for mac in macs:
            if len(self._baseline) < MAX_TRACKED:
                self._baseline.add(mac)
            self._unbounded.discard(mac)
        self._peer_alerts.clear()

    def _window(self, table: OrderedDict[Any, W], key: Any, ts: float, make: type[W]) -> W:
        w = table.get(key)
        if w is None or ts - w.start > self.thresholds.scan_window_s:
            if w is None and len(table) >= MAX_TRACKED:
                table.popitem(last=False)
            w = table[key] = make(ts)
        return w

    def _crossed(
        self, table: OrderedDict[Any, _Window], key: Any, item: Any, ts: float, threshold: int
    ) -> dict[Any, None] | None:
        """Count a distinct ``item`` for ``key``; the items, in the order seen, the first time they reach
        ``threshold`` (the window's start is ``table[key].start``). The window forgets them then."""
        w = self._window(table, key, ts, _Window)
        if w.alerted:
            return None
        items = w.items
        if items is None:
            first = w.first
            if first is _NO_ITEM:
                if threshold > 1:
                    w.first = item
                    return None
                items = {}
            elif first == item:
                return None
            else:
                items = {first: None}
            w.items = items
            w.first = _NO_ITEM
        elif item in items:
            return None
        items[item] = None
        if len(items) < threshold:
            return None
        w.alerted = True
        w.items = None
        return items

    def _syn(self, ts: float, src: bytes, dst: bytes, port: int, mac: bytes | None) -> None:
        t = self.thresholds
        # A window that raised its finding only waits for its end (the finding holds what it counted): its items
        # go, 2,048 windows of 15 or more ports each being most of these tables' memory in a scan-heavy network.
        key = _pair_key(src, dst)
        if (ports := self._crossed(self._ports, key, port, ts, t.port_scan_ports)) is not None:
            self.raise_alert(
                Alert(
                    "port_scan", "high", ts, _mac(mac) if mac else None,
                    f"{_ip(src)} probed {len(ports)} ports of {_ip(dst)} within {t.scan_window_s:.0f} s",
                    {"scanner": _ip(src), "target": _ip(dst), "ports": sorted(ports)[:50],
                     "first_ts": self._ports[key].start},
                )
            )  # fmt: skip
        key = _port_key(src, port)
        if (hosts := self._crossed(self._hosts, key, dst, ts, t.address_scan_hosts)) is not None:
            self.raise_alert(
                Alert(
                    "address_scan", "high", ts, _mac(mac) if mac else None,
                    f"{_ip(src)} probed port {port} on {len(hosts)} hosts within {t.scan_window_s:.0f} s",
                    {"scanner": _ip(src), "port": port, "hosts": sorted(_ip(d) for d in hosts)[:50],
                     "first_ts": self._hosts[key].start},
                )
            )  # fmt: skip

    def _bind(self, ts: float, ip: bytes, mac: bytes) -> None:
        # Raised once per new holder of the address: a MAC it had not had within the memory, while another had it.
        # An address flipping back and forth between two MACs is one finding, not one per flip; and evidence keeps
        # only the first time of each (address, MAC) pair of a batch, so counting flips would depend on batching.
        held = self._bindings.get(ip)
        if held is None:
            if len(self._bindings) >= MAX_TRACKED:
                self._bindings.popitem(last=False)
            held = self._bindings[ip] = {}
        last = held.get(mac)
        if last is None or ts - last > BINDING_MEMORY_S:
            others = [(t, m) for m, t in held.items() if m != mac and ts - t <= BINDING_MEMORY_S]
            if others:
                seen, previous = max(others)
                self.raise_alert(
                    Alert(
                        "address_conflict", "high", ts, _mac(mac),
                        f"{_ip(ip)} moved from {_mac(previous)} to {_mac(mac)} (ARP spoofing or a duplicate address)",
                        {"ip": _ip(ip), "previous_mac": _mac(previous), "mac": _mac(mac), "previous_seen": seen},
                    )
                )  # fmt: skip
        if mac in held or len(held) < 8:
            held[mac] = ts if last is None else max(last, ts)

    @staticmethod
    def _remember(
        table: OrderedDict[bytes, dict[bytes, float]], mac: bytes, ip: bytes, ts: float
    ) -> dict[bytes, float]:
        seen = table.get(mac)
        if seen is None:
            if len(table) >= MAX_TRACKED:
                table.popitem(last=False)
            seen = table[mac] = {}
        if ip in seen or len(seen) < 64:
            seen[ip] = ts
        return seen

    def _arp(self, ts: float, ip: bytes, mac: bytes, claim: bool) -> None:
        # A MAC that announces an address as its own and also has to ask who has that address is answering for
        # someone else: the trace ARP poisoning leaves (the attacker claims the gateway's address, and asks for
        # the real gateway's MAC to relay the traffic it intercepts).
        self._remember(self._claims if claim else self._asks, mac, ip, ts)
        claimed = self._claims.get(mac, {}).get(ip)
        asked = self._asks.get(mac, {}).get(ip)
        if claimed is None or asked is None or abs(claimed - asked) > BINDING_MEMORY_S:
            return
        if (mac, ip) in self._claims_reported or len(self._claims_reported) >= MAX_TRACKED:
            return
        self._claims_reported.add((mac, ip))
        own = sorted(_ip(other) for other in self._claims.get(mac, {}) if other != ip)
        self.raise_alert(
            Alert(
                "arp_spoofing", "high", ts, _mac(mac),
                f"{_mac(mac)} announces {_ip(ip)} as its own but also asks who has it",
                {"mac": _mac(mac), "ip": _ip(ip), "claimed_at": claimed, "asked_at": asked, "other_ips": own},
            )
        )  # fmt: skip

    def _learning(self, ts: float) -> bool | None:
        """Whether ``ts`` falls in the learning period; None without one."""
        if self.learning_period_s is None or self.learning_started is None:
            return None
        return ts - self.learning_started <= self.learning_period_s

    def _new_leaf(self, ts: float, mac: bytes, ips: str, vendor: str) -> None:
        learning = self._learning(ts)
        if learning is None:
            return
        if mac in self._baseline or mac in self._new_reported:
            return  # known (learned, or announced once already: maybe by the run before a restart)
        if learning:
            if len(self._baseline) < MAX_TRACKED:
                self._baseline.add(mac)  # learned: part of the baseline
            return
        if len(self._new_reported) < MAX_TRACKED:
            self._new_reported.add(mac)
        self.raise_alert(
            Alert(
                "new_device", "medium", ts, _mac(mac),
                f"new device {_mac(mac)} ({vendor or 'unknown vendor'}{', ' + ips if ips else ''}) after the "
                f"learning period",
                {"mac": _mac(mac), "ips": ips.split(",") if ips else [], "vendor": vendor or None,
                 "learning_period_s": self.learning_period_s},
            )
        )  # fmt: skip

    def _conversation(self, ts: float, mac: bytes, peer: bytes, port: int, protocol: str) -> None:
        """A leaf of the baseline opening a conversation to a peer it did not use while learning."""
        learning = self._learning(ts)
        if learning is None or mac not in self._baseline or mac in self._unbounded:
            return
        peers = self._peers.setdefault(mac, set())
        key = (peer, port, protocol)
        if key in peers:
            return
        if len(peers) >= (BASELINE_PEERS if learning else 2 * BASELINE_PEERS):
            # Too many to be a baseline (while learning), or to keep following (after): forget this leaf's.
            self._unbounded.add(mac)
            del self._peers[mac]
            return
        peers.add(key)
        if learning:
            return
        w = self._window(self._peer_alerts, mac, ts, _Count)
        w.n += 1
        if w.n > NEW_PEER_ALERTS:
            self.suppressed_alerts += 1
            return
        self.raise_alert(
            Alert(
                "new_peer", "medium", ts, _mac(mac),
                f"{_mac(mac)} opened {protocol} to {_ip(peer)}:{port}, which it did not use during the learning period",
                {"mac": _mac(mac), "peer": _ip(peer), "port": port, "protocol": protocol,
                 "baseline_peers": sorted(f"{_ip(p)}:{pt}/{pr}" for p, pt, pr in peers if (p, pt, pr) != key)[:50],
                 "learning_period_s": self.learning_period_s},
            )
        )  # fmt: skip

    def _service(self, ts: float, mac: bytes, protocol: str, port: int) -> None:
        """A leaf of the baseline offering a service it did not offer while learning."""
        learning = self._learning(ts)
        if learning is None or mac not in self._baseline:
            return
        services = self._services.setdefault(mac, set())
        key = (protocol, port)
        if key in services or len(services) >= 4 * BASELINE_PEERS:
            return
        services.add(key)
        if learning:
            return
        known = sorted(f"{pr}/{pt}" for pr, pt in services if (pr, pt) != key)
        self.raise_alert(
            Alert(
                "new_service", "medium", ts, _mac(mac),
                f"{_mac(mac)} offers {protocol}/{port}, a service it did not offer during the learning period",
                {"mac": _mac(mac), "protocol": protocol, "port": port, "known_services": known[:50],
                 "learning_period_s": self.learning_period_s},
            )
        )  # fmt: skip

    def _silent(self, ts: float, mac: bytes, last_seen: float, silent_after_s: float) -> None:
        self.raise_alert(
            Alert(
                "leaf_silent", "medium", ts, _mac(mac),
                f"{_mac(mac)} has sent nothing for {silent_after_s:g} s",
                {"mac": _mac(mac), "last_seen": last_seen, "silent_after_s": silent_after_s},
            )
        )  # fmt: skip

    def _flood(self, e: FloodSeen) -> None:
        ts, mac, frames, direction = e.ts, e.leaf_mac, e.frames, e.direction
        window_start, window_s, rate = e.window_start, e.window_s, e.rate_per_s
        self.raise_alert(
            Alert(
                "flood", "high", ts, _mac(mac),
                f"{_mac(mac)} {direction} {frames} frames within {window_s:g} s (more than {rate:g} per second)",
                {"mac": _mac(mac), "direction": direction, "frames": frames, "window_start": window_start,
                 "window_s": window_s, "rate_limit_per_s": rate},
            )
        )  # fmt: skip

    def _dhcp(self, ts: float, server_mac: bytes, server_ip: bytes) -> None:
        if server_mac in self._dhcp_servers:
            return
        if len(self._dhcp_servers) < MAX_TRACKED:
            self._dhcp_servers[server_mac] = server_ip
        if len(self._dhcp_servers) > 1 and server_mac not in self._rogue_reported:
            self._rogue_reported.add(server_mac)
            others = sorted(_mac(m) for m in self._dhcp_servers if m != server_mac)
            self.raise_alert(
                Alert(
                    "rogue_dhcp", "high", ts, _mac(server_mac),
                    f"a second DHCP server answers: {_mac(server_mac)} ({_ip(server_ip)}) besides {', '.join(others)}",
                    {"server_mac": _mac(server_mac), "server_ip": _ip(server_ip), "known_servers": others},
                )
            )  # fmt: skip

    def _login(self, e: LoginResult) -> None:
        ts, mac, protocol, client, server, port = e.ts, e.leaf_mac, e.protocol, e.client_ip, e.server_ip, e.server_port
        user: str | None = e.user
        result = e.result
        key = (mac, protocol, server, port)
        last = self._cleartext.get(key)
        if last is None or ts - last > BINDING_MEMORY_S:
            if last is None and len(self._cleartext) >= MAX_TRACKED:
                self._cleartext.popitem(last=False)
            self._cleartext[key] = ts
            self.raise_alert(
                Alert(
                    "cleartext_login", "medium", ts, _mac(mac) if mac else None,
                    f"{protocol} login in cleartext from {_ip(client)} to {_ip(server)}:{port} ({result})",
                    {"protocol": protocol, "client": _ip(client), "server": _ip(server), "port": port,
                     "user": user or None, "result": result},
                )
            )  # fmt: skip
        if result != "Fail":
            return
        w = self._window(self._login_failures, (client, server, port), ts, _Count)
        w.n += 1
        if not w.alerted and w.n >= self.thresholds.brute_force_failures:
            w.alerted = True
            self.raise_alert(
                Alert(
                    "brute_force", "high", ts, _mac(mac) if mac else None,
                    f"{w.n} failed {protocol} logins from {_ip(client)} to {_ip(server)}:{port} "
                    f"within {self.thresholds.scan_window_s:.0f} s",
                    {"protocol": protocol, "client": _ip(client), "server": _ip(server), "port": port,
                     "failures": w.n, "first_ts": w.start},
                )
            )  # fmt: skip


    # -- state that survives a restart -----------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """The learned baselines and the memory that keeps findings from repeating (JSON-ready): the learning
        period's start, the baseline leaves with their peers and services, the leaves announced as new, the
        once-per-window memories (cleartext logins, DHCP servers, ARP claims reported). Scan and brute-force
        windows start afresh after a restart."""
        return {
            "learningStarted": self.learning_started,
            "baseline": _enc(sorted(self._baseline)),
            "unbounded": _enc(sorted(self._unbounded)),
            "peers": [[_enc(mac), _enc(sorted(peers))] for mac, peers in self._peers.items()],
            "services": [[_enc(mac), _enc(sorted(services))] for mac, services in self._services.items()],
            "newReported": _enc(sorted(self._new_reported)),
            "cleartext": [[_enc(key), ts] for key, ts in self._cleartext.items()],
            "dhcpServers": [[_enc(mac), _enc(ip)] for mac, ip in self._dhcp_servers.items()],
            "rogueReported": _enc(sorted(self._rogue_reported)),
            "claimsReported": _enc(sorted(self._claims_reported)),
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`export_state` (raises KeyError/TypeError/ValueError on another shape, changing
        nothing). Bounded as when learned."""
        started = state["learningStarted"]
        baseline = {bytes(m) for m in _dec(state["baseline"])[:MAX_TRACKED]}
        unbounded = {bytes(m) for m in _dec(state["unbounded"])[:MAX_TRACKED]}
        peers = {bytes(_dec(m)): {tuple(p) for p in _dec(ps)} for m, ps in state["peers"][:MAX_TRACKED]}
        services = {bytes(_dec(m)): {tuple(x) for x in _dec(xs)} for m, xs in state["services"][:MAX_TRACKED]}
        new_reported = {bytes(m) for m in _dec(state["newReported"])[:MAX_TRACKED]}
        cleartext = {tuple(_dec(k)): float(ts) for k, ts in state["cleartext"][:MAX_TRACKED]}
        dhcp = {bytes(_dec(m)): bytes(_dec(ip)) for m, ip in state["dhcpServers"][:MAX_TRACKED]}
        rogue = {bytes(m) for m in _dec(state["rogueReported"])[:MAX_TRACKED]}
        claims = {(bytes(m), bytes(ip)) for m, ip in _dec(state["claimsReported"])[:MAX_TRACKED]}
        self.learning_started = float(started) if started is not None else None
        self._baseline, self._unbounded, self._new_reported = baseline, unbounded, new_reported
        self._peers = peers
        self._services = services
        self._cleartext, self._dhcp_servers, self._rogue_reported = OrderedDict(cleartext), dhcp, rogue
        self._claims_reported = claims


def _enc(value: Any) -> Any:
    """JSON for the detectors' keys: bytes as ``{"x": hex}``, tuples and sets as lists, the rest as is."""
    if isinstance(value, bytes):
        return {"x": value.hex()}
    if isinstance(value, tuple | list):
        return [_enc(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"cannot save {type(value).__name__}")


def _dec(value: Any) -> Any:
    """The inverse of :func:`_enc` (lists come back as tuples)."""
    if isinstance(value, dict):
        return bytes.fromhex(str(value["x"]))
    if isinstance(value, list):
        return tuple(_dec(v) for v in value)
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"unexpected {type(value).__name__} in a saved state")


def _order(evidence: list[Evidence]) -> None:
    """Sort by packet time, then kind, then the other fields: equal-time evidence is consumed in the same order
    however it was collected. Ties are rare, so the fields (None as b"", so that every position compares) are
    only looked at inside runs of equal (time, kind)."""
    evidence.sort(key=_time_and_kind)
    keys = list(map(_time_and_kind, evidence))
    if len(set(keys)) == len(keys):
        return
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            if i - start > 1:
                evidence[start:i] = sorted(evidence[start:i], key=_payload)
            start = i


_time_and_kind = attrgetter("ts", "rank")


def _payload(e: Evidence) -> tuple[Any, ...]:
    return tuple(b"" if (v := getattr(e, name)) is None else v for name in e.__slots__ if name != "ts")
