"""Deep decoders for the protocols that carry inventory: DHCP, DNS/mDNS, NetBIOS-NS, SSDP, TLS ClientHello.

Each takes the payload bytes and returns a small record or ``None`` when the payload is not that protocol or
is damaged; none of them raises on bad input (a bounded amount of work per call, even for crafted names).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

DHCP_MAGIC = b"\x63\x82\x53\x63"


@dataclass(slots=True)
class Dhcp:
    op: int
    client_mac: bytes
    your_ip: bytes
    msg_type: int | None = None
    hostname: str | None = None
    requested_ip: bytes | None = None
    param_request_list: tuple[int, ...] = ()
    vendor_class: str | None = None
    client_id: bytes | None = None
    fqdn: str | None = None


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "replace")


def dhcp(payload: bytes) -> Dhcp | None:
    if len(payload) < 240 or payload[236:240] != DHCP_MAGIC:
        return None
    hlen = payload[2]
    if payload[1] != 1 or hlen != 6:
        return None
    d = Dhcp(op=payload[0], client_mac=payload[28:34], your_ip=payload[16:20])
    pos = 240
    n = len(payload)
    while pos < n:
        code = payload[pos]
        if code == 0:
            pos += 1
            continue
        if code == 255 or pos + 1 >= n:
            break
        olen = payload[pos + 1]
        val = payload[pos + 2 : pos + 2 + olen]
        pos += 2 + olen
        if len(val) < olen:
            break
        if code == 53 and olen >= 1:
            d.msg_type = val[0]
        elif code == 12 and olen:
            d.hostname = _text(val)
        elif code == 50 and olen == 4:
            d.requested_ip = val
        elif code == 55:
            d.param_request_list = tuple(val)
        elif code == 60 and olen:
            d.vendor_class = _text(val)
        elif code == 61 and olen:
            d.client_id = val
        elif code == 81 and olen >= 3:
            flags = val[0]
            name = val[3:]
            d.fqdn = _dns_wire_name(name) if flags & 0x04 else _text(name)
    return d


def _dns_wire_name(raw: bytes) -> str | None:
    labels = []
    pos = 0
    while pos < len(raw):
        ln = raw[pos]
        if ln == 0 or ln & 0xC0:
            break
        labels.append(raw[pos + 1 : pos + 1 + ln].decode("utf-8", "replace"))
        pos += 1 + ln
    return ".".join(labels) or None


@dataclass(slots=True)
class Dns:
    response: bool
    opcode: int
    rcode: int
    questions: list[str] = field(default_factory=list)
    # (name, rtype, rdata-as-text-or-None) for answer, authority and additional records
    records: list[tuple[str, int, str | None]] = field(default_factory=list)


DNS_A = 1
DNS_PTR = 12
DNS_AAAA = 28
DNS_SRV = 33
MAX_NAME_JUMPS = 16
MAX_RECORDS = 64


def _read_name(msg: bytes, pos: int) -> tuple[str, int] | None:
    """A possibly compressed DNS name at ``pos``; returns it and the position after it in the record."""
    labels: list[str] = []
    jumps = 0
    after = -1
    n = len(msg)
    total = 0
    while True:
        if pos >= n:
            return None
        ln = msg[pos]
        if ln & 0xC0 == 0xC0:
            if pos + 1 >= n or jumps >= MAX_NAME_JUMPS:
                return None
            if after < 0:
                after = pos + 2
            pos = ((ln & 0x3F) << 8) | msg[pos + 1]
            jumps += 1
            continue
        if ln & 0xC0:
            return None
        pos += 1
        if ln == 0:
            break
        if pos + ln > n:
            return None
        total += ln + 1
        if total > 255:
            return None
        labels.append(msg[pos : pos + ln].decode("utf-8", "replace"))
        pos += ln
    return ".".join(labels), (after if after >= 0 else pos)


def dns(msg: bytes) -> Dns | None:
    if len(msg) < 12:
        return None
    _tid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", msg)
    d = Dns(response=bool(flags & 0x8000), opcode=(flags >> 11) & 0xF, rcode=flags & 0xF)
    pos = 12
    for _ in range(min(qd, MAX_RECORDS)):
        got = _read_name(msg, pos)
        if got is None or got[1] + 4 > len(msg):
            return d if d.questions else None
        d.questions.append(got[0])
        pos = got[1] + 4
    for _ in range(min(an + ns + ar, MAX_RECORDS)):
        got = _read_name(msg, pos)
        if got is None or got[1] + 10 > len(msg):
            break
        name, pos = got
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", msg, pos)
        rdata_at = pos + 10
        pos = rdata_at + rdlen
        if pos > len(msg):
            break
        value: str | None = None
        if rtype == DNS_A and rdlen == 4:
            value = ".".join(str(b) for b in msg[rdata_at:pos])
        elif rtype == DNS_AAAA and rdlen == 16:
            import ipaddress

            value = str(ipaddress.IPv6Address(msg[rdata_at:pos]))
        elif rtype == DNS_PTR:
            got = _read_name(msg, rdata_at)
            value = got[0] if got else None
        elif rtype == DNS_SRV and rdlen > 6:
            got = _read_name(msg, rdata_at + 6)
            value = got[0] if got else None
        d.records.append((name, rtype, value))
    return d


@dataclass(slots=True)
class Nbns:
    response: bool
    opcode: int
    names: list[tuple[str, int, bool]]
    """(name, suffix, is_group) of the question or answer name; ``is_group`` from NB_FLAGS when present."""


def _nb_name(msg: bytes, pos: int) -> tuple[str, int, int] | None:
    if pos >= len(msg) or msg[pos] != 32 or pos + 34 > len(msg):
        return None
    enc = msg[pos + 1 : pos + 33]
    raw = bytearray()
    for i in range(0, 32, 2):
        hi = enc[i] - 0x41
        lo = enc[i + 1] - 0x41
        if not (0 <= hi < 16 and 0 <= lo < 16):
            return None
        raw.append(hi << 4 | lo)
    # After the 32 encoded bytes comes the scope id (usually empty) and a terminating zero label.
    end = pos + 33
    for _ in range(16):
        if end >= len(msg) or msg[end] == 0:
            break
        end += 1 + msg[end]
    # Names are padded with spaces; the NBSTAT wildcard "*" is padded with NULs.
    return raw[:15].decode("ascii", "replace").rstrip(" \x00"), raw[15], end + 1


def _nb_flags(msg: bytes, pos: int) -> int | None:
    """NB_FLAGS of the resource record at ``pos`` (name, type, class, ttl, rdlength, then NB_FLAGS)."""
    if pos < len(msg) and msg[pos] & 0xC0 == 0xC0:
        pos += 2
    else:
        got = _nb_name(msg, pos)
        if got is None:
            return None
        pos = got[2]
    if pos + 12 > len(msg):
        return None
    return int(struct.unpack_from("!H", msg, pos + 10)[0])


def nbns(msg: bytes) -> Nbns | None:
    if len(msg) < 12:
        return None
    _tid, flags, qd, an, _ns, ar = struct.unpack_from("!HHHHHH", msg)
    out = Nbns(response=bool(flags & 0x8000), opcode=(flags >> 11) & 0xF, names=[])
    got = _nb_name(msg, 12)
    if got is None:
        return None
    if qd:
        nb = _nb_flags(msg, got[2] + 4) if ar else None
    elif an:
        nb = _nb_flags(msg, 12)
    else:
        return out
    out.names.append((got[0], got[1], bool(nb is not None and nb & 0x8000)))
    return out


@dataclass(slots=True)
class Ssdp:
    method: str
    server: str | None
    usn: str | None
    location: str | None


def ssdp(payload: bytes) -> Ssdp | None:
    head, _, _ = payload.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines or not lines[0]:
        return None
    first = lines[0].decode("latin-1")
    if not first.startswith(("NOTIFY ", "M-SEARCH ", "HTTP/1.")):
        return None
    hdrs: dict[str, str] = {}
    for line in lines[1:32]:
        k, sep, v = line.partition(b":")
        if sep:
            hdrs[k.strip().lower().decode("latin-1")] = v.strip().decode("utf-8", "replace")
    return Ssdp(
        method=first.split(" ", 1)[0],
        server=hdrs.get("server"),
        usn=hdrs.get("usn"),
        location=hdrs.get("location"),
    )


@dataclass(slots=True)
class ClientHello:
    sni: str | None
    versions: tuple[int, ...]
    """Offered versions: supported_versions when present, else the legacy version."""


def tls_client_hello(payload: bytes) -> ClientHello | None:
    # record: type 22, version 3.x, length; handshake: type 1 (ClientHello)
    if len(payload) < 9 or payload[0] != 0x16 or payload[1] != 3 or payload[5] != 1:
        return None
    end = min(len(payload), 5 + struct.unpack_from("!H", payload, 3)[0])
    pos = 9
    if pos + 34 > end:
        return None
    legacy = struct.unpack_from("!H", payload, pos)[0]
    pos += 34
    if pos >= end:
        return None
    pos += 1 + payload[pos]
    if pos + 2 > end:
        return None
    cs_len = struct.unpack_from("!H", payload, pos)[0]
    pos += 2 + cs_len
    if pos + 1 > end:
        return None
    pos += 1 + payload[pos]
    sni: str | None = None
    versions: tuple[int, ...] = (legacy,)
    if pos + 2 > end:
        return ClientHello(sni, versions)
    ext_end = min(end, pos + 2 + struct.unpack_from("!H", payload, pos)[0])
    pos += 2
    while pos + 4 <= ext_end:
        etype, elen = struct.unpack_from("!HH", payload, pos)
        body = pos + 4
        pos = body + elen
        if pos > ext_end:
            break
        if etype == 0 and elen >= 5:
            # server_name list: list length, then (type 0 = host_name, length, name)
            if payload[body + 2] == 0 and body + 5 <= ext_end:
                nlen = struct.unpack_from("!H", payload, body + 3)[0]
                sni = payload[body + 5 : body + 5 + nlen].decode("ascii", "replace")
        elif etype == 43 and elen >= 1:
            vlen = payload[body]
            vs = payload[body + 1 : body + 1 + vlen]
            versions = tuple(
                struct.unpack_from("!H", vs, i)[0]
                for i in range(0, len(vs) - 1, 2)
                # GREASE values (RFC 8701) are noise, not offers.
                if not (vs[i] == vs[i + 1] and vs[i] & 0x0F == 0x0A)
            )
    return ClientHello(sni, versions)
