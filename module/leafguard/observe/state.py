"""Per-MAC and per-conversation state records of the observation core."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from leafguard.decode.frames import TCP_ACK, TCP_RST, TCP_SYN


def tcp_next_state(state: str, forward: bool, flags: int) -> str:
    """A conversation's TCP state (``S0``, ``REJ``, ``EST``, ``CLOSED`` or ``OTHER``) after a segment with SYN,
    FIN or RST from ``a`` (``forward``) or ``b``."""
    if flags & TCP_SYN:
        if flags & TCP_ACK:
            if not forward and state in ("S0", "REJ"):
                return "EST"
        elif forward and state in ("CLOSED", "REJ"):
            return "S0"  # the 5-tuple is reused by a new connection
    elif flags & TCP_RST:
        if state == "S0" and not forward:
            return "REJ"
        if state == "EST":
            return "CLOSED"
    elif state == "EST":
        return "CLOSED"
    return state


NONE_YET: Mapping[Any, None] = MappingProxyType({})
"""What every name, version and service set of `MacDetails` starts as: one read-only empty mapping for all of them
(an empty dict is 64 bytes, and most MACs never get most of the sets); the ``own_*`` methods give the MAC a dict of
its own on its first write, and a write that bypassed them would fail rather than land in every MAC's set."""


class MacDetails:
    """What a MAC's own traffic says about it (DHCP, SSDP, names, TLS, services), apart from the counters every MAC
    has: a flood's or a scan's MACs, the ones that fill a table, never say any of it. Every MAC starts with the one
    shared `NOTHING_SAID`, and gets a record of its own (`MacState.own_details`) on its first write.

    The sets (insertion-ordered, as dict keys) are read as mappings and written through the ``own_*`` methods."""

    __slots__ = (
        "dhcp_hostname",
        "dhcp_prl",
        "dhcp_vendor_class",
        "dns_queries",
        "hostnames",
        "services",
        "ssdp_server",
        "ssdp_usn",
        "tls_sni",
        "tls_versions",
    )

    def __init__(self) -> None:
        self.hostnames: Mapping[str, None] = NONE_YET
        self.dhcp_hostname: str | None = None
        self.dhcp_vendor_class: str | None = None
        self.dhcp_prl: tuple[int, ...] = ()
        self.dns_queries: Mapping[str, None] = NONE_YET
        self.tls_sni: Mapping[str, None] = NONE_YET
        self.tls_versions: Mapping[int, None] = NONE_YET
        self.services: Mapping[tuple[str, int], None] = NONE_YET
        self.ssdp_server: str | None = None
        self.ssdp_usn: str | None = None

    # The writable sets: the MAC's own dict, made on the first write (the shared empty one is never written).

    def own_hostnames(self) -> dict[str, None]:
        d = self.hostnames
        if isinstance(d, dict):
            return d
        d = self.hostnames = {}
        return d

    def own_dns_queries(self) -> dict[str, None]:
        d = self.dns_queries
        if isinstance(d, dict):
            return d
        d = self.dns_queries = {}
        return d

    def own_tls_sni(self) -> dict[str, None]:
        d = self.tls_sni
        if isinstance(d, dict):
            return d
        d = self.tls_sni = {}
        return d

    def own_tls_versions(self) -> dict[int, None]:
        d = self.tls_versions
        if isinstance(d, dict):
            return d
        d = self.tls_versions = {}
        return d

    def own_services(self) -> dict[tuple[str, int], None]:
        d = self.services
        if isinstance(d, dict):
            return d
        d = self.services = {}
        return d


class _NothingSaid(MacDetails):
    """The details of a MAC that has said nothing yet, shared by all of them: it refuses every write."""

    __slots__ = ()

    def __init__(self) -> None:
        empty = MacDetails()
        for name in MacDetails.__slots__:
            object.__setattr__(self, name, getattr(empty, name))

    def __setattr__(self, name: str, value: object) -> None:
        raise TypeError(f"NOTHING_SAID is shared by every MAC: {name} is written to the MAC's own details")


NOTHING_SAID: MacDetails = _NothingSaid()


class MacState:
    """Everything observed about one unicast MAC. Only MACs that qualify as leaves are reported.

    ``ips`` (32 at most, nearly always one) is a tuple: 48 bytes for one address where a dict is 224."""

    __slots__ = (
        "any_ip",
        "bytes_in",
        "bytes_out",
        "created",
        "details",
        "first_seen",
        "ips",
        "last_seen",
        "leaf_side",
        "mac",
        "packets_in",
        "packets_out",
        "touched",
    )

    def __init__(self, mac: bytes) -> None:
        self.mac = mac
        self.packets_out = 0
        self.bytes_out = 0
        self.packets_in = 0
        self.bytes_in = 0
        self.first_seen = 0.0
        self.last_seen = 0.0
        self.touched = 0.0
        """Last time the MAC was seen in any role (eviction order)."""
        self.created = 0.0
        """When the MAC table took it in (eviction order)."""
        self.any_ip = False
        """It has sent a frame carrying an address of its own."""
        self.leaf_side = False
        """One of those addresses is on the leaf side."""
        self.ips: tuple[bytes, ...] = ()
        self.details = NOTHING_SAID
        """Read here; written through `own_details`."""

    def own_details(self) -> MacDetails:
        """The MAC's own `details`, made on the first write."""
        d = self.details
        if d is NOTHING_SAID:
            d = self.details = MacDetails()
        return d


TCP_STATES: tuple[str | None, ...] = (None, "S0", "REJ", "EST", "CLOSED", "OTHER")
"""A conversation's TCP state as the conversation table stores it: the index of its name (0: a UDP conversation)."""
STATE_CODE = {name: code for code, name in enumerate(TCP_STATES) if name is not None}


def _next_codes() -> list[int]:
    table = [0] * (len(TCP_STATES) << 9)
    for code, name in enumerate(TCP_STATES):
        if name is None:
            continue
        for forward in (False, True):
            for flags in range(256):
                table[(code << 9) | (forward << 8) | flags] = STATE_CODE[tcp_next_state(name, forward, flags)]
    return table


NEXT_STATE = _next_codes()
"""`tcp_next_state` by state code: ``NEXT_STATE[code << 9 | forward << 8 | flags]`` (one list lookup per segment)."""


class Flow(NamedTuple):
    """One TCP or UDP conversation as the conversation table has it at one moment (the table keeps conversations
    in columns, `observe.conversations`; this record is made for the report and the observations). Side ``a``
    initiated it (SYN sender, else first sender). A named tuple: the report makes one per conversation, and a
    tuple is made several times faster than a frozen dataclass."""

    proto: int
    a_ip: bytes
    a_port: int
    b_ip: bytes
    b_port: int
    a_mac: bytes | None
    b_mac: bytes | None
    packets_ab: int
    bytes_ab: int
    packets_ba: int
    bytes_ba: int
    first: float
    last: float
    state: str | None


class CaptureStats:
    """Counters of the input and of what the caps gave up (the report's ``capture`` section)."""

    __slots__ = (
        "bytes",
        "decode_errors",
        "evicted_flows",
        "evicted_macs",
        "evicted_names",
        "files",
        "first_ts",
        "last_ts",
        "link_types",
        "observations_dropped",
        "packets",
        "truncated",
    )

    def __init__(self) -> None:
        self.files: list[str] = []
        self.packets = 0
        self.bytes = 0
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.link_types: dict[str, None] = {}
        self.decode_errors = 0
        self.truncated = 0
        self.evicted_flows = 0
        self.evicted_macs = 0
        self.evicted_names = 0
        self.observations_dropped = 0
