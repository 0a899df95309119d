"""The module twin, the pure part: the desired document and each leaf's effective desired properties, and the
reported properties kept under the hub's 32 KB limit.

Desired shape (module twin)::

    {"ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration": {…},        # default for every leaf
     "leaves": {"<identity>": {"ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration": {…}}}}

A leaf's effective desired document is the default object with the leaf's own entry merged over it (JSON merge,
like a twin patch). Reported shape::

    {"leaves": {"<identity>": {"ms_iotn:…Configuration": {<effective config, wrapped>}}},
     "leafguard": {<health>}}
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from leafguard.agent.config import CONFIG_OBJECT_NAME, merge_desired_patch

LEAVES = "leaves"
HEALTH = "leafguard"
REPORTED_LIMIT_BYTES = 32 * 1024
"""IoT Hub's limit for the reported section, by its size rule (:func:`twin_size`)."""
REPORTED_MARGIN_BYTES = 2048


def twin_size(value: Any) -> int:
    """IoT Hub's twin size rule: keys and strings by UTF-8 length, numbers 8 bytes, booleans 4; ``$`` keys free."""
    if isinstance(value, Mapping):
        return sum(len(str(k).encode()) + twin_size(v) for k, v in value.items() if not str(k).startswith("$"))
    if isinstance(value, bool):
        return 4
    if isinstance(value, int | float):
        return 8
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(twin_size(v) for v in value)
    return 0


@dataclass(frozen=True, slots=True)
class DesiredChange:
    """What a desired update touched: the default object, and the leaves whose own entry changed."""

    default_changed: bool
    leaves: frozenset[str]


def _without_meta(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if not k.startswith("$")}


class ModuleDesired:
    """The whole desired document of the module twin, kept up to date from GETs and patches."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {}
        self.version: int | None = None

    def replace(self, desired: Mapping[str, Any]) -> DesiredChange | None:
        """A whole desired document (a twin GET); None if it is older than what we have."""
        version = desired.get("$version")
        if isinstance(version, int) and self.version is not None and version < self.version:
            return None
        return self._set(_without_meta(desired), version if isinstance(version, int) else None)

    def patch(self, patch: Mapping[str, Any]) -> DesiredChange | None:
        """Merge a desired patch. None when it is stale, or when versions show a patch was missed (then the caller
        must fetch the whole twin: a missed patch may have deleted something a merge cannot delete)."""
        version = patch.get("$version")
        if isinstance(version, int) and self.version is not None:
            if version <= self.version:
                return None
            if version != self.version + 1:
                raise MissedDesiredPatchError(self.version, version)
        merged = merge_desired_patch(self.doc, _without_meta(patch))
        return self._set(merged, version if isinstance(version, int) else self.version)

    def _set(self, doc: dict[str, Any], version: int | None) -> DesiredChange:
        old = self.doc
        self.doc = doc
        self.version = version
        old_leaves = old.get(LEAVES) if isinstance(old.get(LEAVES), Mapping) else {}
        new_leaves = doc.get(LEAVES) if isinstance(doc.get(LEAVES), Mapping) else {}
        assert isinstance(old_leaves, Mapping) and isinstance(new_leaves, Mapping)
        changed = frozenset(k for k in set(old_leaves) | set(new_leaves) if old_leaves.get(k) != new_leaves.get(k))
        return DesiredChange(old.get(CONFIG_OBJECT_NAME) != doc.get(CONFIG_OBJECT_NAME), changed)

    def default_document(self) -> dict[str, Any] | None:
        """The desired document of a leaf without an entry of its own; None when there is no default object."""
        if CONFIG_OBJECT_NAME not in self.doc:
            return None
        return {CONFIG_OBJECT_NAME: copy.deepcopy(self.doc[CONFIG_OBJECT_NAME])}

    def leaf_identities(self) -> list[str]:
        leaves = self.doc.get(LEAVES)
        return sorted(leaves) if isinstance(leaves, Mapping) else []

    def effective(self, identity: str) -> object:
        """The leaf's desired document: its own entry merged over the default (not an object → rejected)."""
        base = self.default_document() or {}
        leaves = self.doc.get(LEAVES)
        own = leaves.get(identity) if isinstance(leaves, Mapping) else None
        if own is None:
            return base
        if not isinstance(own, Mapping):
            return own
        return merge_desired_patch(base, own)


class MissedDesiredPatchError(Exception):
    """A desired patch skipped a version; the whole twin must be fetched again."""

    def __init__(self, have: int, got: int) -> None:
        super().__init__(f"desired $version jumped from {have} to {got}")
        self.have = have
        self.got = got


def without_nulls(value: Any) -> Any:
    """The value as the hub stores it after a merge: a ``null`` member is no member at all."""
    if isinstance(value, Mapping):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    return value


OFF = "off"


def bounded(entries: Iterable[tuple[str, Any]], max_entries: int, max_bytes: int) -> dict[str, Any]:
    """The first entries, in the order given, while there are at most ``max_entries`` and they take at most
    ``max_bytes`` by the hub's size rule: a summary in the reported properties that a long list, or long names
    (128 characters for a device id), cannot push past the twin's 32 KB."""
    out: dict[str, Any] = {}
    used = 0
    for key, value in entries:
        cost = len(key.encode()) + twin_size(value)
        if len(out) >= max_entries or used + cost > max_bytes:
            break
        out[key] = value
        used += cost
    return out


def nulls_as_off(value: Any) -> Any:
    """A section for the reported properties where a null would delete its key in the hub's merge, so a setting
    turned off (None) would simply vanish: nulls become ``"off"``. A null *error* (``error``, ``last_error``,
    ``..._error``: there is none) is left out, as no error."""
    if isinstance(value, Mapping):
        return {k: nulls_as_off(v) for k, v in value.items()
                if v is not None or not str(k).lower().endswith("error")}
    if isinstance(value, list):
        return [nulls_as_off(v) for v in value]
    return OFF if value is None else value


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch that turns ``old`` (what the hub holds) into ``new`` (null-free): a ``null`` for every
    member ``old`` has and ``new`` lacks, objects diffed member by member, anything else replaced when different.
    Empty when they are equal."""
    out: dict[str, Any] = {k: None for k in old if k not in new and not k.startswith("$")}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                out[key] = sub
        elif before != value:
            out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class ReportedPatch:
    body: dict[str, Any]
    """The merge patch to send."""
    target: dict[str, Any]
    """The whole reported section as the hub holds it once ``body`` is merged."""
    size_bytes: int
    """``twin_size(target)``: what the hub measures against its limit."""
    left_out: frozenset[str]
    """Leaves that did not fit (their entries are absent from ``target``)."""


class ReportedState:
    """The reported properties we want in the twin, turned into patches that keep the hub's section ≤ 32 KB.

    The hub merges a patch into what it already holds, so the budget is measured on the merged result: we keep a
    mirror of the hub's section (from every twin GET, :meth:`sync_from_hub`, and every applied patch), and each
    patch is the difference between the mirror and the section we want, a ``null`` deleting whatever the hub holds
    that we no longer want (leaves an earlier run reported, retired leaves, stale keys). Leaves already in the twin
    keep their place; a leaf that does not fit is left out (and removed if the twin held it), counted in
    :attr:`left_out` and named in :attr:`left_out_names`, and tried again with every patch.

    A patch the hub refuses anyway (our mirror was wrong, or its size rule differs from ours) halves the leaves'
    budget for the next one, down to none: the health section always gets through, and the next twin GET refreshes
    the mirror. The first applied patch restores the full budget.
    """

    def __init__(self, limit_bytes: int = REPORTED_LIMIT_BYTES, margin_bytes: int = REPORTED_MARGIN_BYTES) -> None:
        self.budget_bytes = limit_bytes - margin_bytes
        self._wanted: dict[str, dict[str, Any]] = {}
        self._hub: dict[str, Any] = {}
        """What the hub holds in the reported section (without ``$`` keys), as far as we know."""
        self._dirty = False
        self._left_out: set[str] = set()
        self.trims = 0
        """How many times a leaf was left out of (or removed from) the reported properties for lack of room."""
        self.refusals = 0
        """Consecutive patches the hub refused; each halves the leaves' budget of the next patch."""

    @property
    def left_out(self) -> int:
        return len(self._left_out)

    def left_out_names(self, limit: int = 20) -> list[str]:
        """The first ``limit`` leaves not in the twin for lack of room, sorted."""
        return sorted(self._left_out)[:limit]

    @property
    def has_leaf_changes(self) -> bool:
        return self._dirty

    @property
    def hub_size_bytes(self) -> int:
        """The size of the section the hub holds, by its rule, as far as we know."""
        return twin_size(self._hub)

    def update_leaf(self, identity: str, reported: dict[str, Any]) -> None:
        self._wanted[identity] = without_nulls(reported)
        self._dirty = True

    def remove_leaf(self, identity: str) -> None:
        self._wanted.pop(identity, None)
        self._left_out.discard(identity)
        self._dirty = True

    def sync_from_hub(self, reported: Mapping[str, Any]) -> None:
        """The reported section a twin GET returned: what the next patch is measured and diffed against."""
        self._hub = without_nulls({k: v for k, v in reported.items() if not str(k).startswith("$")})
        self._dirty = True

    def take_patch(self, health: dict[str, Any] | None) -> ReportedPatch | None:
        """The next patch (the leaf entries that fit, stale keys deleted, and ``health`` if given); None when the
        hub already holds exactly what we want."""
        if not self._dirty and health is None:
            return None
        self._dirty = False
        target: dict[str, Any] = {}
        health_doc = without_nulls(health) if health is not None else self._hub.get(HEALTH)
        if health_doc is not None:
            target[HEALTH] = health_doc
        leaf_budget = max(0, self.budget_bytes - twin_size(target) - len(LEAVES)) >> min(self.refusals, 16)
        held = self._hub.get(LEAVES)
        held_ids = set(held) if isinstance(held, Mapping) else set()
        order = sorted(i for i in self._wanted if i in held_ids) + sorted(i for i in self._wanted if i not in held_ids)
        leaves: dict[str, Any] = {}
        left_out: set[str] = set()
        used = 0
        for identity in order:
            cost = len(identity.encode()) + twin_size(self._wanted[identity])
            if used + cost <= leaf_budget:
                used += cost
                leaves[identity] = self._wanted[identity]
            else:
                left_out.add(identity)
        if leaves:
            target[LEAVES] = leaves
        body = merge_patch(self._hub, target)
        patch = ReportedPatch(body, target, twin_size(target), frozenset(left_out))
        if not body:
            self._note_left_out(patch.left_out)
            return None
        return patch

    def commit(self, patch: ReportedPatch) -> None:
        """The hub applied ``patch``: it now holds ``patch.target``."""
        self._hub = patch.target
        self.refusals = 0
        self._note_left_out(patch.left_out)

    def restore(self, patch: ReportedPatch, *, refused: bool = False) -> None:
        """The patch was not applied (``refused``: the hub answered it with an error): it is built again, from the
        mirror and the latest entries, for the next attempt."""
        del patch  # nothing of it is kept: the next patch is the difference again
        self._dirty = True
        if refused:
            self.refusals += 1

    def _note_left_out(self, left_out: frozenset[str]) -> None:
        self.trims += len(left_out - self._left_out)
        self._left_out = set(left_out) & set(self._wanted)
