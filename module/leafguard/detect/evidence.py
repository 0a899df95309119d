"""Evidence: what the observation core hands the detectors, one small typed record per kind.

The core records evidence while it walks a batch and counts in bulk; the detectors consume a batch's evidence
sorted by packet time (`Detectors.process`), dispatching on the record's type. Among records of the same packet
time, ``rank`` orders the kinds (and then the fields), so that equal-time evidence is consumed in the same order
however it was collected. Addresses and MACs are raw bytes, as the core holds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass(frozen=True, slots=True)
class SynSent:
    """A TCP connection attempt (a SYN without ACK) opened a conversation."""

    rank: ClassVar[int] = 0
    ts: float
    src_ip: bytes
    dst_ip: bytes
    dst_port: int
    src_mac: bytes | None


@dataclass(frozen=True, slots=True)
class AddressSeen:
    """A leaf-side address was the source of a frame from ``mac`` (the first time in the batch)."""

    rank: ClassVar[int] = 1
    ts: float
    ip: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class DhcpServerReply:
    """A DHCP server's BOOTREPLY from the leaf side."""

    rank: ClassVar[int] = 2
    ts: float
    server_mac: bytes
    server_ip: bytes


@dataclass(frozen=True, slots=True)
class LoginResult:
    """A cleartext login exchange's outcome."""

    rank: ClassVar[int] = 3
    ts: float
    leaf_mac: bytes | None
    protocol: str
    client_ip: bytes
    server_ip: bytes
    server_port: int
    user: str
    """The user name, or "" when the exchange did not show one."""
    result: str


@dataclass(frozen=True, slots=True)
class ArpClaim:
    """An ARP packet in which ``mac`` announces ``ip`` as its own."""

    rank: ClassVar[int] = 4
    ts: float
    ip: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class ArpAsk:
    """An ARP request in which ``mac`` asks who has ``ip``."""

    rank: ClassVar[int] = 5
    ts: float
    ip: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class NewLeaf:
    """A leaf seen for the first time (``ts``: its first frame); only while a learned baseline is kept."""

    rank: ClassVar[int] = 6
    ts: float
    mac: bytes
    ips: str
    """Its addresses as text, comma-separated."""
    vendor: str
    """The vendor its MAC's OUI names, or ""."""


@dataclass(frozen=True, slots=True)
class ConversationOpened:
    """A leaf opened a conversation; only while a learned baseline is kept."""

    rank: ClassVar[int] = 7
    ts: float
    leaf_mac: bytes
    peer_ip: bytes
    peer_port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class ServiceOffered:
    """A leaf offers a service for the first time; only while a learned baseline is kept."""

    rank: ClassVar[int] = 8
    ts: float
    leaf_mac: bytes
    protocol: str
    port: int


@dataclass(frozen=True, slots=True)
class LeafSilent:
    """A leaf sent nothing for ``silent_after_s`` after ``last_seen`` (``ts``: the end of that time)."""

    rank: ClassVar[int] = 9
    ts: float
    leaf_mac: bytes
    last_seen: float
    silent_after_s: float


@dataclass(frozen=True, slots=True)
class FloodSeen:
    """A leaf sent (or received) more than ``frames`` in one window."""

    rank: ClassVar[int] = 10
    ts: float
    leaf_mac: bytes
    frames: int
    window_start: float
    window_s: float
    rate_per_s: float
    direction: Literal["sent", "received"]


Evidence = (
    SynSent | AddressSeen | DhcpServerReply | LoginResult | ArpClaim | ArpAsk | NewLeaf | ConversationOpened
    | ServiceOffered | LeafSilent | FloodSeen
)
