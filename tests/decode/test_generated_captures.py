"""Behaviour of `leafguard analyze --json` on captures whose every frame we built (scapy), in every file
format and link type the contract names: pcap and pcapng, Ethernet (with 802.1Q and QinQ), Linux SLL,
Linux SLL2 and raw IP.

Each test writes its frames to tmp_path, runs `python -m leafguard analyze FILE --json` and compares the
report with what was written: the expected counters, 5-tuples, initiators and TCP states are computed
from the frame list itself (per frame: source and destination MAC, original length, 5-tuple).

Expectations that go beyond tshark (which the real-capture oracle test uses):
* IPv4 fragments: both fragments of a UDP datagram count in its 5-tuple (the non-first fragment carries
  no ports; it is tied to the flow by the IP identification). tshark would instead count the datagram
  once, on the reassembling frame.
* A frame cut by the snaplen counts with its original length. capture.truncated counts frames cut inside
  a header they announce (README: "frames cut before the end of a header they announce"), not frames cut
  in their payload: the scenario has one of each.
* TCP states: S0 = SYN(s) never answered, REJ = SYN answered by RST, EST = handshake done and not closed,
  CLOSED = handshake done then FIN, OTHER = first seen mid-stream (no SYN).
* Services are TCP ports that a leaf answers with SYN-ACK (a refused port is not a service).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, fragment6
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.layers.tls.extensions import ServerName, TLS_Ext_ServerName
from scapy.layers.tls.handshake import TLSClientHello
from scapy.layers.tls.record import TLS
from scapy.packet import Packet

from tests.conftest import run_analyze

LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2 = 1, 101, 113, 276
T0 = 1_700_000_000.0

GW, GW_IP = "e4:f4:c6:00:00:01", "192.168.1.1"
L1, L1_IP, L1_IP6 = "24:0a:c4:00:00:01", "192.168.1.10", "fe80::260a:c4ff:fe00:1"
L2, L2_IP, L2_IP6 = "00:17:88:00:00:02", "192.168.1.20", "fe80::217:88ff:fe00:2"
L3, L3_IP = "b8:27:eb:00:00:03", "192.168.1.30"
L4 = "da:a1:19:00:00:04"  # locally administered: a randomized MAC that only sends a DHCP DISCOVER
SERVER = "93.184.216.34"
BCAST = "ff:ff:ff:ff:ff:ff"
SNI = "mqtt.example.com"
SSDP_SERVER = "Linux/3.14 UPnP/1.0 IpBridge/1.50.0"

Key = tuple[str, str, int, str, int]


@dataclass
class Frame:
    ts: float
    data: bytes  # as captured (may be cut)
    wirelen: int
    src: str | None
    dst: str | None
    key: Key | None  # directed 5-tuple, when the frame belongs to a TCP/UDP conversation
    tcp_flags: int = 0


@dataclass
class Capture:
    frames: list[Frame] = field(default_factory=list)

    def add(self, pkt: Packet, key: Key | None = None, snaplen: int | None = None) -> None:
        raw = bytes(pkt)
        ether = pkt.getlayer(Ether)
        flags = int(pkt[TCP].flags) if pkt.haslayer(TCP) else 0
        self.frames.append(
            Frame(
                T0 + len(self.frames) * 0.01,
                raw[:snaplen] if snaplen else raw,
                len(raw),
                ether.src if ether else None,
                ether.dst if ether else None,
                key,
                flags,
            )
        )

    def flow(self, pkt: Packet, snaplen: int | None = None) -> None:
        """Add a frame that belongs to the TCP/UDP conversation of its own (last) IP/transport header."""
        ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        l4 = pkt.getlayer(TCP) or pkt.getlayer(UDP)
        proto = "tcp" if isinstance(l4, TCP) else "udp"
        self.add(pkt, (proto, str(ip.src), int(l4.sport), str(ip.dst), int(l4.dport)), snaplen)


# ------------------------------------------------------------------------------------------ file writers
def write_pcap(path: Path, frames: list[Frame], linktype: int) -> Path:
    with path.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype))
        for f in frames:
            sec = int(f.ts)
            out.write(struct.pack("<IIII", sec, round((f.ts - sec) * 1e6), len(f.data), f.wirelen) + f.data)
    return path


def _block(kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<II", kind, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def write_pcapng(path: Path, frames: list[Frame], linktype: int) -> Path:
    with path.open("wb") as out:
        out.write(_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)))
        out.write(_block(1, struct.pack("<HHI", linktype, 0, 0)))  # microsecond timestamps (default)
        for f in frames:
            ticks = round(f.ts * 1e6)
            epb = struct.pack("<IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(f.data), f.wirelen) + f.data
            out.write(_block(6, epb))
    return path


def analyze(path: Path, *extra: str) -> dict[str, Any]:
    return run_analyze(path, *extra, timeout_s=120)


# ------------------------------------------------------------------------------------------ scenario
def _dhcp(cap: Capture, mac: str, ip: str, xid: int, names: tuple[str, str], vendor: str, prl: list[int]) -> None:
    chaddr = bytes.fromhex(mac.replace(":", ""))
    base = Ether(src=mac, dst=BCAST) / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
    common = [("client_id", b"\x01" + chaddr), ("vendor_class_id", vendor.encode()), ("param_req_list", prl)]
    cap.flow(
        base
        / BOOTP(op=1, xid=xid, chaddr=chaddr, flags=0x8000)
        / DHCP(options=[("message-type", "discover"), ("hostname", names[0].encode()), *common, "end"])
    )
    reply = Ether(src=GW, dst=mac) / IP(src=GW_IP, dst=ip) / UDP(sport=67, dport=68)
    server = [("server_id", GW_IP), ("lease_time", 86400), ("subnet_mask", "255.255.255.0"), ("router", GW_IP)]
    cap.flow(
        reply
        / BOOTP(op=2, xid=xid, yiaddr=ip, chaddr=chaddr)
        / DHCP(options=[("message-type", "offer"), *server, "end"])
    )
    request = [("message-type", "request"), ("requested_addr", ip), ("server_id", GW_IP)]
    cap.flow(
        base
        / BOOTP(op=1, xid=xid, chaddr=chaddr, flags=0x8000)
        / DHCP(options=[*request, ("hostname", names[1].encode()), *common, "end"])
    )
    cap.flow(
        reply / BOOTP(op=2, xid=xid, yiaddr=ip, chaddr=chaddr) / DHCP(options=[("message-type", "ack"), *server, "end"])
    )


def _tcp(smac: str, dmac: str, src: str, dst: str, sport: int, dport: int) -> tuple[Any, Any]:
    """Two packet factories (client->server, server->client) with running sequence numbers."""
    seq = {"c": 1000, "s": 5000}

    def make(direction: str) -> Any:
        def pkt(flags: str, payload: bytes = b"") -> Packet:
            if direction == "c":
                hdr = Ether(src=smac, dst=dmac) / IP(src=src, dst=dst)
                seg = TCP(sport=sport, dport=dport, flags=flags, seq=seq["c"], ack=seq["s"])
            else:
                hdr = Ether(src=dmac, dst=smac) / IP(src=dst, dst=src)
                seg = TCP(sport=dport, dport=sport, flags=flags, seq=seq["s"], ack=seq["c"])
            seq[direction] += len(payload) + (1 if ("S" in flags or "F" in flags) else 0)
            return hdr / seg / payload if payload else hdr / seg

        return pkt

    return make("c"), make("s")


def _nbns_registration(name: str, ip: str) -> bytes:
    padded = name.upper().ljust(15)[:15].encode() + b"\x00"
    encoded = bytes(b for c in padded for b in (0x41 + (c >> 4), 0x41 + (c & 0xF)))
    question = b"\x20" + encoded + b"\x00\x00\x20\x00\x01"
    additional = b"\xc0\x0c\x00\x20\x00\x01" + struct.pack("!IHH", 300000, 6, 0) + bytes(map(int, ip.split(".")))
    return struct.pack("!HHHHHH", 0x1234, 0x2910, 1, 0, 0, 1) + question + additional


def build_scenario() -> Capture:
    cap = Capture()
    # ARP for the gateway, answered.
    cap.add(Ether(src=L1, dst=BCAST) / ARP(op=1, hwsrc=L1, psrc=L1_IP, pdst=GW_IP))
    cap.add(Ether(src=GW, dst=L1) / ARP(op=2, hwsrc=GW, psrc=GW_IP, hwdst=L1, pdst=L1_IP))
    # DHCP: the hostname changes between DISCOVER and REQUEST (the last one wins).
    _dhcp(cap, L1, L1_IP, 0x1001, ("esp32-setup", "sensor-1"), "udhcp 1.30.1", [1, 3, 6, 12, 15, 28, 42])
    _dhcp(cap, L2, L2_IP, 0x1002, ("Philips-hue", "Philips-hue"), "udhcp 1.19.4", [1, 3, 6, 12, 15, 28, 42, 121])
    _dhcp(cap, L3, L3_IP, 0x1003, ("raspberrypi", "raspberrypi"), "dhcpcd-9.4.1", [1, 28, 2, 3, 15, 6, 119, 12])
    l4 = bytes.fromhex(L4.replace(":", ""))
    cap.flow(
        Ether(src=L4, dst=BCAST)
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(op=1, xid=0x1004, chaddr=l4, flags=0x8000)
        / DHCP(
            options=[("message-type", "discover"), ("hostname", b"Galaxy-S21"), ("param_req_list", [1, 3, 6]), "end"]
        )
    )
    # DNS query and answer through the gateway's resolver.
    q = DNS(id=7, rd=1, qd=DNSQR(qname="api.example.com"))
    cap.flow(Ether(src=L1, dst=GW) / IP(src=L1_IP, dst=GW_IP) / UDP(sport=33333, dport=53) / q)
    a = DNS(id=7, qr=1, ra=1, qd=DNSQR(qname="api.example.com"), an=DNSRR(rrname="api.example.com", rdata=SERVER))
    cap.flow(Ether(src=GW, dst=L1) / IP(src=GW_IP, dst=L1_IP) / UDP(sport=53, dport=33333) / a)
    # CLOSED: TLS to the cloud with SNI, one data frame cut by the snaplen, FIN both ways.
    c, s = _tcp(L1, GW, L1_IP, SERVER, 40001, 443)
    hello = bytes(
        TLS(msg=[TLSClientHello(ext=[TLS_Ext_ServerName(servernames=[ServerName(servername=SNI.encode())])])])
    )
    for pkt in (c("S"), s("SA"), c("A"), c("PA", hello), s("PA", b"\x16\x03\x03" + bytes(300))):
        cap.flow(pkt)
    cap.flow(c("PA", b"\x17\x03\x03" + bytes(997)), snaplen=100)
    for pkt in (s("A"), c("FA"), s("FA"), c("A")):
        cap.flow(pkt)
    # A frame cut inside its IPv4 header: no 5-tuple, but it still counts for the MACs and the totals.
    cap.add(Ether(src=L1, dst=GW) / IP(src=L1_IP, dst=SERVER) / UDP(sport=40009, dport=123) / bytes(48), snaplen=24)
    # EST: leaf-to-leaf HTTP, never closed; L2 offers tcp/80.
    c, s = _tcp(L1, L2, L1_IP, L2_IP, 40002, 80)
    get = b"GET /description.xml HTTP/1.1\r\nHost: 192.168.1.20\r\n\r\n"
    for pkt in (c("S"), s("SA"), c("A"), c("PA", get), s("PA", b"HTTP/1.1 200 OK\r\n\r\n<root/>"), c("A")):
        cap.flow(pkt)
    # REJ: telnet refused by L2.
    c, s = _tcp(L1, L2, L1_IP, L2_IP, 40003, 23)
    cap.flow(c("S"))
    cap.flow(s("RA"))
    # S0: a SYN and its retransmission, never answered.
    c, s = _tcp(L3, GW, L3_IP, SERVER, 40004, 8883)
    cap.flow(c("S"))
    syn_again = c("S")
    syn_again[TCP].seq = 1000
    cap.flow(syn_again)
    # OTHER: MQTT already running when the capture starts.
    c, s = _tcp(L3, GW, L3_IP, SERVER, 40005, 1883)
    for pkt in (c("PA", b"\x30\x0a\x00\x03a/b" + b"hello"), s("A"), s("PA", b"\xd0\x00"), c("A")):
        cap.flow(pkt)
    # UDP request/response (CoAP), then one datagram in two IPv4 fragments.
    coap = Ether(src=L3, dst=GW) / IP(src=L3_IP, dst=SERVER) / UDP(sport=50000, dport=5683)
    cap.flow(coap / b"\x40\x01\x12\x34\xb4temp")
    cap.flow(Ether(src=GW, dst=L3) / IP(src=SERVER, dst=L3_IP) / UDP(sport=5683, dport=50000) / b"\x60\x45\x12\x34")
    big = IP(src=L3_IP, dst=SERVER, id=4242) / UDP(sport=50001, dport=5683) / (b"\x40\x02\x00\x01" + bytes(1396))
    for part in fragment(big, fragsize=800):
        cap.add(Ether(src=L3, dst=GW) / part, ("udp", L3_IP, 50001, SERVER, 5683))
    # ICMP echo to the gateway (no conversation).
    cap.add(Ether(src=L3, dst=GW) / IP(src=L3_IP, dst=GW_IP) / ICMP(type=8, id=1, seq=1) / bytes(32))
    cap.add(Ether(src=GW, dst=L3) / IP(src=GW_IP, dst=L3_IP) / ICMP(type=0, id=1, seq=1) / bytes(32))
    # 802.1Q and QinQ (802.1ad outer tag) syslog.
    cap.flow(
        Ether(src=L1, dst=GW) / Dot1Q(vlan=10) / IP(src=L1_IP, dst=GW_IP) / UDP(sport=514, dport=514) / b"<14>vlan"
    )
    qinq = Ether(src=L2, dst=GW, type=0x88A8) / Dot1AD(vlan=100) / Dot1Q(vlan=10)
    cap.flow(qinq / IP(src=L2_IP, dst=GW_IP) / UDP(sport=40010, dport=514) / b"<14>qinq")
    # IPv6 link-local with hop-by-hop and destination-options headers, and the plain reply.
    v6 = Ether(src=L1, dst=L2) / IPv6(src=L1_IP6, dst=L2_IP6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    cap.flow(v6 / UDP(sport=40020, dport=5683) / b"\x40\x01\x00\x02")
    cap.flow(Ether(src=L2, dst=L1) / IPv6(src=L2_IP6, dst=L1_IP6) / UDP(sport=5683, dport=40020) / b"\x60\x45\x00\x02")
    # Names: mDNS announcement, NetBIOS registration, SSDP NOTIFY.
    mdns = DNS(qr=1, aa=1, an=DNSRR(rrname="hue-bridge.local", type="A", rdata=L2_IP, ttl=120))
    cap.flow(
        Ether(src=L2, dst="01:00:5e:00:00:fb") / IP(src=L2_IP, dst="224.0.0.251") / UDP(sport=5353, dport=5353) / mdns
    )
    nb = _nbns_registration("PIPLC01", L3_IP)
    cap.flow(Ether(src=L3, dst=BCAST) / IP(src=L3_IP, dst="192.168.1.255") / UDP(sport=137, dport=137) / nb)
    notify = (
        "NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nCACHE-CONTROL: max-age=100\r\n"
        "LOCATION: http://192.168.1.20:80/description.xml\r\nNT: upnp:rootdevice\r\nNTS: ssdp:alive\r\n"
        f"SERVER: {SSDP_SERVER}\r\nUSN: uuid:2f402f80-da50-11e1-9b23-001788000002::upnp:rootdevice\r\n\r\n"
    ).encode()
    ssdp = Ether(src=L2, dst="01:00:5e:7f:ff:fa") / IP(src=L2_IP, dst="239.255.255.250")
    cap.flow(ssdp / UDP(sport=1900, dport=1900) / notify)
    return cap


# ------------------------------------------------------------------------------------------ expectations
def expected_macs(frames: list[Frame]) -> dict[str, tuple[int, int, int, int]]:
    out: Counter[str] = Counter()
    out_b: Counter[str] = Counter()
    in_: Counter[str] = Counter()
    in_b: Counter[str] = Counter()
    for f in frames:
        if f.src:
            out[f.src] += 1
            out_b[f.src] += f.wirelen
        if f.dst:
            in_[f.dst] += 1
            in_b[f.dst] += f.wirelen
    return {m: (out[m], out_b[m], in_[m], in_b[m]) for m in out if not int(m[:2], 16) & 1}


def expected_conversations(frames: list[Frame]) -> dict[tuple[str, ...], dict[str, Any]]:
    """Undirected 5-tuple -> initiator side, per-direction counters, first/last seen."""
    convs: dict[tuple[str, ...], dict[str, Any]] = {}
    for f in frames:
        if f.key is None:
            continue
        proto, src, sport, dst, dport = f.key
        ident = (proto, *sorted([f"{src}|{sport}", f"{dst}|{dport}"]))
        conv = convs.get(ident)
        if conv is None:
            conv = convs[ident] = {
                "a": (src, sport),
                "b": (dst, dport),
                "ab": [0, 0],
                "ba": [0, 0],
                "first": f.ts,
                "last": f.ts,
                "flags": [],
            }
        side = conv["ab"] if (src, sport) == conv["a"] else conv["ba"]
        side[0] += 1
        side[1] += f.wirelen
        conv["last"] = f.ts
        conv["flags"].append(f.tcp_flags)
    return convs


def ours_conversations(report: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for c in report["conversations"]:
        a, b = f"{c['a_addr']}|{c['a_port']}", f"{c['b_addr']}|{c['b_port']}"
        ident = (c["protocol"], *sorted([a, b]))
        assert ident not in out, f"5-tuple reported twice: {ident}"
        out[ident] = c
    return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[Capture, dict[str, Any], dict[str, Any]]:
    cap = build_scenario()
    tmp = tmp_path_factory.mktemp("generated")
    pcap = analyze(write_pcap(tmp / "scenario.pcap", cap.frames, LINKTYPE_ETHERNET))
    pcapng = analyze(write_pcapng(tmp / "scenario.pcapng", cap.frames, LINKTYPE_ETHERNET))
    return cap, pcap, pcapng


def test_capture_stats(scenario: tuple[Capture, dict[str, Any], dict[str, Any]]) -> None:
    cap, report, _ = scenario
    stats = report["capture"]
    assert stats["packets"] == len(cap.frames)
    assert stats["bytes"] == sum(f.wirelen for f in cap.frames)
    assert stats["first_ts"] == pytest.approx(cap.frames[0].ts, abs=1e-6)
    assert stats["last_ts"] == pytest.approx(cap.frames[-1].ts, abs=1e-6)
    assert stats["truncated"] == 1
    assert stats["decode_errors"] == 0
    assert len(stats["link_types"]) == 1


def test_pcapng_reports_the_same(scenario: tuple[Capture, dict[str, Any], dict[str, Any]]) -> None:
    _, pcap, pcapng = scenario
    for report in (pcap, pcapng):
        report["capture"].pop("files", None)
    assert pcapng == pcap


def test_leaf_counters(scenario: tuple[Capture, dict[str, Any], dict[str, Any]]) -> None:
    cap, report, _ = scenario
    leaves = {leaf["mac"]: leaf for leaf in report["leaves"]}
    expected = expected_macs(cap.frames)
    assert set(leaves) == {GW, L1, L2, L3, L4} == set(expected)
    got = {m: (v["packets_out"], v["bytes_out"], v["packets_in"], v["bytes_in"]) for m, v in leaves.items()}
    assert got == expected
    assert leaves[L1]["first_seen"] == pytest.approx(cap.frames[0].ts, abs=1e-6)
    assert leaves[L4]["randomized_mac"] is True
    assert not any(leaves[m]["randomized_mac"] for m in (GW, L1, L2, L3))


def test_leaf_inventory(scenario: tuple[Capture, dict[str, Any], dict[str, Any]]) -> None:
    _, report, _ = scenario
    leaves = {leaf["mac"]: leaf for leaf in report["leaves"]}
    assert {L1_IP, L1_IP6} <= set(leaves[L1]["ips"])
    assert {L2_IP, L2_IP6} <= set(leaves[L2]["ips"])
    assert L3_IP in leaves[L3]["ips"]
    assert "Espressif" in (leaves[L1]["vendor"] or "")
    assert "Philips" in (leaves[L2]["vendor"] or "")
    assert "Raspberry" in (leaves[L3]["vendor"] or "")
    assert leaves[L1]["dhcp"] == {
        "hostname": "sensor-1",
        "vendor_class": "udhcp 1.30.1",
        "param_request_list": [1, 3, 6, 12, 15, 28, 42],
    }
    assert leaves[L2]["dhcp"]["vendor_class"] == "udhcp 1.19.4"
    assert leaves[L3]["dhcp"]["param_request_list"] == [1, 28, 2, 3, 15, 6, 119, 12]
    assert leaves[L4]["dhcp"]["hostname"] == "Galaxy-S21"
    assert {"esp32-setup", "sensor-1"} <= set(leaves[L1]["hostnames"])
    assert "Philips-hue" in leaves[L2]["hostnames"]
    assert {"hue-bridge.local", "hue-bridge"} & set(leaves[L2]["hostnames"]), leaves[L2]["hostnames"]
    assert "PIPLC01" in leaves[L3]["hostnames"]
    ssdp_seen = [v for k, v in leaves[L2].items() if isinstance(v, dict | list) and SSDP_SERVER in json.dumps(v)]
    assert ssdp_seen, f"the SSDP SERVER header of L2 is nowhere in its leaf record: {leaves[L2]}"
    assert leaves[L1]["dns_queries"] == ["api.example.com"]
    assert leaves[L2]["dns_queries"] == [] and leaves[L3]["dns_queries"] == []
    assert leaves[L1]["tls_sni"] == [SNI]
    tcp_services = {m: [s["port"] for s in v["services"] if s["protocol"] == "tcp"] for m, v in leaves.items()}
    assert tcp_services == {GW: [], L1: [], L2: [80], L3: [], L4: []}


def test_conversations(scenario: tuple[Capture, dict[str, Any], dict[str, Any]]) -> None:
    cap, report, _ = scenario
    expected = expected_conversations(cap.frames)
    ours = ours_conversations(report)
    assert set(ours) == set(expected)
    for ident, exp in expected.items():
        got = ours[ident]
        assert (got["a_addr"], got["a_port"]) == exp["a"], f"{ident}: initiator"
        counters = [got["packets_ab"], got["bytes_ab"], got["packets_ba"], got["bytes_ba"]]
        assert counters == exp["ab"] + exp["ba"], f"{ident}: counters"
        assert got["first_seen"] == pytest.approx(exp["first"], abs=1e-6), ident
        assert got["last_seen"] == pytest.approx(exp["last"], abs=1e-6), ident


@pytest.mark.parametrize(
    ("a", "b", "state"),
    [
        ((L1_IP, 40001), (SERVER, 443), "CLOSED"),
        ((L1_IP, 40002), (L2_IP, 80), "EST"),
        ((L1_IP, 40003), (L2_IP, 23), "REJ"),
        ((L3_IP, 40004), (SERVER, 8883), "S0"),
        ((L3_IP, 40005), (SERVER, 1883), "OTHER"),
    ],
)
def test_tcp_states(
    scenario: tuple[Capture, dict[str, Any], dict[str, Any]], a: tuple[str, int], b: tuple[str, int], state: str
) -> None:
    _, report, _ = scenario
    ident = ("tcp", *sorted([f"{a[0]}|{a[1]}", f"{b[0]}|{b[1]}"]))
    assert ours_conversations(report)[ident]["state"] == state


# ------------------------------------------------------------------------------------------ link types
def _small_exchange() -> list[tuple[bool, Packet, Key]]:
    """(outgoing?, IP packet, directed key): a closed TCP session and a UDP request/response."""
    me, peer = "10.1.1.10", "10.2.2.2"
    out: list[tuple[bool, Packet, Key]] = []
    seq = {True: 100, False: 900}
    for outgoing, flags, payload in (
        (True, "S", b""),
        (False, "SA", b""),
        (True, "A", b""),
        (True, "PA", b"DESCRIBE rtsp://10.2.2.2:8554/cam RTSP/1.0\r\nCSeq: 2\r\n\r\n"),
        (False, "PA", b"RTSP/1.0 200 OK\r\nCSeq: 2\r\n\r\n"),
        (True, "FA", b""),
        (False, "FA", b""),
        (True, "A", b""),
    ):
        src, dst, sport, dport = (me, peer, 40100, 8554) if outgoing else (peer, me, 8554, 40100)
        seg = TCP(sport=sport, dport=dport, flags=flags, seq=seq[outgoing], ack=seq[not outgoing])
        seq[outgoing] += len(payload) + (1 if ("S" in flags or "F" in flags) else 0)
        pkt = IP(src=src, dst=dst) / seg / payload if payload else IP(src=src, dst=dst) / seg
        out.append((outgoing, pkt, ("tcp", src, sport, dst, dport)))
    out.append(
        (True, IP(src=me, dst=peer) / UDP(sport=5000, dport=5683) / b"\x40\x01\x00\x09", ("udp", me, 5000, peer, 5683))
    )
    out.append(
        (False, IP(src=peer, dst=me) / UDP(sport=5683, dport=5000) / b"\x60\x45\x00\x09", ("udp", peer, 5683, me, 5000))
    )
    return out


ME_MAC, PEER_MAC = "00:0c:29:f3:1e:72", "00:0c:29:3b:2f:b0"


def _sll(outgoing: bool, ip: bytes) -> bytes:
    addr = bytes.fromhex((ME_MAC if outgoing else PEER_MAC).replace(":", "")) + b"\0\0"
    return struct.pack("!HHH8sH", 4 if outgoing else 0, 1, 6, addr, 0x0800) + ip


def _sll2(outgoing: bool, ip: bytes) -> bytes:
    addr = bytes.fromhex((ME_MAC if outgoing else PEER_MAC).replace(":", "")) + b"\0\0"
    return struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 4 if outgoing else 0, 6, addr) + ip


@pytest.mark.parametrize(
    ("linktype", "wrap", "fmt"),
    [
        (LINKTYPE_LINUX_SLL, _sll, "pcap"),
        (LINKTYPE_LINUX_SLL2, _sll2, "pcapng"),
        (LINKTYPE_RAW, lambda _outgoing, ip: ip, "pcap"),
        (LINKTYPE_RAW, lambda _outgoing, ip: ip, "pcapng"),
    ],
    ids=["sll-pcap", "sll2-pcapng", "raw-pcap", "raw-pcapng"],
)
def test_link_types(tmp_path: Path, linktype: int, wrap: Any, fmt: str) -> None:
    frames = []
    for i, (outgoing, pkt, key) in enumerate(_small_exchange()):
        data = wrap(outgoing, bytes(pkt))
        src = (ME_MAC if outgoing else PEER_MAC) if linktype != LINKTYPE_RAW else None
        frames.append(Frame(T0 + i * 0.5, data, len(data), src, None, key, int(pkt[TCP].flags) if TCP in pkt else 0))
    writer = write_pcap if fmt == "pcap" else write_pcapng
    report = analyze(writer(tmp_path / f"link{linktype}.{fmt}", frames, linktype))
    assert report["capture"]["packets"] == len(frames)
    assert report["capture"]["bytes"] == sum(f.wirelen for f in frames)
    assert report["capture"]["decode_errors"] == 0
    assert len(report["capture"]["link_types"]) == 1
    ours = ours_conversations(report)
    expected = expected_conversations(frames)
    assert set(ours) == set(expected)
    for ident, exp in expected.items():
        got = ours[ident]
        assert (got["a_addr"], got["a_port"]) == exp["a"]
        assert [got["packets_ab"], got["bytes_ab"], got["packets_ba"], got["bytes_ba"]] == exp["ab"] + exp["ba"]
    assert ours[("tcp", "10.1.1.10|40100", "10.2.2.2|8554")]["state"] == "CLOSED"
    leaves = {leaf["mac"]: leaf for leaf in report["leaves"]}
    if linktype == LINKTYPE_RAW:
        assert leaves == {}, "raw IP frames carry no MAC address, so there is no leaf (leaf = unicast source MAC)"
        return
    # SLL/SLL2 carry the sender's MAC only: out counters are known, in counters are not checked.
    expected_out = {m: (v[0], v[1]) for m, v in expected_macs(frames).items()}
    assert {m: (v["packets_out"], v["bytes_out"]) for m, v in leaves.items()} == expected_out
    assert [s["port"] for s in leaves[PEER_MAC]["services"] if s["protocol"] == "tcp"] == [8554]


# ------------------------------------------------------------------------------------------ fragments
@pytest.mark.parametrize("order", ["in-order", "reversed"])
def test_fragmented_datagrams(tmp_path: Path, order: str) -> None:
    """Every fragment of a UDP datagram counts in its 5-tuple, IPv4 and IPv6, whatever their order.

    Some stacks send the last fragment first; a passive monitor that drops a non-first fragment seen before
    the first one under-counts those flows.
    """
    cap = Capture()
    v4 = IP(src=L3_IP, dst=SERVER, id=777) / UDP(sport=50100, dport=5683) / bytes(2000)
    parts4 = fragment(v4, fragsize=800)
    v6 = IPv6(src=L1_IP6, dst=L2_IP6) / IPv6ExtHdrFragment(id=4711) / UDP(sport=50200, dport=5683) / bytes(2000)
    parts6 = fragment6(v6, 1000)
    if order == "reversed":
        parts4, parts6 = parts4[::-1], parts6[::-1]
    for part in parts4:
        cap.add(Ether(src=L3, dst=GW) / part, ("udp", L3_IP, 50100, SERVER, 5683))
    for part in parts6:
        cap.add(Ether(src=L1, dst=L2) / part, ("udp", L1_IP6, 50200, L2_IP6, 5683))
    assert len(parts4) == 3 and len(parts6) == 3
    report = analyze(write_pcap(tmp_path / f"frag-{order}.pcap", cap.frames, LINKTYPE_ETHERNET))
    ours = ours_conversations(report)
    expected = expected_conversations(cap.frames)
    assert set(ours) == set(expected)
    got = {i: [c["packets_ab"], c["bytes_ab"], c["packets_ba"], c["bytes_ba"]] for i, c in ours.items()}
    assert got == {i: exp["ab"] + exp["ba"] for i, exp in expected.items()}
