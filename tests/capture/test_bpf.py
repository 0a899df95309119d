"""The kernel filter: what it keeps, how much of it, and what happens to a bad operator expression.

libpcap's own interpreter (pcap_offline_filter) runs the programs here; tests/capture/test_live.py runs the same
programs in the kernel.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw

from leafguard.capture.bpf import (
    BPF_JMP_JA,
    BPF_MAXINSNS,
    BPF_RET_K,
    BpfProgram,
    capture_program,
    compile_expression,
    splice,
)
from leafguard.errors import CaptureError

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
PAD = Raw(b"\x00" * 1200)


def _b(p: Packet) -> bytes:
    return bytes(p)


INVENTORY = {
    "arp": E / ARP(pdst="10.77.0.1"),
    "dhcp": E / IP() / UDP(sport=68, dport=67) / BOOTP(chaddr=b"\x02" * 6) / DHCP(options=[("hostname", b"x"), "end"]),
    "dns": E / IP() / UDP(sport=40000, dport=53) / DNS(qd=DNSQR(qname="example.test")) / PAD,
    "mdns": E / IP() / UDP(sport=5353, dport=5353) / PAD,
    "llmnr": E / IP() / UDP(sport=40001, dport=5355) / PAD,
    "nbns": E / IP() / UDP(sport=137, dport=137) / PAD,
    "ssdp": E / IP() / UDP(sport=40002, dport=1900) / PAD,
    "dns6": E / IPv6() / UDP(sport=40000, dport=53) / PAD,
}
BULK = {
    "tcp": E / IP() / TCP(sport=40000, dport=8883) / PAD,
    "tcp6": E / IPv6() / TCP(sport=40000, dport=443) / PAD,
    "udp": E / IP() / UDP(sport=40000, dport=9999) / PAD,
    "icmp": E / IP() / ICMP() / PAD,
    "other": Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x88B5) / PAD,
}


@pytest.mark.parametrize("name", sorted(INVENTORY))
def test_inventory_frames_are_kept_whole(name: str) -> None:
    frame = _b(INVENTORY[name])
    # The kernel copies min(returned, frame length) bytes.
    assert capture_program().run(frame) >= len(frame)
    assert capture_program(snaplen=64).run(frame) >= len(frame)


@pytest.mark.parametrize("name", sorted(BULK))
def test_other_frames_are_kept_but_cut_to_the_snap_length(name: str) -> None:
    frame = _b(BULK[name])
    assert capture_program().run(frame) == 512
    assert capture_program(snaplen=128).run(frame) == 128


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=700), st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00"]))
def test_default_filter_never_drops_a_frame(tail: bytes, ethertype: bytes) -> None:
    # Counters stay exact only if every frame reaches user space: runts and malformed headers included.
    frame = bytes(12) + ethertype + tail
    assert capture_program().run(frame) > 0
    assert capture_program(snaplen=64).run(frame) > 0


TCP_STARTS = {
    "tls_client_hello": b"\x16\x03\x01\x06\x00\x01",
    "http_get": b"GET /api/v1/telemetry HTTP/1.1\r\n",
    "http_post": b"POST /upload HTTP/1.1\r\n",
    "http_put": b"PUT /x HTTP/1.1\r\n",
    "http_head": b"HEAD / HTTP/1.1\r\n",
    "mqtt_connect": b"\x10\xff\x01\x00\x04MQTT",
}


@pytest.mark.parametrize("name", sorted(TCP_STARTS))
def test_tcp_segments_the_deep_decoders_read_are_kept_whole(name: str) -> None:
    options = [("MSS", 1460), ("NOP", None), ("WScale", 7), ("SAckOK", b""), ("Timestamp", (1, 2))]
    for tcp in (TCP(sport=40000, dport=443), TCP(sport=40000, dport=8080, options=options)):
        frame = _b(E / IP() / tcp / Raw(TCP_STARTS[name] + b"a" * 1300))
        assert capture_program().run(frame) == 65535


def test_tcp_payload_of_other_records_is_cut() -> None:
    app_data = _b(E / IP() / TCP(sport=443, dport=40000) / Raw(b"\x17\x03\x03\x05\x00" + b"z" * 1300))
    assert capture_program().run(app_data) == 512


def test_extra_filter_narrows_both_branches() -> None:
    prog = capture_program("not host 10.77.0.9")
    assert prog.expression == "not host 10.77.0.9"
    assert prog.run(_b(E / IP(dst="10.77.0.9") / TCP() / PAD)) == 0
    assert prog.run(_b(E / IP(dst="10.77.0.9") / UDP(sport=1, dport=53) / PAD)) == 0
    assert prog.run(_b(E / IP(dst="10.77.0.8") / UDP(sport=1, dport=53) / PAD)) == 65535
    assert prog.run(_b(E / IP(dst="10.77.0.8") / TCP() / PAD)) == 512
    # Short frames: kept whole, but only if the extra filter takes them.
    assert prog.run(_b(E / IP(dst="10.77.0.9") / TCP())) == 0
    assert prog.run(_b(E / IP(dst="10.77.0.8") / TCP())) == 65535


@pytest.mark.parametrize("bad", ["hots 10.0.0.1", "tcp port 99999", "((udp", "ether host zz"])
def test_invalid_expression_is_a_capture_error_naming_it(bad: str) -> None:
    with pytest.raises(CaptureError, match="invalid capture filter") as info:
        capture_program(bad)
    assert repr(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_splice_jumps_from_every_drop_to_the_second_program() -> None:
    first = compile_expression("arp", 100)
    rest = compile_expression("", 7)
    prog = splice(first, rest)
    assert len(prog) == len(first) + len(rest)
    assert splice(first, rest, min_len=60).run(_b(E / ARP())) == 7  # 42 bytes: below min_len
    drops = [i for i, (code, _, _, k) in enumerate(first.insns) if code == BPF_RET_K and k == 0]
    assert drops
    for i in drops:
        code, _, _, k = prog.insns[i]
        assert code == BPF_JMP_JA
        assert i + 1 + k == len(first)
    assert prog.run(_b(E / ARP())) == 100
    assert prog.run(_b(E / IP() / TCP())) == 7


def test_too_long_a_program_is_refused() -> None:
    huge = BpfProgram(((BPF_RET_K, 0, 0, 1),) * BPF_MAXINSNS, "huge")
    with pytest.raises(CaptureError, match="too long"):
        splice(huge, compile_expression("", 1))


def test_vlan_tagged_frames_in_the_packet_still_pass() -> None:
    # The kernel usually strips the outer tag before the filter runs; when it does not, the frame is still kept.
    frame = _b(E / Dot1Q(vlan=7) / IP() / UDP(sport=1, dport=53) / PAD)
    assert capture_program().run(frame) == 512
