"""Muting: alerts of one type, of one leaf, or of one type for one leaf, dropped until a time (an expiry).

A rule set comes whole from the ``mute`` list of the gateway settings (module twin or ``gateway.json``), or one
rule at a time from the ``mute`` direct method (`parse_rule`). Each entry names ``type`` and/or ``mac`` and ends at
``until`` (epoch seconds) or ``forS`` seconds after it was applied; a rule without either is refused, so nothing is
muted for ever by mistake. Expiry is judged on the alert's own time (packet time: live, the wall clock).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from leafguard.detect.alerts import Alert
from leafguard.errors import ConfigurationError

ALERT_TYPES = frozenset(
    {
        "port_scan", "address_scan", "address_conflict", "arp_spoofing", "rogue_dhcp", "cleartext_login",
        "brute_force", "new_device", "new_peer", "new_service", "leaf_silent", "flood", "stealth_scan", "udp_scan",
        "icmp_sweep", "arp_sweep", "connection_brute_force", "nd_spoofing", "gateway_impersonation",
    }
)  # fmt: skip
MAX_RULES = 256
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True, slots=True)
class MuteRule:
    type: str | None
    """None: every type (for the leaf ``mac``)."""
    mac: str | None
    """None: every leaf (for alerts of ``type``)."""
    until_ts: float

    def matches(self, alert: Alert) -> bool:
        return (
            alert.ts < self.until_ts
            and (self.type is None or self.type == alert.type)
            and (self.mac is None or self.mac == alert.mac)
        )

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "mac": self.mac, "until": self.until_ts}


def parse_rule(entry: object, now: float) -> MuteRule:
    """One rule (``now``: the time ``forS`` counts from); ConfigurationError names what is wrong."""
    if not isinstance(entry, dict):
        raise ConfigurationError("a mute rule must be an object with type and/or mac, and until or forS")
    unknown = set(entry) - {"type", "mac", "until", "forS"}
    if unknown:
        raise ConfigurationError(f"mute: {', '.join(sorted(unknown))} is not a mute field (type, mac, until, forS)")
    kind, mac = entry.get("type"), entry.get("mac")
    if kind is not None and kind not in ALERT_TYPES:
        raise ConfigurationError(f"mute: {kind!r} is not an alert type")
    if mac is not None:
        if not isinstance(mac, str) or not _MAC.match(mac.lower().replace("-", ":")):
            raise ConfigurationError(f"mute: {mac!r} is not a MAC address")
        mac = mac.lower().replace("-", ":")
    if kind is None and mac is None:
        raise ConfigurationError("mute: a rule names a type, a mac, or both (muting everything is not a rule)")
    until, for_s = entry.get("until"), entry.get("forS")
    if (until is None) == (for_s is None):
        raise ConfigurationError("mute: give exactly one of until (epoch seconds) and forS (seconds from now)")
    value = until if until is not None else for_s
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError("mute: until and forS are numbers of seconds, more than 0")
    return MuteRule(kind, mac, float(value) if until is not None else now + float(value))


def parse_rules(section: object, now: float) -> tuple[MuteRule, ...]:
    """The whole ``mute`` list (validated as a whole: one bad rule rejects the list)."""
    if section is None:
        return ()
    if not isinstance(section, list):
        raise ConfigurationError("mute must be a list of rules")
    if len(section) > MAX_RULES:
        raise ConfigurationError(f"mute: at most {MAX_RULES} rules")
    return tuple(parse_rule(entry, now) for entry in section)


class Muting:
    """The rules in force, from two sources: the settings' ``mute`` list (replaced whole when it changes) and the
    ``mute`` method (added one at a time, a new rule for the same type and MAC replacing the old); counts what
    they dropped."""

    def __init__(self) -> None:
        self.configured: tuple[MuteRule, ...] = ()
        self.added: tuple[MuteRule, ...] = ()
        self.muted = 0

    @property
    def rules(self) -> tuple[MuteRule, ...]:
        return self.configured + self.added

    def set(self, rules: tuple[MuteRule, ...]) -> None:
        self.configured = rules

    def add(self, rule: MuteRule) -> None:
        kept = tuple(r for r in self.added if (r.type, r.mac) != (rule.type, rule.mac))
        if len(kept) >= MAX_RULES:
            raise ConfigurationError(f"mute: at most {MAX_RULES} rules")
        self.added = (*kept, rule)

    def drops(self, alert: Alert) -> bool:
        if (self.configured or self.added) and any(r.matches(alert) for r in self.rules):
            self.muted += 1
            return True
        return False

    def in_force(self, now: float) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.rules if r.until_ts > now]
