"""Polling: for what has no event to wait on (a file a service rewrites, an emulator's state, a counter)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def until(
    predicate: Callable[[], Any],
    *,
    interval_s: float = 0.05,
    timeout_s: float | None = None,
    ignoring: tuple[type[Exception], ...] = (),
) -> Any:
    """Poll ``predicate`` on the loop until it returns something truthy (a coroutine's result counts: pass
    ``lambda: asyncio.to_thread(blocking)`` for a blocking check) and return that. An exception of ``ignoring``
    counts as not yet (a server not listening yet). Bound the wait with ``timeout_s`` (then an AssertionError) or
    with ``asyncio.timeout`` around the call."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            got = predicate()
            if asyncio.iscoroutine(got):
                got = await got
        except ignoring:
            got = None
        if got:
            return got
        if deadline is not None and time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s:g} s")
        await asyncio.sleep(interval_s)


def wait_for(what: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.1) -> Any:
    """Poll ``what`` until it returns something truthy and return that, for code without a loop. A file that is
    missing or half-written meanwhile (OSError, ValueError, KeyError while reading it) counts as not yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            got = what()
        except (OSError, ValueError, KeyError):
            got = None
        if got:
            return got
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s")
