"""Records that leave the observation core.

The observer turns frames into state (leaves, conversations) and into a stream of *observations*: small frozen
records about one leaf that the per-leaf Defender agent turns into security events. Times are packet times in
epoch seconds; addresses are strings; MACs are lower-case and colon-separated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

Direction = Literal["In", "Out"]
"""From the leaf's point of view: ``Out`` when the leaf initiated, ``In`` when the peer did."""

Transport = Literal["tcp", "udp"]


class ConnectionSeen(NamedTuple):
    """A new TCP or UDP conversation in which a leaf takes part (one per conversation, at its first packet).

    A named tuple, not a frozen dataclass like the other records: one is made per leaf side of every new
    conversation, and a frozen dataclass of ten fields took five times as long to build."""

    ts: float
    leaf_mac: str
    direction: Direction
    protocol: Transport
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    tcp_state: str
    """Conversation state when observed: ``S0``, ``REJ``, ``EST``, ``CLOSED`` or ``OTHER``."""
    bytes_seen: int
    """Frame bytes of the conversation seen so far (both directions)."""


@dataclass(frozen=True, slots=True)
class LoginSeen:
    """A cleartext login exchange to or from a leaf (telnet, FTP, HTTP Basic, MQTT CONNECT)."""

    ts: float
    leaf_mac: str
    protocol: Literal["telnet", "ftp", "http", "mqtt"]
    direction: Direction
    """``In``: a peer logged in to the leaf; ``Out``: the leaf logged in to a peer."""
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    user: str | None
    result: Literal["Success", "Fail"]
    reply_code: str | None = None
    """The server's answer that decided the result (FTP reply code, HTTP status, MQTT CONNACK code)."""


@dataclass(frozen=True, slots=True)
class Service:
    """A service a leaf offers, inferred passively (it sent a SYN-ACK, or a UDP reply from that port)."""

    protocol: Transport
    port: int


@dataclass(frozen=True, slots=True)
class LeafView:
    """A read-only snapshot of one leaf's inventory, for periodic events (ListeningPorts, SystemInformation)."""

    mac: str
    ips: tuple[str, ...]
    vendor: str | None
    hostnames: tuple[str, ...]
    dhcp_hostname: str | None
    dhcp_vendor_class: str | None
    dhcp_param_request_list: tuple[int, ...]
    randomized_mac: bool
    first_seen: float
    last_seen: float
    services: tuple[Service, ...]
    os_name: str | None = None
    """Only set when a fingerprint supports it (for example a DHCP vendor class naming the OS); never guessed."""
    os_vendor: str | None = None
    os_version: str | None = None


Observation = ConnectionSeen | LoginSeen


def identity_for_mac(mac: str) -> str:
    """The twin identity of a leaf that the leaf map does not name: ``leaf-`` and its MAC's 12 hex digits."""
    return "leaf-" + mac.replace(":", "").lower()
