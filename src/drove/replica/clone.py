"""Linked clones on disk: a new replica directory whose chain starts on a snapshot's layers,
hard-linked from another replica directory on the same filesystem (never copied).

The new directory holds a hard link to every layer file of the snapshot's chain
(the snapshot and its ancestors), its own copies of their small ``.meta`` files
with a ``base`` marker (``{"volume", "snapshot"}``: not this volume's snapshots,
never listed, deleted or reverted to), and a new empty head.  The format keeps
shared files read-only: :class:`drove.replica.chain.Replica` gives a layer a
private copy before anything would write into it while it has more than one link.

It works on the files alone, whether or not a process has the source open:

* only a chain whose layers are all complete (no rebuild copying into them) is
  linked, and the source's metadata is read again after linking: if volume.meta,
  a linked layer's .meta or the file behind a name changed meanwhile (a fold
  drops a layer's checksum, a rebuild prepare rewrites volume.meta, both before
  writing data), the attempt is undone and made again.  A writer that checks the
  link count after that, as the chain does, then sees the new link;
* the directory is built under a temporary name, fsynced, and renamed into
  place: after a crash it either exists whole or not at all (a leftover
  temporary directory is removed by the next attempt).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from drove.replica import meta
from drove.replica.backing import filling_layer
from drove.replica.errors import ReplicaError
from drove.replica.meta import VOLUME_META, LayerMeta, VolumeMeta, meta_file

ATTEMPTS = 5
"""How often a clone is tried again when the source changed while it was being linked."""

_TMP_PREFIX = "."
CLONE_TMP_SUFFIX = ".clone-tmp"
"""The end of the temporary name a clone directory is built under (see :func:`temp_dir`)."""


class CloneError(Exception):
    """The clone cannot be made as asked (the message says why); nothing was changed."""


@dataclass(frozen=True, slots=True)
class CloneResult:
    """What :func:`make_clone` made."""

    path: str
    size: int
    layers: tuple[str, ...]
    linked_bytes: int

    def to_json(self) -> dict[str, Any]:
        """As plain JSON."""
        return {"path": self.path, "size": self.size, "layers": list(self.layers),
                "linked_bytes": self.linked_bytes}


def temp_dir(dst: Path) -> Path:
    """Where the clone directory ``dst`` is built before it is renamed into place."""
    return dst.parent / f"{_TMP_PREFIX}{dst.name}{CLONE_TMP_SUFFIX}"


def _read_source(src: Path) -> tuple[VolumeMeta, dict[str, LayerMeta]]:
    """The source's volume.meta and every listed layer's metadata."""
    vol = VolumeMeta.from_json(meta.read_json(src / VOLUME_META), str(src / VOLUME_META))
    if vol.staged:
        raise _Changing(f"{src}: a rebuild is preparing this replica")
    metas = {}
    for f in vol.layers:
        mp = src / meta_file(f)
        metas[f] = LayerMeta.from_json(meta.read_json(mp), str(mp))
    return vol, metas


class _Changing(Exception):
    """The source changed while it was read or linked: try again."""


def _find(metas: Mapping[str, LayerMeta], snapshot: str,
          within: Mapping[str, str] | None, src: Path) -> LayerMeta:
    """The layer to clone: live snapshot ``snapshot``, or with ``within`` the base layer of
    that name carrying that marker (a sibling clone's copy of the same snapshot)."""
    want = dict(within) if within is not None else None
    for m in metas.values():
        if m.name != snapshot:
            continue
        if want is None and m.base is None and not m.removed:
            return m
        if want is not None and m.base is not None and dict(m.base) == want:
            return m
    what = (f"snapshot {snapshot!r}" if want is None
            else f"base layer {snapshot!r} of {want['volume']}@{want['snapshot']}")
    raise CloneError(f"{src}: no {what} here")


def _chain(metas: Mapping[str, LayerMeta], top: LayerMeta) -> list[LayerMeta]:
    """``top`` and its ancestors, oldest first."""
    out = []
    cur: LayerMeta | None = top
    while cur is not None:
        out.append(cur)
        cur = metas[cur.parent] if cur.parent is not None else None
    out.reverse()
    return out


def make_clone(src: str | os.PathLike[str], dst: str | os.PathLike[str], snapshot: str,
               base: Mapping[str, str], within: Mapping[str, str] | None = None) -> CloneResult:
    """Make replica directory ``dst``: a new empty head on ``snapshot`` of replica ``src``.

    ``base`` ({"volume", "snapshot"}) marks the linked layers that were ``src``'s own;
    layers that were already base layers keep their marker.  ``within``: take the
    base layer named ``snapshot`` with that marker instead of a live snapshot.
    CloneError (nothing left behind) when the snapshot is missing or incomplete,
    ``dst`` exists, or the two are not on one filesystem.
    """
    src, dst = Path(src), Path(dst)
    base = meta.parse_base(dict(base), "base") or {}
    meta.validate_snapshot_name(snapshot)
    if os.path.lexists(dst):
        raise CloneError(f"{dst} exists already")
    if not (src / VOLUME_META).is_file():
        raise CloneError(f"{src} is not a replica directory")
    tmp = temp_dir(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(ATTEMPTS):
        if tmp.exists():
            shutil.rmtree(tmp)  # a crashed or failed earlier attempt's
        try:
            return _attempt(src, dst, tmp, snapshot, base, within)
        except _Changing as exc:
            last = str(exc)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    raise CloneError(f"{src} kept changing while {dst} was linked ({last}); try again")


def _attempt(src: Path, dst: Path, tmp: Path, snapshot: str, base: Mapping[str, str],
             within: Mapping[str, str] | None) -> CloneResult:
    """One try: link, check the source did not change, write the metadata, rename."""
    try:
        vol, metas = _read_source(src)
    except ReplicaError as exc:
        raise CloneError(f"{src}: {exc}") from None
    top = _find(metas, snapshot, within, src)
    chain = _chain(metas, top)
    for m in chain:
        if m.incomplete:
            raise CloneError(f"{src}: layer {m.file} is still being rebuilt; clone from a "
                             "healthy replica")
    filling = filling_layer(src)
    if filling is not None and filling[0] in {m.file for m in chain} | {"?"}:
        raise CloneError(f"{src}: layer {filling[0]} is still being filled from backup "
                         f"{filling[1]} (an instant restore); clone once its fill is done")
    os.mkdir(tmp)
    inodes = {}
    linked = 0
    for m in chain:
        try:
            meta.fs.link(src / m.file, tmp / m.file)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise CloneError(f"{src} and {dst} are on different filesystems: a linked "
                                 "clone needs its base layers on its own disk") from None
            raise
        st = os.stat(tmp / m.file)
        inodes[m.file] = st.st_ino
        linked += st.st_blocks * 512
    # The source must not have changed under the links (see the module docstring).
    try:
        vol2, metas2 = _read_source(src)
    except ReplicaError as exc:
        raise _Changing(str(exc)) from None
    if vol2 != vol or any(metas2.get(m.file) != m for m in chain):
        raise _Changing(f"{src}: its layers changed")
    for m in chain:
        if os.stat(src / m.file).st_ino != inodes[m.file]:
            raise _Changing(f"{src}: {m.file} was replaced")
    dirfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for m in chain:
            # Not removed here even where the source deleted it: a base layer is not ours
            # to purge (a fold would have to copy the next base layer to write into it).
            mine = replace(m, removed=False, base=m.base if m.base is not None else base)
            meta.write_json_atomic(tmp, dirfd, meta_file(m.file), mine.to_json())
        head = meta.head_file(1)
        fd = meta.fs.open_write(tmp / head, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            meta.fs.ftruncate(fd, top.size)
            meta.fs.fsync(fd)
        finally:
            os.close(fd)
        hm = LayerMeta(file=head, name=None, parent=top.file, created=meta.now_iso(),
                       size=top.size)
        meta.write_json_atomic(tmp, dirfd, meta_file(head), hm.to_json())
        new = VolumeMeta(size=top.size, head=head,
                         layers=(*(m.file for m in chain), head), next_head=2)
        meta.write_json_atomic(tmp, dirfd, VOLUME_META, new.to_json())
    finally:
        os.close(dirfd)
    if os.path.lexists(dst):
        raise CloneError(f"{dst} exists already")
    # The commit point: the whole directory appears under its name at once.
    meta.fs.replace(tmp, dst)
    pfd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        meta.fs.fsync(pfd)
    finally:
        os.close(pfd)
    return CloneResult(path=str(dst), size=top.size, layers=tuple(m.file for m in chain),
                       linked_bytes=linked)
