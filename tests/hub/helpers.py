"""What the tests of the service in edge mode share: the module's identity, its environment, a running process."""

from __future__ import annotations

import asyncio
import os

from tests.hub_emulator import HubEmulator, Identity

MODULE = "edge1/leafguard"
"""The gateway module, as the emulator names its messages' sender."""


def service_env(hub: HubEmulator, module: Identity) -> dict[str, str]:
    """The environment of ``leafguard run`` as the IoT Edge runtime would start it against ``hub`` (and nothing of
    the caller's own ``IOTEDGE_``/``LEAFGUARD_`` variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTEDGE_", "LEAFGUARD_"))}
    return env | hub.edge_environment(module) | {"LEAFGUARD_REPORTED_INTERVAL_S": "0.3"}


class Running:
    """A service process whose stderr is collected as it runs."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.err: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="test.stderr")

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.err.append(line.decode(errors="replace"))

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.err)

    async def wait(self) -> int:
        code = await self.proc.wait()
        await self._reader
        return code
