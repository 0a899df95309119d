"""Running the real `iotedgedev solution genconfig` on the repository's templates, offline and contained.

iotedgedev validates what it generates against the schema it downloads from SchemaStore, and counts a failed
download as a pass (iothub-protocol.md §5.2). Here every HTTP(S) request it makes goes through a proxy on
loopback (``http_proxy``/``https_proxy``) that answers the SchemaStore URLs with the official schemas from
``../shared/schemas`` and refuses everything else, so its own validation really runs, and no traffic leaves the
machine. Its telemetry is switched off before the first run (a private ``HOME`` with ``collect_telemetry = no``).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, SHARED

SCHEMAS = SHARED / "schemas" / "iot-edge-deployment"
SCHEMA_URLS = {
    "http://json.schemastore.org/azure-iot-edge-deployment-2.0": "azure-iot-edge-deployment-2.0.json",
    "http://json.schemastore.org/azure-iot-edge-deployment-template-4.0": "azure-iot-edge-deployment-template-4.0.json",
}
REGISTRY = "plantregistry.azurecr.io"


def iotedgedev_command() -> list[str]:
    """The console script installed beside this interpreter (the `test` extra), or skip."""
    script = Path(sys.executable).parent / "iotedgedev"
    found = str(script) if script.exists() else shutil.which("iotedgedev")
    if found is None:
        pytest.skip("iotedgedev is not installed (pip install -e '.[test]' installs it)")
    return [found]


@dataclass
class SchemaProxy:
    """A forward proxy on loopback that serves only the official deployment schemas."""

    server: http.server.ThreadingHTTPServer
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"


@contextlib.contextmanager
def schema_proxy() -> Iterator[SchemaProxy]:
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent: the official IoT Edge schemas live there")
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            name = SCHEMA_URLS.get(self.path.rstrip("/"))
            if name is None:
                self.send_error(403, "only the IoT Edge deployment schemas are served here")
                return
            body = (SCHEMAS / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_CONNECT(self) -> None:
            seen.append(f"CONNECT {self.path}")
            self.send_error(403, "no tunnels")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="schema-proxy", daemon=True)
    thread.start()
    try:
        yield SchemaProxy(server, seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass(frozen=True)
class GenconfigResult:
    returncode: int
    output: str
    manifest_path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(json.loads(self.manifest_path.read_text()))


def genconfig(
    template: Path, platform: str, workdir: Path, proxy: SchemaProxy, *, env: dict[str, str] | None = None
) -> GenconfigResult:
    """`MODULES_PATH=module iotedgedev solution genconfig -f TEMPLATE -P PLATFORM --fail-on-validation-error`, the
    documented command, with the solution's ``.env`` values passed as environment."""
    home = workdir / "home"
    (home / ".iotedgedev").mkdir(parents=True, exist_ok=True)
    (home / ".iotedgedev" / "setting.ini").write_text("[DEFAULT]\nfirsttime = no\ncollect_telemetry = no\n")
    out_dir = workdir / "config"
    run_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "http_proxy": proxy.url,
        "https_proxy": proxy.url,
        "HTTP_PROXY": proxy.url,
        "HTTPS_PROXY": proxy.url,
        "no_proxy": "",
        "MODULES_PATH": "module",
        "CONFIG_OUTPUT_DIR": str(out_dir),
        "CONTAINER_REGISTRY_SERVER": REGISTRY,
        "CONTAINER_REGISTRY_USERNAME": "plantregistry",
        "LEAFGUARD_INTERFACES": "eth1",
        **(env or {}),
    }
    proc = subprocess.run(
        [*iotedgedev_command(), "solution", "genconfig", "-f", str(template), "-P", platform,
         "--fail-on-validation-error"],
        cwd=workdir, env=run_env, capture_output=True, text=True, timeout=120, check=False,
    )
    name = template.name.replace(".template.json", f".{platform}.json")
    return GenconfigResult(proc.returncode, proc.stdout + proc.stderr, out_dir / name)


def repo_template(name: str) -> Path:
    return REPO / name
