"""The leaf inventory: every unicast MAC seen, which of them are leaves, and what each one is known by.

One table (MAC -> `MacState`), capped (`observe.eviction` chooses what a full table gives up), with the rules that
make a MAC a leaf, its addresses, names and services (each list capped too), and the bulk step's per-batch MAC
totals applied in one call (`apply_totals`). Evidence it finds (a new service, an address seen from a MAC, a new
leaf) goes to the evidence list it is given; packet time is the only clock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from operator import attrgetter

from leafguard.decode.frames import ETH_ARP, Packet
from leafguard.detect.evidence import AddressSeen, ArpAsk, ArpClaim, Evidence, NewLeaf, ServiceOffered
from leafguard.observe.addresses import ULA, ZERO_V4, ZERO_V6, ip_sort_key, ip_text, is_unicast_mac, mac_text
from leafguard.observe.eviction import EvictionQueue
from leafguard.observe.oui import vendor_of
from leafguard.observe.settings import AnalyzerSettings
from leafguard.observe.state import CaptureStats, MacState

LEAF_SIDE_CACHE = 4096
"""Addresses whose side (leaf or not) is remembered; a scan of random addresses only refills it."""

_mac_created = attrgetter("created")
_mac_last_seen = attrgetter("touched")


@dataclass(slots=True)
class MacTotals:
    """One batch's counts per MAC, as the bulk step computes them (`fastpath.classify`), ready for `apply_totals`."""

    now: float
    sent: list[tuple[int, int, int, float, float]]
    """(source MAC, frames, bytes, first time, last time)."""
    addresses: list[tuple[int, int, float]]
    """(source MAC, source address, first time): every pair seen."""
    received: list[tuple[int, int, int]]
    """(unicast destination MAC, frames, bytes)."""


def gateway_set(gateway_macs: frozenset[str]) -> frozenset[bytes]:
    return frozenset(bytes.fromhex(m.replace(":", "")) for m in gateway_macs)


class LeafInventory:
    """The MAC table and the leaf rules."""

    def __init__(self, settings: AnalyzerSettings, stats: CaptureStats, evidence: list[Evidence]) -> None:
        self.settings = settings
        self._stats = stats
        self._evidence = evidence
        self.macs: dict[bytes, MacState] = {}
        self.order: EvictionQueue[MacState] = EvictionQueue(_mac_last_seen, _mac_created)
        """The order in which the table gives up entries when full."""
        self.gateway = gateway_set(settings.gateway_macs)
        self.learning = settings.learning_period_s is not None
        """New services and new leaves are evidence only while a learned baseline is kept."""
        self._touched: set[bytes] = set()
        """MACs seen in this batch (only while learning is on): candidates for a new-device finding."""
        self._announced: set[bytes] = set()
        self._pairs: dict[tuple[bytes, bytes], float] = {}
        """(leaf-side address, MAC) pairs of this batch with the first time each was seen: address bindings."""
        self._leaf_side_cache: dict[bytes, bool] = {}

    def set_network(self, settings: AnalyzerSettings) -> None:
        """A new leaf side and gateway MACs (``settings`` has them), for the frames from now on."""
        self.settings = settings
        self.gateway = gateway_set(settings.gateway_macs)
        self._leaf_side_cache.clear()

    def set_learning(self, on: bool) -> None:
        self.learning = on

    # ----------------------------------------------------------------------------------------- the table

    def touch(self, mac: bytes, ts: float) -> MacState:
        """The MAC's state, created (evicting one if the table is full) when it is new; seen at ``ts``."""
        if self.learning:
            self._touched.add(mac)
        st = self.macs.get(mac)
        if st is None:
            if len(self.macs) >= self.settings.max_macs:
                del self.macs[self.order.victim(ts, self.settings.idle_flow_s).mac]
                self._stats.evicted_macs += 1
            st = self.macs[mac] = MacState(mac)
            st.created = ts
            self.order.admit(st)
        st.touched = ts
        return st

    def frame(self, p: Packet, ts: float, wirelen: int) -> MacState | None:
        """One decoded frame walked by the per-frame path: its MACs' counters, and the address it shows the
        sender uses (ARP's evidence too); the sender's state, when it has a MAC."""
        src = None
        if p.src_mac is not None:
            src = self.touch(p.src_mac, ts)
            if src.packets_out == 0 or ts < src.first_seen:
                src.first_seen = ts
            src.packets_out += 1
            src.bytes_out += wirelen
            src.last_seen = max(src.last_seen, ts)
        dst_mac = p.dst_mac
        if dst_mac is not None and is_unicast_mac(dst_mac):
            dst = self.touch(dst_mac, ts)
            dst.packets_in += 1
            dst.bytes_in += wirelen
        if src is not None:
            own = None
            if p.ethertype == ETH_ARP:
                if p.arp_spa is not None and p.arp_sha == p.src_mac:
                    own = p.arp_spa
                    # A probe (sender 0.0.0.0, RFC 5227) and an announcement (sender == target) are a host
                    # checking and claiming its own address: neither asks for somebody else's.
                    if own != ZERO_V4:
                        self._evidence.append(ArpClaim(ts, own, src.mac))
                        if p.arp_op == 1 and p.arp_tpa is not None and p.arp_tpa != own:
                            self._evidence.append(ArpAsk(ts, p.arp_tpa, src.mac))
            elif p.src_ip is not None:
                own = p.src_ip
            if own is not None:
                self.learn_ip(src, own)
                # Bindings only from Ethernet: a cooked capture on "any" shows one packet per interface it
                # crossed, with different link addresses.
                if p.dst_mac is not None and own not in (ZERO_V4, ZERO_V6) and self.is_leaf_ip(own):
                    self.saw_address(own, src.mac, ts)
        return src

    def apply_totals(self, totals: MacTotals) -> None:
        """Add one batch's per-MAC totals (the bulk step's: frames and bytes sent and received, source addresses)."""
        now = totals.now
        for mac_i, c, b, first_ts, last_ts in totals.sent:
            st = self.touch(mac_i.to_bytes(6, "big"), now)
            if st.packets_out == 0 or first_ts < st.first_seen:
                st.first_seen = first_ts
            st.last_seen = max(st.last_seen, last_ts)
            st.packets_out += c
            st.bytes_out += b
        for mac_i, ip_i, first_ts in totals.addresses:
            mac = mac_i.to_bytes(6, "big")
            known = self.macs.get(mac)
            if known is not None:
                ip = ip_i.to_bytes(4, "big")
                self.learn_ip(known, ip)
                if ip_i and self.is_leaf_ip(ip):
                    self.saw_address(ip, mac, first_ts)
        for mac_i, c, b in totals.received:
            st = self.touch(mac_i.to_bytes(6, "big"), now)
            st.packets_in += c
            st.bytes_in += b

    # ----------------------------------------------------------------------------------------- leaf rules

    def is_leaf(self, st: MacState) -> bool:
        return (
            st.packets_out > 0
            and is_unicast_mac(st.mac)
            and st.mac not in self.gateway
            and (st.leaf_side or not st.any_ip)
        )

    def leaves(self) -> list[MacState]:
        return sorted((st for st in self.macs.values() if self.is_leaf(st)), key=lambda s: s.mac)

    def leaf_of(self, mac_i: int) -> bytes | None:
        """The MAC (a tracker's integer) as bytes, if it is a leaf's."""
        mac = mac_i.to_bytes(6, "big")
        st = self.macs.get(mac)
        return mac if st is not None and self.is_leaf(st) else None

    def is_leaf_ip(self, ip: bytes) -> bool:
        hit = self._leaf_side_cache.get(ip)
        if hit is not None:
            return hit
        addr = ipaddress.ip_address(ip)
        if self.settings.leaf_nets:
            ok = any(addr.version == net.version and addr in net for net in self.settings.leaf_nets)
        elif isinstance(addr, ipaddress.IPv4Address):
            ok = (addr.is_private or addr.is_link_local) and not (
                addr.is_loopback or addr.is_multicast or addr.is_unspecified or ip == b"\xff\xff\xff\xff"
            )
        else:
            ok = addr.is_link_local or addr in ULA
        if len(self._leaf_side_cache) >= LEAF_SIDE_CACHE:
            self._leaf_side_cache.clear()
        self._leaf_side_cache[ip] = ok
        return ok

    def leaf_mac_for(self, ip: bytes, mac: bytes | None) -> bytes | None:
        """``mac`` when it is a leaf's, as the sender or receiver at address ``ip``."""
        if mac is None or not is_unicast_mac(mac) or mac in self.gateway:
            return None
        return mac if self.is_leaf_ip(ip) else None

    # ----------------------------------------------------------------------------------------- what a leaf is known by

    def learn_ip(self, st: MacState, ip: bytes) -> None:
        if ip in st.ips or ip in (ZERO_V4, ZERO_V6):
            return
        if (ip[0] >= 224 and len(ip) == 4) or (len(ip) == 16 and ip[0] == 0xFF):
            return
        st.any_ip = True
        if self.is_leaf_ip(ip):
            st.leaf_side = True
            if len(st.ips) < self.settings.max_ips_per_leaf:
                st.ips += (ip,)

    def add_name(self, names: dict[str, None], name: str) -> None:
        if not name or name in names:
            return
        if len(names) >= self.settings.max_names_per_leaf:
            names.pop(next(iter(names)))
            self._stats.evicted_names += 1
        names[name] = None

    def add_service(self, st: MacState, proto: str, port: int, ts: float) -> None:
        key = (proto, port)
        services = st.details.services
        if key not in services and len(services) < self.settings.max_services_per_leaf:
            st.own_details().own_services()[key] = None
            if self.learning:
                self._evidence.append(ServiceOffered(ts, st.mac, proto, port))

    def saw_address(self, ip: bytes, mac: bytes, ts: float) -> None:
        """A leaf-side address was the source of a frame from ``mac`` (per batch, the earliest time counts)."""
        key = (ip, mac)
        first = self._pairs.get(key)
        if first is None or ts < first:
            self._pairs[key] = ts

    # ----------------------------------------------------------------------------------------- per batch

    def batch_evidence(self) -> None:
        """The batch's new leaves (while learning) and address bindings, as evidence."""
        evidence = self._evidence
        if self.learning:
            for mac in self._touched:
                st = self.macs.get(mac)
                if st is None or mac in self._announced or not self.is_leaf(st):
                    continue
                if len(self._announced) >= self.settings.max_macs:
                    self._announced.clear()  # bounded: a MAC forgotten here is only announced again
                self._announced.add(mac)
                ips = ",".join(sorted((ip_text(ip) for ip in st.ips), key=ip_sort_key))
                evidence.append(NewLeaf(st.first_seen, mac, ips, vendor_of(mac_text(mac)) or ""))
            self._touched.clear()
        evidence.extend(AddressSeen(ts, ip, mac) for (ip, mac), ts in self._pairs.items())
        self._pairs = {}

