"""Many leaf agents: identity mapping, per-leaf configuration, one clock.

Each leaf (by MAC) gets one :class:`LeafAgent` the first time it shows up in an observation or a view. Its identity
comes from the leaf map (MAC → twin identity) when the map names it, else from its MAC (``identity_for_mac``); when
the map later names a leaf, its agent continues under the new identity. Leaves without desired properties of their
own use the fleet's default configuration (the gateway's defaults).

The number of agents is bounded (``max_leaves``); observations of leaves beyond it are counted in
:attr:`Fleet.refused_observations`, not queued anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from leafguard import __version__
from leafguard.agent import journal as j
from leafguard.agent.agent import AgentStats, LeafAgent
from leafguard.agent.config import CONFIG_OBJECT_NAME, AgentConfig, ConfigOutcome
from leafguard.agent.events import Severity
from leafguard.agent.messages import OutgoingMessage
from leafguard.agent.queues import QueueTotals
from leafguard.documents import read_document
from leafguard.errors import ConfigurationError
from leafguard.observe.model import ConnectionSeen, LeafView, LoginSeen, identity_for_mac

DEFAULT_MAX_LEAVES = 10_000

ViewsProvider = Callable[[], Iterable[LeafView]]
"""Returns the current inventory snapshots (e.g. ``Analyzer.leaf_views``); called only when needed."""


class JournalSink(Protocol):
    """Where the fleet records its inputs as they come (see `leafguard.agent.journal`)."""

    def record(self, op: j.FleetOp) -> None: ...


class Fleet:
    """The agents of every leaf, keyed by MAC."""

    def __init__(
        self,
        default_config: AgentConfig | None = None,
        leaf_map: Mapping[str, str] | None = None,
        *,
        default_desired: object = None,
        agent_version: str = __version__,
        max_leaves: int = DEFAULT_MAX_LEAVES,
        discovery_interval_s: float = 10.0,
    ) -> None:
        self.default_config = default_config or AgentConfig()
        self.default_desired = default_desired
        """A desired document applied to every leaf that has none of its own (e.g. ``--agent-config``)."""
        self._leaf_map = {mac.lower(): ident for mac, ident in (leaf_map or {}).items()}
        self._agent_version = agent_version
        self.max_leaves = max_leaves
        self.discovery_interval_s = discovery_interval_s
        self._agents: dict[str, LeafAgent] = {}
        self._by_identity: dict[str, str] = {}
        self._desired: dict[str, object] = {}
        """Desired documents by identity, kept so that a leaf created later starts with its own config."""
        self._last_discovery: float | None = None
        self._reported_dirty: set[str] = set()
        self._retired: set[str] = set()
        """Identities given up by a rename, whose reported properties should be removed."""
        """Identities whose reported properties must be (re)written."""
        self._dirty: set[str] = set()
        """MACs of agents that got input since the last tick (their schedule may have moved earlier)."""
        self._min_due = float("-inf")
        """The earliest ``next_due`` of the agents not in ``_dirty``: until then a tick has nothing to do."""
        self.refused_observations = 0
        self.totals = QueueTotals()
        """Every agent's event and message counters, summed as they happen (metrics read them in O(1))."""
        self._held = False
        self.restored_agents = 0
        """Agents continued from a saved state at start-up."""
        self.restore_failures = 0
        """Agents whose saved state did not fit (started afresh)."""
        self.journal: JournalSink | None = None
        """Every input that changes an agent is recorded here first (None: nothing is journalled)."""

    # -- identities ----------------------------------------------------------------------------------------

    def identity_for(self, mac: str) -> str:
        """The twin identity of a MAC: the leaf map's name for it, else one derived from the MAC."""
        mac = mac.lower()
        return self._leaf_map.get(mac) or identity_for_mac(mac)

    def named_macs(self) -> Collection[str]:
        """The MACs the leaf map names."""
        return self._leaf_map.keys()

    def mac_of(self, identity: str) -> str | None:
        """The MAC of the agent that has ``identity`` (None: no agent has it)."""
        return self._by_identity.get(identity)

    def set_leaf_map(self, leaf_map: Mapping[str, str], now: float) -> None:
        """Replace the leaf map; agents of leaves it renames continue under their new identity."""
        if self.journal is not None:
            self.journal.record(j.LeafMapSet(dict(leaf_map), now))
        self._leaf_map = {mac.lower(): ident for mac, ident in leaf_map.items()}
        self.totals.changes += 1
        renamed = [(mac, agent, ident) for mac, agent in self._agents.items()
                   if (ident := self.identity_for(mac)) != agent.identity]
        # Every old name goes before any new one is taken: one leaf may take the name another gives up.
        for mac, agent, _ident in renamed:
            if self._by_identity.get(agent.identity) == mac:
                del self._by_identity[agent.identity]
            self._retired.add(agent.identity)
        for mac, agent, ident in renamed:
            agent.rename(ident)
            self._by_identity[ident] = mac
            self._reported_dirty.add(ident)
            if ident in self._desired:
                agent.apply_desired(self._desired[ident], now)

    def agent(self, identity: str) -> LeafAgent | None:
        mac = self._by_identity.get(identity)
        return self._agents.get(mac) if mac is not None else None

    def agents(self) -> list[LeafAgent]:
        return list(self._agents.values())

    def ensure(self, mac: str, now: float) -> LeafAgent | None:
        """The agent of a leaf, created at ``now`` if new (None when ``max_leaves`` is reached)."""
        mac = mac.lower()
        agent = self._agents.get(mac)
        if agent is not None:
            return agent
        if len(self._agents) >= self.max_leaves:
            return None
        ident = self.identity_for(mac)
        agent = LeafAgent(ident, self.default_config, now, agent_version=self._agent_version, totals=self.totals)
        self._agents[mac] = agent
        self.totals.changes += 1
        self._by_identity[ident] = mac
        self._dirty.add(mac)
        self._reported_dirty.add(ident)
        desired = self._desired.get(ident, self.default_desired)
        if desired is not None:
            agent.apply_desired(desired, now)
        return agent

    # -- inputs --------------------------------------------------------------------------------------------

    def observe(self, obs: ConnectionSeen | LoginSeen) -> None:
        if self.journal is not None:
            self.journal.record(j.Observed(obs))
        agent = self.ensure(obs.leaf_mac, obs.ts)
        if agent is None:
            self.refused_observations += 1
            self.totals.changes += 1
            return
        agent.observe(obs)
        self._dirty.add(obs.leaf_mac.lower())

    def apply_desired(self, identity: str, desired: object, now: float) -> ConfigOutcome:
        """Apply a leaf's whole desired-properties document (now, or when the leaf first shows up).

        Returns the outcome whose ``reported`` is what to write to that leaf's reported properties. For a
        leaf not seen yet, the outcome is computed against the default configuration.
        """
        if self.journal is not None:
            self.journal.record(j.DesiredApplied(identity, desired, now))
        self._desired[identity] = desired
        self._reported_dirty.add(identity)
        self.totals.changes += 1
        agent = self.agent(identity)
        if agent is None:
            return self.default_config.apply_desired(desired)
        self._dirty.add(self._by_identity[identity])
        return agent.apply_desired(desired, now)

    def take_reported_changes(self) -> dict[str, dict[str, Any]]:
        """Reported properties to write, by identity: new leaves, renamed leaves, every applied desired document.

        After a rejected update the (unchanged) configuration is reported again, as the reference agents do.
        """
        out = {ident: self.reported(ident) for ident in sorted(self._reported_dirty)}
        self._reported_dirty.clear()
        return out

    def take_retired(self) -> list[str]:
        """Identities no leaf uses any more (renamed by the leaf map): remove their reported properties.

        Take them before :meth:`take_reported_changes`: an identity can be retired and reused in one rename."""
        out = sorted(self._retired - set(self._by_identity))
        self._retired.clear()
        return out

    def reported(self, identity: str) -> dict[str, Any]:
        agent = self.agent(identity)
        return (agent.config if agent is not None else self.default_config).reported()

    # -- the clock -----------------------------------------------------------------------------------------

    def tick(self, now: float, views: ViewsProvider | None = None, *, hold: bool = False) -> list[OutgoingMessage]:
        """Advance every agent to ``now``; returns the messages due, leaf by leaf.

        ``views`` is called at most once, and only when an agent takes a snapshot or every
        ``discovery_interval_s`` (to create agents for leaves seen only in the inventory). ``hold``: the uplink is
        down or behind, timed sends wait (see :meth:`LeafAgent.tick`).
        """
        if hold != self._held:
            self._held = hold
            self._min_due = float("-inf")  # every agent's schedule changes with the hold
        discover = self._last_discovery is None or now - self._last_discovery >= self.discovery_interval_s
        if now < self._min_due and not self._dirty and not (discover and views is not None):
            return []  # nothing is due anywhere: O(1) however many leaves there are
        by_mac: dict[str, LeafView] | None = None
        if views is not None and (discover or any(a.needs_view(now) for a in self._agents.values())):
            by_mac = {v.mac.lower(): v for v in views()}
            self._last_discovery = now
            self.totals.changes += 1
            for mac in by_mac:
                self.ensure(mac, now)
        if self.journal is not None:
            self.journal.record(self._tick_record(now, hold, by_mac))
        out: list[OutgoingMessage] = []
        min_due = float("inf")
        for mac, agent in self._agents.items():
            view = by_mac.get(mac) if by_mac is not None else None
            out.extend(agent.tick(now, view, hold=hold))
            min_due = min(min_due, agent.next_due)
        self._dirty.clear()
        self._min_due = min_due
        return out

    def _tick_record(self, now: float, hold: bool, by_mac: Mapping[str, LeafView] | None) -> j.Ticked:
        """What a replay of this tick needs: the leaves its views named and the views the agents will read."""
        if by_mac is None:
            return j.Ticked(now, hold, None, ())
        used = tuple(v for mac, v in by_mac.items() if (a := self._agents.get(mac)) is not None and a.needs_view(now))
        return j.Ticked(now, hold, tuple(by_mac), used)

    def shutdown(self, now: float) -> list[OutgoingMessage]:
        """The final flush of every agent (see :meth:`LeafAgent.shutdown`)."""
        if self.journal is not None:
            self.journal.record(j.ShutDown(now))
        out: list[OutgoingMessage] = []
        for agent in self._agents.values():
            out.extend(agent.shutdown(now))
        return out

    # -- inputs that reach agents outside the clock -----------------------------------------------------------

    def set_default_desired(self, desired: object) -> None:
        """The desired document of leaves that have none of their own (applied when such a leaf shows up)."""
        if self.journal is not None:
            self.journal.record(j.DefaultDesiredSet(desired))
        self.default_desired = desired
        self.totals.changes += 1

    def record_send_failures(self, identity: str, count: int) -> bool:
        """Messages of ``identity`` the uplink dropped (its next MessageStatistics ``TotalFailed``); False when no
        agent has that identity."""
        agent = self.agent(identity)
        if agent is None:
            return False
        if self.journal is not None:
            self.journal.record(j.SendFailures(identity, count))
        agent.record_send_failures(count)
        return True

    def record_capture_drops(self, frames: int) -> None:
        """Frames the capture lost before analysis, for every agent (see :meth:`LeafAgent.record_capture_drops`)."""
        if self.journal is not None:
            self.journal.record(j.CaptureDrops(frames))
        for agent in self._agents.values():
            agent.record_capture_drops(frames)

    def diagnostic(self, severity: Severity, message: str, now: float) -> None:
        """A Diagnostic event in every agent."""
        if self.journal is not None:
            self.journal.record(j.Diagnosed(severity, message, now))
        for agent in self._agents.values():
            agent.diagnostic(severity, message, now)

    def macs(self) -> list[str]:
        """The MACs that have an agent, in the order the agents were created."""
        return list(self._agents)

    def flush_leaf(self, mac: str, now: float) -> list[OutgoingMessage]:
        """Everything one agent holds, in messages now (the ``flush`` method; see :meth:`LeafAgent.flush`)."""
        agent = self._agents.get(mac)
        if agent is None:
            return []
        if self.journal is not None:
            self.journal.record(j.Flushed(mac, now))
        return agent.flush(now)

    def stats(self) -> AgentStats:
        """The sum of every agent's counters."""
        parts = [a.stats() for a in self._agents.values()]
        return AgentStats(
            sum(p.generated for p in parts),
            sum(p.sent for p in parts),
            sum(p.dropped for p in parts),
            sum(p.pending for p in parts),
            sum(p.messages for p in parts),
            sum(p.aggregation_overflow for p in parts),
        )

    # -- state that survives a restart -----------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """The fleet as a restart needs it (JSON-ready): the leaf map in force, the desired documents applied, the
        fleet-wide counters, and every agent's state by MAC."""
        return {
            "leafMap": dict(self._leaf_map),
            "defaultDesired": self.default_desired,
            "desired": dict(self._desired),
            "refusedObservations": self.refused_observations,
            "totals": {name.name: [c.generated, c.sent, c.dropped] for name, c in self.totals.by_queue.items()},
            "messages": self.totals.messages,
            "lastDiscovery": self._last_discovery,
            "agents": {mac: agent.export_state() for mac, agent in self._agents.items()},
            **self._export_configs(),
        }

    def _export_configs(self) -> dict[str, Any]:
        """The configuration each agent has (it may differ from what its documents give now: a rename keeps the
        configuration, a rejected document keeps the one before), as a table of the distinct ones."""
        index: dict[AgentConfig, int] = {}
        of_agent = {mac: index.setdefault(agent.config, len(index)) for mac, agent in self._agents.items()}
        return {"configs": [c.reported_section() for c in index], "agentConfigs": of_agent}

    def restore_state(self, state: dict[str, Any], now: float) -> None:
        """Continue from :meth:`export_state` of an earlier run (before any input). An agent whose state does not
        fit starts afresh (counted in :attr:`restore_failures`); a malformed fleet section raises (KeyError,
        TypeError, ValueError) and changes nothing."""
        leaf_map = {str(k).lower(): str(v) for k, v in dict(state["leafMap"]).items()}
        desired = {str(k): v for k, v in dict(state["desired"]).items()}
        totals = {name: [int(v) for v in state["totals"][name.name]] for name in self.totals.by_queue}
        agents = dict(state["agents"])
        refused, messages = int(state["refusedObservations"]), int(state["messages"])
        last_discovery = state.get("lastDiscovery")
        configs = [_config_from(section) for section in state.get("configs", [])]
        config_of = {str(k): configs[int(v)] for k, v in dict(state.get("agentConfigs", {})).items()}
        self._leaf_map = leaf_map
        self._desired = desired
        if self.default_desired is None:
            self.default_desired = state["defaultDesired"]
        self.refused_observations = refused
        self._last_discovery = float(last_discovery) if last_discovery is not None else None
        for mac, saved in agents.items():
            agent = self.ensure(str(mac), now)
            if agent is None:
                break
            try:
                if not isinstance(saved, dict):
                    raise TypeError("agent state must be an object")
                if (config := config_of.get(str(mac))) is not None:
                    agent.use_config(config, now)
                agent.restore_state(saved, now)
            except (KeyError, TypeError, ValueError, AttributeError):
                self.restore_failures += 1
                continue
            self.restored_agents += 1
        # Last: creating the agents above counts (their configuration's events) in the totals they replace.
        for name, (generated, sent, dropped) in totals.items():
            c = self.totals.by_queue[name]
            c.generated, c.sent, c.dropped = generated, sent, dropped
        self.totals.messages = messages
        self._min_due = float("-inf")

    def forget_events(self, ids_by_identity: Mapping[str, set[str]]) -> int:
        """Events that reached the output after the state was saved leave the restored caches (see
        :meth:`LeafAgent.forget_events`); returns how many."""
        if self.journal is not None and ids_by_identity:
            self.journal.record(j.Forgotten({k: tuple(v) for k, v in ids_by_identity.items()}))
        removed = 0
        for identity, ids in ids_by_identity.items():
            agent = self.agent(identity)
            if agent is not None:
                removed += agent.forget_events(ids)
        return removed


    def replay(self, ops: Iterable[j.FleetOp]) -> float | None:
        """Apply journalled inputs again, in order, after :meth:`restore_state` (nothing is journalled meanwhile;
        the messages they build are discarded: they reached the output before). Returns the latest clock among
        them (None: none had one). Raises :class:`~leafguard.agent.journal.JournalError` where the inputs no
        longer lead where they led; what came before stays applied."""
        journal, self.journal = self.journal, None
        clock: float | None = None
        try:
            for op in ops:
                self._apply(op)
                now = op.clock
                if now is not None:
                    clock = now if clock is None else max(clock, now)
        finally:
            self.journal = journal
        return clock

    def _apply(self, op: j.FleetOp) -> None:
        """One input again, through the method that took it the first time."""
        match op:
            case j.Observed(obs=obs):
                self.observe(obs)
            case j.Ticked():
                self._replay_tick(op)
            case j.ShutDown(now=now):
                self.shutdown(now)
            case j.DesiredApplied(identity=identity, desired=desired, now=now):
                self.apply_desired(identity, desired, now)
            case j.DefaultDesiredSet(desired=desired):
                self.set_default_desired(desired)
            case j.LeafMapSet(leaf_map=leaf_map, now=now):
                self.set_leaf_map(leaf_map, now)
            case j.SendFailures(identity=identity, count=count):
                if not self.record_send_failures(identity, count):
                    raise j.JournalError(f"journal: no agent {identity!r} for its send failures")
            case j.CaptureDrops(frames=frames):
                self.record_capture_drops(frames)
            case j.Diagnosed(severity=severity, message=message, now=now):
                self.diagnostic(cast(Severity, severity), message, now)
            case j.Flushed(mac=mac, now=now):
                self.flush_leaf(mac, now)
            case j.Forgotten(ids=ids):
                self.forget_events({k: set(v) for k, v in ids.items()})

    def _replay_tick(self, op: j.Ticked) -> None:
        asked: list[bool] = []
        provider: ViewsProvider | None = None
        if op.discovered is not None:
            used = {v.mac.lower(): v for v in op.views}

            def recorded() -> list[LeafView]:
                asked.append(True)
                return [used.get(mac) or j.placeholder_view(mac) for mac in op.discovered or ()]

            provider = recorded
        # A tick that did not ask for views gets none: no agent of it needed one, nor its discovery.
        self.tick(op.now, provider, hold=op.hold)
        if op.discovered is not None and not asked:
            raise j.JournalError(f"journal: the tick at {op.now!r} no longer asks for the inventory")


def _config_from(section: object) -> AgentConfig:
    """A saved configuration (its reported section, which reads back as a desired one)."""
    outcome = AgentConfig().apply_desired({CONFIG_OBJECT_NAME: section})
    if not outcome.accepted:
        raise ValueError("a saved agent configuration does not read back")
    return outcome.config


def load_agent_config_file(path: Path | str) -> dict[str, Any]:
    """The desired document in an ``--agent-config`` file; raises ConfigurationError if unreadable or not
    JSON.

    The file has the desired-properties shape: ``{"ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration":
    {"maxMessageSizeInBytes": {"value": 65536}, …}}``. Its *content* is validated per leaf, like a twin.
    """
    doc = read_document(Path(path))
    if not isinstance(doc, dict):
        raise ConfigurationError(f"{path}: expected a JSON object in the desired-properties shape")
    return doc


def make_fleet(agent_config_path: Path | str | None = None, leaf_map: Mapping[str, str] | None = None) -> Fleet:
    """A fleet with default configuration, or with ``--agent-config`` applied to every leaf."""
    desired = load_agent_config_file(agent_config_path) if agent_config_path is not None else None
    return Fleet(AgentConfig(), leaf_map, default_desired=desired)
