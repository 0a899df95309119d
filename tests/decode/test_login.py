"""Cleartext login outcomes, and that passwords never come out."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from leafguard.decode.login import LoginOutcome, LoginTracker


def _run(proto: str, exchange: list[tuple[bool, bytes]]) -> list[LoginOutcome]:
    t = LoginTracker(proto)  # type: ignore[arg-type]
    out: list[LoginOutcome] = []
    for from_client, data in exchange:
        out += t.feed(from_client, data)
    return out


def test_ftp_failure_then_success_with_split_lines() -> None:
    out = _run(
        "ftp",
        [
            (False, b"220 ready\r\n"),
            (True, b"USER csan"),
            (True, b"ders\r\n"),
            (False, b"331 password\r\n"),
            (True, b"PASS wrong\r\n"),
            (False, b"530 Login incorrect.\r\n"),
            (True, b"USER csanders\r\nPASS echo\r\n"),
            (False, b"230-Welcome\r\n230 Logged in\r\n"),
        ],
    )
    assert out == [LoginOutcome("csanders", "Fail", "530"), LoginOutcome("csanders", "Success", "230")]
    assert all("echo" not in repr(o) and "wrong" not in repr(o) for o in out)


def test_telnet_character_at_a_time_login() -> None:
    exchange: list[tuple[bool, bytes]] = [(False, b"\xff\xfd\x18\xff\xfb\x01"), (False, b"\r\nlogin: ")]
    exchange += [(True, bytes([c])) for c in b"fake"] + [(True, b"\r\n")]
    exchange += [(False, b"Password:"), (True, b"user\r\n"), (False, b"\r\nLast login: Sat Nov 27 20:11:43\r\n$ ")]
    assert _run("telnet", exchange) == [LoginOutcome("fake", "Success")]


def test_telnet_failure() -> None:
    exchange: list[tuple[bool, bytes]] = [(False, b"login: "), (True, b"root\r"), (False, b"Password: ")]
    exchange += [(True, b"x\r"), (False, b"\r\nLogin incorrect\r\n")]
    assert _run("telnet", exchange) == [LoginOutcome("root", "Fail")]


def test_http_basic_status() -> None:
    cred = base64.b64encode(b"admin:secret")
    ok = _run(
        "http",
        [(True, b"GET / HTTP/1.1\r\nAuthorization: Basic " + cred + b"\r\n\r\n"), (False, b"HTTP/1.1 200 OK\r\n")],
    )
    assert ok == [LoginOutcome("admin", "Success", "200")]
    bad = _run(
        "http",
        [(True, b"GET / HTTP/1.1\r\nAuthorization: basic " + cred + b"\r\n\r\n"), (False, b"HTTP/1.0 401 No\r\n")],
    )
    assert bad == [LoginOutcome("admin", "Fail", "401")]
    assert _run("http", [(True, b"GET / HTTP/1.1\r\n\r\n"), (False, b"HTTP/1.1 200 OK\r\n")]) == []


def _connect(user: bytes | None, password: bytes | None, level: int = 4) -> bytes:
    flags = (0x80 if user else 0) | (0x40 if password else 0) | 0x02
    var = b"\x00\x04MQTT" + bytes([level, flags]) + b"\x00\x3c" + (b"\x00" if level == 5 else b"")
    payload = b"\x00\x03dev"
    for item in (user, password):
        if item:
            payload += len(item).to_bytes(2, "big") + item
    body = var + payload
    return bytes([0x10, len(body)]) + body


def test_mqtt_connect_connack_v311_and_v5() -> None:
    ok = _run("mqtt", [(True, _connect(b"sensor", b"pw")), (False, b"\x20\x02\x00\x00")])
    assert ok == [LoginOutcome("sensor", "Success", "0")]
    bad = _run("mqtt", [(True, _connect(b"sensor", b"pw", 5)), (False, b"\x20\x03\x00\x86\x00")])
    assert bad == [LoginOutcome("sensor", "Fail", "134")]


def test_mqtt_stream_that_does_not_open_with_connect_is_not_followed() -> None:
    t = LoginTracker("mqtt")
    # A PUBLISH first (a conversation picked up mid-way): a CONNECT after it is not a login MQTT allows.
    assert t.feed(True, b"\x30\x05\x00\x01tab") == []
    assert t.finished
    assert t.feed(True, _connect(b"sensor", b"pw")) + t.feed(False, b"\x20\x02\x00\x00") == []
    # Zeros on the MQTT port read as a reserved packet type: nothing to follow either.
    zeros = LoginTracker("mqtt")
    assert zeros.feed(True, bytes(600)) == []
    assert zeros.finished
    # Split before the first packet is complete: still followed.
    split = LoginTracker("mqtt")
    first = _connect(b"sensor", b"pw")
    assert split.feed(True, first[:3]) == []
    assert not split.finished
    assert split.feed(True, first[3:]) + split.feed(False, b"\x20\x02\x00\x00") == [
        LoginOutcome("sensor", "Success", "0")
    ]


@settings(max_examples=400, deadline=None)
@given(
    proto=st.sampled_from(["ftp", "telnet", "http", "mqtt"]),
    chunks=st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=12),
)
def test_trackers_never_raise_and_stay_bounded(proto: str, chunks: list[tuple[bool, bytes]]) -> None:
    t = LoginTracker(proto)  # type: ignore[arg-type]
    for from_client, data in chunks:
        t.feed(from_client, data)
    assert all(len(b) <= 4096 for b in (t._client_buf, t._server_buf) if b is not None)
