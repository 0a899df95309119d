"""Cleartext login exchanges: FTP, telnet, HTTP Basic and MQTT CONNECT/CONNACK.

A `LoginTracker` follows one TCP conversation, fed with the payload of each segment and which side sent it,
and returns the outcome of each login it sees. Passwords are parsed past but never kept. Buffers are
bounded: a conversation that never completes a login costs at most ``MAX_BUFFER`` bytes per side.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

MAX_BUFFER = 4096
LOGIN_PORTS: dict[int, Literal["telnet", "ftp", "http", "mqtt"]] = {
    21: "ftp",
    23: "telnet",
    80: "http",
    8000: "http",
    8080: "http",
    8081: "http",
    8888: "http",
    1883: "mqtt",
}


@dataclass(frozen=True, slots=True)
class LoginOutcome:
    user: str | None
    result: Literal["Success", "Fail"]
    reply_code: str | None = None


class LoginTracker:
    """Follows the login exchanges of one conversation; ``client`` is the side that connected."""

    __slots__ = ("_client_buf", "_pending_user", "_server_buf", "_state", "protocol")

    def __init__(self, protocol: Literal["telnet", "ftp", "http", "mqtt"]) -> None:
        self.protocol = protocol
        # Each side's unparsed bytes between segments, None when there are none: most followed conversations
        # never leave any one way or the other, and two empty buffers in a dict cost 300 bytes a conversation.
        # Kept as bytes (40 bytes for a short remainder, against 110 as a bytearray); a segment is parsed in a
        # bytearray made from them.
        self._client_buf: bytes | None = None
        self._server_buf: bytes | None = None
        self._state = "wait_login" if protocol == "telnet" else "idle"
        self._pending_user: str | None = None

    @property
    def finished(self) -> bool:
        """No further login is followed on this conversation (a session was opened, or HTTP answered once)."""
        return self._state == "done"

    def feed(self, from_client: bool, payload: bytes) -> list[LoginOutcome]:
        if not payload or self._state == "done":
            return []
        if self.protocol == "telnet":
            return self._telnet(from_client, _strip_telnet(payload))
        held = self._client_buf if from_client else self._server_buf
        buf = bytearray(held) if held is not None else bytearray()
        buf += payload
        if len(buf) > MAX_BUFFER:
            del buf[: len(buf) - MAX_BUFFER]
        if self.protocol == "ftp":
            out = self._ftp(from_client, buf)
        elif self.protocol == "http":
            out = self._http(from_client, buf)
        else:
            out = self._mqtt(from_client, buf)
        self._keep(from_client, buf)
        return out

    def _keep(self, from_client: bool, buf: bytearray) -> None:
        kept = bytes(buf) if buf else None
        if from_client:
            self._client_buf = kept
        else:
            self._server_buf = kept

    def _ftp(self, from_client: bool, buf: bytearray) -> list[LoginOutcome]:
        out: list[LoginOutcome] = []
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            text = line.strip().decode("utf-8", "replace")
            if from_client:
                verb, _, arg = text.partition(" ")
                if verb.upper() == "USER":
                    self._pending_user = arg.strip()
                    self._state = "user"
                elif verb.upper() == "PASS" and self._state == "user":
                    self._state = "pass"
            elif self._state in ("user", "pass") and len(text) >= 3 and text[:3].isdigit():
                if text[3:4] == "-":
                    continue
                code = int(text[:3])
                if code == 230:
                    out.append(LoginOutcome(self._pending_user, "Success", str(code)))
                    self._state = "done"
                elif code in (530, 430) or (self._state == "pass" and code >= 400):
                    out.append(LoginOutcome(self._pending_user, "Fail", str(code)))
                    self._state = "idle"
        return out

    def _telnet(self, from_client: bool, data: bytes) -> list[LoginOutcome]:
        out: list[LoginOutcome] = []
        if from_client:
            if self._state == "user":
                held = self._client_buf
                buf = bytearray(held) if held is not None else bytearray()
                for ch in data:
                    if ch in (0x0D, 0x0A, 0x00):
                        if buf:
                            self._pending_user = buf.decode("utf-8", "replace")
                            buf.clear()
                            self._state = "wait_password"
                        break
                    if ch in (0x08, 0x7F):
                        if buf:
                            buf.pop()
                    elif 0x20 <= ch < 0x7F and len(buf) < 64:
                        buf.append(ch)
                self._keep(True, buf)
            return out
        text = data.decode("latin-1").lower()
        if self._state == "wait_result":
            if any(w in text for w in ("incorrect", "failed", "denied", "invalid")):
                out.append(LoginOutcome(self._pending_user, "Fail"))
                self._state = "wait_login"
            elif text.strip() and "password" not in text:
                out.append(LoginOutcome(self._pending_user, "Success"))
                self._state = "done"
        if self._state == "wait_password" and "password" in text:
            self._state = "wait_result"
        if self._state == "wait_login" and ("login:" in text or "username:" in text):
            self._state = "user"
            self._client_buf = None
        return out

    def _http(self, from_client: bool, buf: bytearray) -> list[LoginOutcome]:
        out: list[LoginOutcome] = []
        if from_client:
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                head = bytes(buf[:end])
                del buf[: end + 4]
                for line in head.split(b"\r\n")[1:]:
                    k, sep, v = line.partition(b":")
                    if sep and k.strip().lower() == b"authorization":
                        scheme, _, cred = v.strip().partition(b" ")
                        if scheme.lower() == b"basic":
                            self._pending_user = _basic_user(cred.strip())
                            self._state = "await_status"
            return out
        while (end := buf.find(b"\r\n")) >= 0:
            line = bytes(buf[:end])
            del buf[: end + 2]
            if line.startswith(b"HTTP/1.") and self._state == "await_status" and line[9:12].isdigit():
                status = int(line[9:12])
                result: Literal["Success", "Fail"] = "Fail" if status in (401, 403) else "Success"
                out.append(LoginOutcome(self._pending_user, result, str(status)))
                self._state = "idle"
            if line.startswith(b"HTTP/1.") and self._state == "idle":
                # Credentials come with the first request of a connection in practice; following the rest of a
                # long keep-alive exchange would hold every frame of it on the per-frame path.
                self._state = "done"
                buf.clear()
                break
        return out

    def _mqtt(self, from_client: bool, buf: bytearray) -> list[LoginOutcome]:
        # The complete packets are walked in place and cut from the buffer once: traffic on the MQTT port that is
        # not MQTT (zeros, say) reads as a run of 2-byte packets, and copying each out cost a microsecond.
        out: list[LoginOutcome] = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            first = buf[pos + 1]
            if first < 0x80:  # a one-byte remaining length, the common case
                rem, body = first, pos + 2
            else:
                rem, body = _varint(buf, pos + 1)
                if rem < 0:
                    break
            if body + rem > n:
                break
            ptype = buf[pos] >> 4
            if from_client and ptype != 1 and self._state == "idle":
                # A client's first packet must be its CONNECT (MQTT 3.1.1 section 3.1.0-1, 5.0 section 3.1): a
                # stream that opens otherwise (picked up mid-way, or not MQTT) has no login to follow.
                self._state = "done"
                buf.clear()
                return out
            if from_client and ptype == 1:
                self._pending_user = _mqtt_connect_user(bytes(buf[body : body + rem]))
                self._state = "await_connack"
            elif not from_client and ptype == 2 and self._state == "await_connack" and rem >= 2:
                code = buf[body + 1]
                result: Literal["Success", "Fail"] = "Success" if code == 0 else "Fail"
                out.append(LoginOutcome(self._pending_user, result, str(code)))
                # MQTT allows one CONNECT per network connection (MQTT 3.1.1 section 3.1).
                self._state = "done"
            pos = body + rem
        del buf[:pos]
        return out


def _varint(buf: bytearray | bytes, pos: int) -> tuple[int, int]:
    """MQTT variable-length integer at ``pos``: (value, position after it), or (-1, 0) if incomplete."""
    value = 0
    for i in range(4):
        if pos + i >= len(buf):
            return -1, 0
        b = buf[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return value, pos + i + 1
    return -1, 0


def _mqtt_str(body: bytes, pos: int) -> tuple[bytes, int] | None:
    if pos + 2 > len(body):
        return None
    n = int.from_bytes(body[pos : pos + 2], "big")
    if pos + 2 + n > len(body):
        return None
    return body[pos + 2 : pos + 2 + n], pos + 2 + n


def _mqtt_connect_user(body: bytes) -> str | None:
    got = _mqtt_str(body, 0)
    if got is None or got[1] + 4 > len(body):
        return None
    pos = got[1]
    level, flags = body[pos], body[pos + 1]
    pos += 4
    if level == 5:
        plen, pos = _varint(body, pos)
        if plen < 0:
            return None
        pos += plen
    got = _mqtt_str(body, pos)  # client id
    if got is None:
        return None
    pos = got[1]
    if flags & 0x04:  # will flag: will properties (v5), topic and message precede the user name
        if level == 5:
            plen, pos = _varint(body, pos)
            if plen < 0:
                return None
            pos += plen
        for _ in range(2):
            got = _mqtt_str(body, pos)
            if got is None:
                return None
            pos = got[1]
    if flags & 0x80:
        got = _mqtt_str(body, pos)
        if got is None:
            return None
        return got[0].decode("utf-8", "replace")
    return None


def _basic_user(cred: bytes) -> str | None:
    try:
        raw = base64.b64decode(cred, validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, _password = raw.partition(b":")
    return user.decode("utf-8", "replace") if sep else None


def _strip_telnet(data: bytes) -> bytes:
    """Payload without telnet IAC commands and subnegotiations (RFC 854/855)."""
    if 0xFF not in data:
        return data
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if b != 0xFF:
            out.append(b)
            i += 1
            continue
        if i + 1 >= n:
            break
        cmd = data[i + 1]
        if cmd == 0xFF:
            out.append(0xFF)
            i += 2
        elif cmd == 0xFA:  # SB ... IAC SE
            j = data.find(b"\xff\xf0", i + 2)
            i = n if j < 0 else j + 2
        elif cmd in (0xFB, 0xFC, 0xFD, 0xFE):
            i += 3
        else:
            i += 2
    return bytes(out)
