"""Every gateway setting from the settings document, applied live or rejected with the key it names (issue #15
point 2): capture interfaces and promiscuous mode on real interfaces in namespaces the test creates, the leaf
side and the gateway's MACs, the intervals, the uplink budget; unknown keys are warnings."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from leafguard.demo import demo_capture
from leafguard.errors import ConfigurationError
from leafguard.service.gateway import (
    CaptureSection,
    IntervalsSection,
    NetworkSection,
    UplinkSection,
    unknown_keys,
)
from testkit.netns import Lab, Netns, needs_root
from testkit.wait import until, wait_for
from tests.service.helpers import read_json, read_stats, run_capturing

IFF_PROMISC = 0x100
FAST_POLL = {"LEAFGUARD_SETTINGS_POLL_S": "0.1"}

SEND = """
import sys
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.sendrecv import sendp
src, dst, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
frames = [Ether(src=src, dst=dst) / IP(src="10.9.0.1", dst="10.9.0.2") / UDP(sport=5000, dport=6000) / b"x"] * n
sendp(frames, iface=sys.argv[1], verbose=False)
"""
LEAF = "02:00:00:00:00:01"
OTHER = "02:00:00:00:00:99"
"""Unicast to a MAC that is not the capturing interface's: the kernel delivers it only in promiscuous mode."""


def test_sections_parse_and_name_what_is_wrong() -> None:
    cap = CaptureSection.parse({"interfaces": ["eth1, eth2", "eth3"], "promiscuous": False})
    assert cap.interfaces == ("eth1", "eth2", "eth3") and cap.promiscuous is False and cap.extra_filter is None
    assert not CaptureSection.parse({}).sets_anything and CaptureSection.parse({"promiscuous": True}).sets_anything
    net = NetworkSection.parse({"leafNets": ["10.1.0.7/24"], "gatewayMacs": ["AA-BB-CC-DD-EE-FF"]})
    assert [str(n) for n in net.leaf_nets or ()] == ["10.1.0.0/24"] and net.gateway_macs == {"aa:bb:cc:dd:ee:ff"}
    assert NetworkSection.parse(None) == NetworkSection()
    assert IntervalsSection.parse({"writeIntervalS": 2}).write_interval_s == 2.0
    assert UplinkSection.parse({"maxBytes": 1 << 20}).max_bytes == 1 << 20
    for parse, bad, named in (
        (CaptureSection.parse, {"interfaces": []}, "capture.interfaces"),
        (CaptureSection.parse, {"interfaces": "eth1"}, "capture.interfaces"),
        (CaptureSection.parse, {"interfaces": ["eth1", "eth1"]}, "capture.interfaces"),
        (CaptureSection.parse, {"interfaces": ["a-name-longer-than-15"]}, "capture.interfaces"),
        (CaptureSection.parse, {"interfaces": ["../etc"]}, "capture.interfaces"),
        (CaptureSection.parse, {"promiscuous": "yes"}, "capture.promiscuous"),
        (NetworkSection.parse, {"leafNets": ["10.0.0.0/33"]}, "network.leafNets"),
        (NetworkSection.parse, {"leafNets": "10.0.0.0/8"}, "network.leafNets"),
        (NetworkSection.parse, {"gatewayMacs": ["aa:bb"]}, "network.gatewayMacs"),
        (NetworkSection.parse, {"gatewayMacs": ["aa:bb:cc:dd:ee:ff"] * 1025}, "network.gatewayMacs"),
        (IntervalsSection.parse, {"writeIntervalS": 0}, "intervals.writeIntervalS"),
        (IntervalsSection.parse, {"reportedIntervalS": True}, "intervals.reportedIntervalS"),
        (IntervalsSection.parse, {"reportedIntervalS": float("inf")}, "intervals.reportedIntervalS"),
        (UplinkSection.parse, {"maxBytes": 1000}, "uplink.maxBytes"),
        (UplinkSection.parse, {"maxBytes": 1.5e6}, "uplink.maxBytes"),
        (UplinkSection.parse, [1], "uplink"),
    ):
        with pytest.raises(ConfigurationError, match=named.replace(".", r"\.")):
            parse(bad)


def test_unknown_keys_are_listed_and_the_hubs_are_not() -> None:
    doc = {
        "$version": 4, "capture": {"extraFilter": "", "interface": ["eth1"]}, "leafMap": {},
        "netwrok": {}, "uplink": {"maxBytes": 1 << 20, "fsync": "always"}, "detection": {},
        "ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration": {},
    }  # fmt: skip
    assert unknown_keys(doc) == ["netwrok", "capture.interface", "uplink.fsync"]


def _promiscuous(ns: Netns, ifname: str) -> bool:
    flags = ns.run("cat", f"/sys/class/net/{ifname}/flags").stdout.strip()
    return bool(int(flags, 16) & IFF_PROMISC)


def _set(out: Path, doc: object) -> None:
    tmp = out / "gateway.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(out / "gateway.json")


def _frames(out: Path, ifname: str) -> int:
    return int(read_stats(out)["interfaces"].get(ifname, {}).get("frames", -1))


def _settled(out: Path, ifname: str, at_least: int) -> int:
    """The frame count of ``ifname`` once it reached ``at_least`` and stopped moving (or 10 s passed)."""
    deadline = time.monotonic() + 10
    last, still = -1, 0
    while time.monotonic() < deadline:
        now = _frames(out, ifname)
        still = still + 1 if now == last else 0
        if now >= at_least and still >= 3:
            return now
        last = now
        time.sleep(0.2)
    return last


@needs_root
def test_interfaces_and_promiscuous_mode_change_live(tmp_path: Path) -> None:
    with Lab() as lab:
        gen, gw = lab.netns("gen"), lab.netns("gw")
        lab.veth(gen, "gen0", gw, "gw0")
        lab.veth(gen, "gen1", gw, "gw1")
        out = tmp_path / "out"
        out.mkdir()
        proc = run_capturing(gw, "gw0", out, tmp_path / "leafguard.log", FAST_POLL)
        try:
            wait_for(lambda: read_stats(out)["interfaces"]["gw0"]["state"] == "running")
            assert _promiscuous(gw, "gw0") and not _promiscuous(gw, "gw1")

            # Add gw1: it is opened and its frames are counted, without a restart.
            _set(out, {"capture": {"interfaces": ["gw0", "gw1"]}})
            wait_for(lambda: read_stats(out)["interfaces"].get("gw1", {}).get("state") == "running")
            gen.python(SEND, "gen1", LEAF, OTHER, "25")
            assert _settled(out, "gw1", 25) == 25
            status = read_stats(out)["capture_filter"]
            assert status["interfaces"] == ["gw0", "gw1"] and status["error"] is None

            # Remove gw0 and turn promiscuous mode off: gw0 leaves the statistics and is no longer read, and the
            # kernel's promiscuous count of gw1 drops to zero. (A veth hands every frame to packet sockets, so
            # the flag is what shows the change; on a real NIC it is what opens the hardware filter.)
            _set(out, {"capture": {"interfaces": ["gw1"], "promiscuous": False}})
            wait_for(lambda: "gw0" not in read_stats(out)["interfaces"])
            wait_for(lambda: not _promiscuous(gw, "gw1"))
            assert not _promiscuous(gw, "gw0")
            before = _frames(out, "gw1")
            gen.python(SEND, "gen0", LEAF, OTHER, "10")  # not captured any more
            gen.python(SEND, "gen1", LEAF, gw.mac("gw1"), "7")
            assert _settled(out, "gw1", before + 7) == before + 7
            assert "gw0" not in read_stats(out)["interfaces"]

            # A bad section changes nothing and says which key is wrong.
            _set(out, {"capture": {"interfaces": ["gw1"], "promiscuous": "on"}})
            bad = wait_for(lambda: (s := read_stats(out)["capture_filter"])["error"] and s)
            assert "capture.promiscuous" in bad["error"] and bad["interfaces"] == ["gw1"]
            assert bad["promiscuous"] is False

            # No capture section: the flags' interfaces and promiscuous mode again.
            _set(out, {})
            wait_for(lambda: read_stats(out)["capture_filter"]["interfaces"] == ["gw0"])
            wait_for(lambda: read_stats(out)["interfaces"].get("gw0", {}).get("state") == "running")
            assert "gw1" not in read_stats(out)["interfaces"]
            wait_for(lambda: _promiscuous(gw, "gw0"))
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, (tmp_path / "leafguard.log").read_text()


@needs_root
def test_gateway_macs_and_leaf_nets_change_live(tmp_path: Path) -> None:
    with Lab() as lab:
        gen, gw = lab.netns("gen"), lab.netns("gw")
        lab.veth(gen, "gen0", gw, "gw0")
        out = tmp_path / "out"
        out.mkdir()
        proc = run_capturing(gw, "gw0", out, tmp_path / "leafguard.log", FAST_POLL)

        def leaves() -> set[str]:
            return {leaf["mac"] for leaf in read_json(out / "leaves.json")["leaves"]}

        try:
            wait_for(lambda: read_stats(out)["interfaces"]["gw0"]["state"] == "running")
            gen.python(SEND, "gen0", LEAF, "ff:ff:ff:ff:ff:ff", "5")
            wait_for(lambda: LEAF in leaves())
            network = read_stats(out)["settings"]["network"]
            assert gw.mac("gw0") in network["gatewayMacs"]  # the capture interface's own, always

            # The leaf's MAC named as the gateway's: it is no leaf any more.
            _set(out, {"network": {"gatewayMacs": [LEAF.upper()]}})
            wait_for(lambda: LEAF not in leaves())
            network = read_stats(out)["settings"]["network"]
            assert LEAF in network["gatewayMacs"] and gw.mac("gw0") in network["gatewayMacs"]

            # Leaf networks that exclude its address: frames from now on are not leaf-side.
            _set(out, {"network": {"leafNets": ["192.168.77.0/24"]}})
            wait_for(lambda: read_stats(out)["settings"]["network"]["leafNets"] == ["192.168.77.0/24"])
            assert LEAF not in read_stats(out)["settings"]["network"]["gatewayMacs"]  # back to the default

            _set(out, {"network": {"leafNets": ["not a network"]}})
            bad = wait_for(lambda: (s := read_stats(out)["settings"]["network"])["error"] and s)
            assert "network.leafNets" in bad["error"] and bad["leafNets"] == ["192.168.77.0/24"]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0


def _replay(out: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
         "--local-dir", str(out), "--write-interval", "0.2"],
        stderr=subprocess.DEVNULL, env=os.environ | FAST_POLL,
    )  # fmt: skip
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.fixture
def replay(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "out"
    out.mkdir()
    for _ in _replay(out):
        wait_for(lambda: read_stats(out)["replay_done"])
        yield out


def test_what_this_run_cannot_change_is_rejected_with_its_key(replay: Path) -> None:
    out = replay
    _set(out, {
        "capture": {"interfaces": ["eth1"]},
        "uplink": {"maxBytes": 1 << 20},
        "intervals": {"writeIntervalS": 0.5, "reportedIntervalS": 1},
        "colour": "blue",
    })  # fmt: skip
    stats = wait_for(lambda: (s := read_stats(out))["settings"]["warnings"] and s)
    assert stats["settings"]["warnings"] == ["colour"]
    assert "capture.interfaces applies to live capture only" in stats["capture_filter"]["error"]
    assert "uplink.maxBytes applies in edge mode" in stats["settings"]["uplink"]["error"]
    # The section is validated as a whole: the valid write interval is not applied either.
    intervals = stats["settings"]["intervals"]
    assert "intervals.reportedIntervalS applies in edge mode" in intervals["error"]
    assert intervals["writeIntervalS"] == 0.2

    _set(out, {"intervals": {"writeIntervalS": 0.5}})
    stats = wait_for(lambda: (s := read_stats(out))["settings"]["intervals"]["writeIntervalS"] == 0.5 and s)
    assert stats["settings"]["intervals"]["error"] is None and stats["settings"]["uplink"]["error"] is None
    assert stats["settings"]["warnings"] == [] and stats["capture_filter"]["error"] is None


def test_the_write_interval_applies_live(replay: Path) -> None:
    out = replay
    _set(out, {"intervals": {"writeIntervalS": 3600}})
    wait_for(lambda: read_stats(out)["settings"]["intervals"]["writeIntervalS"] == 3600)
    written = read_stats(out)["updated_at"]
    time.sleep(1.0)  # five of the flags' 0.2 s intervals
    assert read_stats(out)["updated_at"] == written
    _set(out, {"intervals": {"writeIntervalS": 0.2}})
    # A shorter interval takes effect at once, not after the hour.
    stats: dict[str, Any] = wait_for(lambda: (s := read_stats(out))["updated_at"] > written and s, timeout_s=10)
    assert stats["settings"]["intervals"]["writeIntervalS"] == 0.2


async def test_edge_mode_takes_the_settings_from_the_module_twin() -> None:
    """The module twin's desired properties, with the real SDK through the hub emulator: the budget and the
    reported interval reach the uplink, the leaf side the analyzer; what edge mode cannot use is rejected, and
    the health section says all of it."""
    from tests.hub.helpers import service_env
    from tests.hub_emulator import HubEmulator

    async with HubEmulator.start(thread=True) as hub:
        module = hub.add_module(hub.add_device("edge1", edge=True), "leafguard")
        await hub.set_desired(module, {
            "uplink": {"maxBytes": 300_000},
            "intervals": {"reportedIntervalS": 0.5, "writeIntervalS": 1},
            "network": {"leafNets": ["10.0.0.0/8"]},
            "detection": {"silentAfterS": 60},
            "leafmap": {},
        })  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "leafguard", "run", "--pcap", str(demo_capture()), "--replay-speed", "0",
            env=service_env(hub, module) | FAST_POLL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

        def health() -> dict[str, Any]:
            doc: dict[str, Any] = hub.twin(module)["reported"].get("leafguard", {})
            return doc

        def settings() -> dict[str, Any]:
            return dict(health().get("settings", {}))

        try:
            async with asyncio.timeout(40):
                await until(lambda: settings().get("warnings") == ["leafmap"])
                # Reported properties merge: a null is no key at all.
                assert settings()["network"] == {"leafNets": ["10.0.0.0/8"], "gatewayMacs": []}
                assert settings()["uplink"] == {"maxBytes": 300_000}
                assert health()["uplink"]["max_bytes"] == 300_000
                # Validated as a whole: the intervals section names the key edge mode cannot use.
                assert "intervals.writeIntervalS applies in local mode" in settings()["intervals"]["error"]

                # Desired patches merge: a null deletes a key.
                assert health()["detection"]["silentAfterS"] == 60
                await hub.set_desired(module, {
                    "intervals": {"writeIntervalS": None}, "uplink": {"maxBytes": 10}, "leafmap": None,
                    "detection": {"silentAfterS": "off"},  # a null would delete the key: the value would stay
                })  # fmt: skip
                await until(lambda: health()["detection"].get("silentAfterS") == "off")
                await until(lambda: settings()["intervals"].get("reportedIntervalS") == 0.5
                            and "error" not in settings()["intervals"])
                await until(lambda: "uplink.maxBytes" in settings()["uplink"].get("error", ""))
                assert health()["uplink"]["max_bytes"] == 300_000  # the budget in force stays
                assert settings()["warnings"] == []
        finally:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(40):
                await proc.wait()
        assert proc.returncode == 0
