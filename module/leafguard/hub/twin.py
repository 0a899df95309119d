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
from collections.abc import Mapping
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


@dataclass(frozen=True, slots=True)
class ReportedPatch:
    body: dict[str, Any]
    leaves: dict[str, dict[str, Any] | None]
    """Leaf entries in the patch (None: removed for lack of room)."""
    wanted: dict[str, dict[str, Any]]
    """Every leaf entry this patch was built from, for :meth:`ReportedState.restore`."""
    in_twin_before: dict[str, int]
    removed: frozenset[str] = frozenset()
    """Identities this patch removes (no leaf uses them any more)."""


class ReportedState:
    """The reported properties we want in the twin, coalesced into patches that keep the section ≤ 32 KB.

    Leaves already in the twin keep their place; a leaf that does not fit is left out (removed if its entry grew
    past the budget) and counted in :attr:`left_out`; it is tried again whenever its configuration changes.
    """

    def __init__(self, limit_bytes: int = REPORTED_LIMIT_BYTES, margin_bytes: int = REPORTED_MARGIN_BYTES) -> None:
        self.budget_bytes = limit_bytes - margin_bytes
        self._pending: dict[str, dict[str, Any]] = {}
        self._in_twin: dict[str, int] = {}
        """Identity → twin size of its entry as the twin holds it."""
        self._left_out: set[str] = set()
        self._removing: set[str] = set()
        self.trims = 0
        """How many times a leaf was left out of (or removed from) the reported properties for lack of room."""

    @property
    def left_out(self) -> int:
        return len(self._left_out)

    @property
    def has_leaf_changes(self) -> bool:
        return bool(self._pending)

    def update_leaf(self, identity: str, reported: dict[str, Any]) -> None:
        self._pending[identity] = reported

    def remove_leaf(self, identity: str) -> None:
        self._pending.pop(identity, None)
        self._left_out.discard(identity)
        if identity in self._in_twin:
            self._removing.add(identity)

    def take_patch(self, health: dict[str, Any] | None) -> ReportedPatch | None:
        """The next patch (pending leaf entries that fit, and ``health`` if given); None when nothing to send."""
        removing, self._removing = self._removing, set()
        if not self._pending and not removing and health is None:
            return None
        wanted = dict(self._pending)
        before = dict(self._in_twin)
        used = len(LEAVES) + sum(len(k.encode()) + v for k, v in self._in_twin.items())
        used += len(HEALTH) + twin_size(health or {})
        leaves: dict[str, dict[str, Any] | None] = {}
        for identity in sorted(removing - set(self._pending)):
            old = self._in_twin.get(identity)
            if old is not None:
                used -= len(identity.encode()) + old
                leaves[identity] = None  # JSON merge: null deletes the entry from the twin
        for identity in sorted(self._pending):
            doc = self._pending[identity]
            size = twin_size(doc)
            old = self._in_twin.get(identity)
            grown = used - (len(identity.encode()) + old if old is not None else 0) + len(identity.encode()) + size
            if grown <= self.budget_bytes:
                used = grown
                leaves[identity] = doc
                self._left_out.discard(identity)
            else:
                self.trims += 1
                self._left_out.add(identity)
                if old is not None:
                    used -= len(identity.encode()) + old
                    leaves[identity] = None
        self._pending.clear()
        body: dict[str, Any] = {}
        if leaves:
            body[LEAVES] = leaves
        if health is not None:
            body[HEALTH] = health
        if not body:
            return None
        patch = ReportedPatch(body, leaves, wanted, before, frozenset(removing))
        for identity, entry in leaves.items():
            if entry is None:
                self._in_twin.pop(identity, None)
            else:
                self._in_twin[identity] = twin_size(entry)
        return patch

    def restore(self, patch: ReportedPatch) -> None:
        """The patch was not applied: its leaf entries are pending again (unless newer ones are)."""
        self._in_twin = dict(patch.in_twin_before)
        for identity, doc in patch.wanted.items():
            self._pending.setdefault(identity, doc)
        self._removing |= {identity for identity in patch.removed if identity not in self._pending}
