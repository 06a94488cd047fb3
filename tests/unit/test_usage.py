"""Space honesty on a real chain: the extent arithmetic, and what deleting a snapshot frees
against what a delete and purge really free on the disk (st_blocks of the directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drove.replica import Replica
from drove.replica.usage import (
    Layer,
    data_extents,
    directory_usage,
    freed_by_delete,
    intersect,
    purge_frees,
    space_json,
    subtract,
    total,
    union,
)

BS = 4096
MiB = 1 << 20


def test_range_arithmetic():
    a = [(0, 8 * BS), (16 * BS, 20 * BS)]
    b = [(4 * BS, 18 * BS)]
    assert intersect(a, b) == [(4 * BS, 8 * BS), (16 * BS, 18 * BS)]
    assert subtract(a, b) == [(0, 4 * BS), (18 * BS, 20 * BS)]
    assert union(a, b) == [(0, 20 * BS)]
    assert total(a) == 12 * BS
    assert subtract(a, []) == a and intersect(a, []) == [] and union([], b) == b
    # Touching ranges merge; disjoint ones stay apart.
    assert union([(0, BS)], [(BS, 2 * BS), (3 * BS, 4 * BS)]) == [(0, 2 * BS), (3 * BS, 4 * BS)]


def test_data_extents_round_out_to_blocks(tmp_path):
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(64 * BS)
        f.seek(5 * BS + 100)
        f.write(b"x" * 10)
        f.seek(40 * BS)
        f.write(b"y" * (3 * BS))
    fd = os.open(p, os.O_RDONLY)
    try:
        assert data_extents(fd, 64 * BS) == [(5 * BS, 6 * BS), (40 * BS, 43 * BS)]
        assert data_extents(fd, 41 * BS) == [(5 * BS, 6 * BS), (40 * BS, 41 * BS)]
    finally:
        os.close(fd)


def _layer(file: str, parent: str | None, blocks: list[tuple[int, int]], **kw) -> Layer:
    ext = [(s * BS, e * BS) for s, e in blocks]
    return Layer(file=file, name=kw.pop("name", file), parent=parent, extents=ext,
                 allocated=total(ext), **kw)


def test_model_fold_prune_branch_and_shared():
    # a <- b <- head: deleting a folds it into b (frees what b overwrote: blocks 4-8);
    # deleting b prunes it under the head (frees what the head overwrote: blocks 6-7).
    a = _layer("a", None, [(0, 8)])
    b = _layer("b", "a", [(4, 12)])
    head = _layer("h", "b", [(6, 7), (20, 21)], head=True, name=None)
    layers = [a, b, head]
    assert purge_frees(layers) == 0
    freed, why = freed_by_delete(layers, "a")
    assert freed == 4 * BS and "folds into b" in why
    freed, why = freed_by_delete(layers, "b")
    assert freed == 1 * BS and "head overwrote" in why
    assert freed_by_delete(layers, "h")[0] is None

    # A branch point frees nothing; a leaf frees its whole file.
    c = _layer("c", "a", [(30, 32)])
    layers = [a, b, head, c]
    freed, why = freed_by_delete(layers, "a")
    assert freed == 0 and "branch point" in why
    assert freed_by_delete(layers, "c")[0] == 2 * BS

    # Shared with a linked clone: the file outlives our link.
    shared_c = _layer("c", "a", [(30, 32)], links=2)
    assert freed_by_delete([a, b, head, shared_c], "c")[0] == 0

    # Deleting the leaf of a removed branch point: the branch point then folds too.
    ra = _layer("a", None, [(0, 8)], removed=True)
    layers = [ra, b, head, c]
    assert freed_by_delete(layers, "c")[0] == 2 * BS + 4 * BS  # c goes, then a folds into b
    assert freed_by_delete(layers, "a")[0] is None


def _write(r: Replica, block: int, count: int, fill: int) -> None:
    r.write(block * BS, bytes([fill]) * (count * BS))


def _du(d: Path) -> int:
    return sum(os.lstat(d / f).st_blocks * 512 for f in os.listdir(d)
               if os.path.isfile(d / f))


def _freed(r: Replica, name: str) -> int:
    space = space_json(r.dir, r.layers(), r.size)
    (row,) = [la for la in space["layers"] if la["name"] == name and not la["removed"]]
    return row["freed_by_delete"]


@pytest.mark.parametrize("case", ["fold", "prune", "leaf"])
def test_freed_by_delete_is_what_the_purge_frees(tmp_path, case):
    d = tmp_path / "r"
    with Replica.create(d, 16 * MiB) as r:
        _write(r, 0, 256, 1)  # 1 MiB
        _write(r, 1024, 128, 2)
        r.snapshot("s1")
        _write(r, 64, 64, 3)  # overwrites 256 KiB of s1
        _write(r, 2048, 32, 4)  # new data
        if case == "fold":
            r.snapshot("s2")
        elif case == "leaf":
            r.snapshot("s2")
            r.revert("s1")  # s2 now has no children
        r.flush()
        space = space_json(r.dir, r.layers(), r.size)
        assert space["actual"] == _du(d) == directory_usage(d)["actual"]
        by_name = {la["name"]: la for la in space["layers"]}
        assert by_name["s1"]["data"] == (256 + 128) * BS
        victim = "s2" if case == "leaf" else "s1"
        freed = _freed(r, victim)
        if case == "fold":  # s2 overwrote 64 blocks of s1; s1's other data moves into s2
            assert 64 * BS <= freed <= 64 * BS + 3 * BS, freed
        elif case == "leaf":  # s2's whole file and its .meta go
            assert freed >= by_name["s2"]["allocated"] >= 96 * BS
        before = _du(d)
        r.delete_snapshot(victim)
        r.purge()
        drop = before - _du(d)
        if case == "fold":  # copying into s2 may cost ext4 an extent block or two
            assert abs(drop - freed) <= 2 * BS, (drop, freed)
        else:
            assert drop == freed
        if case == "prune":
            assert freed == 64 * BS
