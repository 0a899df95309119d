"""The observation core: leaf rules, conversation states, services, observations, bounds, and the fast path."""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether

from leafguard.capture.batch import FrameBatch
from leafguard.capture.pcapfile import read_batches
from leafguard.demo import _client_hello, demo_capture
from leafguard.observe.analyzer import Analyzer
from leafguard.observe.model import ConnectionSeen, LoginSeen
from leafguard.observe.settings import AnalyzerSettings
from tests.conftest import shared_pcaps

LEAF = ("00:17:88:00:00:01", "10.1.0.5")
PEER = ("00:17:88:00:00:02", "10.1.0.6")
ROUTER = ("00:1b:21:00:00:09", "10.1.0.1")


def _batch(pkts: list[Any], t0: float = 1_700_000_000.0) -> FrameBatch:
    return FrameBatch.from_frames(1, [(t0 + i * 0.001, bytes(p), len(bytes(p))) for i, p in enumerate(pkts)])


def _tcp(src: tuple[str, str], dst: tuple[str, str], sport: int, dport: int, flags: str, data: bytes = b"") -> Any:
    return (
        Ether(src=src[0], dst=dst[0]) / IP(src=src[1], dst=dst[1]) / TCP(sport=sport, dport=dport, flags=flags) / data
    )


def _conv(an: Analyzer, port: int) -> dict[str, Any]:
    return next(c for c in an.report()["conversations"] if port in (c["a_port"], c["b_port"]))


def test_tcp_states() -> None:
    an = Analyzer()
    an.feed(
        _batch(
            [
                _tcp(LEAF, PEER, 40001, 80, "S"),  # S0: never answered
                _tcp(LEAF, PEER, 40002, 81, "S"),
                _tcp(PEER, LEAF, 81, 40002, "RA"),  # REJ
                _tcp(LEAF, PEER, 40003, 82, "S"),
                _tcp(PEER, LEAF, 82, 40003, "SA"),
                _tcp(LEAF, PEER, 40003, 82, "A"),  # EST
                _tcp(LEAF, PEER, 40004, 83, "S"),
                _tcp(PEER, LEAF, 83, 40004, "SA"),
                _tcp(LEAF, PEER, 40004, 83, "FA"),
                _tcp(PEER, LEAF, 83, 40004, "FA"),  # CLOSED
                _tcp(PEER, LEAF, 84, 40005, "PA", b"mid-stream"),  # OTHER, first sender is a
            ]
        )
    )
    assert [_conv(an, p)["state"] for p in (80, 81, 82, 83, 84)] == ["S0", "REJ", "EST", "CLOSED", "OTHER"]
    mid = _conv(an, 84)
    assert (mid["a_addr"], mid["a_port"]) == (PEER[1], 84)
    est = _conv(an, 82)
    assert (est["a_addr"], est["packets_ab"], est["packets_ba"]) == (LEAF[1], 2, 1)


def test_capture_starting_at_syn_ack_takes_the_receiver_as_initiator() -> None:
    an = Analyzer()
    an.feed(_batch([_tcp(PEER, LEAF, 1883, 50000, "SA"), _tcp(LEAF, PEER, 50000, 1883, "A")]))
    c = _conv(an, 1883)
    assert (c["a_addr"], c["a_port"], c["state"]) == (LEAF[1], 50000, "EST")


def test_leaf_rules_and_services() -> None:
    internet = ("00:1b:21:00:00:09", "52.1.2.3")  # frames from the internet arrive with the router's MAC
    no_ip = Ether(src="00:0e:8c:00:00:07", dst="01:80:c2:00:00:0e", type=0x88CC) / (b"\x00" * 40)
    an = Analyzer()
    an.feed(
        _batch(
            [
                _tcp(LEAF, internet, 40000, 443, "S"),
                _tcp(internet, LEAF, 443, 40000, "SA"),  # a remote service, not the router's
                _tcp(PEER, LEAF, 50000, 502, "S"),
                _tcp(LEAF, PEER, 502, 50000, "SA"),  # the leaf serves Modbus
                Ether(src=LEAF[0], dst=PEER[0]) / IP(src=LEAF[1], dst=PEER[1]) / UDP(sport=5000, dport=161),
                Ether(src=PEER[0], dst=LEAF[0]) / IP(src=PEER[1], dst=LEAF[1]) / UDP(sport=161, dport=5000),
                no_ip,
            ]
        )
    )
    leaves = {leaf["mac"]: leaf for leaf in an.report()["leaves"]}
    assert set(leaves) == {LEAF[0], PEER[0], "00:0e:8c:00:00:07"}
    assert leaves[LEAF[0]]["services"] == [{"protocol": "tcp", "port": 502}]
    assert leaves[PEER[0]]["services"] == [{"protocol": "udp", "port": 161}]
    assert leaves["00:0e:8c:00:00:07"]["ips"] == []
    # With an explicit leaf net the router's MAC only ever carried outside addresses: not a leaf.
    only = Analyzer(AnalyzerSettings.from_cli(["10.1.0.0/24"], gateway_macs=[PEER[0]]))
    only.feed(_batch([_tcp(internet, LEAF, 443, 40000, "SA"), _tcp(PEER, LEAF, 1, 2, "S")]))
    assert [leaf["mac"] for leaf in only.report()["leaves"]] == []


def test_dhcp_server_and_mdns_responder_are_services() -> None:
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.dns import DNS, DNSRR

    an = Analyzer()
    an.feed(
        _batch(
            [
                Ether(src=ROUTER[0], dst="ff:ff:ff:ff:ff:ff")
                / IP(src=ROUTER[1], dst="255.255.255.255")
                / UDP(sport=67, dport=68)
                / BOOTP(op=2, chaddr=bytes.fromhex("001788000001"), yiaddr=LEAF[1])
                / DHCP(options=[("message-type", "offer"), "end"]),
                Ether(src=LEAF[0], dst="01:00:5e:00:00:fb")
                / IP(src=LEAF[1], dst="224.0.0.251")
                / UDP(sport=5353, dport=5353)
                / DNS(qr=1, an=DNSRR(rrname="cam.local", rdata=LEAF[1])),
            ]
        )
    )
    leaves = {leaf["mac"]: leaf for leaf in an.report()["leaves"]}
    assert {"protocol": "udp", "port": 67} in leaves[ROUTER[0]]["services"]
    assert leaves[LEAF[0]]["services"] == [{"protocol": "udp", "port": 5353}]
    assert leaves[LEAF[0]]["hostnames"] == ["cam.local"]


def test_arp_teaches_addresses_and_counts_both_ways() -> None:
    an = Analyzer()
    an.feed(
        _batch(
            [
                Ether(src=LEAF[0], dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=LEAF[0], psrc=LEAF[1], pdst=ROUTER[1]),
                Ether(src=ROUTER[0], dst=LEAF[0]) / ARP(op=2, hwsrc=ROUTER[0], psrc=ROUTER[1], pdst=LEAF[1]),
            ]
        )
    )
    leaf = next(x for x in an.report()["leaves"] if x["mac"] == LEAF[0])
    assert leaf["ips"] == [LEAF[1]]
    assert (leaf["packets_out"], leaf["packets_in"]) == (1, 1)
    assert leaf["bytes_out"] == leaf["bytes_in"] == 42


@pytest.mark.parametrize("order", ["in order", "reversed"])
def test_fragments_count_in_their_conversation_in_any_order(order: str) -> None:
    from scapy.layers.inet import fragment

    datagram = IP(src=LEAF[1], dst=PEER[1], id=4242) / UDP(sport=7000, dport=7001) / (b"z" * 3000)
    frags = fragment(datagram, fragsize=1000)
    assert len(frags) == 4
    pkts = [Ether(src=LEAF[0], dst=PEER[0]) / f for f in frags]
    if order == "reversed":
        pkts.reverse()
    an = Analyzer()
    an.feed(_batch(pkts))
    c = _conv(an, 7001)
    assert (c["packets_ab"], c["bytes_ab"]) == (len(pkts), sum(len(bytes(p)) for p in pkts))


def test_observations_from_the_demo_capture() -> None:
    an = Analyzer()
    for b in read_batches(demo_capture()):
        an.feed(b)
    obs = an.drain_observations()
    assert an.drain_observations() == []
    conns = [o for o in obs if isinstance(o, ConnectionSeen)]
    logins = [o for o in obs if isinstance(o, LoginSeen)]
    plc = [o for o in conns if o.local_port == 502]
    assert len(plc) == 3 and all(o.direction == "In" for o in plc)
    refused = next(o for o in conns if o.local_port == 23)
    assert refused.direction == "In" and refused.protocol == "tcp"
    assert {(o.protocol, o.user, o.result, o.direction) for o in logins} >= {
        ("mqtt", "sensor", "Success", "Out"),
        ("http", "admin", "Success", "In"),
    }
    assert [o.ts for o in obs] == sorted(o.ts for o in obs)


def test_state_is_bounded_and_evictions_are_counted() -> None:
    settings_ = AnalyzerSettings(max_flows=64, max_macs=32, max_names_per_leaf=4)
    an = Analyzer(settings_)
    rnd = random.Random(7)

    def burst(k: int) -> FrameBatch:
        pkts = []
        for _ in range(500):
            mac = f"00:17:88:00:{rnd.randrange(256):02x}:{rnd.randrange(256):02x}"
            ip = f"10.9.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
            pkts.append(_tcp((mac, ip), PEER, rnd.randrange(1024, 65535), rnd.randrange(1, 1024), "S"))
        return _batch(pkts, t0=1_700_000_000.0 + k * 1000)

    # Built before measuring: scapy's own allocations are not ours. Enough batches for every table (the
    # detectors' scan windows and address bindings included, 2048 entries each) to reach its cap first.
    batches = [burst(k) for k in range(16)]
    an.feed(batches[0])
    tracemalloc.start()
    for b in batches[1:8]:
        an.feed(b)
        an.drain_observations()
    base = tracemalloc.get_traced_memory()[0]
    for b in batches[8:]:
        an.feed(b)
        an.drain_observations()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(an.flows) <= 64 and len(an.macs) <= 32
    cap = an.report()["capture"]
    assert cap["evicted_flows"] >= 15 * 500 - 64
    assert cap["evicted_leaves"] > 0
    assert grown < 256 * 1024, f"memory grew by {grown} bytes once the caps were reached"


def _payloads(rnd: random.Random, dport: int) -> list[tuple[bool, bytes]]:
    """A plausible exchange for the service on ``dport``: (from the client?, payload) in order."""
    if dport == 1883:
        user = b"dev%d" % rnd.randrange(10)
        body = b"\x00\x04MQTT\x04\xc2\x00\x3c\x00\x02id" + len(user).to_bytes(2, "big") + user + b"\x00\x02pw"
        code = rnd.choice([0, 0, 5])
        return [
            (True, bytes([0x10, len(body)]) + body),
            (False, bytes([0x20, 2, 0, code])),
            (True, b"\x30\x05\x00\x01tx"),
        ]
    if dport in (80, 8080):
        auth = b"Authorization: Basic YWRtaW46eA==\r\n" if rnd.random() < 0.5 else b""
        status = rnd.choice([b"200 OK", b"401 No"])
        return [(True, b"GET / HTTP/1.1\r\n" + auth + b"\r\n"), (False, b"HTTP/1.1 " + status + b"\r\n\r\n")]
    if dport == 23:
        return [(False, b"login: "), (True, b"root\r\n"), (False, b"Password: "), (True, b"x\r\n"), (False, b"$ ")]
    if dport == 443:
        return [(True, _client_hello(f"s{rnd.randrange(5)}.example")), (False, b"\x16\x03\x03\x00\x01\x00")]
    return [(rnd.random() < 0.5, b"x" * rnd.randint(1, 60)) for _ in range(rnd.randint(0, 6))]


def _session(rnd: random.Random, a: tuple[str, str], b: tuple[str, str], n: int) -> list[Any]:
    sport, kind = 20000 + n, rnd.random()
    if kind < 0.15:  # DNS, CoAP or mDNS
        u = rnd.choice([53, 5683, 5353])
        q = bytes(DNS(rd=1, qd=DNSQR(qname=f"h{rnd.randrange(9)}.example")))
        ans = bytes(DNS(qr=1, qd=DNSQR(qname="cam.local"), an=DNSRR(rrname="cam.local", rdata=a[1])))
        out = [Ether(src=a[0], dst=b[0]) / IP(src=a[1], dst=b[1]) / UDP(sport=sport, dport=u) / q]
        out += [Ether(src=b[0], dst=a[0]) / IP(src=b[1], dst=a[1]) / UDP(sport=u, dport=sport) / ans]
        return out * rnd.randint(1, 2)
    if kind < 0.2:  # ICMP echo and ARP
        return [
            Ether(src=a[0], dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=a[0], psrc=a[1], pdst=b[1]),
            Ether(src=b[0], dst=a[0]) / ARP(op=2, hwsrc=b[0], psrc=b[1], pdst=a[1]),
            Ether(src=a[0], dst=b[0]) / IP(src=a[1], dst=b[1]) / ICMP(),
            Ether(src=b[0], dst=a[0]) / IP(src=b[1], dst=a[1]) / ICMP(type=0),
        ]
    dport = rnd.choice([80, 443, 1883, 502, 8080, 23])
    start = rnd.random()
    if start < 0.1:  # refused
        return [_tcp(a, b, sport, dport, "S"), _tcp(b, a, dport, sport, "RA")]
    if start < 0.2:  # the capture starts mid-connection
        out = []
    elif start < 0.3:  # ... or at the SYN-ACK
        out = [_tcp(b, a, dport, sport, "SA"), _tcp(a, b, sport, dport, "A")]
    else:
        out = [_tcp(a, b, sport, dport, "S"), _tcp(b, a, dport, sport, "SA"), _tcp(a, b, sport, dport, "A")]
    for from_client, data in _payloads(rnd, dport):
        if from_client:
            out += [_tcp(a, b, sport, dport, "PA", data), _tcp(b, a, dport, sport, "A")]
        else:
            out += [_tcp(b, a, dport, sport, "PA", data), _tcp(a, b, sport, dport, "A")]
    if rnd.random() < 0.8:
        out += [_tcp(a, b, sport, dport, "FA"), _tcp(b, a, dport, sport, "FA"), _tcp(a, b, sport, dport, "A")]
    return out


def _tagged(p: Any, vlan: int) -> Any:
    return Ether(src=p[Ether].src, dst=p[Ether].dst) / Dot1Q(vlan=vlan) / p[Ether].payload


def _session_frames(rnd: random.Random, n_sessions: int) -> list[Any]:
    hosts = [(f"00:17:88:00:01:{i:02x}", f"10.2.0.{i + 1}") for i in range(6)] + [("00:1b:21:00:00:09", "52.9.9.9")]
    sessions = [_session(rnd, *rnd.sample(hosts, 2), n) for n in range(n_sessions)]
    # A third of them on a VLAN (a trunk port): one 802.1Q tag between the MACs and the rest.
    sessions = [[_tagged(p, 10 + n % 3) for p in s] if rnd.random() < 0.33 else s for n, s in enumerate(sessions)]
    # Interleave the sessions as a capture does, each one's frames staying in order.
    frames: list[Any] = []
    live = [list(reversed(s)) for s in sessions if s]
    while live:
        k = rnd.randrange(min(len(live), 4))
        frames.append(live[k].pop())
        if not live[k]:
            live.pop(k)
    return frames


def _run(frames: list[Any], fast: bool, batch: int) -> tuple[dict[str, Any], list[Any]]:
    an = Analyzer(fast_path=fast)
    raw = [(1_700_000_000.0 + i * 0.01, bytes(p), len(bytes(p))) for i, p in enumerate(frames)]
    for k in range(0, len(raw), batch):
        an.feed(FrameBatch.from_frames(1, raw[k : k + batch]))
    return an.report(), an.drain_observations()


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.sampled_from([64, 100, 257, 4096]))
def test_fast_path_gives_the_same_result_as_the_per_frame_path(seed: int, batch: int) -> None:
    frames = _session_frames(random.Random(seed), 40)
    fast, slow = _run(frames, True, batch), _run(frames, False, batch)
    assert fast == slow
    assert any(isinstance(o, LoginSeen) for o in slow[1]), "the generator should exercise the login trackers"


@pytest.mark.parametrize("capture", [p.name for p in shared_pcaps()])
def test_fast_path_matches_on_real_captures(capture: str) -> None:
    path = next(p for p in shared_pcaps() if p.name == capture)
    results = []
    for fast in (True, False):
        an = Analyzer(fast_path=fast)
        for b in read_batches(path, batch_frames=128):
            an.feed(b)
        results.append((an.report(), an.drain_observations()))
    assert results[0] == results[1]


def test_frames_with_one_vlan_tag_take_the_bulk_path_too(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(11)
    hosts = [(f"00:17:88:00:01:{i:02x}", f"10.2.0.{i + 1}") for i in range(6)]
    frames = [p for n in range(60) for p in _session(rnd, *rnd.sample(hosts, 2), n)]
    tagged = [_tagged(p, 42) for p in frames]
    walked = 0
    frame = Analyzer.frame

    def counting(self: Analyzer, *args: Any, **kwargs: Any) -> Any:
        nonlocal walked
        walked += 1
        return frame(self, *args, **kwargs)

    monkeypatch.setattr(Analyzer, "frame", counting)
    results = []
    for capture in (frames, tagged):
        walked = 0
        report, _ = _run(capture, True, 4096)
        counts = [(c["a_addr"], c["a_port"], c["packets_ab"], c["packets_ba"]) for c in report["conversations"]]
        results.append(([(x["mac"], x["packets_out"], x["services"]) for x in report["leaves"]], counts, walked))
        assert report == _run(capture, False, 4096)[0]
    assert results[0][:2] == results[1][:2]  # the same traffic (only the byte counts differ, by the tags)
    assert results[1][2] == results[0][2] < len(frames) / 4  # a trunk port costs no more per-frame work
