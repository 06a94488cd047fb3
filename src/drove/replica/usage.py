"""Space honesty: how much a replica directory takes on its disk, how much data each layer
holds, and exactly what deleting each snapshot would free.

Everything is computed from the layer files' allocation (SEEK_DATA / SEEK_HOLE, rounded
out to 4 KiB blocks, and ``st_blocks``); no data is read.

What a delete frees follows the chain's purge (:meth:`drove.replica.chain.Replica.
purge_steps`), which :func:`purge_frees` replays on the layers' extents:

* a removed snapshot S with no children: its file goes (all it allocates);
* with one snapshot child C: S folds into C, the blocks of S that C lacks are copied
  into C and S's file goes, so what is freed is what C holds over S (the blocks C
  overwrote since);
* with the head as its only child: S is pruned where the head holds data (freed now);
  the rest stays in S, removed, until a snapshot over the head lets it fold;
* with several children (a branch point: a revert or a linked clone made one) it
  stays: nothing is freed;
* a layer file with more than one link (shared with a linked clone) is never changed
  in place and its inode outlives our link: removing it frees nothing, and a fold
  into a shared child first copies that child.

A removed parent left with one child by a delete is purged too; the replay follows
that.  What a purge would free with nothing deleted (``pending``) is reported apart
and subtracted from each snapshot's figure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from drove.replica.meta import BLOCK, meta_file
from drove.replica.ranges import Ranges, block_extents, intersect, subtract, total, union
from drove.units import format_size

# The layers' extents are byte ranges aligned to 4 KiB blocks.


class LayerLike(Protocol):
    """What is read of a layer (:class:`drove.replica.chain.LayerInfo`)."""

    name: str | None
    file: str
    parent: str | None
    removed: bool
    head: bool
    incomplete: bool
    base: Any


# --------------------------------------------------------------------------- ranges


def data_extents(fd: int, size: int) -> Ranges:
    """Where the file holds data in [0, size), in bytes rounded out to whole blocks, merged."""
    blocks = -(-size // BLOCK)
    return [(s * BLOCK, e * BLOCK) for s, e in block_extents(fd, 0, blocks, BLOCK)]


# --------------------------------------------------------------------------- the model


@dataclass
class Layer:
    """One layer file as the space model sees it."""

    file: str
    name: str | None = None
    parent: str | None = None
    head: bool = False
    removed: bool = False
    base: bool = False  # a linked clone's base layer (its source's snapshot)
    incomplete: bool = False
    extents: Ranges = field(default_factory=list)
    allocated: int = 0  # st_blocks * 512 of the layer file
    links: int = 1  # st_nlink: more than one when a linked clone shares the file
    meta_allocated: int = 0  # st_blocks * 512 of its .meta file

    @property
    def data(self) -> int:
        """Bytes of the volume this layer holds (its data extents)."""
        return total(self.extents)


def children(layers: Sequence[Layer]) -> dict[str, list[str]]:
    """Child files of each layer file, in ``layers`` order."""
    out: dict[str, list[str]] = {}
    for la in layers:
        if la.parent is not None:
            out.setdefault(la.parent, []).append(la.file)
    return out


def purge_frees(layers: Sequence[Layer], delete: str | None = None) -> int:
    """Bytes a purge frees once layer ``delete`` is marked removed (None: nothing more),
    replaying the chain's purge on the extents (negative when it costs space)."""
    model = {la.file: replace(la, extents=list(la.extents)) for la in layers}
    order = [la.file for la in layers]
    if delete is not None:
        model[delete].removed = True
    freed = 0
    pruned: set[tuple[str, str]] = set()
    while True:
        step = _next_step([model[f] for f in order], pruned)
        if step is None:
            return freed
        kind, s, c = step
        sl = model[s]
        if kind == "remove":
            freed += (sl.allocated if sl.links == 1 else 0) + sl.meta_allocated
            order.remove(s)
            del model[s]
        elif kind == "fold":
            cl = model[c]
            moved = subtract(sl.extents, cl.extents)
            cost = cl.allocated if cl.links > 1 else 0  # a shared child is copied first
            freed += (sl.allocated if sl.links == 1 else 0) + sl.meta_allocated \
                - total(moved) - cost
            cl.extents = union(cl.extents, moved)
            cl.allocated += total(moved)
            cl.links = 1
            cl.parent = sl.parent
            order.remove(s)
            del model[s]
        else:  # prune: punch s where the head holds data, unless s is shared
            pruned.add((s, c))
            if sl.links > 1:
                continue
            both = intersect(sl.extents, model[c].extents)
            sl.extents = subtract(sl.extents, both)
            sl.allocated = max(0, sl.allocated - total(both))
            freed += total(both)


def _next_step(layers: Sequence[Layer], pruned: set[tuple[str, str]]
               ) -> tuple[str, str, str] | None:
    """The purge's next action, as :meth:`Replica._plan_purge` picks it."""
    kids = children(layers)
    heads = {la.file for la in layers if la.head}
    incomplete = {la.file for la in layers if la.incomplete}
    for la in layers:
        if not la.removed or la.incomplete or la.base:
            continue
        mine = kids.get(la.file, [])
        if not mine:
            return "remove", la.file, ""
        if len(mine) == 1 and mine[0] not in incomplete:
            c = mine[0]
            if c not in heads:
                return "fold", la.file, c
            if (la.file, c) not in pruned:
                return "prune", la.file, c
    return None


def freed_by_delete(layers: Sequence[Layer], file: str, pending: int = 0
                    ) -> tuple[int | None, str]:
    """What deleting snapshot layer ``file`` frees (beyond ``pending``, what a purge frees
    anyway) and why; None for a layer that cannot be deleted here."""
    by_file = {la.file: la for la in layers}
    la = by_file[file]
    if la.head:
        return None, "the head: it holds the live data"
    if la.base:
        return None, "a base layer of this linked clone: its source's snapshot, not its own"
    kids = children(layers).get(file, [])
    if la.removed:
        if len(kids) > 1:
            return None, f"deleted; kept as a branch point ({len(kids)} layers build on it)"
        return None, "deleted; the data the head has not overwritten stays until the next " \
                     "snapshot lets it fold"
    freed = purge_frees(layers, file) - pending
    if la.links > 1:
        return freed, ("its file is shared with a linked clone (hard link): it stays while "
                       "a clone uses it")
    if not kids:
        return freed, "nothing builds on it: its file goes"
    if len(kids) > 1:
        return freed, (f"a branch point ({len(kids)} layers build on it: a revert or a clone):"
                       " it is only marked deleted, nothing is freed while they remain")
    c = by_file[kids[0]]
    overlap = total(intersect(la.extents, c.extents))
    moved = la.data - overlap
    if c.head:
        return freed, (f"frees what the head overwrote since ({format_size(overlap)}) now; "
                       f"the other {format_size(moved)} stay until the next snapshot takes "
                       "them over")
    return freed, (f"folds into {c.name or c.file}: {format_size(moved)} move into it, what it "
                   f"overwrote ({format_size(overlap)}) is freed")


# --------------------------------------------------------------------------- scanning


def scan_layers(directory: Path, infos: Sequence[LayerLike], size: int) -> list[Layer]:
    """The model of every layer of a replica directory, from its files (thread-safe; the
    caller keeps the tree from changing meanwhile)."""
    out = []
    for info in infos:
        path = directory / info.file
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            extents = data_extents(fd, size if info.head else st.st_size)
        finally:
            os.close(fd)
        try:
            meta_blocks = os.stat(directory / meta_file(info.file)).st_blocks
        except FileNotFoundError:
            meta_blocks = 0
        out.append(Layer(file=info.file, name=info.name, parent=info.parent, head=info.head,
                         removed=info.removed, base=info.base is not None,
                         incomplete=info.incomplete, extents=extents,
                         allocated=st.st_blocks * 512, links=st.st_nlink,
                         meta_allocated=meta_blocks * 512))
    return out


def directory_usage(directory: Path) -> dict[str, int]:
    """Bytes the directory's files allocate: ``own`` (one link), ``shared`` (hard-linked
    with another directory: a linked clone's), ``actual`` (both, each file once)."""
    own = shared = 0
    for e in os.scandir(directory):
        if not e.is_file(follow_symlinks=False):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # a temporary file renamed meanwhile
        if st.st_nlink > 1:
            shared += st.st_blocks * 512
        else:
            own += st.st_blocks * 512
    return {"actual": own + shared, "own": own, "shared": shared}


def space_json(directory: Path, infos: Sequence[LayerLike], size: int) -> dict[str, Any]:
    """What a replica's control API answers for its space: the directory's allocation, the
    head's data, and per layer its data and what deleting it frees (runs in a thread)."""
    layers = scan_layers(directory, infos, size)
    pending = purge_frees(layers)
    head = next((la for la in layers if la.head), None)
    out_layers = []
    for la in layers:
        freed, why = freed_by_delete(layers, la.file, pending)
        out_layers.append({"file": la.file, "name": la.name, "parent": la.parent,
                           "head": la.head, "removed": la.removed, "base": la.base,
                           "incomplete": la.incomplete, "data": la.data,
                           "allocated": la.allocated, "shared": la.links > 1,
                           "freed_by_delete": freed, "why": why})
    return {"dir": str(directory), "block_size": BLOCK, **directory_usage(directory),
            "head": head.data if head is not None else 0,
            "head_allocated": head.allocated if head is not None else 0,
            "pending_purge": pending, "layers": out_layers}
