"""Wake waiters when state changes; each waiter re-checks its own predicate (a condition without a lock)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Notifier:
    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        """Callable from synchronous code on the loop, unlike asyncio.Condition.notify_all()."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Return once `predicate()` holds after some notify(); TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.add(waiter)
                try:
                    await waiter
                finally:
                    self._waiters.discard(waiter)
