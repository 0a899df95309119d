"""Security and operational events in the official Defender for IoT message schema (defender-spec §3).

An :class:`Event` is the schema's event object minus its ``Id`` (the agent assigns a deterministic one when it
serializes the event, see :func:`encode_event`). Builders turn the observation core's records into events.

Passive observation cannot see processes: ``ProcessId`` is 0 and ``Executable``/``CommandLine`` are empty, and
the network evidence goes to ``ExtraDetails`` (string values only, as the schema demands). A password is never
part of an observation, so it cannot leave the module.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from leafguard.agent.config import ConfigIssue
from leafguard.observe.model import ConnectionSeen, LeafView, LoginSeen

Category = Literal["Periodic", "Triggered", "Aggregated"]
EventType = Literal["Security", "Operational", "Diagnostic"]
Severity = Literal["Fatal", "Error", "Warning", "Information", "Debug"]

SOURCE = "LeafGuard passive network observation"
"""``ExtraDetails.Source`` of every event built from traffic: the evidence is the network, not a kernel."""

_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:leafguard:defender-agent")


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a security message, without its ``Id``."""

    name: str
    category: Category
    event_type: EventType
    ts: float
    """Epoch seconds (packet time); becomes ``TimestampUTC``/``TimestampLocal``."""
    payload: tuple[Mapping[str, Any], ...]

    def to_json(self, event_id: str) -> dict[str, Any]:
        """The schema's event object."""
        return {
            "Id": event_id,
            "TimestampLocal": timestamp_local(self.ts),
            "TimestampUTC": timestamp_utc(self.ts),
            "Category": self.category,
            "Name": self.name,
            "EventType": self.event_type,
            "IsEmpty": not self.payload,
            "PayloadSchemaVersion": "1.0",
            "Payload": [dict(p) for p in self.payload],
        }


def agent_id(identity: str) -> str:
    """The stable ``AgentId`` of a leaf identity: a name-based GUID (uuid5), the same across restarts."""
    return str(uuid.uuid5(_ID_NAMESPACE, "agent:" + identity))


def event_id(identity: str, seq: int, event: Event) -> str:
    """A deterministic event ``Id``: uuid5 of the identity, the agent's event counter and the event's
    time/name.

    Offline runs of the same capture therefore produce the same Ids; the time keeps Ids distinct across
    restarts of a live agent, whose counter starts again at 0.
    """
    return str(uuid.uuid5(_ID_NAMESPACE, f"{identity}|{seq}|{event.name}|{event.ts!r}"))


def encode_event(event: Event, event_id: str) -> bytes:
    """The event serialized as compact UTF-8 JSON, exactly as it will appear in the message body."""
    return orjson.dumps(event.to_json(event_id))


# The range datetime can write. A capture can carry any 64-bit tick count at any resolution (pcapng
# if_tsresol), so frame times outside it are real input, not bugs: they are written as the nearest end.
_FIRST_TS = datetime.min.replace(tzinfo=UTC).timestamp()
_LAST_TS = datetime.max.replace(tzinfo=UTC).timestamp() - 1e-3


def _utc(ts: float) -> datetime:
    if not ts >= _FIRST_TS:  # also NaN
        ts = _FIRST_TS
    return datetime.fromtimestamp(min(ts, _LAST_TS), UTC)


def timestamp_utc(ts: float) -> str:
    """RFC 3339 UTC with milliseconds and ``Z``: ``2018-08-10T11:01:21.000Z``."""
    return _utc(ts).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def timestamp_local(ts: float) -> str:
    """The module's local time is UTC (a container); written with an explicit ``+00:00`` offset."""
    return _utc(ts).isoformat(timespec="milliseconds")


def _ip(addr: str) -> str | None:
    """The address in canonical form, or None if it is not an IP address (the schema checks ipv4/ipv6)."""
    try:
        return str(ipaddress.ip_address(addr.split("%", 1)[0]))
    except ValueError:
        return None


# -- triggered security events -------------------------------------------------------------------------------


def connection_payload(obs: ConnectionSeen) -> dict[str, Any] | None:
    """The ConnectionCreate payload item for one observed conversation (None if an address is not an IP)."""
    remote, local = _ip(obs.remote_addr), _ip(obs.local_addr)
    if remote is None:
        return None
    item: dict[str, Any] = {
        "RemoteAddress": remote,
        "RemotePort": str(obs.remote_port),
        "LocalPort": str(obs.local_port),
        "Direction": obs.direction,
        "Protocol": obs.protocol.upper(),
        "ProcessId": 0,
        "Executable": "",
        "CommandLine": "",
    }
    if local is not None:
        item["LocalAddress"] = local
    extra = {"Source": SOURCE, "LeafMac": obs.leaf_mac, "BytesSeen": str(obs.bytes_seen)}
    if obs.protocol == "tcp":
        extra["TcpState"] = obs.tcp_state
    item["ExtraDetails"] = extra
    return item


def connection_create(obs: ConnectionSeen) -> Event | None:
    """A Triggered ConnectionCreate for a new conversation the leaf opened (Out) or accepted (In)."""
    item = connection_payload(obs)
    if item is None:
        return None
    return Event("ConnectionCreate", "Triggered", "Security", obs.ts, (item,))


_LOGIN_OPERATION = {
    "telnet": "Telnet:login",
    "ftp": "FTP:USER/PASS",
    "http": "HTTP:Basic",
    "mqtt": "MQTT:CONNECT",
}


def login(obs: LoginSeen) -> Event | None:
    """A Triggered Login for a cleartext login exchange; ``UserName`` is empty when it was not visible."""
    remote = _ip(obs.remote_addr)
    item: dict[str, Any] = {
        "ProcessId": 0,
        "UserName": obs.user if obs.user is not None else "",
        "Operation": _LOGIN_OPERATION.get(obs.protocol, obs.protocol),
        "Executable": "",
        "RemotePort": str(obs.remote_port),
        "LocalPort": str(obs.local_port),
        "Result": obs.result,
    }
    if remote is not None:
        item["RemoteAddress"] = remote
    extra = {
        "Source": SOURCE,
        "LeafMac": obs.leaf_mac,
        "Protocol": obs.protocol,
        "Direction": obs.direction,
        "LocalAddress": obs.local_addr,
        "UserNameVisible": "true" if obs.user is not None else "false",
    }
    # The server's reply (FTP reply code, HTTP status, MQTT CONNACK code), once the observation carries it.
    reply = getattr(obs, "reply_code", None)
    if reply is not None:
        extra["ReplyCode"] = str(reply)
    item["ExtraDetails"] = extra
    return Event("Login", "Triggered", "Security", obs.ts, (item,))


# -- periodic security events --------------------------------------------------------------------------------


def listening_ports(view: LeafView, ts: float) -> Event:
    """A Periodic ListeningPorts from the services inferred passively (empty snapshot when none)."""
    local = _ip(view.ips[0]) if len(view.ips) == 1 else None
    items: list[dict[str, Any]] = []
    for svc in sorted(view.services, key=lambda s: (s.protocol, s.port)):
        item: dict[str, Any] = {"LocalPort": str(svc.port), "Protocol": svc.protocol.upper()}
        if local is not None:
            item["LocalAddress"] = local
        item["ExtraDetails"] = {
            "Source": SOURCE,
            "Evidence": "SYN-ACK sent" if svc.protocol == "tcp" else "UDP reply sent from this port",
            "LeafMac": view.mac,
        }
        items.append(item)
    return Event("ListeningPorts", "Periodic", "Security", ts, tuple(items))


def system_information(view: LeafView, ts: float) -> Event:
    """A Periodic SystemInformation from the inventory; OS fields only when a fingerprint supports them."""
    item: dict[str, Any] = {}
    host = view.dhcp_hostname or (view.hostnames[0] if view.hostnames else None)
    if host:
        item["HostName"] = host
    if view.os_name:
        item["OSName"] = view.os_name
    if view.os_vendor:
        item["OSVendor"] = view.os_vendor
    if view.os_version:
        item["OSVersion"] = view.os_version
    extra = {
        "Source": SOURCE,
        "MacAddress": view.mac,
        "IpAddresses": ",".join(view.ips),
        "RandomizedMac": "true" if view.randomized_mac else "false",
        "FirstSeenUtc": timestamp_utc(view.first_seen),
        "LastSeenUtc": timestamp_utc(view.last_seen),
    }
    if view.vendor:
        extra["NicVendor"] = view.vendor
    if view.hostnames:
        extra["HostNames"] = ",".join(view.hostnames)
    if view.dhcp_hostname:
        extra["DhcpHostName"] = view.dhcp_hostname
    if view.dhcp_vendor_class:
        extra["DhcpVendorClass"] = view.dhcp_vendor_class
    if view.dhcp_param_request_list:
        extra["DhcpParameterRequestList"] = ",".join(str(o) for o in view.dhcp_param_request_list)
    item["ExtraDetails"] = extra
    return Event("SystemInformation", "Periodic", "Security", ts, (item,))


# -- operational and diagnostic events -----------------------------------------------------------------------


def configuration_error(issues: tuple[ConfigIssue, ...], ts: float) -> Event | None:
    """A Triggered ConfigurationError, one payload item per issue (None when there is nothing to report)."""
    if not issues:
        return None
    items = tuple(
        {
            "ConfigurationName": i.name,
            "ErrorType": i.error_type,
            "UsedConfiguration": i.used,
            "Message": i.message,
        }
        for i in issues
    )
    return Event("ConfigurationError", "Triggered", "Operational", ts, items)


@dataclass(frozen=True, slots=True)
class QueueCounts:
    """Per-interval counters of one queue: events offered to it and events it dropped."""

    collected: int
    dropped: int
    too_large: int = 0
    """Of ``dropped``: events larger than any message could carry."""


def dropped_events_statistics(
    high: QueueCounts, low: QueueCounts, operational: QueueCounts, ts: float, *, capture_dropped: int = 0
) -> Event:
    """A Periodic DroppedEventsStatistics with the High and Low items the schema allows.

    The schema's ``Queue`` enum has no "Operational" (C# sends one anyway and fails it), so the operational
    queue's counters ride in the High item's ExtraDetails, and so do the frames live capture lost before
    analysis (``CaptureDroppedFrames``): events the agent never got to see.
    """
    hi: dict[str, Any] = {"Queue": "High", "CollectedEvents": high.collected, "DroppedEvents": high.dropped}
    lo: dict[str, Any] = {"Queue": "Low", "CollectedEvents": low.collected, "DroppedEvents": low.dropped}
    hi["ExtraDetails"] = {
        "TooLargeEvents": str(high.too_large),
        "OperationalCollectedEvents": str(operational.collected),
        "OperationalDroppedEvents": str(operational.dropped),
        "OperationalTooLargeEvents": str(operational.too_large),
        "CaptureDroppedFrames": str(capture_dropped),
    }
    lo["ExtraDetails"] = {"TooLargeEvents": str(low.too_large)}
    return Event("DroppedEventsStatistics", "Periodic", "Operational", ts, (hi, lo))


def message_statistics(sent: int, under_4kb: int, failed: int, ts: float) -> Event:
    """A Periodic MessageStatistics (per interval: counters reset after each report)."""
    item = {"MessagesSent": sent, "MessagesUnder4KB": under_4kb, "TotalFailed": failed}
    return Event("MessageStatistics", "Periodic", "Operational", ts, (item,))


def diagnostic(severity: Severity, message: str, ts: float) -> Event:
    """A Triggered Diagnostic event about the agent itself (no process: ProcessId and ThreadId are 0)."""
    item = {"Severity": severity, "Message": message, "ProcessId": 0, "ThreadId": 0}
    return Event("Diagnostic", "Triggered", "Diagnostic", ts, (item,))
