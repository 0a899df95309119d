"""NIC vendor from the IEEE OUI registry (the copy maintained in the `netaddr` package).

netaddr parses its whole index with the csv module on first use (about 50 ms, a fifth of a short analysis);
the index is three integers per line (OUI, offset and size of the record in ``oui.txt``), which numpy reads in
a tenth of that. The record is then read and its organisation taken as netaddr does: the first record of the
OUI, the text after ``(hex)`` on its first line.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

_PACKAGE = "netaddr.eui"


@lru_cache(maxsize=1)
def _index() -> dict[int, tuple[int, int]]:
    raw = resources.files(_PACKAGE).joinpath("oui.idx").read_bytes()
    nums = np.fromstring(raw.strip().replace(b"\n", b","), dtype=np.int64, sep=",")
    rows = nums.reshape(-1, 3).tolist()
    index: dict[int, tuple[int, int]] = {}
    for oui, offset, size in rows:
        index.setdefault(oui, (offset, size))  # several records for one OUI: netaddr reports the first
    return index


@lru_cache(maxsize=4096)
def vendor_of(mac: str) -> str | None:
    """Registered organisation of the MAC's OUI, or ``None`` (unregistered, or not a MAC)."""
    digits = mac.replace(":", "").replace("-", "")
    if len(digits) != 12:
        return None
    try:
        oui = int(digits[:6], 16)
    except ValueError:
        return None
    at = _index().get(oui)
    if at is None:
        return None
    offset, size = at
    with resources.files(_PACKAGE).joinpath("oui.txt").open("rb") as fh:
        fh.seek(offset)
        record = fh.read(size).decode("utf-8")
    for raw_line in record.split("\n"):
        line = raw_line.strip()
        if "(hex)" in line:
            parts = line.split(None, 2)
            return parts[2] if len(parts) == 3 else None
    return None
