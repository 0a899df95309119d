"""Settings of the observation core: the leaf side and the caps that keep its state bounded."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from leafguard.detect.thresholds import Thresholds
from leafguard.errors import ConfigurationError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True, slots=True)
class AnalyzerSettings:
    leaf_nets: tuple[Network, ...] = ()
    """Addresses on the leaf side. Empty: private, link-local and ULA addresses (RFC 1918, 3927, 4193)."""
    gateway_macs: frozenset[str] = field(default_factory=frozenset)
    """The gateway's own MACs, never reported as leaves."""
    max_flows: int = 200_000
    max_macs: int = 20_000
    max_names_per_leaf: int = 256
    """Cap of each per-leaf name list (DNS queries, TLS SNI, hostnames)."""
    max_services_per_leaf: int = 256
    max_ips_per_leaf: int = 32
    max_fragments: int = 4096
    idle_flow_s: float = 300.0
    """A flow quiet for this long is preferred for eviction when the flow table is full."""
    learning_period_s: float | None = None
    """Leaves first seen this long after the first frame raise a ``new_device`` alert; None: no learning."""
    silent_after_s: float | None = None
    """A leaf that sends nothing for this long raises a ``leaf_silent`` alert; None: not watched."""
    flood_rate_per_s: float | None = None
    """A leaf that sends more frames than this per second, over a 10 s window, raises a ``flood`` alert."""
    thresholds: Thresholds = field(default_factory=Thresholds)
    """Counts and windows of the scan, sweep, brute-force and impersonation rules (`detect.thresholds`)."""

    def __post_init__(self) -> None:
        for name in ("max_flows", "max_macs", "max_names_per_leaf", "max_services_per_leaf", "max_ips_per_leaf"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1")
        if self.learning_period_s is not None and not self.learning_period_s >= 0:
            raise ConfigurationError("the learning period must be a number of seconds, 0 or more")
        if self.silent_after_s is not None and not self.silent_after_s > 0:
            raise ConfigurationError("the silence time must be a number of seconds, more than 0")
        if self.flood_rate_per_s is not None and not self.flood_rate_per_s > 0:
            raise ConfigurationError("the flood rate must be a number of frames per second, more than 0")
        for mac in self.gateway_macs:
            if not _MAC.fullmatch(mac):
                raise ConfigurationError(f"gateway MAC {mac!r} is not six colon-separated hex bytes")

    @classmethod
    def from_cli(
        cls,
        leaf_nets: list[str] | None,
        gateway_macs: list[str] | None = None,
        learning_period_s: float | None = None,
        silent_after_s: float | None = None,
        flood_rate_per_s: float | None = None,
    ) -> AnalyzerSettings:
        nets: list[Network] = []
        for text in leaf_nets or []:
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise ConfigurationError(f"--leaf-net {text!r} is not a CIDR network: {exc}") from exc
        return cls(
            leaf_nets=tuple(nets),
            gateway_macs=frozenset(m.lower().replace("-", ":") for m in gateway_macs or []),
            learning_period_s=learning_period_s,
            silent_after_s=silent_after_s,
            flood_rate_per_s=flood_rate_per_s,
        )
