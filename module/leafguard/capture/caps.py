"""CAP_NET_RAW for a non-root process: raise a permitted capability into the effective set, once, at start.

The images run LeafGuard as an unprivileged user with CAP_NET_RAW as a *permitted-only* file capability on a
private copy of the interpreter (``setcap cap_net_raw=p``, see the Dockerfiles). The kernel then grants it on exec
only if the container's bounding set holds it (``CapAdd: ["NET_RAW"]``), but does not make it effective: the
process raises it itself, here. A permitted+effective file capability (``=ep``) would need no code, but when the
manifest lacks NET_RAW the kernel refuses to exec such a binary at all (the "capability-dumb binary" safety check of
capabilities(7)), and the operator would see a bare "operation not permitted" from the container runtime instead
of LeafGuard's one-line error naming the fix.

Capabilities are per thread, and new threads copy their creator's: this must run in the main thread before any
other thread starts (the event loop's executor, the capture threads, the SDK's threads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("leafguard.capture")

CAP_NET_RAW = 13
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def raise_permitted(cap: int = CAP_NET_RAW) -> bool:
    """Make ``cap`` effective in the calling thread if it is permitted; True when it is effective afterwards.

    Never raises: without the capability, opening the packet socket later fails with the one-line error."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_Data * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            return False
        word, bit = divmod(cap, 32)
        mask = 1 << bit
        if data[word].effective & mask:
            return True
        if not data[word].permitted & mask:
            return False
        data[word].effective |= mask
        if libc.capset(ctypes.byref(header), data) != 0:
            log.warning("could not raise capability %d: %s", cap, ctypes.get_errno())
            return False
        return True
    except (OSError, AttributeError):
        # Not Linux, or no capget/capset in libc: nothing to raise.
        return False
