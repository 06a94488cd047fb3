"""What differs between two snapshots of a replica, from its layers' allocation alone.

A block of snapshot TO can differ from snapshot FROM only if some layer on the
way from their nearest common layer up to TO, or up to FROM, holds it: every
write lands in the head, and a snapshot freezes the head.  So the delta is the
union of those layers' own data extents (SEEK_DATA / SEEK_HOLE, rounded out to
4 KiB blocks); no data is read.  When FROM is an ancestor of TO (the usual case)
the common layer is FROM itself and only the layers above it count; after a
revert made a branch, the layers of FROM's side above the common layer count
too (what FROM holds there must be undone).  TO being an ancestor of FROM (FROM
newer) is refused: it is almost always swapped arguments.

The result is a superset of the bytes that differ (a block rewritten with the
same data counts), exact in what matters: copying TO's data over those extents
onto an image of FROM gives TO.

Deleted snapshots whose data is not folded yet stay in the tree (``removed``)
and count like any layer; a purge only moves data between layers of the same
side (fold into the child, prune under the head), so the union is the same
before and after each of its steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from drove.replica.errors import InvalidRequestError, RebuildingError, SnapshotNotFoundError
from drove.replica.meta import BLOCK

SCAN_WINDOW = 1 << 30
"""Bytes of the volume one step of a whole-volume scan covers."""

_RUNS = 1024  # most runs one block_status_fd call reports


class _Layer(Protocol):
    """What :func:`plan` reads of a layer (:class:`drove.replica.chain.LayerInfo`)."""

    name: str | None
    file: str
    parent: str | None
    removed: bool
    size: int
    head: bool
    incomplete: bool


@dataclass(frozen=True, slots=True)
class DeltaPlan:
    """Which layers make the delta between snapshot ``since`` and ``to`` (None: the head)."""

    since: str
    to: str | None
    ancestor: str | None  # the nearest common layer's snapshot name (None: no common layer)
    branch: bool  # FROM is not an ancestor of TO: its own side counts too
    files: tuple[str, ...]  # the layer files whose data makes the delta
    size: int  # TO's size in bytes
    since_size: int  # FROM's size in bytes


def _chain(by_file: Mapping[str, _Layer], file: str) -> list[str]:
    """Files from ``file`` up to the root of its chain (``file`` first)."""
    out: list[str] = []
    cur: str | None = file
    while cur is not None and cur not in out:
        out.append(cur)
        cur = by_file[cur].parent if cur in by_file else None
    return out


def _snapshot(layers: Sequence[_Layer], name: str) -> _Layer:
    """The live snapshot called ``name`` or SnapshotNotFoundError."""
    for la in layers:
        # A linked clone's base layers (``base`` set) are its source's snapshots, not its
        # own: names are looked up among its own, as the chain does.
        if (la.name == name and not la.removed and not la.head
                and getattr(la, "base", None) is None):
            return la
    raise SnapshotNotFoundError(f"no snapshot {name!r}")


def plan(layers: Sequence[_Layer], since: str, to: str | None) -> DeltaPlan:
    """The layers whose data differs between snapshot ``since`` and ``to`` (None: the head).

    SnapshotNotFoundError for an unknown name, InvalidRequestError when ``to`` is
    older than ``since`` (an ancestor of it), RebuildingError when a layer that
    counts (or either end) is still being rebuilt: its allocation is not whole yet.
    """
    by_file = {la.file: la for la in layers}
    a = _snapshot(layers, since)
    if to is None:
        b = next((la for la in layers if la.head), None)
        if b is None:
            raise InvalidRequestError("the replica has no head")
    else:
        b = _snapshot(layers, to)
    chain_a = _chain(by_file, a.file)
    chain_b = _chain(by_file, b.file)
    if b.file != a.file and b.file in chain_a:
        raise InvalidRequestError(
            f"snapshot {to!r} is older than {since!r} (an ancestor of it): the delta goes "
            f"from the older snapshot to the newer one; swap them")
    on_a = set(chain_a)
    ancestor = next((f for f in chain_b if f in on_a), None)
    side_b = chain_b[:chain_b.index(ancestor)] if ancestor else chain_b
    side_a = chain_a[:chain_a.index(ancestor)] if ancestor else chain_a
    files = tuple(side_b + side_a)
    for f in (*files, a.file, b.file):
        if by_file[f].incomplete:
            raise RebuildingError(f"layer {f} is being rebuilt on this replica: ask a "
                                  "replica in RW mode")
    anc_name = by_file[ancestor].name if ancestor else None
    return DeltaPlan(since=since, to=to, ancestor=anc_name, branch=ancestor != a.file,
                     files=files, size=b.size, since_size=a.size)


def check_order(parents: Mapping[str, str | None], since: str, to: str | None) -> None:
    """The checks of :func:`plan` on a snapshot tree by name (``parents``: name -> parent
    name; the head under None is not needed): unknown names and a ``to`` older than
    ``since`` are refused as :func:`plan` refuses them."""
    for name in (since, to):
        if name is not None and name not in parents:
            raise SnapshotNotFoundError(f"no snapshot {name!r}")
    if to is None or to == since:
        return
    cur: str | None = parents[since]
    seen: set[str] = set()
    while cur is not None and cur not in seen:
        if cur == to:
            raise InvalidRequestError(
                f"snapshot {to!r} is older than {since!r} (an ancestor of it): the delta "
                f"goes from the older snapshot to the newer one; swap them")
        seen.add(cur)
        cur = parents.get(cur)


class _Handle(Protocol):
    """A layer file's own allocation (:class:`drove.replica.chain.LayerHandle`)."""

    size: int

    def block_status_fd(self, offset: int, length: int,
                        max_extents: int = ...) -> list[tuple[int, bool]]: ...

    def close(self) -> None: ...


def union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of two sorted lists of disjoint [start, end) ranges, merged where they touch."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(a + b):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _file_data(h: _Handle, start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of [start, end) where the layer file holds data, in blocks."""
    end = min(end, h.size)
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        runs = h.block_status_fd(pos, end - pos, _RUNS)
        if not runs:
            break
        for n, data in runs:
            if data:
                s = pos // BLOCK * BLOCK
                e = min(-(-(pos + n) // BLOCK) * BLOCK, end)
                if out and s <= out[-1][1]:
                    out[-1] = (out[-1][0], max(e, out[-1][1]))
                else:
                    out.append((s, e))
            pos += n
    return out


class Delta:
    """The changed extents of one :class:`DeltaPlan`, read from open layer handles.

    The handles keep their files open, so a purge that drops a layer meanwhile
    does not pull it away; the ``*_fd`` reads they use are thread-safe.
    """

    def __init__(self, plan: DeltaPlan, handles: Sequence[_Handle]) -> None:
        """Use :meth:`open`."""
        self.plan = plan
        self._handles = list(handles)

    @classmethod
    def open(cls, replica: Any, since: str, to: str | None) -> Delta:
        """The delta between ``since`` and ``to`` (None: the head) of an open Replica."""
        p = plan(replica.layers(), since, to)
        handles: list[_Handle] = []
        try:
            for f in p.files:
                handles.append(replica.open_layer(f))
        except BaseException:
            for h in handles:
                h.close()
            raise
        return cls(p, handles)

    def extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """Changed [start, end) byte ranges within [start, end) of TO (block-aligned
        inside, clipped to the window at its edges)."""
        end = min(end, self.plan.size)
        out: list[tuple[int, int]] = []
        for h in self._handles:
            out = union(out, _file_data(h, start, end))
        return [(max(s, start), min(e, end)) for s, e in out if min(e, end) > max(s, start)]

    def scan(self) -> list[tuple[int, int]]:
        """Every changed extent of TO as (offset, length), merged (runs in a thread)."""
        ranges: list[tuple[int, int]] = []
        for lo in range(0, self.plan.size, SCAN_WINDOW):
            ranges = union(ranges, self.extents(lo, lo + SCAN_WINDOW))
        return [(s, e - s) for s, e in ranges]

    def close(self) -> None:
        """Close the layer handles."""
        for h in self._handles:
            h.close()
        self._handles = []

    def __enter__(self) -> Delta:
        """Use as a context manager that closes the handles."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the handles."""
        self.close()


def to_json(p: DeltaPlan, extents: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """A delta as the control APIs answer it."""
    return {"since": p.since, "to": p.to, "head": p.to is None, "ancestor": p.ancestor,
            "branch": p.branch, "size": p.size, "since_size": p.since_size,
            "block_size": BLOCK, "extents": [[o, n] for o, n in extents],
            "bytes": sum(n for _, n in extents)}


def delta_json(replica: Any, since: str, to: str | None) -> dict[str, Any]:
    """:func:`to_json` of the delta of an open Replica, computed inline (a thread may call
    this on a replica no event loop uses, e.g. a detached volume's)."""
    with Delta.open(replica, since, to) as d:
        return to_json(d.plan, d.scan())
