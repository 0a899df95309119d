"""An agent continued from its saved state sends what the uninterrupted agent would have sent, and holding for a
congested uplink gives fewer, fuller messages."""

from __future__ import annotations

import orjson

from leafguard.agent.agent import LeafAgent
from leafguard.agent.config import AgentConfig
from leafguard.agent.fleet import Fleet
from leafguard.agent.messages import OutgoingMessage
from leafguard.service.state import decode_state, encode_state
from tests.agent.helpers import MAC, T0, conn, login

FAST = AgentConfig(high_priority_message_frequency_s=10.0, low_priority_message_frequency_s=20.0)


def bodies(messages: list[OutgoingMessage]) -> list[bytes]:
    return [m.body for m in messages]


def events(messages: list[OutgoingMessage]) -> list[dict[str, object]]:
    return [e for m in messages for e in orjson.loads(m.body)["Events"]]


def feed(agent: LeafAgent, start: float, count: int) -> list[OutgoingMessage]:
    out: list[OutgoingMessage] = []
    for i in range(count):
        ts = start + i * 0.7
        agent.observe(conn(ts, remote_port=1000 + i % 40) if i % 3 else login(ts))
        out += agent.tick(ts)
    return out


def test_a_restored_agent_continues_exactly_where_the_saved_one_was() -> None:
    reference = LeafAgent("leaf-1", FAST, T0)
    feed(reference, T0, 50)
    # Through the state file's encoding (events spliced in as JSON, read back as objects).
    saved = decode_state(encode_state({"agent": reference.export_state()}))["agent"]
    assert sum(len(q) for q in saved["queues"]["events"].values()) > 0, "events wait in the cache"
    assert saved["aggregation"]["entries"], "an aggregation window is open"

    restored = LeafAgent("leaf-1", FAST, T0 + 9999)
    restored.restore_state(saved, T0 + 35)
    after_ref = feed(reference, T0 + 35, 60) + reference.shutdown(T0 + 120)
    after_restored = feed(restored, T0 + 35, 60) + restored.shutdown(T0 + 120)
    assert bodies(after_restored) == bodies(after_ref), "same messages, same event Ids, byte for byte"
    assert restored.stats() == reference.stats()
    s = restored.stats()
    assert s.generated == s.sent + s.dropped and s.pending == 0


def test_forgetting_events_that_reached_the_output_after_the_save() -> None:
    agent = LeafAgent("leaf-1", FAST, T0)
    feed(agent, T0, 20)
    saved = agent.export_state()
    cached = {str(orjson.loads(e)["Id"]) for q in saved["queues"]["events"].values() for e in q}  # bytes here
    sent = agent.flush(T0 + 15)  # these reached the output after the save, then the process died
    ids = {str(e["Id"]) for e in events(sent)}
    assert cached and cached <= ids
    restored = LeafAgent("leaf-1", FAST, T0)
    restored.restore_state(saved, T0 + 15)
    assert restored.forget_events(ids) == len(cached)
    again = events(restored.flush(T0 + 15))
    # What the cache held is not sent twice. The open aggregation window was saved too, so its closing events
    # come again: the same events with the same Ids (duplicates a consumer can tell apart).
    repeated = [e for e in again if e["Id"] in ids]
    assert repeated and all(e["Category"] == "Aggregated" for e in repeated)
    assert all(e in events(sent) for e in repeated)
    s = restored.stats()
    assert s.generated == s.sent + s.dropped + s.pending


def test_fleet_state_keeps_the_leaf_map_desired_documents_and_totals() -> None:
    fleet = Fleet(AgentConfig(), {MAC: "plc-7"})
    desired = {"ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration":
               {"highPriorityMessageFrequency": {"value": "PT30S"}}}
    fleet.apply_desired("plc-7", desired, T0)
    for i in range(30):
        fleet.observe(login(T0 + i))
    fleet.tick(T0 + 30)
    state = decode_state(encode_state({"fleet": fleet.export_state()}))["fleet"]
    again = Fleet(AgentConfig())
    again.restore_state(state, T0 + 30)
    agent = again.agent("plc-7")
    assert agent is not None and again.identity_for(MAC) == "plc-7"
    assert agent.config.high_priority_message_frequency_s == 30.0
    assert again.stats() == fleet.stats() and again.restored_agents == 1
    assert again.totals.totals() == fleet.totals.totals()


def test_a_malformed_agent_starts_afresh_and_is_counted() -> None:
    fleet = Fleet(AgentConfig())
    fleet.observe(login(T0))
    state = fleet.export_state()
    state["agents"][MAC]["queues"] = "garbage"
    again = Fleet(AgentConfig())
    again.restore_state(state, T0)
    assert again.restore_failures == 1 and again.restored_agents == 0 and again.agent(MAC.replace(":", "")) is None


def test_holding_gives_fewer_fuller_messages_and_loses_nothing() -> None:
    small = AgentConfig(high_priority_message_frequency_s=5.0, low_priority_message_frequency_s=10.0,
                        max_message_size_bytes=16_384, aggregation_enabled_connection_create=False)

    def run(hold: bool) -> tuple[list[OutgoingMessage], LeafAgent]:
        agent = LeafAgent("leaf-1", small, T0)
        out: list[OutgoingMessage] = []
        for i in range(1500):
            ts = T0 + i * 2.0  # 5 events per 10 s timed send (Low): a sixth of a message
            agent.observe(conn(ts, remote_port=1000 + i))
            out += agent.tick(ts, hold=hold and i < 1400)
        return out + agent.shutdown(T0 + 3100), agent

    fast, fast_agent = run(hold=False)
    held, held_agent = run(hold=True)
    assert len(held) < len(fast) / 3
    per_message = sum(m.event_count for m in held) / len(held)
    assert per_message > 2 * sum(m.event_count for m in fast) / len(fast)
    assert all(len(m.body) <= 16_384 for m in held)
    assert sum(m.event_count for m in held) == sum(m.event_count for m in fast)
    assert held_agent.stats().dropped == fast_agent.stats().dropped == 0
