"""Least privilege, proven with the kernel: `leafguard run` captures with CAP_NET_RAW and nothing else, as root with
every other capability dropped (the manifest's ``CapDrop: ALL`` + ``CapAdd: NET_RAW``) and as an unprivileged user
through the images' permitted-only file capability on a copy of the interpreter; without NET_RAW it stops with the
one-line error naming the fix.

Each run happens in a network namespace this test creates (a veth pair; the leaf sends a bounded burst of UDP to
the gateway side); `setpriv` sets the capability bounding set, the user and the inheritable set, as Docker does for
a container, `setcap` sets the file capability as the Dockerfiles do, and `/proc/PID/status` shows what the process
really holds. The unprivileged user cannot reach this machine's interpreter under /root (mode 0700), so those runs
get a private mount namespace in which /root is a traversable directory holding only the interpreter tree.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from leafguard.capture.live import cap_net_raw_message
from testkit.netns import Lab, Netns, needs_root
from testkit.wait import wait_for
from tests.conftest import REPO

pytestmark = [
    pytest.mark.netns,
    needs_root,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("setpriv", "setcap", "capsh", "unshare")),
        reason="needs setpriv and unshare (util-linux), setcap and capsh (libcap2-bin)",
    ),
    pytest.mark.timeout(120),
]

CAP_NET_RAW_MASK = 1 << 13
NOBODY = 65534
LEAF_MAC = "02:42:00:00:00:11"
LEAF_IP, GW_IP = "10.42.0.11", "10.42.0.1"
INTERPRETER = Path(os.path.realpath(sys.executable))
# Docker's bounding set for CapDrop ALL + CapAdd NET_RAW; what it gives a container without NET_RAW.
ONLY_NET_RAW = "--bounding-set=-all,+net_raw"
NONE = "--bounding-set=-all"


@dataclass
class Sandbox:
    """A 0711 directory: the interpreter copy with the images' file capability, and a data directory."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def python(self) -> Path:
        return self.root / "bin" / "leafguard-python"


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    root = Path(tempfile.mkdtemp(prefix="lg-priv-", dir="/tmp"))
    try:
        root.chmod(0o711)
        (root / "bin").mkdir(mode=0o755)
        (root / "data").mkdir()
        shutil.copy2(INTERPRETER, root / "bin" / "leafguard-python")
        # As in the Dockerfiles: permitted only; LeafGuard raises it into the effective set itself.
        subprocess.run(["setcap", "cap_net_raw=p", str(root / "bin" / "leafguard-python")], check=True, timeout=10)
        yield Sandbox(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def net() -> Iterator[tuple[Netns, Netns]]:
    with Lab() as lab:
        gw, leaf = lab.netns("gw"), lab.netns("leaf")
        lab.veth(gw, "lan0", leaf, "eth0", up=False)
        leaf.run("ip", "link", "set", "eth0", "address", LEAF_MAC)
        gw.addr("lan0", f"{GW_IP}/24")
        leaf.addr("eth0", f"{LEAF_IP}/24")
        gw.up("lan0")
        leaf.up("eth0")
        yield gw, leaf


def _private_root(sandbox: Sandbox) -> str:
    """Shell lines for a private mount namespace in which /root is the sandbox (0711) with the top-level entries of
    /root that the interpreter and this tree live in bound at their usual paths, so that every path stays valid."""
    lines = []
    for path in {INTERPRETER, Path(sys.base_prefix), REPO}:
        if path.is_relative_to("/root") and path != Path("/root"):
            top = Path("/root") / path.relative_to("/root").parts[0]
            (sandbox.root / top.name).mkdir(exist_ok=True)
            lines.append(f"mount --bind {top} {sandbox.root / top.name}")
    lines.append(f"mount --rbind {sandbox.root} /root")
    return "; ".join(["set -e", *sorted(set(lines[:-1])), lines[-1]])


def _run_argv(sandbox: Sandbox, bounding: str, *, unprivileged: bool) -> list[str]:
    run = ["-m", "leafguard", "run", "--interface", "lan0", "--local-dir", str(sandbox.data), "--write-interval", "0.2"]
    env = ["env", f"HOME={sandbox.data}", f"PYTHONPATH={REPO / 'module'}"]
    if not unprivileged:
        # Root, holding only what the bounding set leaves (what a container's root gets from Docker).
        os.chown(sandbox.data, 0, 0)
        return ["setpriv", bounding, "--inh-caps=-all", *env, str(INTERPRETER), *run]
    os.chown(sandbox.data, NOBODY, NOBODY)
    user = f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups {bounding} --inh-caps=-all"
    command = " ".join([user, *env, f"PYTHONHOME={sys.base_prefix}", str(sandbox.python), *run])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{_private_root(sandbox)}; exec {command}"]


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _leafguard_pid(parent: int, deadline_s: float = 20) -> int:
    """The process running `leafguard run`: ``parent`` itself once its exec chain reaches the interpreter, or a
    descendant."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"\0-m\0leafguard\0run\0" in cmd and not cmd.startswith(b"setpriv") and (
                pid == parent or _descends(pid, parent)
            ):
                return pid
        time.sleep(0.05)
    raise AssertionError("leafguard run did not start")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(_status(pid)["PPid"])
        except (OSError, KeyError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def _send_burst(leaf: Netns, count: int = 20) -> None:
    code = (
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for i in range({count}):\n"
        f"    s.sendto(b'leafguard-priv %d' % i, ('{GW_IP}', 5683)); time.sleep(0.01)\n"
    )
    leaf.python(code)


def _leaves_once_the_leaf_is_in(data: Path) -> list[dict[str, object]] | None:
    leaves: list[dict[str, object]] = json.loads((data / "leaves.json").read_text())["leaves"]
    return leaves if any(leaf["mac"] == LEAF_MAC for leaf in leaves) else None


def _capture_with(gw: Netns, leaf: Netns, sandbox: Sandbox, *, unprivileged: bool) -> dict[str, str]:
    proc = gw.popen(*_run_argv(sandbox, ONLY_NET_RAW, unprivileged=unprivileged),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid = _leafguard_pid(proc.pid)
        deadline = time.monotonic() + 15
        while not (sandbox.data / "stats.json").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        status = _status(pid)
        _send_burst(leaf)
        wait_for(lambda: _leaves_once_the_leaf_is_in(sandbox.data), timeout_s=15)
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
        stats = json.loads((sandbox.data / "stats.json").read_text())
        assert stats["interfaces"]["lan0"]["frames"] >= 20
        return status
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_capture_works_as_root_with_only_cap_net_raw(net: tuple[Netns, Netns], sandbox: Sandbox) -> None:
    status = _capture_with(*net, sandbox, unprivileged=False)
    assert int(status["CapEff"], 16) == CAP_NET_RAW_MASK, status["CapEff"]
    assert int(status["CapBnd"], 16) == CAP_NET_RAW_MASK


def test_capture_works_unprivileged_with_the_images_file_capability(
    net: tuple[Netns, Netns], sandbox: Sandbox
) -> None:
    status = _capture_with(*net, sandbox, unprivileged=True)
    assert status["Uid"].split()[0] == str(NOBODY)
    # Permitted from the file capability, made effective by LeafGuard itself; nothing else.
    assert int(status["CapPrm"], 16) == CAP_NET_RAW_MASK, status["CapPrm"]
    assert int(status["CapEff"], 16) == CAP_NET_RAW_MASK, status["CapEff"]
    decoded = subprocess.run(["capsh", f"--decode={status['CapEff']}"], capture_output=True, text=True, check=True)
    assert decoded.stdout.strip().endswith("cap_net_raw"), decoded.stdout


@pytest.mark.parametrize("unprivileged", [False, True], ids=["root", "unprivileged"])
def test_without_net_raw_run_stops_with_the_one_line_error(
    net: tuple[Netns, Netns], sandbox: Sandbox, unprivileged: bool
) -> None:
    gw, _ = net
    proc = gw.run(*_run_argv(sandbox, NONE, unprivileged=unprivileged), check=False, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("leafguard:")]
    assert errors == [f"leafguard: {cap_net_raw_message('lan0')}"], proc.stderr
    assert "NET_RAW" in errors[0] and "CapAdd" in errors[0]


def test_an_effective_file_capability_would_not_even_start_without_net_raw(sandbox: Sandbox) -> None:
    """Why the images use ``cap_net_raw=p``: with ``=ep`` the kernel refuses to exec the interpreter when the
    bounding set lacks the capability, so the operator would never see LeafGuard's error."""
    subprocess.run(["setcap", "cap_net_raw=ep", str(sandbox.python)], check=True, timeout=10)
    user = f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups {NONE} --inh-caps=-all"
    script = f"{_private_root(sandbox)}; exec {user} env PYTHONHOME={sys.base_prefix} {sandbox.python} -c 'print(1)'"
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, (proc.returncode, proc.stderr)


# Everything mounted becomes read-only except the data directory and the kernel's own filesystems, as Docker's
# ReadonlyRootfs leaves a container (the rootfs read-only; /proc, /sys, /dev as the runtime mounts them).
READ_ONLY_EXCEPT = (
    "for m in $(awk '{print $5}' /proc/self/mountinfo); do case \"$m\" in "
    "{data}|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*) ;; *) mount -o remount,bind,ro \"$m\" 2>/dev/null || true;; esac; "
    "done; "
    "if touch /tmp/.lg-ro-probe 2>/dev/null || touch /root/.lg-ro-probe 2>/dev/null; then echo not read-only >&2; "
    "exit 9; fi"
)


def _emulator_in(ns: Netns, env_file: Path) -> dict[str, str]:
    """The hub emulator inside the namespace (on its own loopback), and the module environment it wrote."""
    import shlex

    ns.popen(sys.executable, "-m", "tests.hub_emulator", "--env-file", str(env_file), cwd=REPO,
             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not env_file.exists():
        assert time.monotonic() < deadline, "the emulator wrote no env file"
        time.sleep(0.05)
    env = {}
    for line in env_file.read_text().splitlines():
        key, _, value = line.partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    return env


def _control(ns: Netns, url: str) -> object:
    code = f"import sys, urllib.request; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    return json.loads(ns.python(code).stdout)


def test_as_deployed_unprivileged_read_only_edge_mode_captures_and_sends(
    net: tuple[Netns, Netns], sandbox: Sandbox
) -> None:
    """The image's runtime conditions together: uid 10001-like (nobody), only CAP_NET_RAW through the =p file
    capability, every mount read-only but the data directory, edge mode against the hub emulator (in the
    namespace), live capture of a leaf; the leaf's Defender messages reach the hub."""
    gw, leaf = net
    hub = _emulator_in(gw, sandbox.root / "hub.env")
    control = hub["HUB_EMULATOR_CONTROL_URL"]
    os.chown(sandbox.data, NOBODY, NOBODY)
    edge_env = " ".join(f"{k}={v}" for k, v in hub.items() if k.startswith("IOTEDGE_"))
    user = f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups {ONLY_NET_RAW} --inh-caps=-all"
    command = (
        f"{user} env -i PATH=/usr/bin:/bin HOME={sandbox.data} LEAFGUARD_DATA_DIR={sandbox.data} "
        f"PYTHONDONTWRITEBYTECODE=1 PYTHONHOME={sys.base_prefix} PYTHONPATH={REPO / 'module'} {edge_env} "
        f"LEAFGUARD_INTERFACES=lan0 LEAFGUARD_REPORTED_INTERVAL_S=0.5 {sandbox.python} -m leafguard run"
    )
    script = (f"{_private_root(sandbox)}; mount --bind {sandbox.data} {sandbox.data}; "
              f"{READ_ONLY_EXCEPT.replace('{data}', str(sandbox.data))}; exec {command}")
    proc = gw.popen("unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        pid = _leafguard_pid(proc.pid)
        identity = "leaf-" + LEAF_MAC.replace(":", "")
        deadline = time.monotonic() + 30
        reported: dict[str, object] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            _send_burst(leaf, count=5)
            twin = _control(gw, f"{control}/twins/edge1/leafguard")
            assert isinstance(twin, dict)
            reported = twin.get("properties", twin).get("reported", {})
            if identity in reported.get("leaves", {}):
                break
            time.sleep(0.5)
        assert identity in reported.get("leaves", {}), reported
        status = _status(pid)  # the interpreter by now (earlier the pid may still be setpriv's or env's)
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert status["Uid"].split()[0] == str(NOBODY)
    assert int(status["CapEff"], 16) == CAP_NET_RAW_MASK and int(status["CapPrm"], 16) == CAP_NET_RAW_MASK
    found = _control(gw, f"{control}/messages?limit=1000")
    assert isinstance(found, dict)
    mine = [m for m in found["messages"]
            if m["system"].get("$.ifid") == "urn:azureiot:Security:SecurityAgent:1"
            and (m["properties"].get("leafIdentity") == identity or m["identity"] == identity)]
    assert mine, found["messages"][-3:]
    assert not (Path("/tmp") / ".lg-ro-probe").exists()
