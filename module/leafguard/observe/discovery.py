"""Discovery protocols: what DHCP, DNS, mDNS, LLMNR, NetBIOS-NS and SSDP datagrams say about the leaves.

Both halves of the core meet these datagrams: the per-frame path decodes each one as it walks, and the bulk step
counts them with the rest and hands only their payloads over (`fastpath.classify` picks them with
`selected_many`). Which datagrams have something to say is stated here once, as port sets: `datagram` interprets
them, and `selected_many` is the same rule over a whole batch's header fields.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from leafguard.decode import deep
from leafguard.detect.evidence import DhcpServerReply, Evidence
from leafguard.observe.addresses import ZERO_V4
from leafguard.observe.inventory import LeafInventory
from leafguard.observe.state import MacState

DHCP_PORTS = (67, 68)
DNS_PORTS = (53, 5353, 5355)
"""DNS, mDNS and LLMNR: one message format."""
MDNS_PORT = 5353
NBNS_PORT = 137
SSDP_PORT = 1900
PORTS = frozenset((*DHCP_PORTS, *DNS_PORTS, NBNS_PORT, SSDP_PORT))
"""A datagram with neither port in this set says nothing here."""
DNS_CACHE = 1024
"""DNS messages remembered by their bytes after the transaction id (devices repeat the same few queries)."""

_I64 = npt.NDArray[np.int64]
_B = npt.NDArray[np.bool_]


def selected_many(arr: npt.NDArray[np.uint8], sport: _I64, dport: _I64, pay_off: _I64, pay_len: _I64) -> _B:
    """Which of a batch's UDP datagrams `Discovery.datagram` would read something in: DHCP either way, DNS except a
    unicast answer, NetBIOS-NS from its port, SSDP either way; and only with a payload."""

    def either(ports: tuple[int, ...]) -> _B:
        hit = np.zeros(sport.size, dtype=bool)
        for port in ports:
            hit |= (sport == port) | (dport == port)
        return hit

    dhcp = either(DHCP_PORTS)
    dns = ~dhcp & either(DNS_PORTS)
    qr = arr[np.where(pay_len > 2, pay_off + 2, 0)] & 0x80
    answer = (pay_len > 2) & (qr != 0) & (sport != MDNS_PORT)
    others = ~dhcp & ~dns & ((sport == NBNS_PORT) | either((SSDP_PORT,)))
    selected: _B = (pay_len > 0) & (dhcp | (dns & ~answer) | others)
    return selected


class Discovery:
    """Interprets discovery datagrams into the inventory (names, services, DHCP fingerprints, addresses)."""

    def __init__(self, inventory: LeafInventory, evidence: list[Evidence]) -> None:
        self._inventory = inventory
        self._evidence = evidence
        self._dns_cache: dict[bytes, deep.Dns | None] = {}

    def datagram(self, sport: int, dport: int, src_ip: bytes, payload: bytes, src: MacState, ts: float) -> None:
        """One UDP datagram's payload, sent by ``src`` from ``src_ip``."""
        if sport in DHCP_PORTS or dport in DHCP_PORTS:
            self._dhcp(sport, src_ip, payload, src, ts)
        elif sport in DNS_PORTS or dport in DNS_PORTS:
            # Only queries (the names a leaf asks for) and mDNS announcements (its own names) are kept:
            # a unicast DNS answer needs no parsing.
            if not (len(payload) > 2 and payload[2] & 0x80 and sport != MDNS_PORT):
                self._dns(sport, dport, payload, src, ts)
        elif sport == NBNS_PORT:
            self._nbns(payload, src)
        elif SSDP_PORT in (sport, dport):
            s = deep.ssdp(payload)
            if s is not None and s.method != "M-SEARCH":
                if s.server:
                    src.own_details().ssdp_server = s.server
                if s.usn:
                    src.own_details().ssdp_usn = s.usn

    def frame(self, data: bytes, off: int, caplen: int, ts: float) -> None:
        """The payload of a plain IPv4 UDP datagram in an Ethernet frame, with or without one 802.1Q tag, that
        `selected_many` chose (the bulk step counted the frame)."""
        src = self._inventory.touch(data[off + 6 : off + 12], ts)
        if data[off + 12] == 0x81 and data[off + 13] == 0:  # fields after the tag: as in an untagged frame
            off += 4
            caplen -= 4
        total = (data[off + 16] << 8) | data[off + 17]
        payload = data[off + 42 : off + min(14 + total, caplen)]
        sport = (data[off + 34] << 8) | data[off + 35]
        dport = (data[off + 36] << 8) | data[off + 37]
        self.datagram(sport, dport, data[off + 26 : off + 30], payload, src, ts)

    def _dhcp(self, sport: int, src_ip: bytes, payload: bytes, src: MacState, ts: float) -> None:
        d = deep.dhcp(payload)
        if d is None:
            return
        inv = self._inventory
        client = src if d.client_mac == src.mac else inv.touch(d.client_mac, src.touched)
        if d.hostname:
            client.own_details().dhcp_hostname = d.hostname
            inv.add_name(client.own_details().own_hostnames(), d.hostname)
        if d.fqdn:
            inv.add_name(client.own_details().own_hostnames(), d.fqdn)
        if d.op == 1:
            if d.vendor_class:
                client.own_details().dhcp_vendor_class = d.vendor_class
            if d.param_request_list:
                client.own_details().dhcp_prl = d.param_request_list
        elif d.msg_type == 5 and d.your_ip != ZERO_V4:
            inv.learn_ip(client, d.your_ip)
        # A server's OFFER/ACK goes to a broadcast or a new address, never back on the request's 5-tuple, so the
        # reply rule cannot see it: a BOOTREPLY from port 67 is the evidence.
        if d.op == 2 and sport == 67 and inv.is_leaf_ip(src_ip):
            inv.add_service(src, "udp", 67, ts)
            self._evidence.append(DhcpServerReply(ts, src.mac, src_ip))

    def _dns(self, sport: int, dport: int, payload: bytes, src: MacState, ts: float) -> None:
        m = self._parsed_dns(payload)
        if m is None:
            return
        inv = self._inventory
        if not m.response and dport in DNS_PORTS:
            for q in m.questions:
                inv.add_name(src.own_details().own_dns_queries(), q)
        if sport == MDNS_PORT:
            if m.response and m.records:
                # Answering mDNS (to the multicast group, so again not on the query's 5-tuple).
                inv.add_service(src, "udp", MDNS_PORT, ts)
            for name, rtype, _value in m.records:
                if rtype in (deep.DNS_A, deep.DNS_AAAA) and name:
                    inv.add_name(src.own_details().own_hostnames(), name)

    def _nbns(self, payload: bytes, src: MacState) -> None:
        nb = deep.nbns(payload)
        if nb is None:
            return
        # Registrations and refreshes (opcodes 5, 8, 9) and positive answers name the sender itself.
        if (not nb.response and nb.opcode in (5, 8, 9)) or (nb.response and nb.opcode == 0):
            for name, suffix, group in nb.names:
                if suffix in (0x00, 0x20) and not group and name and name.isprintable() and name[0] != "*":
                    self._inventory.add_name(src.own_details().own_hostnames(), name)

    def _parsed_dns(self, payload: bytes) -> deep.Dns | None:
        # Devices repeat the same few queries; only the transaction id (the first two bytes) changes.
        key = payload[2:]
        if key in self._dns_cache:
            return self._dns_cache[key]
        m = deep.dns(payload)
        if len(self._dns_cache) >= DNS_CACHE:
            self._dns_cache.clear()
        self._dns_cache[key] = m
        return m
