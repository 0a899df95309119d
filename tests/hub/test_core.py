"""The pure parts of edge mode: the outbox and its drop policy, backoff, the module twin documents, settings."""

from __future__ import annotations

from typing import Any

import pytest

from leafguard.agent.config import CONFIG_OBJECT_NAME as CFG
from leafguard.agent.messages import OutgoingMessage, Trigger
from leafguard.errors import ConfigurationError
from leafguard.hub.link import Backoff
from leafguard.hub.outbox import Outbox
from leafguard.hub.settings import EDGE_ENV, EdgeSettings
from leafguard.hub.twin import (
    REPORTED_LIMIT_BYTES,
    MissedDesiredPatchError,
    ModuleDesired,
    ReportedState,
    twin_size,
)


def msg(name: str, size: int = 100, priority: Trigger = "High") -> OutgoingMessage:
    return OutgoingMessage(name, b"x" * size, priority, 1)


def test_outbox_is_fifo_and_keeps_unacknowledged_messages() -> None:
    box = Outbox(1000)
    for name in "abc":
        assert box.put(msg(name)) == []
    first = box.next_to_send()
    assert first is not None and first.message.identity == "a"
    assert box.release_in_flight() == 1
    again = box.next_to_send()
    assert again is first and again.attempts == 2 and box.stats.resent == 1
    box.ack(again)
    nxt = box.next_to_send()
    assert nxt is not None and nxt.message.identity == "b"
    assert (len(box), box.bytes, box.stats.acked) == (2, 200, 1)


def test_outbox_drops_low_first_then_oldest_but_never_in_flight() -> None:
    box = Outbox(500)
    for name, prio in [("h1", "High"), ("l1", "Low"), ("h2", "High"), ("l2", "Low"), ("h3", "High")]:
        box.put(msg(name, priority=prio))  # type: ignore[arg-type]
    head = box.next_to_send()
    assert head is not None and head.message.identity == "h1"
    assert [m.identity for m in box.put(msg("h4"))] == ["l1"]
    assert [m.identity for m in box.put(msg("h5", 200))] == ["l2", "h2"]
    # h1 is in flight: it is never evicted, so a message that needs its room is dropped itself.
    assert [m.identity for m in box.put(msg("huge", 450))] == ["huge"]
    assert box.stats.dropped == 4 and box.stats.dropped_bytes == 100 * 3 + 450
    assert box.bytes <= box.max_bytes
    names = []
    while (entry := box.next_to_send()) is not None:
        names.append(entry.message.identity)
    assert names == ["h3", "h4", "h5"]


def test_outbox_message_ids_survive_resend() -> None:
    box = Outbox(1000)
    box.put(msg("a"))
    first = box.next_to_send()
    assert first is not None
    box.release_in_flight()
    again = box.next_to_send()
    assert again is not None and again.message_id == first.message_id


def test_backoff_is_capped_jittered_and_resets() -> None:
    draws = iter([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    backoff = Backoff(1.0, 5.0, rand=lambda: next(draws))
    assert [backoff.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.next_delay() == 0.5
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_effective_desired_merges_leaf_over_default() -> None:
    desired = ModuleDesired()
    change = desired.replace(
        {
            CFG: {"maxMessageSizeInBytes": {"value": 65536}, "eventPriorityLogin": {"value": "Low"}},
            "leaves": {"plc1": {CFG: {"maxMessageSizeInBytes": {"value": 16384}}}},
            "$version": 3,
        }
    )
    assert change is not None and change.default_changed and change.leaves == {"plc1"}
    assert desired.effective("plc1") == {
        CFG: {"maxMessageSizeInBytes": {"value": 16384}, "eventPriorityLogin": {"value": "Low"}}
    }
    assert desired.effective("cam1") == {
        CFG: {"maxMessageSizeInBytes": {"value": 65536}, "eventPriorityLogin": {"value": "Low"}}
    }
    change = desired.patch({"leaves": {"plc1": None}, "$version": 4})
    assert change is not None and not change.default_changed and change.leaves == {"plc1"}
    assert desired.effective("plc1") == desired.effective("cam1")
    assert desired.patch({"$version": 4, "x": 1}) is None  # stale
    with pytest.raises(MissedDesiredPatchError):
        desired.patch({"$version": 6, "x": 1})
    assert desired.replace({"$version": 6}) is not None and desired.doc == {}


def test_reported_state_trims_leaves_to_stay_under_32_kb() -> None:
    state = ReportedState()
    big = {CFG: {f"key{i:03d}": {"value": "v" * 40} for i in range(40)}}  # about 2 KB per leaf
    for i in range(40):
        state.update_leaf(f"leaf-{i:02d}", big)
    patch = state.take_patch({"version": "0.1.0"})
    assert patch is not None
    assert twin_size(patch.body) <= REPORTED_LIMIT_BYTES
    assert 0 < len(patch.body["leaves"]) < 40
    state.commit(patch)
    assert state.left_out == 40 - len(patch.body["leaves"]) and state.trims == state.left_out
    assert state.take_patch(None) is None


def test_reported_state_restores_a_failed_patch() -> None:
    state = ReportedState()
    state.update_leaf("a", {"x": 1})
    patch = state.take_patch(None)
    assert patch is not None
    state.update_leaf("b", {"y": 2})
    state.restore(patch)
    again = state.take_patch(None)
    assert again is not None and again.body == {"leaves": {"a": {"x": 1}, "b": {"y": 2}}}


def test_reported_state_removes_retired_leaves_and_restores_the_removal() -> None:
    state = ReportedState()
    state.update_leaf("old", {"x": 1})
    state.update_leaf("kept", {"y": 2})
    first = state.take_patch(None)
    assert first is not None
    state.commit(first)
    state.remove_leaf("old")
    state.remove_leaf("never-reported")  # nothing in the twin: nothing to remove
    patch = state.take_patch(None)
    assert patch is not None and patch.body == {"leaves": {"old": None}}
    state.restore(patch)  # the patch failed: the removal is tried again
    again = state.take_patch(None)
    assert again is not None and again.body == {"leaves": {"old": None}}
    state.commit(again)
    assert state.take_patch(None) is None


def _env(**extra: str) -> dict[str, Any]:
    return dict.fromkeys(EDGE_ENV, "x") | extra


def test_edge_settings_from_env() -> None:
    settings = EdgeSettings.from_env(_env(IOTEDGE_DEVICEID="edge1", LEAFGUARD_SEND_TIMEOUT_S="2.5"))
    assert settings.identity == "edge1/x" and settings.send_timeout_s == 2.5
    assert settings.outbox_max_bytes == 16 * 1024 * 1024 and settings.output_name == "security"
    with pytest.raises(ConfigurationError, match="IOTEDGE_WORKLOADURI"):
        EdgeSettings.from_env({k: v for k, v in _env().items() if k != "IOTEDGE_WORKLOADURI"})
    with pytest.raises(ConfigurationError, match="LEAFGUARD_OUTBOX_MAX_BYTES"):
        EdgeSettings.from_env(_env(LEAFGUARD_OUTBOX_MAX_BYTES="lots"))
    with pytest.raises(ConfigurationError, match="outbox"):
        EdgeSettings.from_env(_env(LEAFGUARD_OUTBOX_MAX_BYTES="1000"))


def test_outbox_drops_are_reported_to_the_leaf_agent_as_send_failures() -> None:
    from leafguard.agent.fleet import make_fleet
    from leafguard.hub.output import EdgeAgentOutput
    from leafguard.hub.transport import EdgeTransport
    from leafguard.observe.model import identity_for_mac

    fleet = make_fleet()
    agent = fleet.ensure("00:11:22:33:44:55", 1000.0)
    assert agent is not None
    transport = EdgeTransport(EdgeSettings.from_env(_env(LEAFGUARD_OUTBOX_MAX_BYTES="262144")))
    output = EdgeAgentOutput(transport, fleet)
    ident = identity_for_mac("00:11:22:33:44:55")
    transport.submit([msg(ident, 100_000, "Low") for _ in range(4)] + [msg("gone", 100_000)])
    assert transport.outbox.stats.dropped == 3 and output.unattributed_drops == 0
    assert len(transport.outbox) == 2  # "gone" (High) pushed out a second Low message
    events = [e for m in fleet.shutdown(2000.0) for e in m.body_json()["Events"]]
    (stats,) = [e for e in events if e["Name"] == "MessageStatistics"]
    assert stats["Payload"][0]["TotalFailed"] == 3


def test_service_settings_choose_edge_mode_only_without_a_local_folder(tmp_path: Any) -> None:
    from leafguard.cli import _parser
    from leafguard.service.settings import ServiceSettings

    args = _parser().parse_args(["run", "--pcap", "x.pcap"])
    edge = ServiceSettings.from_args(args, _env(IOTEDGE_MODULEID="leafguard"))
    assert edge.edge is not None and edge.local_dir is None and edge.edge.module_id == "leafguard"
    local = ServiceSettings.from_args(_parser().parse_args(["run", "--pcap", "x", "--local-dir", str(tmp_path)]),
                                      _env())
    assert local.edge is None and local.local_dir == tmp_path
    with pytest.raises(ConfigurationError, match="IOTEDGE_DEVICEID"):
        ServiceSettings.from_args(args, {k: v for k, v in _env().items() if k != "IOTEDGE_DEVICEID"})
    with pytest.raises(ConfigurationError, match="--local-dir"):
        ServiceSettings.from_args(args, {})


def test_service_analyzer_settings_from_flags_or_the_environment(tmp_path: Any) -> None:
    from leafguard.cli import _parser
    from leafguard.service.settings import ServiceSettings

    base = {"LEAFGUARD_LOCAL_DIR": str(tmp_path)}
    env = {
        **base,
        "LEAFGUARD_LEAF_NETS": "10.20.0.0/16, 192.168.7.0/24",
        "LEAFGUARD_LEARNING_PERIOD_S": "3600",
        "LEAFGUARD_SILENT_AFTER_S": "900",
        "LEAFGUARD_FLOOD_RATE": "2500",
    }
    from_env = ServiceSettings.from_args(_parser().parse_args(["run", "--pcap", "x"]), env).analyzer
    assert [str(n) for n in from_env.leaf_nets] == ["10.20.0.0/16", "192.168.7.0/24"]
    assert from_env.learning_period_s == 3600.0 and from_env.silent_after_s == 900.0
    assert from_env.flood_rate_per_s == 2500.0
    flags = ["run", "--pcap", "x", "--leaf-net", "10.9.0.0/16", "--learning-period", "60", "--silent-after", "30"]
    from_flags = ServiceSettings.from_args(_parser().parse_args(flags), env).analyzer  # flags win
    assert [str(n) for n in from_flags.leaf_nets] == ["10.9.0.0/16"]
    assert from_flags.learning_period_s == 60.0 and from_flags.silent_after_s == 30.0
    unset = ServiceSettings.from_args(_parser().parse_args(["run", "--pcap", "x"]), base).analyzer
    assert unset.leaf_nets == () and unset.learning_period_s is None and unset.silent_after_s is None
    replay = _parser().parse_args(["run", "--pcap", "x"])
    with pytest.raises(ConfigurationError, match="LEAFGUARD_SILENT_AFTER_S='soon'"):
        ServiceSettings.from_args(replay, {**base, "LEAFGUARD_SILENT_AFTER_S": "soon"})
    with pytest.raises(ConfigurationError, match="more than 0"):
        ServiceSettings.from_args(replay, {**base, "LEAFGUARD_SILENT_AFTER_S": "0"})
