"""Golden tests of one leaf agent with a virtual clock: aggregation windows, send triggers, padding, envelope."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

import leafguard
from leafguard.agent.agent import LeafAgent
from leafguard.agent.config import CONFIG_OBJECT_NAME, AgentConfig
from leafguard.agent.events import agent_id
from leafguard.agent.messages import SECURITY_INTERFACE_ID
from tests.agent.helpers import MAC, T0, bodies, conn, events, login, names, security, view
from tests.agent.schema import errors


def config(**props: Any) -> AgentConfig:
    outcome = AgentConfig().apply_desired({CONFIG_OBJECT_NAME: {k: {"value": v} for k, v in props.items()}})
    assert outcome.accepted, outcome.issues
    return outcome.config


def test_aggregation_windows_golden() -> None:
    cfg = config(
        highPriorityMessageFrequency="PT1H",
        lowPriorityMessageFrequency="PT5H",
        snapshotFrequency="P1D",
        aggregationIntervalConnectionCreate="PT10M",
    )
    a = LeafAgent("leaf-x", cfg, T0)
    assert a.tick(T0, view()) == []  # snapshot queued, nothing due yet
    a.observe(conn(T0 + 10, local_port=50001))
    a.observe(conn(T0 + 20, local_port=50002))  # same identity keys: only the client port differs
    a.observe(conn(T0 + 30, remote_port=80))
    a.observe(conn(T0 + 40, direction="In", remote="10.0.0.77", remote_port=5555, local_port=22))
    a.observe(conn(T0 + 50, direction="In", remote="10.0.0.77", remote_port=5556, local_port=22))
    assert a.tick(T0 + 600) == []  # exactly the interval: not yet (strictly more than)
    assert a.tick(T0 + 601) == []  # flushed into the low queue; low send not due
    a.observe(conn(T0 + 700, remote_port=8883))  # the next window, which started at T0+601
    msgs = a.tick(T0 + 3600)
    assert len(msgs) == 1 and msgs[0].priority == "High"
    body = bodies(msgs)[0]
    assert errors(body) == []
    evs = body["Events"]
    assert [e["Name"] for e in evs] == [
        "DroppedEventsStatistics",
        "MessageStatistics",  # operational first
        "ListeningPorts",  # then the queue that triggered (High)
        "SystemInformation",  # then the other queue as padding, oldest first
        "ConnectionCreate",
        "ConnectionCreate",
        "ConnectionCreate",
        "ConnectionCreate",
    ]
    agg = evs[4:]
    assert all(e["Category"] == "Aggregated" and len(e["Payload"]) == 1 for e in agg)
    p = [e["Payload"][0] for e in agg]
    assert [(x["Direction"], x["RemotePort"], x["LocalPort"], x["ExtraDetails"]["HitCount"]) for x in p] == [
        ("Out", "443", "0", "2"),
        ("Out", "80", "0", "1"),
        ("In", "0", "22", "2"),
        ("Out", "8883", "0", "1"),
    ]
    assert all(x["ProcessId"] == 0 and x["Executable"] == "" for x in p)
    first, last = p[0]["ExtraDetails"], p[3]["ExtraDetails"]
    assert first["StartTimeUtc"] == "2023-11-14T22:13:20.000Z"  # T0
    assert first["EndTimeUtc"] == "2023-11-14T22:23:21.000Z"  # T0 + 601
    assert first["StartTimeLocal"] == "2023-11-14T22:13:20.000+00:00"
    assert last["StartTimeUtc"] == first["EndTimeUtc"]  # start = the previous flush
    assert last["EndTimeUtc"] == "2023-11-14T23:13:20.000Z"  # T0 + 3600, flushed by this tick
    assert all(isinstance(v, str) for x in p for v in x["ExtraDetails"].values())


def test_window_closes_at_packet_time_even_without_ticks() -> None:
    a = LeafAgent("leaf-x", config(aggregationIntervalConnectionCreate="PT10M"), T0)
    a.observe(conn(T0 + 1))
    a.observe(conn(T0 + 602))  # after the window: the first window is flushed before this one is counted
    a.observe(conn(T0 + 603))
    evs = security(a.shutdown(T0 + 700))
    assert [(e["Category"], e["Payload"][0]["ExtraDetails"]["HitCount"]) for e in evs] == [
        ("Aggregated", "1"),
        ("Aggregated", "2"),
    ]


def test_idle_window_does_not_start_in_the_past() -> None:
    a = LeafAgent("leaf-x", config(aggregationIntervalConnectionCreate="PT10M"), T0)
    a.observe(conn(T0 + 3 * 3600 + 5))  # three hours idle: the window is on the 10-minute grid
    assert security(a.tick(T0 + 3 * 3600 + 10)) == []
    evs = security(a.shutdown(T0 + 3 * 3600 + 700))
    assert evs[0]["Payload"][0]["ExtraDetails"]["StartTimeUtc"] == "2023-11-15T01:13:20.000Z"


def test_frequency_triggers_and_padding() -> None:
    cfg = config(
        highPriorityMessageFrequency="PT1M",
        lowPriorityMessageFrequency="PT10M",
        snapshotFrequency="P1D",
        aggregationEnabledConnectionCreate=False,
        eventPriorityDroppedEventsStatistics="Off",
        eventPriorityMessageStatistics="Off",
        eventPriorityListeningPorts="Off",
        eventPrioritySystemInformation="Off",
    )
    a = LeafAgent("leaf-x", cfg, T0)
    assert a.tick(T0) == []
    a.observe(conn(T0 + 1))  # low
    a.observe(login(T0 + 5))  # high
    assert a.tick(T0 + 59) == []
    msgs = a.tick(T0 + 60)  # high timer: the high event, and the low one as padding
    assert [m.priority for m in msgs] == ["High"]
    assert names(msgs) == ["Login", "ConnectionCreate"]
    assert events(msgs)[1]["Category"] == "Triggered"
    a.observe(conn(T0 + 70))
    assert a.tick(T0 + 120) == []  # high timer fires but the high queue is empty: no send (reference rule)
    a.observe(login(T0 + 130))
    msgs = a.tick(T0 + 600)  # low timer (and high timer): one message each, main queue first
    assert [m.priority for m in msgs] == ["High"]  # the high send took everything, the low send had nothing
    assert names(msgs) == ["Login", "ConnectionCreate"]
    a.observe(conn(T0 + 601))
    msgs = a.tick(T0 + 1200)
    assert [m.priority for m in msgs] == ["Low"]
    assert names(msgs) == ["ConnectionCreate"]


def test_size_trigger_splits_within_the_limit() -> None:
    cfg = config(maxMessageSizeInBytes=8192, maxLocalCacheSizeInBytes=1_000_000, snapshotFrequency="P1D")
    a = LeafAgent("leaf-x", cfg, T0)
    a.tick(T0, view())
    for i in range(200):
        a.observe(login(T0 + 1 + i * 0.01, user=f"user{i}"))
    msgs = a.tick(T0 + 3)  # far from any timer: the cache holds several messages' worth
    assert len(msgs) >= 2
    assert all(len(m.body) <= 8192 for m in msgs)
    assert all(errors(b) == [] for b in bodies(msgs))
    users = [e["Payload"][0]["UserName"] for e in events(msgs) if e["Name"] == "Login"]
    assert users == [f"user{i}" for i in range(len(users))]  # oldest first, no reordering
    left = a.shutdown(T0 + 4)
    st = a.stats()
    assert st.pending == 0 and st.sent + st.dropped == st.generated and st.dropped == 0
    assert all(len(m.body) <= 8192 for m in left)


def test_event_too_large_is_dropped_counted_and_does_not_block() -> None:
    cfg = config(maxMessageSizeInBytes=8192, snapshotFrequency="P1D", highPriorityMessageFrequency="PT1M")
    a = LeafAgent("leaf-x", cfg, T0)
    a.tick(T0)
    a.observe(login(T0 + 1, user="x" * 9000))
    a.observe(login(T0 + 2, user="small"))
    msgs = a.tick(T0 + 60)
    assert [e["Payload"][0]["UserName"] for e in events(msgs) if e["Name"] == "Login"] == ["small"]
    assert a.stats().dropped == 1
    msgs = a.tick(T0 + 86400)  # the next snapshot reports the drop
    msgs += a.shutdown(T0 + 86401)
    stats = [e for e in events(msgs) if e["Name"] == "DroppedEventsStatistics"]
    high = stats[0]["Payload"][0]
    assert high["Queue"] == "High" and high["DroppedEvents"] == 1 and high["ExtraDetails"]["TooLargeEvents"] == "1"


def reported_drops(payloads: list[list[dict[str, Any]]]) -> int:
    total = 0
    for p in payloads:
        for item in p:
            total += item["DroppedEvents"]
            total += int(item["ExtraDetails"].get("OperationalDroppedEvents", "0"))
    return total


def test_dropped_statistics_are_per_interval() -> None:
    cfg = config(maxLocalCacheSizeInBytes=8192, maxMessageSizeInBytes=8192, snapshotFrequency="PT1H")
    a = LeafAgent("leaf-x", cfg, T0)
    out = a.tick(T0)
    for i in range(100):  # far more than 8 KB of low events: the oldest are evicted
        a.observe(conn(T0 + 1 + i, remote=f"10.1.0.{i}"))
    a.observe(login(T0 + 200))
    out += a.tick(T0 + 3600)
    out += a.tick(T0 + 7200)
    out += a.shutdown(T0 + 7201)
    st = a.stats()
    assert st.pending == 0 and st.sent + st.dropped == st.generated and st.dropped > 0
    stats = [e["Payload"] for e in events(out) if e["Name"] == "DroppedEventsStatistics"]
    dropped_low = [next(i for i in p if i["Queue"] == "Low")["DroppedEvents"] for p in stats]
    # T0: nothing yet; T0+3600: the window is still open; T0+7200: the 100 aggregated events overflow the cache.
    assert dropped_low[:3] == [0, 0, 89]
    # Counters are reset after each report: the reports add up to exactly the drops, none twice, none missing.
    assert reported_drops(stats) == st.dropped


def test_capture_drops_are_reported_per_interval_as_operational_events() -> None:
    a = LeafAgent("leaf-x", config(snapshotFrequency="PT1H"), T0)
    out = a.tick(T0)
    a.record_capture_drops(7)
    a.record_capture_drops(5)
    out += a.tick(T0 + 3600)
    a.record_capture_drops(3)
    out += a.shutdown(T0 + 3700)
    stats = [e for e in events(out) if e["Name"] == "DroppedEventsStatistics"]
    assert all(e["EventType"] == "Operational" for e in stats)
    high = [
        next(i for i in e["Payload"] if i["Queue"] == "High")["ExtraDetails"]["CaptureDroppedFrames"] for e in stats
    ]
    assert high == ["0", "12", "3"]


def test_off_means_not_produced() -> None:
    a = LeafAgent("leaf-x", config(eventPriorityLogin="Off", eventPriorityConnectionCreate="Off"), T0)
    a.observe(login(T0 + 1))
    a.observe(conn(T0 + 2))
    assert a.stats().generated == 0
    assert "Login" not in names(a.shutdown(T0 + 3))


def test_live_config_change_switches_aggregation_and_reports_errors() -> None:
    a = LeafAgent("leaf-x", config(snapshotFrequency="P1D"), T0)
    a.tick(T0)
    a.observe(conn(T0 + 1))
    a.observe(conn(T0 + 2))
    outcome = a.apply_desired({CONFIG_OBJECT_NAME: {"aggregationEnabledConnectionCreate": {"value": False}}}, T0 + 10)
    assert outcome.accepted and not a.config.aggregation_enabled_connection_create
    a.observe(conn(T0 + 11))
    bad = a.apply_desired({CONFIG_OBJECT_NAME: {"maxMessageSizeInBytes": {"value": "huge"}}}, T0 + 12)
    assert not bad.accepted and a.config is outcome.config
    evs = security(a.shutdown(T0 + 20))
    assert [(e["Name"], e["Category"]) for e in evs] == [
        ("ConfigurationError", "Triggered"),  # operational first
        ("ConnectionCreate", "Aggregated"),  # the buffered window, flushed when aggregation was switched off
        ("ConnectionCreate", "Triggered"),
    ]
    item = evs[0]["Payload"][0]
    assert item == {
        "ConfigurationName": "maxMessageSizeInBytes",
        "ErrorType": "TypeMismatch",
        "UsedConfiguration": "204800",
        "Message": item["Message"],
    }
    assert "maxMessageSizeInBytes" in item["Message"]
    assert evs[1]["Payload"][0]["ExtraDetails"]["HitCount"] == "2"


def test_advisory_issue_is_a_configuration_error_event() -> None:
    a = LeafAgent("leaf-x", AgentConfig(), T0)
    a.apply_desired({CONFIG_OBJECT_NAME: {"maxMessageSizeInBytes": {"value": 10000}}}, T0)
    evs = [e for e in events(a.shutdown(T0 + 1)) if e["Name"] == "ConfigurationError"]
    assert [p["ErrorType"] for p in evs[0]["Payload"]] == ["NotOptimal"]
    assert (
        errors({"AgentVersion": "1", "AgentId": str(uuid.uuid4()), "MessageSchemaVersion": "1.0", "Events": evs}) == []
    )


def test_shrinking_message_size_drops_what_no_longer_fits() -> None:
    a = LeafAgent("leaf-x", config(snapshotFrequency="P1D"), T0)
    a.observe(login(T0 + 1, user="y" * 10000))  # fits in 204800
    a.apply_desired({CONFIG_OBJECT_NAME: {"maxMessageSizeInBytes": {"value": 8192}}}, T0 + 2)
    a.shutdown(T0 + 3)
    st = a.stats()
    assert st.dropped == 1 and st.sent + st.dropped == st.generated


def test_envelope_properties_and_identity() -> None:
    a = LeafAgent("plc-7", config(highPriorityMessageFrequency="PT1M"), T0)
    a.observe(login(T0 + 1))
    msgs = a.tick(T0 + 60, view())
    assert len(msgs) == 1
    m = msgs[0]
    body = orjson.loads(m.body)
    assert body["AgentVersion"] == leafguard.__version__
    assert body["AgentId"] == agent_id("plc-7") and len(body["AgentId"]) == 36
    assert body["MessageSchemaVersion"] == "1.0"
    props = m.properties()
    assert props["$.ifid"] == SECURITY_INTERFACE_ID
    assert props["$.ct"] == "application/json" and props["$.ce"] == "utf-8"
    assert props["MessagePriority"] == "High"
    line = orjson.loads(m.jsonl_line())
    assert line == {"identity": "plc-7", "properties": props, "body": body}
    login_ev = next(e for e in body["Events"] if e["Name"] == "Login")
    assert login_ev["Payload"][0]["UserName"] == "admin"
    assert "password" not in m.body.decode().lower()


def test_agent_id_is_stable_and_per_identity() -> None:
    assert agent_id("leaf-001122334455") == agent_id("leaf-001122334455")
    assert agent_id("a") != agent_id("b")
    uuid.UUID(agent_id("a"))


def test_runs_are_reproducible() -> None:
    def run() -> list[bytes]:
        a = LeafAgent("leaf-x", config(highPriorityMessageFrequency="PT1M"), T0)
        out = a.tick(T0, view())
        for i in range(50):
            a.observe(conn(T0 + i, remote_port=1000 + i % 7))
            a.observe(login(T0 + i + 0.5))
            out += a.tick(T0 + i + 0.6, view())
        out += a.shutdown(T0 + 7200)
        return [m.body for m in out]

    first = run()
    assert first == run()
    ids = [e["Id"] for b in first for e in orjson.loads(b)["Events"]]
    assert len(ids) == len(set(ids))


def test_periodic_events_from_the_view() -> None:
    a = LeafAgent("leaf-x", config(snapshotFrequency="PT1H"), T0)
    v = view(os_name="Linux", os_vendor=None, os_version=None, hostnames=(), dhcp_hostname=None)
    assert a.needs_view(T0)
    a.tick(T0, v)
    assert not a.needs_view(T0 + 10)
    msgs = a.shutdown(T0 + 10)
    evs = {e["Name"]: e for e in events(msgs)}
    lp = evs["ListeningPorts"]["Payload"]
    assert [(p["Protocol"], p["LocalPort"], p["LocalAddress"]) for p in lp] == [
        ("TCP", "80", "10.0.0.2"),
        ("UDP", "161", "10.0.0.2"),
    ]
    si = evs["SystemInformation"]["Payload"][0]
    assert si["OSName"] == "Linux" and "OSVendor" not in si and "OSVersion" not in si and "HostName" not in si
    assert si["ExtraDetails"]["NicVendor"] == "Acme Devices"
    assert si["ExtraDetails"]["DhcpParameterRequestList"] == "1,3,6,12,15,28,42"
    assert si["ExtraDetails"]["MacAddress"] == MAC
    assert all(errors(b) == [] for b in bodies(msgs))
    empty = LeafAgent("leaf-y", AgentConfig(), T0)
    empty.tick(T0, view(services=()))
    lp_empty = next(e for e in events(empty.shutdown(T0 + 1)) if e["Name"] == "ListeningPorts")
    assert lp_empty["IsEmpty"] is True and lp_empty["Payload"] == []


def test_reapplying_the_same_configuration_is_silent() -> None:
    a = LeafAgent("leaf-x", AgentConfig(), T0)
    doc = {CONFIG_OBJECT_NAME: {"maxMessageSizeInBytes": {"value": 10000}}, "leafguard": {"x": 1}}
    a.apply_desired(doc, T0)
    a.apply_desired({**doc, "leafguard": {"x": 2}}, T0 + 1)  # a patch to another section: same config
    a.apply_desired({CONFIG_OBJECT_NAME: {"maxMessageSizeInBytes": {"value": 1}}}, T0 + 2)  # rejected
    a.apply_desired({CONFIG_OBJECT_NAME: {"maxMessageSizeInBytes": {"value": 1}}}, T0 + 3)  # rejected again
    errs = [e["Payload"][0]["ErrorType"] for e in events(a.shutdown(T0 + 4)) if e["Name"] == "ConfigurationError"]
    assert errs == ["NotOptimal", "TypeMismatch", "TypeMismatch"]
