"""Generate a large, deterministic, IoT-like pcap for the throughput benchmark (and for tests that need many
leaves or frames).

    python3 -m testkit.gen_capture [--frames 1000000] [--leaves 240] [--seed 7] [--out FILE] [--force]

The default output is cached under benchmarks/.cache/ (git-ignored) and reused when it already exists.

Frames are built as raw bytes with `struct` from per-protocol templates: headers are packed, checksums
(IPv4 header, TCP/UDP/ICMP) are computed as one's-complement sums over native-order 16-bit words (byte
order independent, RFC 1071 §2(B)), and the sums of the few payload bodies that repeat are cached. Scapy
would need minutes for a million frames; this takes well under a minute.

Traffic mix (all seeded): ≥ 200 leaves on 10.20.0.0/16 with real vendor OUIs behind one gateway
(10.20.0.1, also the DNS resolver and DHCP server). Every leaf boots with ARP + DHCP DISCOVER/OFFER/
REQUEST/ACK (options 53, 50, 61, 12, 60, 55) and then, interleaved across ~64 concurrent sessions:
DNS A queries and answers, TCP sessions with handshake, payload and FIN teardown (MQTT 1883, MQTT over
TLS 8883 and HTTPS 443 opening with a TLS ClientHello that carries SNI, plain HTTP 80), UDP telemetry
(CoAP 5683 confirmable POST + ACK, syslog 514), ICMP echo, ARP refreshes, and a few refused
connections (SYN answered by RST). Frames shorter than 60 bytes are padded like an Ethernet NIC does.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

GENERATOR_VERSION = 3
CACHE = Path(__file__).resolve().parent.parent / "benchmarks" / ".cache"
START_TS = 1_767_225_600.0  # 2026-01-01T00:00:00Z

# Device profiles: a real OUI of an IoT vendor, the DHCP hostname stem, vendor class (option 60) and
# parameter request list (option 55) such devices send.
UDHCP_PRL = (1, 3, 6, 12, 15, 28, 42)
ESP_PRL = (1, 3, 28, 6)
ANDROID_PRL = (1, 3, 6, 15, 26, 28, 51, 58, 59, 43)
LINUX_PRL = (1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42)
PROFILES = (
    ("24:0a:c4", "ESP32", "espressif-idf", ESP_PRL),  # Espressif
    ("5c:cf:7f", "ESP", "ESP8266", ESP_PRL),  # Espressif
    ("00:17:88", "Philips-hue", "udhcp 1.19.4", UDHCP_PRL),  # Philips Lighting
    ("50:c7:bf", "HS110", "udhcp 0.9.9-pre", UDHCP_PRL),  # TP-Link
    ("b8:27:eb", "raspberrypi", "dhcpcd-9.4.1", LINUX_PRL),  # Raspberry Pi
    ("d8:f1:5b", "Tuya", "udhcp 1.30.1", UDHCP_PRL),  # Espressif (Tuya module)
    ("48:a6:b8", "Sonos", "udhcp 1.24.2", UDHCP_PRL),  # Sonos
    ("f0:27:2d", "amazon", "android-dhcp-9", ANDROID_PRL),  # Amazon
    ("fc:ec:da", "UniFi", "udhcp 1.25.1", UDHCP_PRL),  # Ubiquiti
    ("44:19:b6", "IPCam", "udhcp 1.20.2", UDHCP_PRL),  # Hikvision
    ("18:b4:30", "Nest", "dhcpcd-6.8.2", LINUX_PRL),  # Nest Labs
    ("c4:5b:be", "shelly1", "ESP8266", ESP_PRL),  # Espressif (Shelly)
    ("64:90:c1", "yeelink", "udhcp 1.28.3", UDHCP_PRL),  # Xiaomi
)
GATEWAY_MAC = bytes.fromhex("e4f4c6112233")  # Netgear OUI
GATEWAY_IP = bytes([10, 20, 0, 1])
BROADCAST = b"\xff" * 6

CLOUD = {  # name -> (address, service ports it answers on)
    "a3k7odshaiipe8-ats.iot.eu-west-1.amazonaws.com": ("52.212.40.17", (8883, 443)),
    "m2.tuyaeu.com": ("18.185.20.103", (1883, 8883)),
    "mqtt.meross.com": ("3.121.63.219", (443, 8883)),
    "diagnostics.meethue.com": ("34.250.201.5", (443, 80)),
    "devs.tplinkcloud.com": ("54.93.162.12", (443, 80)),
    "firmware.shelly.cloud": ("95.216.210.31", (80, 443)),
    "api.sonos.com": ("13.32.110.48", (443,)),
    "time.nist.gov": ("132.163.97.6", (80,)),
    "telemetry.example-iot.net": ("104.18.30.77", (1883, 443)),
    "ota.espressif.com": ("47.254.38.8", (80, 443)),
}


# ---------------------------------------------------------------------------------------- checksums
_SUMS: dict[bytes, int] = {}


def _native_sum(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    return sum(array("H", data))


def _payload_sum(data: bytes) -> int:
    cached = _SUMS.get(data)
    if cached is None:
        cached = _native_sum(data)
        if len(_SUMS) < 4096:
            _SUMS[data] = cached
    return cached


def _fold(total: int) -> bytes:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return struct.pack("=H", ~total & 0xFFFF)


def _odd_safe(header: bytes, payload: bytes) -> int:
    """Sum of header+payload; the cached payload sum is only valid when the header has even length."""
    return _native_sum(header) + _payload_sum(payload)


# ---------------------------------------------------------------------------------------- frames
def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int, ttl: int = 64) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident & 0xFFFF, 0x4000, ttl, proto, 0, src, dst)
    return hdr[:10] + _fold(_native_sum(hdr)) + hdr[12:] + payload


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"") -> bytes:
    if flags & 0x02:  # SYN and SYN/ACK carry an MSS option (24-byte header)
        hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 6 << 4, flags, 64240, 0, 0) + b"\x02\x04\x05\xb4"
    else:
        hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 64240, 0, 0)
    total = _native_sum(_pseudo(src, dst, 6, len(hdr) + len(payload))) + _odd_safe(hdr, payload)
    return hdr[:16] + _fold(total) + hdr[18:] + payload


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    hdr = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    total = _native_sum(_pseudo(src, dst, 17, 8 + len(payload))) + _odd_safe(hdr, payload)
    c = _fold(total)
    return hdr[:6] + (c if c != b"\0\0" else b"\xff\xff") + payload


def icmp_echo(kind: int, ident: int, seq: int, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    return hdr[:2] + _fold(_odd_safe(hdr, payload)) + hdr[4:] + payload


def ether(dst: bytes, src: bytes, ethertype: int, body: bytes) -> bytes:
    frame = dst + src + struct.pack("!H", ethertype) + body
    return frame if len(frame) >= 60 else frame + b"\0" * (60 - len(frame))


def arp(op: int, smac: bytes, sip: bytes, tmac: bytes, tip: bytes) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, smac, sip, tmac, tip)


def dns_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def dns_query(txid: int, name: str) -> bytes:
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + dns_name(name) + b"\x00\x01\x00\x01"


def dns_answer(txid: int, name: str, addr: bytes) -> bytes:
    question = dns_name(name) + b"\x00\x01\x00\x01"
    answer = b"\xc0\x0c\x00\x01\x00\x01" + struct.pack("!IH", 300, 4) + addr
    return struct.pack("!HHHHHH", txid, 0x8180, 1, 1, 0, 0) + question + answer


def dhcp(op: int, xid: int, chaddr: bytes, yiaddr: bytes, options: list[tuple[int, bytes]]) -> bytes:
    fixed = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        op,
        1,
        6,
        0,
        xid,
        0,
        0x8000,
        bytes(4),
        yiaddr,
        bytes(4),
        bytes(4),
        chaddr,
        b"",
        b"",
    )
    opts = b"".join(bytes([code, len(value)]) + value for code, value in options)
    return fixed + b"\x63\x82\x53\x63" + opts + b"\xff"


def tls_client_hello(sni: str, seed: int) -> bytes:
    rnd = random.Random(seed)
    name = sni.encode()
    server_name = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
    exts = struct.pack("!HH", 0, len(server_name)) + server_name
    exts += bytes.fromhex("000a000800060017001d0018")  # supported_groups
    exts += bytes.fromhex("000d0012001004030804040105030805050108060601")  # signature_algorithms
    exts += bytes.fromhex("002b0003020304")  # supported_versions: TLS 1.3
    exts += bytes.fromhex("003300260024001d0020") + rnd.randbytes(32)  # key_share x25519
    suites = bytes.fromhex("130113021303c02bc02fc02cc030cca9cca8c013c014009c009d002f0035")
    body = b"\x03\x03" + rnd.randbytes(32) + b"\x20" + rnd.randbytes(32)
    body += struct.pack("!H", len(suites)) + suites + b"\x01\x00" + struct.pack("!H", len(exts)) + exts
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def mqtt_connect(client_id: str) -> bytes:
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid
    return b"\x10" + bytes([len(var)]) + var


def mqtt_publish(topic: str, payload: bytes) -> bytes:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + payload
    return b"\x30" + bytes([len(body)]) + body


# ---------------------------------------------------------------------------------------- model
@dataclass
class Leaf:
    index: int
    mac: bytes
    ip: bytes
    hostname: str
    vendor_class: str
    prl: tuple[int, ...]
    eth_out: bytes = b""  # leaf -> gateway Ethernet header
    eth_in: bytes = b""  # gateway -> leaf Ethernet header


Emit = Iterator[bytes]  # a session yields whole frames; the scheduler stamps them


class Mix:
    def __init__(self, seed: int, leaves: int) -> None:
        self.rnd = random.Random(seed)
        self.ident = 1
        self.leaves: list[Leaf] = []
        used: set[bytes] = set()
        for i in range(leaves):
            oui_text, stem, vendor_class, prl = self.rnd.choice(PROFILES)
            oui = bytes.fromhex(oui_text.replace(":", ""))
            mac = oui + self.rnd.randbytes(3)
            while mac in used:
                mac = oui + self.rnd.randbytes(3)
            used.add(mac)
            host = 10 + i
            ip = bytes([10, 20, host // 250, host % 250 + 2])
            leaf = Leaf(i, mac, ip, f"{stem}-{mac[3:].hex().upper()}", vendor_class, prl)
            leaf.eth_out = GATEWAY_MAC + mac + b"\x08\x00"
            leaf.eth_in = mac + GATEWAY_MAC + b"\x08\x00"
            self.leaves.append(leaf)
        self.names = list(CLOUD)
        self.cloud = {name: (bytes(int(x) for x in addr.split(".")), ports) for name, (addr, ports) in CLOUD.items()}
        self.blobs = [self.rnd.randbytes(1400) for _ in range(8)]
        self.hellos = {name: tls_client_hello(name, seed + k) for k, name in enumerate(self.names)}

    def _id(self) -> int:
        self.ident = (self.ident + 1) & 0xFFFF
        return self.ident

    def _out(self, leaf: Leaf, dst: bytes, proto: int, l4: bytes) -> bytes:
        return ether(GATEWAY_MAC, leaf.mac, 0x0800, ipv4(leaf.ip, dst, proto, l4, self._id()))

    def _in(self, leaf: Leaf, src: bytes, proto: int, l4: bytes, ttl: int = 52) -> bytes:
        return ether(leaf.mac, GATEWAY_MAC, 0x0800, ipv4(src, leaf.ip, proto, l4, self._id(), ttl))

    # ---- sessions ----------------------------------------------------------------------------
    def boot(self, leaf: Leaf) -> Emit:
        yield ether(BROADCAST, leaf.mac, 0x0806, arp(1, leaf.mac, bytes(4), bytes(6), leaf.ip))  # probe
        xid = self.rnd.getrandbits(32)
        client_id = b"\x01" + leaf.mac
        common = [
            (61, client_id),
            (12, leaf.hostname.encode()),
            (60, leaf.vendor_class.encode()),
            (55, bytes(leaf.prl)),
        ]
        bootp = [
            (b"\x01", [(53, b"\x01"), *common]),
            (b"\x03", [(53, b"\x03"), (50, leaf.ip), (54, GATEWAY_IP), *common]),
        ]
        for kind, opts in bootp:
            payload = dhcp(1, xid, leaf.mac, bytes(4), opts)
            l3 = ipv4(bytes(4), b"\xff" * 4, 17, udp(bytes(4), b"\xff" * 4, 68, 67, payload), self._id(), 64)
            yield ether(BROADCAST, leaf.mac, 0x0800, l3)
            reply = 2 if kind == b"\x01" else 5
            server_opts = [
                (53, bytes([reply])),
                (54, GATEWAY_IP),
                (51, struct.pack("!I", 86400)),
                (1, b"\xff\xff\x00\x00"),
                (3, GATEWAY_IP),
                (6, GATEWAY_IP),
            ]
            payload = dhcp(2, xid, leaf.mac, leaf.ip, server_opts)
            l3 = ipv4(GATEWAY_IP, leaf.ip, 17, udp(GATEWAY_IP, leaf.ip, 67, 68, payload), self._id(), 64)
            yield ether(leaf.mac, GATEWAY_MAC, 0x0800, l3)
        yield ether(BROADCAST, leaf.mac, 0x0806, arp(1, leaf.mac, leaf.ip, bytes(6), GATEWAY_IP))
        yield ether(leaf.mac, GATEWAY_MAC, 0x0806, arp(2, GATEWAY_MAC, GATEWAY_IP, leaf.mac, leaf.ip))

    def arp_refresh(self, leaf: Leaf) -> Emit:
        yield ether(GATEWAY_MAC, leaf.mac, 0x0806, arp(1, leaf.mac, leaf.ip, bytes(6), GATEWAY_IP))
        yield ether(leaf.mac, GATEWAY_MAC, 0x0806, arp(2, GATEWAY_MAC, GATEWAY_IP, leaf.mac, leaf.ip))

    def dns(self, leaf: Leaf, name: str) -> Emit:
        txid, sport = self.rnd.getrandbits(16), self.rnd.randint(32768, 60999)
        yield self._out(leaf, GATEWAY_IP, 17, udp(leaf.ip, GATEWAY_IP, sport, 53, dns_query(txid, name)))
        answer = dns_answer(txid, name, self.cloud[name][0])
        yield self._in(leaf, GATEWAY_IP, 17, udp(GATEWAY_IP, leaf.ip, 53, sport, answer), ttl=64)

    def tcp_session(self, leaf: Leaf, name: str, port: int) -> Emit:
        server = self.cloud[name][0]
        sport = self.rnd.randint(32768, 60999)
        c, s = self.rnd.getrandbits(32), self.rnd.getrandbits(32)

        def up(flags: int, payload: bytes = b"") -> bytes:
            return self._out(leaf, server, 6, tcp(leaf.ip, server, sport, port, c, s, flags, payload))

        def down(flags: int, payload: bytes = b"") -> bytes:
            return self._in(leaf, server, 6, tcp(server, leaf.ip, port, sport, s, c, flags, payload))

        yield up(0x02)
        c += 1
        if self.rnd.random() < 0.02:  # refused: RST/ACK
            yield self._in(leaf, server, 6, tcp(server, leaf.ip, port, sport, 0, c, 0x14))
            return
        yield down(0x12)
        s += 1
        yield up(0x10)
        exchanges: list[tuple[bytes, list[bytes]]]
        if port in (443, 8883):
            first = self.hellos[name]
            hello_reply = [self.blobs[0], self.blobs[1][: self.rnd.randint(200, 1300)]]
            exchanges = [(first, hello_reply)]
            exchanges += [
                (self.blobs[2][: self.rnd.randint(60, 400)], [self.blobs[3][: self.rnd.randint(40, 900)]])
                for _ in range(self.rnd.randint(1, 12))
            ]
        elif port == 1883:
            exchanges = [(mqtt_connect(f"{leaf.hostname}-{leaf.index}"), [b"\x20\x02\x00\x00"])]
            for k in range(self.rnd.randint(2, 20)):
                body = f'{{"seq":{k},"t":{20 + k % 7}.5,"rssi":-{50 + k % 30}}}'.encode()
                exchanges.append((mqtt_publish(f"devices/{leaf.index}/telemetry", body), []))
            exchanges.append((b"\xe0\x00", []))
        else:  # HTTP 80
            host = name.encode()
            req = b"GET /api/v1/status?fw=1.2.3 HTTP/1.1\r\nHost: " + host + b"\r\nUser-Agent: iot-agent/1.0\r\n\r\n"
            pieces = self.rnd.randint(1, 6)
            exchanges = [
                (
                    req,
                    [b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + self.blobs[4][:1300]]
                    + [self.blobs[5]] * pieces,
                )
            ]
        for request, replies in exchanges:
            yield up(0x18, request)
            c += len(request)
            if not replies:
                yield down(0x10)
            for k, reply in enumerate(replies):
                yield down(0x18, reply)
                s += len(reply)
                if k % 2 == 1 or k == len(replies) - 1:
                    yield up(0x10)
        # client closes
        yield up(0x11)
        c += 1
        yield down(0x11)
        s += 1
        yield up(0x10)

    def coap(self, leaf: Leaf, server: bytes) -> Emit:
        sport, mid, token = self.rnd.randint(49152, 65535), self.rnd.getrandbits(16), self.rnd.randbytes(4)
        body = f'{{"temp":{self.rnd.randint(150, 300) / 10},"hum":{self.rnd.randint(20, 80)}}}'.encode()
        con = struct.pack("!BBH", 0x44, 0x02, mid) + token + b"\xb9telemetry\xff" + body
        yield self._out(leaf, server, 17, udp(leaf.ip, server, sport, 5683, con))
        ack = struct.pack("!BBH", 0x64, 0x44, mid) + token
        yield self._in(leaf, server, 17, udp(server, leaf.ip, 5683, sport, ack))

    def syslog(self, leaf: Leaf) -> Emit:
        uptime = self.rnd.randint(1, 99999)
        msg = f"<134>1 2026-01-01T00:00:00Z {leaf.hostname} agent {leaf.index} - - heartbeat ok uptime={uptime}"
        yield self._out(leaf, GATEWAY_IP, 17, udp(leaf.ip, GATEWAY_IP, 514, 514, msg.encode()))

    def ping(self, leaf: Leaf, target: bytes) -> Emit:
        ident = self.rnd.getrandbits(16)
        payload = bytes(range(32))
        for seq in range(self.rnd.randint(1, 4)):
            yield self._out(leaf, target, 1, icmp_echo(8, ident, seq, payload))
            yield self._in(leaf, target, 1, icmp_echo(0, ident, seq, payload), ttl=60)

    def activity(self) -> Emit:
        leaf = self.rnd.choice(self.leaves)
        r = self.rnd.random()
        name = self.rnd.choice(self.names)
        if r < 0.20:
            return self.dns(leaf, name)
        if r < 0.62:
            port = self.rnd.choice(self.cloud[name][1])
            return self.tcp_session(leaf, name, port)
        if r < 0.80:
            return self.coap(leaf, self.cloud[name][0])
        if r < 0.92:
            return self.syslog(leaf)
        if r < 0.97:
            return self.ping(leaf, self.rnd.choice((GATEWAY_IP, self.cloud[name][0])))
        return self.arp_refresh(leaf)


def frames(seed: int, leaves: int, count: int, concurrency: int = 64) -> Iterator[tuple[float, bytes]]:
    mix = Mix(seed, leaves)
    rnd = mix.rnd
    boots = [mix.boot(leaf) for leaf in mix.leaves]
    active: list[Emit] = boots[:concurrency]
    pending = boots[concurrency:]
    ts = START_TS
    produced = 0
    expo: Callable[[float], float] = rnd.expovariate
    while produced < count:
        k = rnd.randrange(len(active))
        frame = next(active[k], None)
        if frame is None:
            active[k] = pending.pop() if pending else mix.activity()
            continue
        ts += expo(20_000.0)  # ≈ 20k frames/s on average
        produced += 1
        yield ts, frame


def write_pcap(path: Path, stream: Iterator[tuple[float, bytes]]) -> int:
    tmp = path.with_suffix(".tmp")
    n = 0
    with tmp.open("wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        chunk: list[bytes] = []
        pack = struct.Struct("<IIII").pack
        for ts, frame in stream:
            sec = int(ts)
            chunk.append(pack(sec, int((ts - sec) * 1e6), len(frame), len(frame)))
            chunk.append(frame)
            n += 1
            if len(chunk) >= 65536:
                out.write(b"".join(chunk))
                chunk.clear()
        out.write(b"".join(chunk))
    tmp.replace(path)
    return n


def default_path(frames_: int, seed: int, leaves: int) -> Path:
    return CACHE / f"iot_mix_v{GENERATOR_VERSION}_{frames_}f_{leaves}l_s{seed}.pcap"


def ensure_capture(
    frames_: int = 1_000_000,
    seed: int = 7,
    leaves: int = 240,
    out: Path | None = None,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    path = out or default_path(frames_, seed, leaves)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n = write_pcap(path, frames(seed, leaves, frames_))
    if not quiet:
        took = time.perf_counter() - t0
        print(f"generated {path} ({n:,} frames, {path.stat().st_size / 1e6:.1f} MB) in {took:.1f} s", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--leaves", type=int, default=240)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--force", action="store_true", help="regenerate even if the cached file exists")
    args = ap.parse_args(argv)
    if args.leaves < 1 or args.leaves > 60000:
        ap.error("--leaves must be in 1..60000")
    print(ensure_capture(args.frames, args.seed, args.leaves, args.out, args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
