"""The real iotedgedev expands the templates (base and layered) into deployments that validate against the official
schema: iotedgedev's own validation (served the official schema offline) and jsonschema's, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft4Validator

from leafguard import __version__
from tests.conftest import REPO
from tests.deploy.iotedgedev import REGISTRY, SCHEMAS, genconfig, repo_template, schema_proxy

PLATFORMS = ("amd64", "arm64v8")


def _deployment_schema() -> dict[str, Any]:
    return dict(json.loads((SCHEMAS / "azure-iot-edge-deployment-2.0.json").read_text()))


def _errors(doc: dict[str, Any]) -> list[str]:
    validator = Draft4Validator(_deployment_schema())
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_module_json_names_both_dockerfiles_and_the_package_version() -> None:
    spec = json.loads((REPO / "module" / "leafguard" / "module.json").read_text())
    image = spec["image"]
    assert image["tag"]["version"] == __version__, "module.json's image version follows leafguard.__version__"
    base = REPO / "module" / "leafguard"
    for platform in PLATFORMS:
        dockerfile = (base / image["tag"]["platforms"][platform]).resolve()
        assert dockerfile == REPO / f"Dockerfile.{platform}"
    assert (base / image["contextPath"]).resolve() == REPO


@pytest.mark.parametrize("platform", PLATFORMS)
def test_iotedgedev_expands_the_template_into_a_valid_deployment(tmp_path: Path, platform: str) -> None:
    with schema_proxy() as proxy:
        result = genconfig(repo_template("deployment.template.json"), platform, tmp_path, proxy)
    assert result.returncode == 0, result.output
    # iotedgedev fetched the official schema (through our loopback proxy) and its validation passed.
    assert "http://json.schemastore.org/azure-iot-edge-deployment-2.0" in proxy.requests
    assert "Deployment manifest schema validation passed" in result.output, result.output
    doc = result.manifest
    assert not _errors(doc)
    assert "$schema-template" not in doc
    module = doc["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["leafguard"]
    assert module["settings"]["image"] == f"{REGISTRY}/leafguard:{__version__}-{platform}"
    create = json.loads("".join(v for k, v in sorted(module["settings"].items()) if k.startswith("createOptions")))
    host = create["HostConfig"]
    assert host["NetworkMode"] == "host"
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == ["NET_RAW"], "least privilege: raw sockets only"
    assert host["ReadonlyRootfs"] is True
    assert host["Binds"] == ["/var/lib/leafguard:/var/lib/leafguard"]
    assert module["env"]["LEAFGUARD_DATA_DIR"]["value"] == "/var/lib/leafguard", "the one writable path"
    assert module["env"]["LEAFGUARD_INTERFACES"]["value"] == "eth1", "filled in from the solution's .env values"
    hub = doc["modulesContent"]["$edgeAgent"]["properties.desired"]["systemModules"]["edgeHub"]
    hub_create = json.loads(hub["settings"]["createOptions"])
    storage = hub["env"]["storageFolder"]["value"]
    binds = hub_create["HostConfig"]["Binds"]
    assert any(bind.split(":")[1] == storage for bind in binds), "edgeHub's store is on the host"


def test_iotedgedev_rejects_an_invalid_deployment(tmp_path: Path) -> None:
    """The validation above can fail: the same run on a template with a bad restart policy exits non-zero and names
    the property (iotedgedev would count it a pass if it could not fetch the schema)."""
    doc = json.loads(repo_template("deployment.template.json").read_text())
    doc["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["leafguard"]["restartPolicy"] = "sometimes"
    broken = tmp_path / "deployment.template.json"
    broken.write_text(json.dumps(doc))
    (tmp_path / "module").symlink_to(REPO / "module")
    with schema_proxy() as proxy:
        result = genconfig(broken, "amd64", tmp_path, proxy)
    assert result.returncode != 0
    assert "'sometimes' is not one of" in result.output and "restartPolicy" in result.output, result.output


def _merge_layer(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """What IoT Hub does with a layered deployment on a device: each ``properties.desired.a.b`` path of the layer is
    set on top of the base deployment's module twins."""
    merged = json.loads(json.dumps(base))
    for twin, patch in layer["content"]["modulesContent"].items():
        for path, value in patch.items():
            keys = path.split(".")
            assert keys[:2] == ["properties", "desired"] and len(keys) > 2, f"{twin}: a layer sets sub-paths: {path}"
            target = merged["modulesContent"].setdefault(twin, {}).setdefault("properties.desired", {})
            for key in keys[2:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
    return dict(merged)


def test_iotedgedev_expands_the_layered_deployment_and_it_validates_on_a_base(tmp_path: Path) -> None:
    with schema_proxy() as proxy:
        layered = genconfig(repo_template("deployment.layered.template.json"), "arm64v8", tmp_path / "l", proxy)
        base = genconfig(repo_template("deployment.template.json"), "arm64v8", tmp_path / "b", proxy)
    assert layered.returncode == 0, layered.output
    assert "createOptions of module leafguard validation passed" in layered.output, layered.output
    layer = layered.manifest
    assert layer["targetCondition"] == "tags.leafguard='enabled'" and layer["priority"] > 0
    content = layer["content"]["modulesContent"]
    module = content["$edgeAgent"]["properties.desired.modules.leafguard"]
    assert module["settings"]["image"] == f"{REGISTRY}/leafguard:{__version__}-arm64v8"
    assert isinstance(module["settings"]["createOptions"], str)
    # A base deployment without LeafGuard (only the runtime), with the layer applied, is a valid deployment; and it
    # deploys LeafGuard exactly as the base template does.
    runtime_only = json.loads(json.dumps(base.manifest))
    mc = runtime_only["modulesContent"]
    mc["$edgeAgent"]["properties.desired"]["modules"] = {}
    mc["$edgeHub"]["properties.desired"]["routes"] = {"upstream": "FROM /messages/* INTO $upstream"}
    del mc["leafguard"]
    merged = _merge_layer(runtime_only, layer)
    assert not _errors(merged), _errors(merged)
    full = base.manifest["modulesContent"]
    assert merged["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["leafguard"] == (
        full["$edgeAgent"]["properties.desired"]["modules"]["leafguard"]
    )
    routes = merged["modulesContent"]["$edgeHub"]["properties.desired"]["routes"]
    assert set(full["$edgeHub"]["properties.desired"]["routes"]) <= set(routes)
