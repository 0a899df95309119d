"""The attack rules of issue #14 together: frames picked from each batch (`probes.Picker`), routed in capture
order to the rules that read them (`scans`, `bruteforce`, `impersonation`); findings go to one sink (the
`Detectors` alert list, which mutes and caps them)."""

from __future__ import annotations

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

    def set_thresholds(self, thresholds: Thresholds) -> None:
        """New thresholds, in force for what is counted from now on (the rules share the record)."""
        self.thresholds = thresholds
        self.scans.t = self.brute.t = self.impersonation.t = thresholds

    def learn(self) -> None:
        """Accept the current state: every count starts afresh, and the next hop each leaf uses now is its
        gateway (the rules are rebuilt; what the picker has seen stays seen)."""
        self._build(self.thresholds)

    def feed(self, batch: FrameBatch) -> None:
        scans, brute, imp = self.scans, self.brute, self.impersonation
        for r in self.picker.records(batch):
            scans.expire(r.ts)
            if isinstance(r, TcpControl):
                scans.tcp(r)
                brute.tcp(r)
            elif isinstance(r, UdpFirst):
                scans.udp(r)
            elif isinstance(r, NextHop):
                imp.next_hop(r)
            elif isinstance(r, ArpFrame):
                scans.arp(r)
                imp.arp(r)
            elif isinstance(r, EchoRequest):
                scans.echo(r)
            elif isinstance(r, PortUnreachable):
                scans.unreachable(r)
            elif isinstance(r, Neighbor):
                imp.neighbor(r)

    def finish(self, last_ts: float | None) -> None:
        """The end of the input: probes unanswered by the last packet time are judged."""
        if last_ts is not None:
            self.scans.expire(last_ts)
