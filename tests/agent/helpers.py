"""Hand-made observations and views, and ways to look into messages."""

from __future__ import annotations

from typing import Any, Literal

import orjson

from leafguard.agent.messages import OutgoingMessage
from leafguard.observe.model import ConnectionSeen, LeafView, LoginSeen, Service

MAC = "00:11:22:33:44:55"
T0 = 1_700_000_000.0


def conn(
    ts: float,
    *,
    mac: str = MAC,
    direction: Literal["In", "Out"] = "Out",
    remote: str = "10.0.0.9",
    remote_port: int = 443,
    local: str = "10.0.0.2",
    local_port: int = 50000,
    protocol: Literal["tcp", "udp"] = "tcp",
) -> ConnectionSeen:
    return ConnectionSeen(
        ts=ts,
        leaf_mac=mac,
        direction=direction,
        protocol=protocol,
        local_addr=local,
        local_port=local_port,
        remote_addr=remote,
        remote_port=remote_port,
        tcp_state="EST",
        bytes_seen=1234,
    )


def login(
    ts: float, *, mac: str = MAC, user: str | None = "admin", result: Literal["Success", "Fail"] = "Fail"
) -> LoginSeen:
    return LoginSeen(
        ts=ts,
        leaf_mac=mac,
        protocol="telnet",
        direction="In",
        local_addr="10.0.0.2",
        local_port=23,
        remote_addr="10.0.0.66",
        remote_port=40000,
        user=user,
        result=result,
    )


def view(mac: str = MAC, **kw: Any) -> LeafView:
    base: dict[str, Any] = {
        "mac": mac,
        "ips": ("10.0.0.2",),
        "vendor": "Acme Devices",
        "hostnames": ("cam-1.local",),
        "dhcp_hostname": "cam-1",
        "dhcp_vendor_class": "udhcp 1.19.4",
        "dhcp_param_request_list": (1, 3, 6, 12, 15, 28, 42),
        "randomized_mac": False,
        "first_seen": T0,
        "last_seen": T0 + 10,
        "services": (Service("tcp", 80), Service("udp", 161)),
    }
    base.update(kw)
    return LeafView(**base)


def bodies(msgs: list[OutgoingMessage]) -> list[dict[str, Any]]:
    return [orjson.loads(m.body) for m in msgs]


def events(msgs: list[OutgoingMessage]) -> list[dict[str, Any]]:
    return [e for b in bodies(msgs) for e in b["Events"]]


def names(msgs: list[OutgoingMessage]) -> list[str]:
    return [e["Name"] for e in events(msgs)]


def security(msgs: list[OutgoingMessage]) -> list[dict[str, Any]]:
    """Events other than the periodic statistics (which every snapshot adds)."""
    return [e for e in events(msgs) if e["Name"] not in {"DroppedEventsStatistics", "MessageStatistics"}]
