"""NIC vendor from the IEEE OUI registry (the copy maintained in the `netaddr` package)."""

from __future__ import annotations

from functools import lru_cache

import netaddr


@lru_cache(maxsize=4096)
def vendor_of(mac: str) -> str | None:
    """Registered organisation of the MAC's OUI, or ``None`` (unregistered or locally administered)."""
    try:
        return str(netaddr.EUI(mac).oui.registration().org)
    except (netaddr.NotRegisteredError, netaddr.AddrFormatError, IndexError):
        return None
