"""`python -m tests.hub_emulator`: run the emulator standalone and print what a module or a leaf device needs.

    python -m tests.hub_emulator --edge-device edge1 --module leafguard --leaf plc1 --leaf cam1 --env-file hub.env
    python -m tests.hub_emulator --daemon --env-file hub.env      # returns once hub.env is written (pid in hub.pid)
    python -m tests.hub_emulator --show                           # what arrived, per leaf (reads hub.env's URL)

Stops on Ctrl-C or SIGTERM. The control API (see tests/hub_emulator/control.py) is printed with the rest.
Run it from the repository root: ``tests`` is not installed by ``pip install .``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.hub_emulator.emulator import DEFAULT_HUB_HOSTNAME, MQTT_PORT, HubEmulator

CONTROL_ENV = "HUB_EMULATOR_CONTROL_URL"
"""Written into the env file beside the ``IOTEDGE_*`` variables: where ``--show`` (and curl) find the emulator."""


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
    parser.add_argument("--daemon", action="store_true", help="serve in the background; return once the env "
                        "file is written (so `. ./hub.env` right after never races it)")
    parser.add_argument("--pid-file", type=Path, default=Path("hub.pid"), help="with --daemon: the server's pid "
                        "(default: hub.pid; stop it with kill \"$(cat hub.pid)\")")
    parser.add_argument("--log-file", type=Path, help="with --daemon: where the server logs (default: nowhere)")
    parser.add_argument("--show", action="store_true", help="print what a running emulator received, per leaf, "
                        f"and exit (its control URL from ${CONTROL_ENV}, which the env file sets)")
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


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """Shell-quoted ``NAME=value`` lines, renamed into place: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    tmp.replace(path)


async def _main(args: argparse.Namespace, ready: Callable[[str], None] | None = None) -> None:
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
        if args.env_file is not None:
            write_env_file(args.env_file, env | {CONTROL_ENV: f"{hub.http_url}/control"})
            text += f"\nwrote {args.env_file}"
        if ready is not None:
            ready(text)
        else:
            print(text, flush=True)
            print("\nserving; Ctrl-C to stop", flush=True)
        await stop.wait()


def _daemon(args: argparse.Namespace) -> int:
    """Fork; the child serves in its own session, the parent returns once the child has written the env file
    (it hands the report over a pipe: no polling, no race)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()

        def ready(text: str) -> None:
            args.pid_file.write_text(f"{os.getpid()}\n")
            with os.fdopen(write_fd, "w") as pipe:
                pipe.write(text)
            log_fd = os.open(args.log_file or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            for fd in (1, 2):
                os.dup2(log_fd, fd)
            os.close(log_fd)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)

        code = 0
        try:
            asyncio.run(_main(args, ready))
        except BaseException:
            logging.getLogger("tests.hub_emulator").exception("emulator failed")
            code = 1
        finally:
            with contextlib.suppress(OSError):
                if args.pid_file.read_text().strip() == str(os.getpid()):
                    args.pid_file.unlink()
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        text = pipe.read()
    if not text:
        _, status = os.waitpid(pid, 0)
        print(f"hub emulator failed to start (exit status {os.waitstatus_to_exitcode(status)})", file=sys.stderr)
        return 1
    print(text)
    print(f"serving in the background as pid {pid} ({args.pid_file}); stop it with: kill \"$(cat {args.pid_file})\"",
          flush=True)
    return 0


def show(control_url: str) -> str:
    """What the emulator received: every security message's events by type, per leaf, and LeafGuard's alerts."""
    from leafguard.agent.summary import format_message_summary, summarize_messages

    with urllib.request.urlopen(f"{control_url}/messages?limit=100000", timeout=10) as response:
        found = json.load(response)["messages"]
    security = [(m["properties"].get("leafIdentity") or m["identity"], json.loads(m["body"]))
                for m in found if m["system"].get("$.ifid") == "urn:azureiot:Security:SecurityAgent:1"]
    # An alert message carries a JSON array of alerts (LeafGuard batches them).
    bodies = [json.loads(m["body"]) for m in found if m["system"].get("$.on") == "alerts"]
    alerts = [a for b in bodies for a in (b if isinstance(b, list) else [b])]
    lines = [f"{len(found)} messages received at {control_url}"]
    lines.append(format_message_summary(summarize_messages(security)))
    if alerts:
        lines.append(f"LeafGuard alerts (output alerts): {len(alerts)} in {len(bodies)} messages")
        lines += [f"  {a.get('type', '?'):<18} {a.get('severity', '?'):<8} {a.get('mac', '-')}  {a.get('summary', '')}"
                  for a in alerts[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("aiohttp").setLevel(logging.WARNING)
    if args.show:
        url = os.environ.get(CONTROL_ENV)
        if not url:
            print(f"--show needs ${CONTROL_ENV} (set -a; . ./hub.env; set +a)", file=sys.stderr)
            return 2
        print(show(url))
        return 0
    if args.daemon:
        return _daemon(args)
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
