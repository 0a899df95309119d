"""The attack rules of issue #14 together: frames picked from each batch (`probes.Picker`), routed in capture
order to the rules that read them (`scans`, `bruteforce`, `impersonation`); findings go to one sink (the
`Detectors` alert list, which mutes and caps them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from leafguard.capture.batch import FrameBatch
from leafguard.detect.bruteforce import ConnectionBruteForce
from leafguard.detect.impersonation import Impersonation
from leafguard.detect.probes import (
    ArpFrame,
    EchoRequest,
    Neighbor,
    NextHop,
    Picker,
    PortUnreachable,
    TcpControl,
    UdpFirst,
)
from leafguard.detect.scans import Scans, Sink
from leafguard.detect.thresholds import Thresholds
from leafguard.observe.settings import Network


class AttackDetectors:
    def __init__(
        self,
        thresholds: Thresholds,
        sink: Sink,
        *,
        leaf_nets: tuple[Network, ...] = (),
        gateway_macs: frozenset[bytes] = frozenset(),
        max_tracked: int = 65_536,
    ) -> None:
        """``max_tracked``: the cap of each table of conversations and probes (the analyzer's flow cap)."""
        self._sink = sink
        self._max = max_tracked
        self._leaf_nets = leaf_nets
        self._gateway = gateway_macs
        self.picker = Picker(leaf_nets, max_tracked)
        self._build(thresholds)

    def _build(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self.scans = Scans(thresholds, self._sink, self._gateway, self._max)
        self.brute = ConnectionBruteForce(thresholds, self._sink, self._max)
        self.impersonation = Impersonation(thresholds, self._sink, self._gateway)

    def set_network(self, leaf_nets: tuple[Network, ...], gateway_macs: frozenset[bytes]) -> None:
        """The leaf side and the gateway's own MACs changed (gateway settings): in force from the next batch;
        what the rules have counted stays."""
        self._leaf_nets, self._gateway = leaf_nets, gateway_macs
        self.scans.gateway_macs = self.impersonation.gateway_macs = gateway_macs
        self.picker.set_leaf_nets(leaf_nets)

    def set_thresholds(self, thresholds: Thresholds) -> None:
        """New thresholds, in force for what is counted from now on (the rules share the record)."""
        self.thresholds = thresholds
        self.scans.t = self.brute.t = self.impersonation.t = thresholds
        self.scans.expire_at_new_timeout()

    def learn(self) -> None:
        """Accept the current state: every count starts afresh, and the next hop each leaf uses now is its
        gateway (the rules are rebuilt; what the picker has seen stays seen)."""
        self._build(self.thresholds)

    def feed(self, batch: FrameBatch) -> None:
        scans = self.scans
        route = self._routes
        for r in self.picker.records(batch):
            if r.ts >= scans.deadline:
                scans.expire(r.ts)
            for rule in route[type(r)]:
                rule(r)

    @property
    def _routes(self) -> dict[type, tuple[Callable[[Any], None], ...]]:
        """Which rules read each kind of record, in the order they read it."""
        s, b, i = self.scans, self.brute, self.impersonation
        return {
            TcpControl: (s.tcp, b.tcp),
            UdpFirst: (s.udp,),
            NextHop: (i.next_hop,),
            ArpFrame: (s.arp, i.arp),
            EchoRequest: (s.echo,),
            PortUnreachable: (s.unreachable,),
            Neighbor: (i.neighbor,),
        }

    def finish(self, last_ts: float | None) -> None:
        """The end of the input: probes unanswered by the last packet time are judged."""
        if last_ts is not None:
            self.scans.expire(last_ts)
