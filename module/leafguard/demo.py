"""The embedded default capture: a small plant network (camera, PLC, sensor, workstation, gateway), built with scapy.

It exercises what `analyze` reports (DHCP fingerprints, DNS, mDNS, TLS SNI, services, a refused connection,
a cleartext MQTT login) so that `leafguard analyze --demo` shows real output on a machine with no captures.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

T0 = 1_764_000_000.0
GATEWAY = ("02:00:5e:10:00:01", "192.168.50.1")
CAMERA = ("00:17:88:24:76:ff", "192.168.50.11")
PLC = ("00:0e:8c:aa:bb:01", "192.168.50.12")
SENSOR = ("5c:cf:7f:07:ae:fb", "192.168.50.13")
CLOUD = "52.49.107.41"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "leafguard"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / "leafguard"
        path.mkdir(parents=True, exist_ok=True)
    return path


def demo_capture() -> Path:
    path = _cache_dir() / "demo-v2.pcap"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        build_demo(tmp)
        tmp.replace(path)
    return path


def build_demo(path: Path) -> None:
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap

    frames: list[Any] = []
    t = T0

    def add(pkt: Any, dt: float = 0.01) -> None:
        nonlocal t
        t += dt
        pkt.time = t
        frames.append(pkt)

    gw_mac, gw_ip = GATEWAY
    for mac, ip, name, vclass in (
        (CAMERA[0], CAMERA[1], "hue-bridge", "udhcp 1.31.1"),
        (SENSOR[0], SENSOR[1], "ESP_07AEFB", None),
    ):
        opts: list[Any] = [("message-type", "request"), ("hostname", name), ("param_req_list", [1, 3, 6, 15])]
        if vclass:
            opts.append(("vendor_class_id", vclass))
        opts.append("end")
        chaddr = bytes.fromhex(mac.replace(":", ""))
        add(
            Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
            / IP(src="0.0.0.0", dst="255.255.255.255")
            / UDP(sport=68, dport=67)
            / BOOTP(chaddr=chaddr, xid=0x1234)
            / DHCP(options=opts)
        )
        add(
            Ether(src=gw_mac, dst=mac)
            / IP(src=gw_ip, dst=ip)
            / UDP(sport=67, dport=68)
            / BOOTP(op=2, chaddr=chaddr, yiaddr=ip, xid=0x1234)
            / DHCP(options=[("message-type", "ack"), "end"])
        )
    add(Ether(src=PLC[0], dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=PLC[0], psrc=PLC[1], pdst=gw_ip))
    add(Ether(src=gw_mac, dst=PLC[0]) / ARP(op=2, hwsrc=gw_mac, psrc=gw_ip, hwdst=PLC[0], pdst=PLC[1]))
    # mDNS announcement by the camera
    add(
        Ether(src=CAMERA[0], dst="01:00:5e:00:00:fb")
        / IP(src=CAMERA[1], dst="224.0.0.251")
        / UDP(sport=5353, dport=5353)
        / DNS(qr=1, aa=1, an=DNSRR(rrname="Philips-hue.local", type="A", rdata=CAMERA[1]))
    )
    # The sensor resolves its cloud endpoint, then opens TLS with SNI.
    add(
        Ether(src=SENSOR[0], dst=gw_mac)
        / IP(src=SENSOR[1], dst=gw_ip)
        / UDP(sport=40000, dport=53)
        / DNS(rd=1, qd=DNSQR(qname="telemetry.example-cloud.net"))
    )
    add(
        Ether(src=gw_mac, dst=SENSOR[0])
        / IP(src=gw_ip, dst=SENSOR[1])
        / UDP(sport=53, dport=40000)
        / DNS(
            qr=1,
            qd=DNSQR(qname="telemetry.example-cloud.net"),
            an=DNSRR(rrname="telemetry.example-cloud.net", rdata=CLOUD),
        )
    )
    hello = _client_hello("telemetry.example-cloud.net")
    _tcp_session(add, SENSOR, (gw_mac, CLOUD), 41000, 8883, [hello], [b"\x16\x03\x03\x00\x04\x0e\x00\x00\x00"])
    # An operator workstation polls the PLC's Modbus service and the camera's web UI.
    op = ("3c:52:82:11:22:33", "192.168.50.20")
    modbus_req = bytes.fromhex("000100000006010300000002")
    modbus_resp = bytes.fromhex("00010000000701030400010002")
    for k in range(3):
        _tcp_session(add, op, PLC, 50000 + k, 502, [modbus_req], [modbus_resp])
    basic = b"GET / HTTP/1.1\r\nHost: cam\r\nAuthorization: Basic YWRtaW46YWRtaW4=\r\n\r\n"
    _tcp_session(add, op, CAMERA, 50100, 80, [basic], [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    # A refused connection: the camera has no telnet.
    add(Ether(src=op[0], dst=CAMERA[0]) / IP(src=op[1], dst=CAMERA[1]) / TCP(sport=50200, dport=23, flags="S"))
    add(Ether(src=CAMERA[0], dst=op[0]) / IP(src=CAMERA[1], dst=op[1]) / TCP(sport=23, dport=50200, flags="RA"))
    # Cleartext MQTT login from the sensor to the gateway's broker.
    # MQTT 3.1.1 CONNECT: client id "sensor-7", user "sensor", password "plant" (flags 0xC2).
    body = b"\x00\x04MQTT\x04\xc2\x00\x3c" + b"\x00\x08sensor-7" + b"\x00\x06sensor" + b"\x00\x05plant"
    connect = bytes([0x10, len(body)]) + body
    _tcp_session(add, SENSOR, GATEWAY, 42000, 1883, [connect], [bytes.fromhex("20020000")])
    # UDP telemetry with replies (CoAP).
    for k in range(4):
        add(
            Ether(src=SENSOR[0], dst=gw_mac)
            / IP(src=SENSOR[1], dst=gw_ip)
            / UDP(sport=5683, dport=5683)
            / Raw(b"\x40\x01\x00" + bytes([k]))
        )
        add(
            Ether(src=gw_mac, dst=SENSOR[0])
            / IP(src=gw_ip, dst=SENSOR[1])
            / UDP(sport=5683, dport=5683)
            / Raw(b"\x60\x45\x00" + bytes([k]))
        )
    wrpcap(str(path), frames)


def _tcp_session(
    add: Any,
    client: tuple[str, str],
    server: tuple[str, str],
    sport: int,
    dport: int,
    sends: list[bytes],
    replies: list[bytes],
) -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    cm, ci = client
    sm, si = server

    def c2s(flags: str, seq: int, ack: int, data: bytes = b"") -> Any:
        return (
            Ether(src=cm, dst=sm)
            / IP(src=ci, dst=si)
            / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
            / data
        )

    def s2c(flags: str, seq: int, ack: int, data: bytes = b"") -> Any:
        return (
            Ether(src=sm, dst=cm)
            / IP(src=si, dst=ci)
            / TCP(sport=dport, dport=sport, flags=flags, seq=seq, ack=ack)
            / data
        )

    cs, ss = 1000, 5000
    add(c2s("S", cs, 0))
    add(s2c("SA", ss, cs + 1))
    add(c2s("A", cs + 1, ss + 1))
    cs += 1
    ss += 1
    for req, resp in zip(sends, replies, strict=True):
        add(c2s("PA", cs, ss, req))
        cs += len(req)
        add(s2c("PA", ss, cs, resp))
        ss += len(resp)
        add(c2s("A", cs, ss))
    add(c2s("FA", cs, ss))
    add(s2c("FA", ss, cs + 1))
    add(c2s("A", cs + 1, ss + 1))


def _client_hello(sni: str) -> bytes:
    name = sni.encode()
    sni_ext = (
        (0).to_bytes(2, "big")
        + (len(name) + 5).to_bytes(2, "big")
        + (len(name) + 3).to_bytes(2, "big")
        + b"\x00"
        + len(name).to_bytes(2, "big")
        + name
    )
    versions = bytes.fromhex("002b0005") + bytes.fromhex("0403040303")
    exts = sni_ext + versions
    body = (
        bytes.fromhex("0303")
        + bytes(32)
        + b"\x00"
        + bytes.fromhex("0004130113020100")
        + len(exts).to_bytes(2, "big")
        + exts
    )
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs
