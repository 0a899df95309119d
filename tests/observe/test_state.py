"""A MAC's sets: one shared read-only empty mapping until the MAC's first write, then a dict of its own."""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from leafguard.capture.batch import FrameBatch
from leafguard.demo import _client_hello
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.state import NONE_YET, NOTHING_SAID, MacDetails, MacState

TALKER = ("00:17:88:00:00:01", "10.1.0.5")
QUIET = ("00:17:88:00:00:02", "10.1.0.6")
SERVER = ("00:17:88:00:00:03", "10.1.0.7")


def _batch(pkts: list[Any], t0: float = 1_700_000_000.0) -> FrameBatch:
    return FrameBatch.from_frames(1, [(t0 + i * 0.001, bytes(p), len(bytes(p))) for i, p in enumerate(pkts)])


def _nothing(d: MacDetails) -> bool:
    return not (d.hostnames or d.dns_queries or d.tls_sni or d.tls_versions or d.services) and (
        d.dhcp_hostname,
        d.dhcp_vendor_class,
        d.dhcp_prl,
        d.ssdp_server,
        d.ssdp_usn,
    ) == (None, None, (), None, None)


def test_each_mac_writes_its_own_details_and_sets() -> None:
    a, b = MacState(b"\x00\x17\x88\x00\x00\x01"), MacState(b"\x00\x17\x88\x00\x00\x02")
    assert a.details is b.details is NOTHING_SAID
    own = a.own_details()
    assert own is not NOTHING_SAID and a.own_details() is own and a.details is own
    own.dhcp_hostname = "cam"
    own.own_hostnames()["cam"] = None
    own.own_dns_queries()["ntp.example"] = None
    own.own_tls_sni()["hub.example"] = None
    own.own_tls_versions()[0x0304] = None
    own.own_services()[("tcp", 502)] = None
    assert list(own.hostnames) == ["cam"] and list(own.dns_queries) == ["ntp.example"]
    assert list(own.tls_sni) == ["hub.example"] and list(own.tls_versions) == [0x0304]
    assert list(own.services) == [("tcp", 502)]
    # The other MAC, and every MAC made after, still has nothing: the writes did not go to a shared record or set.
    for st in (b, MacState(b"\x00\x17\x88\x00\x00\x03")):
        assert _nothing(st.details) and _nothing(st.own_details())
    assert _nothing(NOTHING_SAID) and not NONE_YET
    # The first write made the set; later writes add to the same one.
    names = own.own_hostnames()
    names["cam2"] = None
    assert own.own_hostnames() is names and list(own.hostnames) == ["cam", "cam2"]


def test_the_shared_empty_details_and_sets_refuse_writes() -> None:
    st = MacState(b"\x00\x17\x88\x00\x00\x01")
    with pytest.raises(TypeError):
        st.details.dhcp_hostname = "cam"
    with pytest.raises(TypeError):
        st.details.own_hostnames()
    with pytest.raises(TypeError):
        st.own_details().hostnames["cam"] = None  # type: ignore[index]
    assert _nothing(NOTHING_SAID) and not NONE_YET and _nothing(st.details)


def test_only_the_mac_that_showed_a_name_or_service_has_it() -> None:
    """Through the analyzer's own write paths (DHCP and DNS, a TLS ClientHello, a SYN-ACK): each lands in the
    sender's state only, and a MAC that sent none of them reports empty lists."""
    an = Analyzer()
    an.feed(
        _batch(
            [
                Ether(src=TALKER[0], dst="ff:ff:ff:ff:ff:ff")
                / IP(src="0.0.0.0", dst="255.255.255.255")
                / UDP(sport=68, dport=67)
                / BOOTP(op=1, chaddr=bytes.fromhex("001788000001"))
                / DHCP(options=[("message-type", "request"), ("hostname", b"cam-7"), "end"]),
                Ether(src=TALKER[0], dst=SERVER[0])
                / IP(src=TALKER[1], dst=SERVER[1])
                / UDP(sport=40000, dport=53)
                / DNS(rd=1, qd=DNSQR(qname="hub.example")),
                Ether(src=TALKER[0], dst=SERVER[0])
                / IP(src=TALKER[1], dst=SERVER[1])
                / TCP(sport=40001, dport=443, flags="S"),
                Ether(src=SERVER[0], dst=TALKER[0])
                / IP(src=SERVER[1], dst=TALKER[1])
                / TCP(sport=443, dport=40001, flags="SA"),
                Ether(src=TALKER[0], dst=SERVER[0])
                / IP(src=TALKER[1], dst=SERVER[1])
                / TCP(sport=40001, dport=443, flags="PA")
                / _client_hello("hub.example"),
                Ether(src=QUIET[0], dst=SERVER[0]) / IP(src=QUIET[1], dst=SERVER[1]) / UDP(sport=40002, dport=9),
            ]
        )
    )
    leaves = {leaf["mac"]: leaf for leaf in an.report()["leaves"]}
    talker, quiet, server = leaves[TALKER[0]], leaves[QUIET[0]], leaves[SERVER[0]]
    assert talker["hostnames"] == ["cam-7"] and talker["dns_queries"] == ["hub.example"]
    assert talker["tls_sni"] == ["hub.example"] and talker["tls_versions"] == ["0x0303", "0x0304"]
    assert server["services"] == [{"protocol": "tcp", "port": 443}]
    for leaf in (quiet, server):
        assert leaf["hostnames"] == leaf["dns_queries"] == leaf["tls_sni"] == leaf["tls_versions"] == []
    assert talker["services"] == quiet["services"] == []
    assert an.macs[bytes.fromhex(QUIET[0].replace(":", ""))].details is NOTHING_SAID
    assert _nothing(NOTHING_SAID) and not NONE_YET
