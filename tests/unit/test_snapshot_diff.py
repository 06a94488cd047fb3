"""drove.replica.diff's choice of layers on layer trees, and the manager's check by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drove.replica.diff import check_order, plan, union
from drove.replica.errors import InvalidRequestError, RebuildingError, SnapshotNotFoundError


@dataclass
class L:
    """A layer as plan() reads it."""

    name: str | None
    file: str
    parent: str | None
    removed: bool = False
    size: int = 1 << 20
    head: bool = False
    incomplete: bool = False


def tree() -> list[L]:
    """a <- b(removed) <- c <- head; a <- d (a revert's branch, then a snapshot)."""
    return [L("a", "fa", None), L("b", "fb", "fa", removed=True), L("c", "fc", "fb"),
            L(None, "fh", "fc", head=True), L("d", "fd", "fa")]


def test_layers_above_from_up_to_to():
    p = plan(tree(), "a", "c")
    assert (p.files, p.ancestor, p.branch) == (("fc", "fb"), "a", False)
    assert plan(tree(), "a", None).files == ("fh", "fc", "fb")
    assert plan(tree(), "c", "c").files == ()


def test_a_branch_goes_through_the_common_ancestor():
    p = plan(tree(), "d", "c")
    assert (p.files, p.ancestor, p.branch) == (("fc", "fb", "fd"), "a", True)


def test_refusals():
    with pytest.raises(SnapshotNotFoundError):
        plan(tree(), "b", "c")  # removed: not a snapshot any more
    with pytest.raises(InvalidRequestError, match="swap"):
        plan(tree(), "c", "a")
    layers = tree()
    layers[2].incomplete = True
    with pytest.raises(RebuildingError):
        plan(layers, "a", "c")


def test_union_merges_touching_ranges():
    assert union([(0, 4), (10, 12)], [(4, 6), (11, 20), (30, 31)]) == [(0, 6), (10, 20),
                                                                         (30, 31)]


@st.composite
def trees(draw) -> list[L]:
    """Random layer trees: each snapshot's parent an earlier one; some removed."""
    n = draw(st.integers(1, 8))
    layers: list[L] = []
    for i in range(n):
        parent = draw(st.sampled_from([None, *(la.file for la in layers)])) if i else None
        layers.append(L(f"s{i}", f"f{i}", parent, removed=draw(st.booleans()) and i > 0))
    layers.append(L(None, "fh", draw(st.sampled_from([la.file for la in layers])),
                    head=True))
    return layers


@settings(max_examples=300, deadline=None)
@given(layers=trees(), data=st.data())
def test_the_managers_check_agrees_with_the_replicas(layers, data):
    """check_order on the visible tree (removed layers skipped, as the manager shows it)
    refuses exactly what plan refuses."""
    names = [f"s{i}" for i in range(len(layers) - 1)] + ["nope"]
    since = data.draw(st.sampled_from(names))
    to = data.draw(st.sampled_from([*names, None]))
    by_file = {la.file: la for la in layers}

    def visible_parent(la: L) -> str | None:
        p = by_file.get(la.parent) if la.parent else None
        while p is not None and p.removed:
            p = by_file.get(p.parent) if p.parent else None
        return p.name if p else None

    parents = {la.name: visible_parent(la) for la in layers
               if la.name and not la.removed}
    outcome = []
    for check in (lambda: plan(layers, since, to), lambda: check_order(parents, since, to)):
        try:
            check()
            outcome.append(None)
        except (SnapshotNotFoundError, InvalidRequestError) as exc:
            outcome.append(type(exc))
    assert outcome[0] == outcome[1]
