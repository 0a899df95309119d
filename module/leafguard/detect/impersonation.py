"""Somebody else answering for an address: IPv6 neighbour-advertisement spoofing and gateway impersonation.

* ``nd_spoofing`` (IPv6's ``arp_spoofing``): a neighbour advertisement binds a target address to a MAC while
  another MAC was bound to it within ``binding_memory_s`` (by its own advertisement, or the source link-layer
  option of its solicitations). thc-ipv6's ``parasite6`` answers every solicitation with its own MAC, and
  ``fake_advertise6`` advertises a victim's address; NDPMon and arpwatch's flip-flop follow the same binding.
* ``gateway_impersonation``: a leaf's default gateway is the MAC its traffic to addresses beyond the leaf side
  goes to. The finding is raised when that traffic goes to another MAC, in ``HOP_SECONDS`` distinct seconds (one
  stray frame, such as a duplicate ACK to a host that relays answers, is no change of gateway), while the gateway
  was still in use within ``gateway_memory_s`` (a router that has gone quiet for that long has been replaced,
  and its successor is learned silently), and when a MAC other than a gateway's claims one of the gateway's
  addresses in ARP (the first frame of an ARP poisoning aimed at the gateway).
"""

from __future__ import annotations

from collections import OrderedDict

from leafguard.detect.alerts import Alert
from leafguard.detect.probes import ArpFrame, Neighbor, NextHop
from leafguard.detect.scans import Sink, mac_text
from leafguard.detect.thresholds import Thresholds
from leafguard.observe.addresses import ip_text

MAX_TRACKED = 4096
HOP_SECONDS = 3
_UNSPECIFIED6 = b"\x00" * 16


def _remember(table: OrderedDict[bytes, tuple[bytes, float]], key: bytes, value: tuple[bytes, float]) -> None:
    if key not in table and len(table) >= MAX_TRACKED:
        table.popitem(last=False)
    table[key] = value


class Impersonation:
    def __init__(self, thresholds: Thresholds, sink: Sink, gateway_macs: frozenset[bytes] = frozenset()) -> None:
        self.t = thresholds
        self._sink = sink
        self.gateway_macs = gateway_macs
        """The gateway's own MACs; replaced live by the gateway settings."""
        self._nd: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        """IPv6 address -> (MAC, last time it was bound to it)."""
        self._nd_reported: set[tuple[bytes, bytes]] = set()
        self._hops: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        """Leaf MAC -> (its gateway's MAC, last time the leaf sent through it)."""
        self._gateways: OrderedDict[bytes, float] = OrderedDict()
        """MACs that are some leaf's gateway -> last time in use."""
        self._gateway_ips: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        """Addresses a gateway claimed in ARP -> (that gateway's MAC, when)."""
        self._gw_reported: set[tuple[bytes, bytes]] = set()
        self._other_hops: OrderedDict[tuple[bytes, bytes], int] = OrderedDict()
        """(leaf, MAC that is not its gateway) -> seconds in which the leaf sent beyond the leaf side through it."""

    # ------------------------------------------------------------------------------------------ IPv6

    def neighbor(self, r: Neighbor) -> None:
        addr = r.address
        if addr == _UNSPECIFIED6 or addr[0] == 0xFF:
            return
        mac = r.link_addr or r.src_mac
        if not r.advert and r.link_addr is None:
            return  # a solicitation without its source link-layer option binds nothing
        old = self._nd.get(addr)
        if old is not None and old[0] != mac and r.ts - old[1] <= self.t.binding_memory_s:
            if not r.advert:
                return  # only advertisements take an address over; a solicitation just asks
            key = (mac, addr)
            if key not in self._nd_reported and len(self._nd_reported) < MAX_TRACKED:
                self._nd_reported.add(key)
                self._sink(
                    Alert(
                        "nd_spoofing", "high", r.ts, mac_text(mac),
                        f"{mac_text(mac)} advertises {ip_text(addr)}, which {mac_text(old[0])} holds",
                        {"ip": ip_text(addr), "mac": mac_text(mac), "previous_mac": mac_text(old[0]),
                         "previous_seen": old[1], "override": r.override},
                    )
                )  # fmt: skip
            return  # the first holder keeps the address: a spoofer answering again is not the new normal
        _remember(self._nd, addr, (mac, r.ts))

    # ------------------------------------------------------------------------------------------ gateway

    def next_hop(self, r: NextHop) -> None:
        """A leaf sending beyond the leaf side through ``r.hop`` (one record per pair and second)."""
        old = self._hops.get(r.leaf_mac)
        if old is None or old[0] == r.hop:
            self._gateway_seen(r.hop, r.ts)
            _remember(self._hops, r.leaf_mac, (r.hop, r.ts))
            return
        if r.ts - old[1] > self.t.gateway_memory_s:
            self._gateway_seen(r.hop, r.ts)
            _remember(self._hops, r.leaf_mac, (r.hop, r.ts))  # the old router is gone: this is the new one
            return
        key = (r.leaf_mac, r.hop)
        if key not in self._other_hops and len(self._other_hops) >= MAX_TRACKED:
            self._other_hops.popitem(last=False)
        seconds = self._other_hops[key] = self._other_hops.get(key, 0) + 1
        if seconds == HOP_SECONDS and key not in self._gw_reported and len(self._gw_reported) < MAX_TRACKED:
            self._gw_reported.add(key)
            self._sink(
                Alert(
                    "gateway_impersonation", "high", r.ts, mac_text(r.hop),
                    f"{mac_text(r.leaf_mac)} now sends its traffic beyond the leaf side to {mac_text(r.hop)}, "
                    f"not to its gateway {mac_text(old[0])}",
                    {"leaf_mac": mac_text(r.leaf_mac), "mac": mac_text(r.hop), "gateway_mac": mac_text(old[0]),
                     "gateway_seen": old[1], "how": "next hop"},
                )
            )  # fmt: skip

    def _gateway_seen(self, mac: bytes, ts: float) -> None:
        if mac not in self._gateways and len(self._gateways) >= MAX_TRACKED:
            self._gateways.popitem(last=False)
        self._gateways[mac] = max(ts, self._gateways.get(mac, ts))

    def arp(self, r: ArpFrame) -> None:
        if r.sender_mac != r.src_mac or r.sender_ip == b"\x00\x00\x00\x00":
            return
        if r.src_mac in self._gateways or r.src_mac in self.gateway_macs:
            _remember(self._gateway_ips, r.sender_ip, (r.src_mac, r.ts))
            return
        owner = self._gateway_ips.get(r.sender_ip)
        if owner is None or r.ts - owner[1] > self.t.binding_memory_s:
            return
        key = (r.src_mac, r.sender_ip)
        if key in self._gw_reported or len(self._gw_reported) >= MAX_TRACKED:
            return
        self._gw_reported.add(key)
        self._sink(
            Alert(
                "gateway_impersonation", "high", r.ts, mac_text(r.src_mac),
                f"{mac_text(r.src_mac)} claims the gateway address {ip_text(r.sender_ip)} of {mac_text(owner[0])}",
                {"leaf_mac": None, "mac": mac_text(r.src_mac), "gateway_mac": mac_text(owner[0]),
                 "gateway_ip": ip_text(r.sender_ip), "gateway_seen": owner[1], "how": "arp claim"},
            )
        )  # fmt: skip
