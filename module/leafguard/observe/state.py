"""Per-MAC and per-conversation state records of the observation core."""

from __future__ import annotations

from leafguard.decode.frames import TCP_ACK, TCP_RST, TCP_SYN
from leafguard.decode.login import LoginTracker


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


class MacState:
    """Everything observed about one unicast MAC. Only MACs that qualify as leaves are reported."""

    __slots__ = (
        "any_ip",
        "bytes_in",
        "bytes_out",
        "created",
        "dhcp_hostname",
        "dhcp_prl",
        "dhcp_vendor_class",
        "dns_queries",
        "first_seen",
        "hostnames",
        "ips",
        "last_seen",
        "leaf_side",
        "mac",
        "packets_in",
        "packets_out",
        "services",
        "ssdp_server",
        "ssdp_usn",
        "tls_sni",
        "tls_versions",
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
        self.ips: dict[bytes, None] = {}
        self.hostnames: dict[str, None] = {}
        self.dhcp_hostname: str | None = None
        self.dhcp_vendor_class: str | None = None
        self.dhcp_prl: tuple[int, ...] = ()
        self.dns_queries: dict[str, None] = {}
        self.tls_sni: dict[str, None] = {}
        self.tls_versions: dict[int, None] = {}
        self.services: dict[tuple[str, int], None] = {}
        self.ssdp_server: str | None = None
        self.ssdp_usn: str | None = None


class Flow:
    """One TCP or UDP conversation. Side ``a`` initiated it (SYN sender, else first sender)."""

    __slots__ = (
        "a_ip",
        "a_is_lo",
        "a_mac",
        "a_port",
        "b_ip",
        "b_mac",
        "b_port",
        "b_seen",
        "bytes_ab",
        "bytes_ba",
        "first",
        "hello_checked",
        "last",
        "login",
        "login_budget",
        "nkey",
        "packets_ab",
        "packets_ba",
        "proto",
        "slow",
        "state",
    )

    def __init__(
        self,
        proto: int,
        a_ip: bytes,
        a_port: int,
        b_ip: bytes,
        b_port: int,
        a_mac: bytes | None,
        b_mac: bytes | None,
        ts: float,
    ) -> None:
        self.proto = proto
        self.a_ip = a_ip
        self.a_port = a_port
        self.b_ip = b_ip
        self.b_port = b_port
        self.a_mac = a_mac
        self.b_mac = b_mac
        self.packets_ab = 0
        self.bytes_ab = 0
        self.packets_ba = 0
        self.bytes_ba = 0
        self.first = ts
        self.last = ts
        self.state: str | None = None
        self.b_seen = False
        self.hello_checked = False
        self.login: LoginTracker | None = None
        self.login_budget = 0
        self.a_is_lo = True
        """Side ``a`` is the lower (address, port) endpoint of the conversation's key."""
        self.nkey: tuple[int, int] | None = None
        """The IPv4 conversation key as two integers (the bulk step's index), or None for IPv6."""
        self.slow = False
        """Its frames need the per-frame path: a login exchange on it is being followed."""

    def key(self) -> tuple[int, bytes, int, bytes, int]:
        """Its key in the conversation table: the protocol, then the lower (address, port) endpoint first."""
        if self.a_is_lo:
            return (self.proto, self.a_ip, self.a_port, self.b_ip, self.b_port)
        return (self.proto, self.b_ip, self.b_port, self.a_ip, self.a_port)

    def count(self, forward: bool, packets: int, nbytes: int, last: float) -> None:
        """Add frames sent by ``a`` (``forward``) or by ``b``."""
        if forward:
            self.packets_ab += packets
            self.bytes_ab += nbytes
        else:
            self.packets_ba += packets
            self.bytes_ba += nbytes
        self.last = max(self.last, last)


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
