"""The deployment template validates against the official IoT Edge template schema, and its settings select edge
mode; what the real iotedgedev makes of it is tested in test_iotedgedev.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft4Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from leafguard.cli import _parser
from leafguard.hub.settings import EDGE_ENV
from leafguard.service.settings import ServiceSettings
from tests.conftest import REPO, SHARED

SCHEMAS = SHARED / "schemas" / "iot-edge-deployment"


def _schema(name: str) -> dict[str, Any]:
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent")
    return dict(json.loads((SCHEMAS / name).read_text()))


def _registry() -> Registry:
    registry: Registry = Registry()
    for path in SCHEMAS.glob("*.json"):
        resource = Resource.from_contents(json.loads(path.read_text()), default_specification=DRAFT4)
        registry = registry.with_resource(path.name, resource)
    return registry


def _template() -> dict[str, Any]:
    return dict(json.loads((REPO / "deployment.template.json").read_text()))


def test_template_validates_against_the_template_schema() -> None:
    schema = _schema("azure-iot-edge-deployment-template-4.0.json")
    validator = Draft4Validator(schema, registry=_registry())
    errors = sorted(validator.iter_errors(_template()), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_routes_send_the_module_outputs_upstream() -> None:
    routes = _template()["modulesContent"]["$edgeHub"]["properties.desired"]["routes"]
    assert any("/outputs/security" in r and "$upstream" in r for r in routes.values())


def test_the_deployed_module_runs_in_edge_mode() -> None:
    """The manifest's environment, plus what the IoT Edge runtime sets for every module, must select edge mode
    (a local folder in the environment would keep every message on the gateway's disk)."""
    module = _template()["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["leafguard"]
    env = {name: spec["value"] for name, spec in module["env"].items()}
    env["LEAFGUARD_INTERFACES"] = "eth1"  # the template's placeholder, as iotedgedev fills it from .env
    env.update(
        IOTEDGE_IOTHUBHOSTNAME="plant-hub.azure-devices.net",
        IOTEDGE_DEVICEID="gateway-7",
        IOTEDGE_MODULEID="leafguard",
        IOTEDGE_GATEWAYHOSTNAME="gateway-7",
        IOTEDGE_MODULEGENERATIONID="638000000000000000",
        IOTEDGE_WORKLOADURI="unix:///var/run/iotedge/workload.sock",
        IOTEDGE_APIVERSION="2019-11-05",
    )
    assert set(EDGE_ENV) <= set(env)
    args = _parser().parse_args(["run"])  # the images' ENTRYPOINT, with no flags
    settings = ServiceSettings.from_args(args, env)
    assert settings.local_dir is None and settings.edge is not None
    assert settings.interfaces == ("eth1",)


def test_dockerfiles_install_the_package_and_run_the_service() -> None:
    for arch in ("amd64", "arm64v8"):
        text = (REPO / f"Dockerfile.{arch}").read_text()
        assert "pip install --no-cache-dir ." in text
        assert 'ENTRYPOINT ["/usr/local/bin/leafguard-python", "-m", "leafguard", "run"]' in text
