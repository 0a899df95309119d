"""Calls into azure-iot-device, bounded on our side (``iothub-protocol.md`` §1.4, §7): shared by the gateway
module's transport and every managed leaf's link.

The SDK resolves its own futures from its threads and logs an error when one was cancelled under it, and twin
and connect calls have no timeout of their own. So a call is awaited for at most a timeout and never cancelled:
one we stop waiting for is kept until the SDK settles it, and closing the client lets those settle first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from azure.iot.device.exceptions import ClientError, OperationCancelled, OperationTimeout

log = logging.getLogger("leafguard.hub")
T = TypeVar("T")

SDK_ERRORS = (ClientError, OperationCancelled, OperationTimeout)
"""What azure-iot-device raises for a failed operation (the last two are not ClientErrors)."""
STABLE_CONNECTION_S = 10.0
"""A connection that lasted this long resets the backoff when it breaks; a shorter one backs off first."""
SDK_RECONNECT_GRACE_S = 3.0
"""How long a disconnect the SDK reports may last before we call the link lost: the SDK renews its SAS token
(every ~58 min by default) with a DISCONNECT and a CONNECT of its own, which is not an outage."""

BROKEN_DISCONNECT_S = 5.0
"""How long the disconnect after a broken link may take before the client is replaced by a new one: a client whose
paho network thread died of an exception (a TLS write racing the socket's close, azure-iot-sdk-python#989) still
says it is connected, never completes a disconnect and never connects again."""


class SdkCalls:
    """The SDK calls of one client: bounded, never cancelled, the abandoned ones kept until they settle."""

    def __init__(self, task_prefix: str, what: str) -> None:
        self._prefix = task_prefix
        self._what = what
        """Who the calls are for, in log lines (``the hub client``, ``leaf plc1``)."""
        self.abandoned: set[asyncio.Task[Any]] = set()

    async def call(self, call: Coroutine[Any, Any, T], timeout_s: float, name: str) -> T:
        """Await an SDK call (or a thread) for at most ``timeout_s`` (TimeoutError), never cancelling it."""
        task = asyncio.get_running_loop().create_task(call, name=f"{self._prefix}.{name}")
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(task)
        finally:
            self.keep(task)

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Keep a call we stopped waiting for until the SDK settles it (done, or cancelled by a disconnect)."""
        if task.done():
            self._settled(task)
            return
        self.abandoned.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self.abandoned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s: abandoned SDK call ended with %r", self._what, task.exception())

    async def disconnect_after_break(self, client: Any, timeout_s: float) -> bool:
        """Disconnect ``client`` after its link broke, for at most ``min(timeout_s, BROKEN_DISCONNECT_S)``; False
        when it could not (it is wedged) and was shut down instead: the caller creates a new client."""
        try:
            await self.call(client.disconnect(), min(timeout_s, BROKEN_DISCONNECT_S), "disconnect")
        except TimeoutError:
            log.warning("%s did not disconnect within %g s; replacing it", self._what, BROKEN_DISCONNECT_S)
            await self.shut_down(client, BROKEN_DISCONNECT_S)
            return False
        except SDK_ERRORS as exc:
            log.debug("%s: disconnect after a broken link: %r", self._what, exc)
        return True

    async def shut_down(self, client: Any, timeout_s: float) -> None:
        """Shut ``client`` down within ``timeout_s``; shutting down settles every call the SDK still held
        (cancelled), so those end first; whatever is left then is cancelled."""
        try:
            async with asyncio.timeout(timeout_s):
                await client.shutdown()
                if self.abandoned:
                    await asyncio.wait(set(self.abandoned))
        except (TimeoutError, *SDK_ERRORS) as exc:
            log.warning("%s: closing the client: %r", self._what, exc)
        for task in list(self.abandoned):
            task.cancel()
