"""Connection supervision, the pure part: the link states and a capped, jittered backoff."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable


class LinkState(enum.Enum):
    """The supervisor's states for one hub connection.

    DISCONNECTED → CONNECTING → CONNECTED; a failed attempt → BACKOFF → CONNECTING; a lost connection (the SDK
    says so, a send fails, or a send is not acknowledged within the send timeout) → DISCONNECTED.
    """

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"


class Backoff:
    """Exponential backoff with "full jitter" (a uniform draw below the capped exponential bound).

    ``next_delay()`` after ``n`` consecutive failures draws from ``[initial_s/2, min(max_s, initial_s·2ⁿ)]``;
    :meth:`reset` after a success. The lower bound keeps a fleet of gateways from hammering a hub that just came
    back, the cap keeps recovery within ``max_s`` of the hub's return.
    """

    def __init__(self, initial_s: float, max_s: float, rand: Callable[[], float] = random.random) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        self.initial_s = initial_s
        self.max_s = max_s
        self._rand = rand
        self.failures = 0

    def next_delay(self) -> float:
        bound = min(self.max_s, self.initial_s * 2.0 ** min(self.failures, 32))
        self.failures += 1
        low = self.initial_s / 2
        return low + (bound - low) * self._rand()

    def reset(self) -> None:
        self.failures = 0
