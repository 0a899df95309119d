"""Deep decoders on real protocol bytes built with scapy, and on hostile input."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR, DNSRR

from leafguard.decode import deep
from leafguard.demo import _client_hello


def test_dhcp_fingerprint_options() -> None:
    raw = bytes(
        BOOTP(chaddr=bytes.fromhex("5ccf7f07aefb"))
        / DHCP(
            options=[
                ("message-type", "request"),
                ("hostname", "ESP_07AEFB"),
                ("requested_addr", "10.0.0.9"),
                ("param_req_list", [1, 3, 28, 6]),
                ("vendor_class_id", "udhcp 1.15.2"),
                ("client_id", b"\x01\x5c\xcf\x7f\x07\xae\xfb"),
                (81, b"\x04\x00\x00\x06sensor\x04home\x00"),
                "end",
            ]
        )
    )
    d = deep.dhcp(raw)
    assert d is not None
    assert d.client_mac == bytes.fromhex("5ccf7f07aefb")
    assert (d.msg_type, d.hostname, d.vendor_class) == (3, "ESP_07AEFB", "udhcp 1.15.2")
    assert d.param_request_list == (1, 3, 28, 6)
    assert d.requested_ip == bytes([10, 0, 0, 9])
    assert d.fqdn == "sensor.home"


def test_dns_query_and_mdns_answers_with_compression() -> None:
    q = deep.dns(bytes(DNS(rd=1, qd=DNSQR(qname="api.example.com"))))
    assert q is not None and not q.response and q.questions == ["api.example.com"]
    ans = bytes(
        DNS(
            qr=1,
            qd=DNSQR(qname="cam.local"),
            an=[
                DNSRR(rrname="cam.local", type="A", rdata="10.0.0.5"),
                DNSRR(rrname="cam.local", type="AAAA", rdata="fe80::5"),
            ],
        )
    )
    a = deep.dns(ans)
    assert a is not None and a.response
    assert ("cam.local", deep.DNS_A, "10.0.0.5") in a.records
    assert ("cam.local", deep.DNS_AAAA, "fe80::5") in a.records


def test_dns_pointer_loop_is_bounded() -> None:
    msg = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    d = deep.dns(msg)
    assert d is None or d.questions == []


def _nb_encode(name: str, suffix: int) -> bytes:
    raw = name.encode().ljust(15) + bytes([suffix])
    return bytes([32]) + bytes(c for b in raw for c in (0x41 + (b >> 4), 0x41 + (b & 0x0F))) + b"\x00"


def test_nbns_registration_name_and_group_flag() -> None:
    # Name registration request (opcode 5): question, then an additional record with NB_FLAGS (RFC 1002 4.2.2).
    head = struct.pack("!HHHHHH", 7, 0x2910, 1, 0, 0, 1)
    question = _nb_encode("PLC-LINE4", 0x00) + b"\x00\x20\x00\x01"
    additional = b"\xc0\x0c" + struct.pack("!HHIHH4s", 0x20, 1, 300000, 6, 0x0000, bytes([10, 0, 0, 9]))
    n = deep.nbns(head + question + additional)
    assert n is not None and (n.response, n.opcode) == (False, 5)
    assert n.names == [("PLC-LINE4", 0x00, False)]
    group = b"\xc0\x0c" + struct.pack("!HHIHH4s", 0x20, 1, 300000, 6, 0x8000, bytes([10, 0, 0, 9]))
    g = deep.nbns(head + _nb_encode("WORKGROUP", 0x00) + b"\x00\x20\x00\x01" + group)
    assert g is not None and g.names == [("WORKGROUP", 0x00, True)]


def test_ssdp_notify_headers() -> None:
    raw = (
        b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nSERVER: Linux/3.14 UPnP/1.0 IpBridge/1.17\r\n"
        b"USN: uuid:2f402f80-da50-11e1-9b23-001788247fff::upnp:rootdevice\r\nNTS: ssdp:alive\r\n\r\n"
    )
    s = deep.ssdp(raw)
    assert s is not None and s.method == "NOTIFY"
    assert s.server == "Linux/3.14 UPnP/1.0 IpBridge/1.17"
    assert s.usn is not None and s.usn.startswith("uuid:2f402f80")
    assert deep.ssdp(b"GET / HTTP/1.0\r\n\r\n") is None


def test_tls_client_hello_sni_and_versions() -> None:
    hello = deep.tls_client_hello(_client_hello("devs.tplinkcloud.com"))
    assert hello is not None
    assert hello.sni == "devs.tplinkcloud.com"
    assert hello.versions == (0x0304, 0x0303)
    assert deep.tls_client_hello(b"\x17\x03\x03\x00\x10" + bytes(16)) is None


@settings(max_examples=800, deadline=None)
@given(st.binary(max_size=400))
def test_deep_decoders_never_raise(data: bytes) -> None:
    deep.dhcp(data)
    deep.dns(data)
    deep.nbns(data)
    deep.ssdp(data)
    deep.tls_client_hello(data)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 400))
def test_truncated_client_hello_never_raises(cut: int) -> None:
    deep.tls_client_hello(_client_hello("x.example")[:cut])
