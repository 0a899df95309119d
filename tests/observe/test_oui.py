"""The vendor lookup reads netaddr's registry files itself; netaddr's own lookup is the oracle."""

from __future__ import annotations

import random

import netaddr
import pytest

from leafguard.observe.oui import vendor_of


def _netaddr_vendor(mac: str) -> str | None:
    try:
        return str(netaddr.EUI(mac).oui.registration().org)
    except (netaddr.NotRegisteredError, netaddr.AddrFormatError, IndexError):
        return None


def test_every_registered_oui_names_the_same_organisation_as_netaddr() -> None:
    from netaddr.eui import ieee

    rng = random.Random(7)
    ouis = sorted(ieee.OUI_INDEX)
    assert len(ouis) > 30_000
    for oui in ouis:
        mac = f"{oui:06x}{rng.randrange(1 << 24):06x}"
        mac = ":".join(mac[i : i + 2] for i in range(0, 12, 2))
        assert vendor_of(mac) == _netaddr_vendor(mac), mac


@pytest.mark.parametrize("mac", ["02:00:00:00:00:01", "ff:ff:ff:ff:ff:ff", "zz:00:00:00:00:00", "00:11"])
def test_unregistered_or_invalid_is_none(mac: str) -> None:
    assert vendor_of(mac) is None
    assert _netaddr_vendor(mac) is None
