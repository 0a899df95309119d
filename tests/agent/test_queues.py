"""The drop policy and message filling, on the queues directly, and the property test over event streams."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leafguard.agent.agent import LeafAgent
from leafguard.agent.config import CONFIG_OBJECT_NAME, AgentConfig
from leafguard.agent.messages import MessageBuilder
from leafguard.agent.queues import EventQueues, QueueName
from tests.agent.helpers import T0, conn, login, view

LOW, HIGH, OP = QueueName.LOW, QueueName.HIGH, QueueName.OPERATIONAL


def ev(tag: str, size: int = 10) -> bytes:
    return tag.encode().ljust(size, b".")


def contents(q: EventQueues, name: QueueName) -> list[str]:
    out = []
    while q.count(name):
        out.append(q.pop(name).decode().rstrip("."))
    return out


def test_new_low_evicts_oldest_low_only() -> None:
    q = EventQueues(cache_bytes=40, max_event_bytes=100)
    for t in ("l1", "l2", "h1"):
        q.push(HIGH if t.startswith("h") else LOW, ev(t))
    q.push(LOW, ev("l3"))
    q.push(LOW, ev("l4"))  # full: evicts l1
    assert q.totals().dropped == 1
    assert contents(q, LOW) == ["l2", "l3", "l4"] and contents(q, HIGH) == ["h1"]


def test_low_is_refused_when_only_higher_ranks_fill_the_cache() -> None:
    q = EventQueues(cache_bytes=30, max_event_bytes=100)
    q.push(HIGH, ev("h1"))
    q.push(OP, ev("o1"))
    q.push(HIGH, ev("h2"))
    assert not q.push(LOW, ev("l1"))  # would have to evict a high event: the new low event is dropped
    assert contents(q, HIGH) == ["h1", "h2"] and contents(q, OP) == ["o1"]
    h, lo, _ = q.take_counts()
    assert (lo.collected, lo.dropped) == (1, 1) and (h.collected, h.dropped) == (2, 0)


def test_high_evicts_low_first_then_older_high() -> None:
    q = EventQueues(cache_bytes=30, max_event_bytes=100)
    q.push(LOW, ev("l1"))
    q.push(HIGH, ev("h1"))
    q.push(HIGH, ev("h2"))
    q.push(HIGH, ev("h3"))  # evicts l1
    q.push(HIGH, ev("h4"))  # evicts h1
    assert contents(q, LOW) == [] and contents(q, HIGH) == ["h2", "h3", "h4"]
    h, lo, _ = q.take_counts()
    assert (h.dropped, lo.dropped) == (1, 1)


def test_operational_is_dropped_last() -> None:
    q = EventQueues(cache_bytes=30, max_event_bytes=100)
    q.push(OP, ev("o1"))
    q.push(LOW, ev("l1"))
    q.push(HIGH, ev("h1"))
    q.push(OP, ev("o2"))  # evicts l1
    q.push(OP, ev("o3"))  # evicts h1
    q.push(OP, ev("o4"))  # only operational left: evicts o1
    assert contents(q, OP) == ["o2", "o3", "o4"]
    _, _, o = q.take_counts()
    assert (o.collected, o.dropped) == (4, 1)


def test_too_large_never_enters_and_is_counted() -> None:
    q = EventQueues(cache_bytes=1000, max_event_bytes=50)
    assert not q.push(HIGH, ev("big", 51))
    assert q.push(HIGH, ev("ok", 50))
    h, _, _ = q.take_counts()
    assert (h.collected, h.dropped, h.too_large) == (2, 1, 1)
    assert q.take_counts()[0].collected == 0  # reset after being taken


def test_fill_order_operational_main_padding_oldest_first_and_size() -> None:
    b = MessageBuilder("leaf-x", "1.2.3", 8192)
    q = EventQueues(cache_bytes=100_000, max_event_bytes=b.max_event_bytes)
    for i in range(3):
        q.push(LOW, orjson.dumps({"n": f"l{i}"}))
        q.push(HIGH, orjson.dumps({"n": f"h{i}"}))
    q.push(OP, orjson.dumps({"n": "o0"}))
    msg = b.build(q, LOW, HIGH)
    assert msg is not None and msg.priority == "Low"
    body = orjson.loads(msg.body)
    assert [e["n"] for e in body["Events"]] == ["o0", "l0", "l1", "l2", "h0", "h1", "h2"]
    assert set(body) == {"AgentVersion", "AgentId", "MessageSchemaVersion", "Events"}


def test_message_is_filled_to_the_exact_byte_limit() -> None:
    b = MessageBuilder("leaf-x", "1.2.3", 8192)
    q = EventQueues(cache_bytes=100_000, max_event_bytes=b.max_event_bytes)
    first = b"x" * (b.max_event_bytes - 20)
    q.push(HIGH, b'"' + first[2:] + b'"')
    q.push(HIGH, b'"' + b"y" * 17 + b'"')  # 19 bytes + comma = 20: fits exactly
    q.push(HIGH, b'"z"')
    msg = b.build(q, HIGH, LOW)
    assert msg is not None and len(msg.body) == 8192 and msg.event_count == 2
    assert q.count(HIGH) == 1


def config_for(cache: int, size: int, hf: int, lf: int, agg: bool, agg_s: int) -> AgentConfig:
    doc = {
        "maxLocalCacheSizeInBytes": cache,
        "maxMessageSizeInBytes": size,
        "highPriorityMessageFrequency": f"PT{hf}S",
        "lowPriorityMessageFrequency": f"PT{lf}S",
        "snapshotFrequency": "PT300S",
        "aggregationEnabledConnectionCreate": agg,
        "aggregationIntervalConnectionCreate": f"PT{agg_s}S",
    }
    outcome = AgentConfig().apply_desired({CONFIG_OBJECT_NAME: {k: {"value": v} for k, v in doc.items()}})
    assert outcome.accepted
    return outcome.config


step = st.one_of(
    st.tuples(st.just("conn"), st.integers(0, 30), st.integers(1, 20), st.sampled_from(["In", "Out"])),
    st.tuples(st.just("login"), st.integers(0, 12000), st.integers(1, 20), st.booleans()),
    st.tuples(st.just("tick"), st.integers(0, 400)),
    st.tuples(st.just("config"), st.sampled_from([8192, 16384, 65536]), st.sampled_from([8192, 12288, 16384])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cache=st.sampled_from([8192, 12000, 30000, 200_000]),
    size=st.sampled_from([8192, 10000, 16384]),
    hf=st.integers(1, 600),
    lf=st.integers(1, 3600),
    agg=st.booleans(),
    agg_s=st.integers(1, 600),
    steps=st.lists(step, max_size=120),
)
def test_every_event_is_sent_or_counted_and_no_message_exceeds_the_limit(
    cache: int, size: int, hf: int, lf: int, agg: bool, agg_s: int, steps: list[tuple[Any, ...]]
) -> None:
    a = LeafAgent("leaf-p", config_for(cache, size, hf, lf, agg, agg_s), T0)
    now = T0
    out: list[Any] = []

    def collect(msgs: list[Any]) -> None:
        # Each message is within the limit of the configuration in force when it was built.
        assert all(len(m.body) <= a.config.max_message_size_bytes for m in msgs)
        out.extend(msgs)

    collect(a.tick(now, view()))
    for s in steps:
        kind = s[0]
        if kind == "conn":
            now += s[2]
            a.observe(conn(now, remote_port=s[1], direction=s[3]))
        elif kind == "login":
            now += s[2]
            a.observe(login(now, user="u" * s[1], result="Success" if s[3] else "Fail"))
        elif kind == "tick":
            now += s[1]
            collect(a.tick(now, view()))
        else:
            doc = {"maxLocalCacheSizeInBytes": s[1], "maxMessageSizeInBytes": s[2]}
            a.apply_desired({CONFIG_OBJECT_NAME: {k: {"value": v} for k, v in doc.items()}}, now)
            collect(a.tick(now, view()))
        totals = a.stats()
        assert totals.sent + totals.dropped + totals.pending == totals.generated
    collect(a.shutdown(now + 1))
    totals = a.stats()
    assert totals.pending == 0
    assert totals.sent + totals.dropped == totals.generated
    assert sum(m.event_count for m in out) == totals.sent
    assert sum(len(orjson.loads(m.body)["Events"]) for m in out) == totals.sent


def test_body_never_exceeds_what_the_sdk_accepts() -> None:
    b = MessageBuilder("leaf-x", "1.2.3", 262144)
    q = EventQueues(cache_bytes=10_000_000, max_event_bytes=b.max_event_bytes)
    for _ in range(40):
        q.push(HIGH, b'"' + "é".encode() * 5000 + b'"')
    msg = b.build(q, HIGH, LOW)
    assert msg is not None and len(msg.body) <= 262144 - 1024
    sdk = msg.to_sdk_message()
    assert sdk.get_size() <= 262144
    assert sdk.iothub_interface_id == "urn:azureiot:Security:SecurityAgent:1"
    assert sdk.content_type == "application/json" and sdk.content_encoding == "utf-8"
    assert sdk.custom_properties == {"MessagePriority": "High"}
