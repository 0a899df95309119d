"""A local IoT Hub / edgeHub emulator that the unmodified azure-iot-device 2.14 SDK connects to over TLS.

    async with HubEmulator.start() as hub:
        edge = hub.add_device("edge1", edge=True)
        module = hub.add_module(edge, "leafguard")
        leaf = hub.add_device("plc1", parent=edge)
        client = IoTHubDeviceClient.create_from_connection_string(
            hub.connection_string(leaf), server_verification_cert=hub.ca_pem)
        # or, for a module: os.environ.update(hub.edge_environment(module)) and then
        # await asyncio.to_thread(IoTHubModuleClient.create_from_edge_environment)
        ...
        await hub.set_desired(leaf, {"interval": 10})
        messages = await hub.wait_for_messages(1, timeout_s=5)

Each emulator owns one loopback address 127.0.0.x (the SDK's port 8883 is fixed), a throw-away CA and a server
certificate for that address, and an HTTP port with the workload API (trust bundle, sign) and the control API.

**Same loop, so never block it.** The emulator runs on the loop that started it. SDK calls that block the
calling thread until the hub answers (creating a client from the edge environment: HTTP to the workload API;
assigning a handler: connect + SUBSCRIBE, iothub-protocol.md §1.4) must run in a thread
(`asyncio.to_thread`) or they deadlock against the emulator. The SDK's async methods are fine.

See docs/hub-emulator.md for the in-process API, the faults and the standalone command.
"""

from tests.hub.broker import ConnectionInfo, MethodResult, Stats
from tests.hub.emulator import DEFAULT_HUB_HOSTNAME, HubEmulator
from tests.hub.identities import Identity
from tests.hub.messages import ReceivedMessage

__all__ = [
    "DEFAULT_HUB_HOSTNAME",
    "ConnectionInfo",
    "HubEmulator",
    "Identity",
    "MethodResult",
    "ReceivedMessage",
    "Stats",
]
