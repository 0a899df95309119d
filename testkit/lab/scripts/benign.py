"""A leaf doing its normal work until killed, run inside its namespace by the lab (testkit/lab/topology.py).

Roles (argv[1]):
* ``sensor IP``: DHCP-configured sensor: every second an MQTT publish on one persistent connection, every 2 s a
  DNS query to the gateway and an NTP query to the cloud, every 3 s an HTTP poll (a new connection each time),
  every 5 s an mDNS announcement and an SSDP NOTIFY, every 10 s a DHCP lease renewal (a unicast REQUEST to the
  server, as in RFC 2131's RENEWING state, answered with an ACK; a real client renews at half the lease time, here
  compressed so that every lab case of 10 s or more holds one).
* ``camera IP VIEWER``: an RTP-like stream of 25 datagrams per second to the viewer.
* ``plc IP``: a Modbus/TCP server answering read-holding-registers.
* ``hmi IP PLC``: polls the PLC every 0.5 s over one connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time

CLOUD = "198.18.0.2"
GATEWAY = "10.88.0.1"


def _dns_query(name: str) -> bytes:
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return q + struct.pack("!HH", 1, 1)


def _mdns_announce(ip: str) -> bytes:
    name = b"\x0bsensor-lab1\x05local\x00"
    head = struct.pack("!HHHHHH", 0, 0x8400, 0, 1, 0, 0)
    return head + name + struct.pack("!HHIH", 1, 0x8001, 120, 4) + socket.inet_aton(ip)


def _dhcp_renew(ip: str, mac: bytes, xid: int) -> bytes:
    """A DHCPREQUEST renewing ``ip``: the client's address in ciaddr, no server identifier (RFC 2131 4.3.2)."""
    bootp = struct.pack("!BBBBIHH4s4s4s4s", 1, 1, 6, 0, xid, 0, 0, socket.inet_aton(ip), bytes(4), bytes(4), bytes(4))
    bootp += mac.ljust(16, b"\0") + bytes(64 + 128) + bytes([0x63, 0x82, 0x53, 0x63])
    options = bytes([53, 1, 3]) + bytes([12, 11]) + b"sensor-lab1" + bytes([55, 4, 1, 3, 6, 15, 255])
    return bootp + options


def sensor(ip: str) -> None:
    mqtt = socket.create_connection((CLOUD, 1883), timeout=5, source_address=(ip, 0))
    # MQTT 3.1.1 CONNECT, clean session, no credentials (anonymous), keep-alive 60 s.
    payload = struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x02]) + struct.pack("!H", 60)
    payload += struct.pack("!H", 9) + b"sensor-01"
    mqtt.sendall(bytes([0x10, len(payload)]) + payload)
    mqtt.recv(4)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((ip, 0))
    udp.settimeout(0.5)
    multi = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    multi.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(ip))
    multi.bind((ip, 5353))
    dhcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dhcp.bind((ip, 68))
    dhcp.settimeout(0.5)
    with open("/sys/class/net/eth0/address") as f:
        mac = bytes.fromhex(f.read().strip().replace(":", ""))
    tick = 0
    while True:
        topic = b"plant/line1/temp"
        body = struct.pack("!H", len(topic)) + topic + f"{20 + tick % 5}.5".encode()
        mqtt.sendall(bytes([0x30, len(body)]) + body)
        if tick % 2 == 0:
            udp.sendto(_dns_query("broker.plant.test"), (GATEWAY, 53))
            udp.sendto(b"\x23" + b"\0" * 47, (CLOUD, 123))  # NTP v4 client request
            for _ in range(2):
                with contextlib.suppress(TimeoutError):
                    udp.recvfrom(2048)
        if tick % 3 == 0:
            with socket.create_connection((CLOUD, 8080), timeout=3, source_address=(ip, 0)) as http:
                http.sendall(b"GET /api/v1/config HTTP/1.1\r\nHost: cloud\r\nConnection: close\r\n\r\n")
                while http.recv(4096):
                    pass
        if tick % 10 == 0:
            dhcp.sendto(_dhcp_renew(ip, mac, 0x4C470100 + tick), (GATEWAY, 67))
            with contextlib.suppress(TimeoutError):
                dhcp.recvfrom(2048)
        if tick % 5 == 0:
            multi.sendto(_mdns_announce(ip), ("224.0.0.251", 5353))
            notify = (
                "NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nNT: upnp:rootdevice\r\nNTS: ssdp:alive\r\n"
                f"LOCATION: http://{ip}:49152/desc.xml\r\nSERVER: Linux/5.10 UPnP/1.0 sensor/1.2\r\n"
                "USN: uuid:lab-sensor-1::upnp:rootdevice\r\n\r\n"
            )
            multi.sendto(notify.encode(), ("239.255.255.250", 1900))
        tick += 1
        time.sleep(1.0)


def camera(ip: str, viewer: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 5004))
    seq = 0
    while True:
        s.sendto(struct.pack("!BBHII", 0x80, 96, seq & 0xFFFF, seq * 3600, 0x1234) + b"\0" * 1000, (viewer, 5004))
        seq += 1
        time.sleep(0.04)


def plc(ip: str) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, 502))
    srv.listen()

    def serve(c: socket.socket) -> None:
        with c:
            while (req := c.recv(260)) and len(req) >= 12:
                tid, _, _, unit, fn, _, count = struct.unpack("!HHHBBHH", req[:12])
                data = struct.pack(f"!{count}H", *range(count))
                c.sendall(struct.pack("!HHHBBB", tid, 0, 3 + len(data), unit, fn, len(data)) + data)

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def hmi(ip: str, plc_ip: str) -> None:
    while True:
        try:
            c = socket.create_connection((plc_ip, 502), timeout=3, source_address=(ip, 0))
            break
        except OSError:
            time.sleep(0.2)
    tid = 0
    while True:
        tid = (tid + 1) & 0xFFFF
        c.sendall(struct.pack("!HHHBBHH", tid, 0, 6, 1, 3, 0, 10))
        c.recv(260)
        time.sleep(0.5)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {"sensor": sensor, "camera": camera, "plc": plc, "hmi": hmi}[role](*args)
