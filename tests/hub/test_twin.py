"""The reported section against the hub's own merge and size rule (the emulator's `Section`, as IoT Hub merges):
what an earlier run left in the twin counts, stale keys are deleted, and a refused patch is recovered from."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from leafguard.agent.config import CONFIG_OBJECT_NAME as CFG
from leafguard.hub.twin import HEALTH, LEAVES, ReportedState, merge_patch, without_nulls
from tests.hub_emulator.twins import SECTION_LIMIT_BYTES, Section, TwinError, twin_size

KEYS = st.sampled_from(["a", "b", "c", "leaves", "x1"])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3) | st.lists(st.integers(0, 3), max_size=2),
    lambda inner: st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=12,
)
DOCS = st.dictionaries(KEYS, VALUES, max_size=4)


@given(DOCS, DOCS)
@settings(max_examples=100, deadline=None)
def test_merge_patch_turns_what_the_hub_holds_into_what_we_want(old: dict[str, Any], new: dict[str, Any]) -> None:
    section = Section()
    section.apply(old)
    held = section.document()
    del held["$version"]
    patch = merge_patch(held, without_nulls(new))
    if patch:
        section.apply(patch)
    result = section.document()
    del result["$version"]
    assert result == without_nulls(new)


def leaf_entry(i: int, size: int = 900) -> dict[str, Any]:
    return {CFG: {"note": {"value": f"{i:04d}" + "v" * size}}}


def hub_with_stale_leaves(count: int) -> Section:
    """The reported section an earlier run left: `count` leaves of about 1 KB, and a health section."""
    section = Section()
    section.apply({LEAVES: {f"old-{i:02d}": leaf_entry(i) for i in range(count)}, HEALTH: {"version": "0.0.1",
                                                                                             "stale": True}})
    return section


def send(state: ReportedState, section: Section, health: dict[str, Any] | None) -> bool:
    """One round as the transport does it: take a patch, let the hub apply it, commit or restore."""
    patch = state.take_patch(health)
    if patch is None:
        return False
    try:
        section.apply(patch.body)
    except TwinError:
        state.restore(patch, refused=True)
        raise
    state.commit(patch)
    return True


def test_stale_leaves_of_an_earlier_run_are_deleted_and_the_merged_section_fits() -> None:
    section = hub_with_stale_leaves(30)  # about 28 KB already held
    state = ReportedState()
    state.sync_from_hub(section.document())
    for i in range(40):  # more leaves than fit in 32 KB
        state.update_leaf(f"leaf-{i:02d}", leaf_entry(i))
    assert send(state, section, {"version": "1.0"})
    held = section.document()
    assert not [k for k in held[LEAVES] if k.startswith("old-")], "the earlier run's leaves are gone"
    assert held[HEALTH] == {"version": "1.0"}, "a stale health key is deleted, not merged"
    assert twin_size(held) <= SECTION_LIMIT_BYTES
    assert 0 < len(held[LEAVES]) < 40 and state.left_out == 40 - len(held[LEAVES])
    assert state.left_out_names(3) == sorted(set(state.left_out_names(100)))[:3]
    assert state.hub_size_bytes == twin_size(held)
    # A later change is reported too: the section did not freeze.
    state.update_leaf("leaf-00", leaf_entry(0, 100))
    assert send(state, section, {"version": "1.0", "frames": 5})
    assert section.document()[LEAVES]["leaf-00"] == leaf_entry(0, 100)
    assert section.document()[HEALTH]["frames"] == 5
    assert state.take_patch(None) is None, "nothing changed: no patch"


def test_without_the_hubs_copy_the_old_budget_freezes_and_a_refusal_recovers_by_itself() -> None:
    """No GET yet (the mirror is empty): the first patch is refused like before the fix; each refusal halves the
    leaves' budget, so the patches after it get through, and the health section with them."""
    section = hub_with_stale_leaves(30)
    state = ReportedState()
    for i in range(40):
        state.update_leaf(f"leaf-{i:02d}", leaf_entry(i))
    refused = 0
    for _ in range(20):
        try:
            if send(state, section, {"version": "1.0"}):
                break
        except TwinError:
            refused += 1
    else:
        raise AssertionError("the reported section never recovered")
    assert refused >= 1 and state.refusals == 0
    assert section.document()[HEALTH]["version"] == "1.0"
    # With the hub's copy (the transport's GET after a refusal), the stale leaves go and the budget is full again.
    state.sync_from_hub(section.document())
    assert send(state, section, None)
    assert not [k for k in section.document()[LEAVES] if k.startswith("old-")]
    assert len(section.document()[LEAVES]) > 20
