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

The API, in short (docs/hub-emulator.md has the details):

* addresses: `host`, `hub_hostname`, `ca_pem`, `ca_file`, `http_url`, `workload_uri(device)`;
* identities: `add_device(id, parent=, edge=)`, `add_module(device, module)`, `identity(client_id)`,
  `connection_string(identity)`, `edge_environment(device, module)`, `local_dev_environment(module)`,
  `scope_to(edge_device)`;
* twins and messages: `await set_desired(identity, patch)`, `twin(identity)`, `messages(identity=None)`,
  `clear_messages()`, `await wait_for_messages(n, timeout_s)`, `await send_to_input(...)`, `await send_c2d(...)`,
  `await invoke_method(identity, name, payload)`, `answer_unsubscribed_twin_requests`;
* connections: `connections()`, `await wait_connected(identity, after=n)`, `await wait_until(predicate)`,
  `stats`;
* faults: `refuse_connections(code)` / `accept_connections()`, `drop_connection(identity=None)`,
  `stall_pubacks()` / `release_pubacks()`, `delay_pubacks(seconds)`, `fail_twin_requests(status, count)`,
  `await restart(downtime_s=0)`.

**Same loop, so never block it.** The emulator runs on the loop that started it. SDK calls that block the
calling thread until the hub answers (creating a client from the edge environment: HTTP to the workload API;
assigning a handler: connect + SUBSCRIBE, iothub-protocol.md §1.4) must run in a thread
(`asyncio.to_thread`) or they deadlock against the emulator; or start it with `HubEmulator.start(thread=True)`,
which gives it a loop of its own. The SDK's async methods are fine either way.
"""

from tests.hub_emulator.broker import ConnectionInfo, MethodResult, Stats
from tests.hub_emulator.emulator import DEFAULT_HUB_HOSTNAME, HubEmulator
from tests.hub_emulator.identities import Identity
from tests.hub_emulator.messages import ReceivedMessage

__all__ = [
    "DEFAULT_HUB_HOSTNAME",
    "ConnectionInfo",
    "HubEmulator",
    "Identity",
    "MethodResult",
    "ReceivedMessage",
    "Stats",
]
