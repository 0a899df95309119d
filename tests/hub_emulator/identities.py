"""The identity registry: devices and modules with symmetric keys, generation ids and parent links."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field

from tests.hub_emulator.twins import Twin


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(slots=True, eq=False)
class Identity:
    device_id: str
    module_id: str | None = None
    primary_key: str = field(default_factory=new_key)
    secondary_key: str = field(default_factory=new_key)
    generation_id: str = field(default_factory=lambda: secrets.token_hex(8))
    parent: str | None = None
    """For a device: the device id of its parent (edge) device."""
    edge: bool = False
    """The device is an IoT Edge device (may have children and modules that use the workload API)."""
    twin: Twin = field(default_factory=Twin)

    @property
    def id(self) -> str:
        """The MQTT client id: `device` or `device/module`."""
        return self.device_id if self.module_id is None else f"{self.device_id}/{self.module_id}"

    @property
    def keys(self) -> list[str]:
        return [self.primary_key, self.secondary_key]

    def __repr__(self) -> str:
        return f"Identity({self.id!r})"


class RegistryError(Exception):
    """An identity is missing or already exists."""


class Registry:
    def __init__(self) -> None:
        self._identities: dict[str, Identity] = {}

    def add_device(self, device_id: str, *, parent: str | None = None, edge: bool = False,
                   primary_key: str | None = None, secondary_key: str | None = None) -> Identity:
        if "/" in device_id or not device_id:
            raise RegistryError(f"invalid device id {device_id!r}")
        if device_id in self._identities:
            raise RegistryError(f"device {device_id!r} already exists")
        if parent is not None and not self.get(parent).edge:
            raise RegistryError(f"parent {parent!r} is not an IoT Edge device")
        identity = Identity(device_id, parent=parent, edge=edge)
        if primary_key:
            identity.primary_key = primary_key
        if secondary_key:
            identity.secondary_key = secondary_key
        self._identities[device_id] = identity
        return identity

    def add_module(self, device_id: str, module_id: str, *, primary_key: str | None = None,
                   secondary_key: str | None = None) -> Identity:
        self.get(device_id)
        if "/" in module_id or not module_id:
            raise RegistryError(f"invalid module id {module_id!r}")
        identity = Identity(device_id, module_id)
        if identity.id in self._identities:
            raise RegistryError(f"module {identity.id!r} already exists")
        if primary_key:
            identity.primary_key = primary_key
        if secondary_key:
            identity.secondary_key = secondary_key
        self._identities[identity.id] = identity
        return identity

    def get(self, client_id: str) -> Identity:
        try:
            return self._identities[client_id]
        except KeyError:
            raise RegistryError(f"no identity {client_id!r}") from None

    def find(self, client_id: str) -> Identity | None:
        return self._identities.get(client_id)

    def find_casefold(self, client_id: str) -> Identity | None:
        """edgeHub compares token audiences with identities case-insensitively."""
        folded = client_id.casefold()
        return next((i for k, i in self._identities.items() if k.casefold() == folded), None)

    def all(self) -> list[Identity]:
        return list(self._identities.values())

    def children(self, device_id: str) -> list[Identity]:
        return [i for i in self._identities.values() if i.module_id is None and i.parent == device_id]
