"""`python -m tests.hub_emulator`: run the emulator standalone and print what a module or a leaf device needs.

    python -m tests.hub_emulator --edge-device edge1 --module leafguard --leaf plc1 --leaf cam1 --env-file hub.env

Stops on Ctrl-C or SIGTERM. The control API (see tests/hub_emulator/control.py) is printed with the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import shutil
import signal
import sys
from pathlib import Path

from tests.hub_emulator.emulator import DEFAULT_HUB_HOSTNAME, MQTT_PORT, HubEmulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.hub_emulator", description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="loopback address to serve on (default: the first free 127.0.0.x)")
    parser.add_argument("--hub-hostname", default=DEFAULT_HUB_HOSTNAME, help="the IoT Hub host name to emulate")
    parser.add_argument("--edge-device", default="edge1", help="the IoT Edge device id (default: edge1)")
    parser.add_argument("--module", action="append", default=[], help="module id on the edge device "
                        "(repeatable; default: leafguard)")
    parser.add_argument("--leaf", action="append", default=[], help="leaf device id, child of the edge device "
                        "(repeatable)")
    parser.add_argument("--http-port", type=int, default=0, help="workload + control API port (default: free)")
    parser.add_argument("--websockets", action="store_true", help="also serve MQTT over WebSocket on 443")
    parser.add_argument("--ca-out", type=Path, help="copy the CA certificate (PEM) to this path")
    parser.add_argument("--env-file", type=Path, help="write the module's environment to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    return parser


def _report(hub: HubEmulator, module_ids: list[str], leaf_ids: list[str], edge_id: str,
            ca_out: Path | None) -> tuple[str, dict[str, str]]:
    ca_file = hub.ca_file
    if ca_out is not None:
        shutil.copyfile(hub.ca_file, ca_out)
        ca_file = ca_out
    lines = [
        f"IoT Hub emulator for {hub.hub_hostname}",
        f"  MQTT over TLS   {hub.host}:{MQTT_PORT}" + (f"  (and wss://{hub.host}:443/$iothub/websocket)"
                                                     if hub.websockets else ""),
        f"  CA certificate  {ca_file}",
        f"  control API     {hub.http_url}/control",
        f"  workload API    {hub.workload_uri(edge_id)}",
        "",
    ]
    env: dict[str, str] = {}
    for module_id in module_ids:
        module_env = hub.edge_environment(edge_id, module_id)
        env = env or module_env
        lines.append(f"Module {edge_id}/{module_id}: the IoT Edge environment (the SDK's create_from_edge_environment)")
        lines += [f"  export {k}={shlex.quote(v)}" for k, v in module_env.items()]
        lines.append("  or the local-development pair:")
        dev = hub.local_dev_environment(f"{edge_id}/{module_id}")
        dev["EdgeModuleCACertificateFile"] = str(ca_file)
        lines += [f"  export {k}={shlex.quote(v)}" for k, v in dev.items()]
        lines.append("")
    for leaf_id in leaf_ids:
        lines.append(f"Leaf device {leaf_id} (child of {edge_id}; pass the CA as server_verification_cert):")
        lines.append(f"  {hub.connection_string(leaf_id)}")
    return "\n".join(lines), env


async def _main(args: argparse.Namespace) -> None:
    module_ids = args.module or ["leafguard"]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with HubEmulator.start(host=args.host, hub_hostname=args.hub_hostname, websockets=args.websockets,
                                 http_port=args.http_port) as hub:
        hub.add_device(args.edge_device, edge=True)
        for module_id in module_ids:
            hub.add_module(args.edge_device, module_id)
        for leaf_id in args.leaf:
            hub.add_device(leaf_id, parent=args.edge_device)
        text, env = _report(hub, module_ids, args.leaf, args.edge_device, args.ca_out)
        print(text, flush=True)
        if args.env_file is not None:
            args.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
            print(f"\nwrote {args.env_file}", flush=True)
        print("\nserving; Ctrl-C to stop", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("aiohttp").setLevel(logging.WARNING)
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
