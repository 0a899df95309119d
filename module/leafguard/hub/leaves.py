"""Leaf map entries: which leaves are *managed* (an IoT Hub device of their own) and through which twin.

A leaf map entry is either today's string (the leaf's twin identity; the leaf stays *unmanaged*: its messages
go out on the gateway's output ``security``) or an object::

    {"<MAC>": {"deviceId": "plc1", "identity": "module" | "device", "ip": "10.0.0.7"}}

``identity`` picks the leaf's twin: ``module`` (default) is the Defender convention, the leaf device's
``azureiotsecurity`` module; ``device`` is the leaf's device twin, for edge hubs that refuse module identities of
downstream devices. ``ip`` is informational (reported in the leaf's inventory). A leaf given as an object is
managed once credentials exist for its device id (:mod:`leafguard.hub.credentials`).
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from leafguard.errors import ConfigurationError

SECURITY_MODULE_ID = "azureiotsecurity"
"""The Defender for IoT security module of a device."""

# IoT Hub device ids: up to 128 characters of letters, digits and -.%_*?!(),:=@$' (IoT Hub identity registry).
DEVICE_ID = re.compile(r"^[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}$")
_ENTRY_KEYS = frozenset({"deviceId", "identity", "ip"})


class IdentityMode(enum.Enum):
    """Whose twin and connection a managed leaf uses."""

    MODULE = "module"
    """``<device>/azureiotsecurity`` (``IoTHubModuleClient``): the Defender convention."""
    DEVICE = "device"
    """The leaf's device twin (``IoTHubDeviceClient``)."""


@dataclass(frozen=True, slots=True)
class LeafEntry:
    """One leaf map entry, validated."""

    mac: str
    device_id: str
    mode: IdentityMode | None
    """None: a plain string entry (unmanaged), or an object without ``identity`` (the gateway-wide default)."""
    ip: str | None = None
    managed: bool = False
    """Given as an object: a candidate for its own client (managed once credentials exist)."""

    @classmethod
    def parse(cls, mac: str, value: object) -> LeafEntry:
        """``value`` is the map's value for the (canonical) ``mac``; ConfigurationError names what is wrong."""
        if isinstance(value, str):
            if not DEVICE_ID.match(value):
                raise ConfigurationError(f"leafMap: {value!r} (for {mac}) is not a valid device identity")
            return cls(mac, value, None)
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"leafMap: the entry for {mac} must be a device id or an object with deviceId")
        unknown = sorted(set(value) - _ENTRY_KEYS)
        if unknown:
            raise ConfigurationError(f"leafMap: {mac}: unknown key {unknown[0]!r} (deviceId, identity, ip are keys)")
        device_id = value.get("deviceId")
        if not isinstance(device_id, str) or not DEVICE_ID.match(device_id):
            raise ConfigurationError(f"leafMap: {mac}: deviceId {device_id!r} is not a valid device id")
        mode_text = value.get("identity")
        try:
            mode = None if mode_text is None else IdentityMode(mode_text)
        except ValueError:
            raise ConfigurationError(f"leafMap: {mac}: identity must be \"module\" or \"device\"") from None
        ip = value.get("ip")
        if ip is not None:
            try:
                ip = str(ipaddress.ip_address(ip if isinstance(ip, str) else ""))
            except ValueError:
                raise ConfigurationError(f"leafMap: {mac}: ip {ip!r} is not an IP address") from None
        return cls(mac, device_id, mode, ip, managed=True)

    def mode_or(self, default: IdentityMode) -> IdentityMode:
        return self.mode if self.mode is not None else default


def parse_identity_mode(value: object, where: str) -> IdentityMode:
    """A gateway-wide default identity mode (``"module"`` when absent)."""
    if value is None:
        return IdentityMode.MODULE
    try:
        return IdentityMode(value)
    except ValueError:
        raise ConfigurationError(f"{where} must be \"module\" or \"device\"") from None
