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
from typing import Any

from leafguard import __version__
from leafguard.agent.agent import AgentStats, LeafAgent
from leafguard.agent.config import AgentConfig, ConfigOutcome
from leafguard.agent.messages import OutgoingMessage
from leafguard.agent.queues import QueueTotals
from leafguard.documents import read_document
from leafguard.errors import ConfigurationError
from leafguard.observe.model import ConnectionSeen, LeafView, LoginSeen, identity_for_mac

DEFAULT_MAX_LEAVES = 10_000

ViewsProvider = Callable[[], Iterable[LeafView]]
"""Returns the current inventory snapshots (e.g. ``Analyzer.leaf_views``); called only when needed."""


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
        self._leaf_map = {mac.lower(): ident for mac, ident in leaf_map.items()}
        self.totals.changes += 1
        for mac, agent in self._agents.items():
            ident = self.identity_for(mac)
            if ident != agent.identity:
                del self._by_identity[agent.identity]
                self._retired.add(agent.identity)
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
            for mac in by_mac:
                self.ensure(mac, now)
        out: list[OutgoingMessage] = []
        min_due = float("inf")
        for mac, agent in self._agents.items():
            view = by_mac.get(mac) if by_mac is not None else None
            out.extend(agent.tick(now, view, hold=hold))
            min_due = min(min_due, agent.next_due)
        self._dirty.clear()
        self._min_due = min_due
        return out

    def shutdown(self, now: float) -> list[OutgoingMessage]:
        """The final flush of every agent (see :meth:`LeafAgent.shutdown`)."""
        out: list[OutgoingMessage] = []
        for agent in self._agents.values():
            out.extend(agent.shutdown(now))
        return out

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
            "agents": {mac: agent.export_state() for mac, agent in self._agents.items()},
        }

    def restore_state(self, state: dict[str, Any], now: float) -> None:
        """Continue from :meth:`export_state` of an earlier run (before any input). An agent whose state does not
        fit starts afresh (counted in :attr:`restore_failures`); a malformed fleet section raises (KeyError,
        TypeError, ValueError) and changes nothing."""
        leaf_map = {str(k).lower(): str(v) for k, v in dict(state["leafMap"]).items()}
        desired = {str(k): v for k, v in dict(state["desired"]).items()}
        totals = {name: [int(v) for v in state["totals"][name.name]] for name in self.totals.by_queue}
        agents = dict(state["agents"])
        refused, messages = int(state["refusedObservations"]), int(state["messages"])
        self._leaf_map = leaf_map
        self._desired = desired
        if self.default_desired is None:
            self.default_desired = state["defaultDesired"]
        self.refused_observations = refused
        for name, (generated, sent, dropped) in totals.items():
            c = self.totals.by_queue[name]
            c.generated, c.sent, c.dropped = generated, sent, dropped
        self.totals.messages = messages
        for mac, saved in agents.items():
            agent = self.ensure(str(mac), now)
            if agent is None:
                break
            try:
                if not isinstance(saved, dict):
                    raise TypeError("agent state must be an object")
                agent.restore_state(saved, now)
            except (KeyError, TypeError, ValueError, AttributeError):
                self.restore_failures += 1
                continue
            self.restored_agents += 1
        self._min_due = float("-inf")

    def forget_events(self, ids_by_identity: Mapping[str, set[str]]) -> int:
        """Events that reached the output after the state was saved leave the restored caches (see
        :meth:`LeafAgent.forget_events`); returns how many."""
        removed = 0
        for identity, ids in ids_by_identity.items():
            agent = self.agent(identity)
            if agent is not None:
                removed += agent.forget_events(ids)
        return removed


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
