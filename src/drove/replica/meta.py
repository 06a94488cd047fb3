"""The replica directory's metadata files, names, and filesystem mutations.

A replica directory holds::

    volume.meta                     the commit point: size, head, live layer files
    engine.meta                     the engine's opaque state (generation, members, ...)
    volume.lock                     flock'ed by the process that has the replica open
    volume-head-NNN.img(.meta)      the writable head layer and its metadata
    volume-snap-<name>.img(.meta)   read-only snapshot layers and their metadata

Every metadata write is atomic (temp file, fsync, rename, fsync the directory).
Every filesystem mutation the format makes goes through :data:`fs`, so tests can
make the N-th one fail and check that the directory reopens consistently.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drove.replica.errors import InvalidRequestError, ReplicaError

FORMAT_VERSION = 1
BLOCK = 4096

VOLUME_META = "volume.meta"
LOCK_FILE = "volume.lock"
ENGINE_META = "engine.meta"
"""The engine's opaque state (generation, members, ...): kept across opens, never a leftover."""
ENGINE_STATE_MAX = 64 * 1024
"""Largest engine state, in bytes of compact JSON."""
META_SUFFIX = ".meta"
TMP_SUFFIX = ".tmp"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEAD_RE = re.compile(r"^volume-head-(\d{3,})\.img$")
# "~" never occurs in a snapshot name, so a "~N" suffix (used when a removed
# snapshot still holds the plain file name) cannot collide with another name.
SNAP_RE = re.compile(r"^volume-snap-([A-Za-z0-9][A-Za-z0-9._-]{0,63})(~\d+)?\.img$")
# Files this format may leave behind after an interrupted operation.
_OURS_RE = re.compile(
    r"^(volume-head-\d{3,}\.img|volume-snap-[^/]+\.img)(\.meta)?(\.tmp)?$"
    r"|^volume\.meta\.tmp$|^engine\.meta\.tmp$"
)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class FsOps:
    """Every filesystem mutation of the replica format, in one replaceable place.

    Reads (pread, lseek, fstat) are not here: they cannot leave a half-done state.
    Tests wrap the methods named in :attr:`MUTATIONS` to fail after N calls.
    """

    MUTATIONS = (
        "open_write", "pwritev", "fsync", "fdatasync", "replace", "link", "unlink",
        "punch_hole", "preallocate", "ftruncate",
    )

    def open_write(self, path: str | Path, flags: int, mode: int = 0o644) -> int:
        """Open (and maybe create or truncate) a file for writing."""
        return os.open(path, flags | os.O_CLOEXEC, mode)

    def pwritev(self, fd: int, bufs: Sequence[Any], offset: int, flags: int = 0) -> int:
        """One pwritev(2) call; may write less than asked."""
        return os.pwritev(fd, bufs, offset, flags)

    def fsync(self, fd: int) -> None:
        """fsync(2) a file or a directory."""
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        """fdatasync(2) a file."""
        os.fdatasync(fd)

    def replace(self, src: str | Path, dst: str | Path) -> None:
        """Atomically rename ``src`` over ``dst``."""
        os.replace(src, dst)

    def link(self, src: str | Path, dst: str | Path) -> None:
        """Create the hard link ``dst`` to ``src``."""
        os.link(src, dst)

    def unlink(self, path: str | Path) -> None:
        """Remove a directory entry."""
        os.unlink(path)

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        """Deallocate a range, keeping the file size (it then reads as zeros)."""
        if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")

    def preallocate(self, fd: int, offset: int, length: int) -> None:
        """Allocate a range as unwritten extents, keeping the size (SEEK_DATA still sees holes)."""
        if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate: {os.strerror(err)}")

    def ftruncate(self, fd: int, length: int) -> None:
        """Set a file's size."""
        os.ftruncate(fd, length)


fs = FsOps()


def write_all(fd: int, bufs: Sequence[Any], offset: int, flags: int = 0) -> None:
    """pwritev all of ``bufs`` at ``offset``, continuing after short writes."""
    if len(bufs) == 1:
        # The usual case, one buffer written whole by one call: skip the bookkeeping.
        n = fs.pwritev(fd, bufs, offset, flags)
        if n == memoryview(bufs[0]).nbytes:
            return
        bufs = [memoryview(bufs[0]).cast("B")[n:]]
        offset += n
    views = [v for v in (memoryview(b).cast("B") for b in bufs) if len(v)]
    i = 0
    while i < len(views):
        # IOV_MAX is 1024 on Linux; longer lists fail with EINVAL.
        n = fs.pwritev(fd, views[i:i + 1024], offset, flags)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        while n:
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


FOLIO_PIECE = 64 * 1024
"""Largest single write into a head: the page cache then keeps folios of at most this size.

Since Linux 6.16, ext4 caches a file in folios as large as the writes that
created them, and a later 4 KiB write into a large folio costs time in
proportion to the folio's size (ext4_block_write_begin walks every block of
it).  Measured on this kernel (6.18), CPU per 4 KiB overwrite of data first
written in 1 MiB writes: 24.5 us; in 256 KiB writes: 7.8; in 64 KiB: 4.1; in
4 KiB: 2.1.  Writing big requests in 64 KiB pieces costs ~13% more kernel CPU
for the big write itself; a database volume is overwritten in small pages far
more often than it is written in bulk.
"""


def write_in_pieces(fd: int, bufs: Sequence[Any], offset: int, flags: int = 0) -> None:
    """:func:`write_all`, in :data:`FOLIO_PIECE`-aligned pieces (see there why).

    With ``flags`` (RWF_DSYNC) the write stays one call: one sync, not one per piece.
    """
    # One buffer is the usual case (no edge completed from an older layer): no generator.
    total = memoryview(bufs[0]).nbytes if len(bufs) == 1 else \
        sum(memoryview(b).nbytes for b in bufs)
    if flags or total <= FOLIO_PIECE:
        write_all(fd, bufs, offset, flags)
        return
    mv = memoryview(bufs[0]).cast("B") if len(bufs) == 1 else memoryview(b"".join(bufs))
    pos = 0
    while pos < total:
        end = min(total, ((offset + pos) // FOLIO_PIECE + 1) * FOLIO_PIECE - offset)
        write_all(fd, [mv[pos:end]], offset + pos)
        pos = end


def now_iso() -> str:
    """The current time as ISO-8601 UTC with a Z suffix."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def head_file(number: int) -> str:
    """File name of the head layer number ``number``."""
    return f"volume-head-{number:03d}.img"


def head_number(file: str) -> int | None:
    """The number in a head file name, or None when it is not one."""
    m = HEAD_RE.match(file)
    return int(m.group(1)) if m else None


def validate_snapshot_name(name: object) -> str:
    """Return ``name`` if it is a valid snapshot name, else raise ValueError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequestError(
            f"invalid snapshot name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name


def snapshot_file(name: str, taken: Collection[str]) -> str:
    """A file name for snapshot ``name`` not in ``taken`` (plain unless a removed one has it)."""
    file = f"volume-snap-{name}.img"
    n = 1
    while file in taken:
        n += 1
        file = f"volume-snap-{name}~{n}.img"
    return file


def is_format_file(file: str) -> bool:
    """Whether ``file`` is a name this format creates (so a leftover of it may be removed)."""
    return bool(_OURS_RE.match(file))


def meta_file(file: str) -> str:
    """Name of the metadata file of layer file ``file``."""
    return file + META_SUFFIX


@dataclass(frozen=True, slots=True)
class VolumeMeta:
    """Contents of volume.meta: the committed structure of the replica."""

    size: int
    head: str
    layers: tuple[str, ...]
    next_head: int
    # Layer metadata committed with this structure but maybe not yet in the layers'
    # own .meta files (a rebuild prepare rewrites many at once): open installs it.
    staged: Mapping[str, LayerMeta] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to volume.meta."""
        out: dict[str, Any] = {
            "format": FORMAT_VERSION, "size": self.size, "head": self.head,
            "layers": list(self.layers), "next_head": self.next_head,
        }
        if self.staged:
            out["staged"] = {f: m.to_json() for f, m in self.staged.items()}
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str) -> VolumeMeta:
        """Parse and check volume.meta's JSON object; ReplicaError naming ``where``."""
        _check_format(obj, where)
        size = _get(obj, "size", int, where)
        head = _get(obj, "head", str, where)
        layers = _get(obj, "layers", list, where)
        next_head = _get(obj, "next_head", int, where)
        if size <= 0 or size % BLOCK:
            raise ReplicaError(f"{where}: size {size} is not a positive multiple of {BLOCK}")
        if not all(isinstance(f, str) for f in layers):
            raise ReplicaError(f"{where}: 'layers' must be a list of file names")
        for f in layers:
            if not (HEAD_RE.match(f) or SNAP_RE.match(f)):
                raise ReplicaError(f"{where}: {f!r} is not a layer file name")
        if len(set(layers)) != len(layers):
            raise ReplicaError(f"{where}: 'layers' lists a file twice")
        if head not in layers:
            raise ReplicaError(f"{where}: head {head!r} is not among the layers")
        number = head_number(head)
        if number is None:
            raise ReplicaError(f"{where}: head {head!r} is not a head file name")
        if next_head <= number:
            raise ReplicaError(f"{where}: next_head {next_head} is not after head {head!r}")
        staged: dict[str, LayerMeta] | None = None
        raw = obj.get("staged")
        if raw is not None:
            if not isinstance(raw, dict):
                raise ReplicaError(f"{where}: 'staged' must map layer files to metadata")
            staged = {}
            for f, m in raw.items():
                if f not in layers:
                    raise ReplicaError(f"{where}: staged metadata for {f!r}, not a layer")
                staged[f] = LayerMeta.from_json(m, f"{where} (staged {f})")
        return cls(size=size, head=head, layers=tuple(layers), next_head=next_head,
                   staged=staged or None)


@dataclass(frozen=True, slots=True)
class LayerMeta:
    """Contents of one ``<layer file>.meta``."""

    file: str
    name: str | None
    parent: str | None
    created: str
    size: int
    labels: Mapping[str, str] = field(default_factory=dict)
    removed: bool = False
    checksum: str | None = None
    # Being rebuilt: the layer's data is still being copied from another replica.
    incomplete: bool = False
    # A linked clone's base layer: {"volume", "snapshot"} the clone was made from.  Its
    # file may be a hard link shared with other replicas: never a snapshot of this
    # volume (not listed as one, not deletable, no revert to it), never written in place.
    base: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to the layer's .meta file."""
        out: dict[str, Any] = {
            "format": FORMAT_VERSION, "name": self.name, "file": self.file,
            "parent": self.parent, "created": self.created, "labels": dict(self.labels),
            "removed": self.removed, "size": self.size, "checksum": self.checksum,
        }
        if self.incomplete:
            out["incomplete"] = True
        if self.base is not None:
            out["base"] = dict(self.base)
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str) -> LayerMeta:
        """Parse and check a layer's JSON object; ReplicaError naming ``where``."""
        _check_format(obj, where)
        name = _get(obj, "name", (str, type(None)), where)
        file = _get(obj, "file", str, where)
        parent = _get(obj, "parent", (str, type(None)), where)
        created = _get(obj, "created", str, where)
        labels = _get(obj, "labels", dict, where)
        removed = _get(obj, "removed", bool, where)
        size = _get(obj, "size", int, where)
        checksum = _get(obj, "checksum", (str, type(None)), where)
        incomplete = obj.get("incomplete", False)  # optional: older files lack it
        if not isinstance(incomplete, bool):
            raise ReplicaError(f"{where}: key 'incomplete' has the wrong type "
                               f"({type(incomplete).__name__})")
        if incomplete and checksum is not None:
            raise ReplicaError(f"{where}: an incomplete layer cannot have a checksum")
        base = parse_base(obj.get("base"), where)
        if name is not None and not NAME_RE.match(name):
            raise ReplicaError(f"{where}: invalid snapshot name {name!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ReplicaError(f"{where}: 'labels' must map strings to strings")
        if size <= 0 or size % BLOCK:
            raise ReplicaError(f"{where}: size {size} is not a positive multiple of {BLOCK}")
        try:
            datetime.fromisoformat(created)
        except ValueError:
            raise ReplicaError(f"{where}: 'created' is not an ISO-8601 time: {created!r}") from None
        return cls(file=file, name=name, parent=parent, created=created, size=size,
                   labels=dict(labels), removed=removed, checksum=checksum,
                   incomplete=incomplete, base=base)


def parse_base(raw: Any, where: str) -> dict[str, str] | None:
    """A layer's ``base`` marker ({"volume", "snapshot"} strings) or None; ReplicaError."""
    if raw is None:
        return None
    if (not isinstance(raw, dict) or set(raw) != {"volume", "snapshot"}
            or not all(isinstance(v, str) and v for v in raw.values())):
        raise ReplicaError(f"{where}: 'base' must be {{\"volume\": ..., \"snapshot\": ...}}, "
                           f"not {raw!r}")
    return {"volume": raw["volume"], "snapshot": raw["snapshot"]}


def _check_format(obj: Any, where: str) -> None:
    """Raise ReplicaError unless ``obj`` is a JSON object of our format version."""
    if not isinstance(obj, dict):
        raise ReplicaError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    version = obj.get("format")
    if version != FORMAT_VERSION:
        raise ReplicaError(f"{where}: unsupported format version {version!r} "
                           f"(this drove reads version {FORMAT_VERSION})")


def _get(obj: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    """obj[key] checked against ``types`` (bool never passes for int)."""
    if key not in obj:
        raise ReplicaError(f"{where}: missing key {key!r}")
    value = obj[key]
    bad_bool = isinstance(value, bool) and types is int
    if bad_bool or not isinstance(value, types):
        raise ReplicaError(f"{where}: key {key!r} has the wrong type ({type(value).__name__})")
    return value


def read_json(path: Path) -> Any:
    """Load a metadata file; ReplicaError naming it when missing or unparseable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ReplicaError(f"{path}: metadata file is missing") from None
    except OSError as e:
        raise ReplicaError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReplicaError(f"{path}: corrupt JSON ({e})") from None


def stage_json(dirpath: Path, name: str, obj: Any) -> Path:
    """Write ``obj`` to ``name``.tmp in ``dirpath`` and fsync it; return the temp path."""
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    tmp = dirpath / (name + TMP_SUFFIX)
    fd = fs.open_write(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(fd, [data], 0)
        fs.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def write_json_atomic(dirpath: Path, dirfd: int, name: str, obj: Any) -> None:
    """Atomically replace ``name`` in ``dirpath`` with ``obj`` as JSON, durably."""
    tmp = stage_json(dirpath, name, obj)
    fs.replace(tmp, dirpath / name)
    fs.fsync(dirfd)


def check_tree(
    vol: VolumeMeta, layers: Mapping[str, LayerMeta], file_sizes: Mapping[str, int], where: Path,
) -> None:
    """Raise ReplicaError unless the layers listed in ``vol`` form a consistent tree.

    ``layers`` and ``file_sizes`` hold the parsed meta and the apparent file size
    of every layer listed in ``vol``.  ``where`` is the replica directory.
    """
    live_names: dict[str, str] = {}
    for file in vol.layers:
        m = layers[file]
        mpath = where / meta_file(file)
        if m.file != file:
            raise ReplicaError(f"{mpath}: describes file {m.file!r}, expected {file!r}")
        if m.parent is not None and m.parent not in layers:
            raise ReplicaError(f"{mpath}: parent {m.parent!r} is not a layer of this replica")
        if m.parent == file:
            raise ReplicaError(f"{mpath}: layer is its own parent")
        is_head = file == vol.head
        if is_head:
            if (m.name is not None or m.removed or m.checksum is not None or m.incomplete
                    or m.base is not None):
                raise ReplicaError(f"{mpath}: the head must have no name, checksum, removal, "
                                   "incomplete flag or base marker")
            if file_sizes[file] < vol.size:
                raise ReplicaError(f"{where / file}: file size {file_sizes[file]} is smaller "
                                   f"than the volume size {vol.size}")
            if m.size > vol.size:
                raise ReplicaError(f"{mpath}: size {m.size} exceeds the volume size {vol.size}")
        else:
            if m.name is None or not SNAP_RE.match(file):
                raise ReplicaError(f"{mpath}: a snapshot layer needs a name and a snapshot "
                                   "file name")
            if file_sizes[file] != m.size:
                raise ReplicaError(f"{where / file}: file size {file_sizes[file]} does not "
                                   f"match size {m.size} in {mpath.name}")
            if m.size > vol.size:
                raise ReplicaError(f"{mpath}: size {m.size} exceeds the volume size {vol.size}")
            if not m.removed and m.base is None:  # base layers are not this volume's
                if m.name in live_names:
                    raise ReplicaError(f"{mpath}: snapshot name {m.name!r} is also used by "
                                       f"{live_names[m.name]}")
                live_names[m.name] = file
        if m.parent is not None:
            p = layers[m.parent]
            if m.parent == vol.head:
                raise ReplicaError(f"{mpath}: parent {m.parent!r} is the head")
            if p.size > m.size:
                raise ReplicaError(f"{mpath}: parent {m.parent!r} is larger ({p.size}) than "
                                   f"this layer ({m.size})")
    # Cycles: every walk up the parents must end at a root within len(layers) steps.
    for file in vol.layers:
        seen = {file}
        cur = layers[file].parent
        while cur is not None:
            if cur in seen:
                raise ReplicaError(f"{where / meta_file(file)}: parent chain has a cycle "
                                   f"through {cur!r}")
            seen.add(cur)
            cur = layers[cur].parent


def parents_first(parents: Mapping[str, str | None],
                  order: Callable[[str], Any] | None = None) -> list[str]:
    """The keys of ``parents`` (layer -> its parent) with every parent before its children.

    Siblings come in ``order`` (default: by name); a parent not among the keys is
    ignored, and a loop is cut where it closes.
    """
    out: list[str] = []
    seen: set[str] = set()
    for f in sorted(parents, key=order):
        path: list[str] = []
        cur: str | None = f
        while cur is not None and cur in parents and cur not in seen and cur not in path:
            path.append(cur)
            cur = parents[cur]
        for p in reversed(path):
            seen.add(p)
            out.append(p)
    return out
