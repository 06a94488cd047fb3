"""The replica's differencing-disk chain: head I/O, snapshots, purge, revert.

One directory per replica (see :mod:`drove.replica.meta` for the files).  The
layers form a tree; the live volume is the chain from the head up its parents.
A 4 KiB block is read from the newest layer of the chain holding any byte of
it: whoever writes part of a block an older layer holds first copies the rest
of that block into the head (read-modify-write), so that rule is always exact.

Everything here is synchronous: the replica process calls it inline on its
event loop.  Only :meth:`Replica.checksum` may run in a worker thread.

Crash safety: new files are written and fsynced first, then volume.meta is
atomically replaced (the commit point of adding or dropping layers), then what
is no longer referenced is removed.  Single-layer flag changes (delete) commit
by atomically replacing that layer's .meta.  :meth:`Replica.open` removes the
unlisted leftovers of an interrupted operation and refuses anything
inconsistent with :class:`ReplicaError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import stat
import struct
import threading
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from drove.replica import backing as bk
from drove.replica import meta
from drove.replica.errors import (
    ChecksumMismatchError,
    InvalidRequestError,
    LayerNotFoundError,
    RebuildingError,
    ReplicaError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StaleGenerationError,
)
from drove.replica.index import CHUNK_BLOCKS, HOLE, MAX_LAYERS, ReadIndex
from drove.replica.meta import (
    BLOCK,
    ENGINE_META,
    LOCK_FILE,
    VOLUME_META,
    LayerMeta,
    VolumeMeta,
    meta_file,
)
from drove.replica.ranges import block_extents, intersect, seek_data, subtract

log = logging.getLogger(__name__)

DEFAULT_MAX_OPEN_FILES = 128
"""Read-only layer files kept open at once (LRU); the head is always open."""

PURGE_STEP_BYTES = 32 << 20
"""Most data one purge step copies or punches before yielding."""

_COPY_BUF = 4 << 20
_ZEROS = memoryview(bytes(1 << 20))
_O_RO = os.O_RDONLY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One layer of the replica's tree, as :meth:`Replica.layers` reports it."""

    name: str | None
    file: str
    parent: str | None
    children: tuple[str, ...]
    created: str
    labels: Mapping[str, str]
    removed: bool
    size: int
    allocated: int
    checksum: str | None
    head: bool
    incomplete: bool = False
    base: Mapping[str, str] | None = None
    backing: str | None = None  # the backup an instant restore still fills this layer from


# --------------------------------------------------------------------------- helpers


# bytearray(n) zero-fills; CPython's PyByteArray_FromStringAndSize(NULL, n) does
# not.  For a 1 MiB chain read that memset was 15% of the replica's CPU, and
# the buffer is fully overwritten anyway (data runs by preadv, holes zeroed).
_bytearray_uninit = ctypes.pythonapi.PyByteArray_FromStringAndSize
_bytearray_uninit.restype = ctypes.py_object
_bytearray_uninit.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_UNINIT_MIN = 64 * 1024
# From this size on, preallocating a write's span in the head before writing it
# is cheaper than letting ext4 allocate on write (measured: 155 vs 540-1550 us
# of CPU per 1 MiB, break-even near 64 KiB; 4 KiB writes get 3x dearer).
_PREALLOCATE_MIN = 128 * 1024  # below this the ctypes call costs more than the memset


def _read_buffer(n: int) -> bytearray:
    """A bytearray of ``n`` bytes with undefined contents: the caller overwrites all of it."""
    return _bytearray_uninit(None, n) if n >= _UNINIT_MIN else bytearray(n)


class NoWaitUnsupportedError(BlockingIOError):
    """The filesystem cannot tell whether a read would wait (tmpfs): read the plain way."""


def _pread_full(fd: int, mv: memoryview, offset: int, flags: int = 0) -> None:
    """Fill ``mv`` from ``fd`` at ``offset``; past the end of the file reads as zeros.

    With ``os.RWF_NOWAIT`` in ``flags``, BlockingIOError when the data is not in
    the page cache (the kernel returns what is cached, then EAGAIN), and also
    where the filesystem cannot read without waiting at all (tmpfs: EOPNOTSUPP).
    """
    while len(mv):
        try:
            n = os.preadv(fd, [mv], offset, flags)
        except OSError as exc:
            if flags and exc.errno == errno.EOPNOTSUPP:
                raise NoWaitUnsupportedError(errno.EAGAIN, "this filesystem has no "
                                                           "RWF_NOWAIT reads") from exc
            raise
        if n == 0:
            _fill_zero(mv)
            return
        mv = mv[n:]
        offset += n


def _fill_zero(mv: memoryview) -> None:
    """Zero a writable buffer without allocating one as large."""
    for i in range(0, len(mv), len(_ZEROS)):
        k = min(len(_ZEROS), len(mv) - i)
        mv[i:i + k] = _ZEROS[:k]


def _write_zeros(fd: int, offset: int, length: int) -> None:
    """Write real zeros (allocated blocks, never unwritten extents) over a range."""
    bufs = []
    while length:
        k = min(length, len(_ZEROS))
        bufs.append(_ZEROS[:k])
        length -= k
    meta.write_all(fd, bufs, offset)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Copy bytes [start, end) from file ``src`` to the same offsets of file ``dst``."""
    buf = memoryview(bytearray(min(_COPY_BUF, end - start)))
    while start < end:
        mv = buf[:min(len(buf), end - start)]
        _pread_full(src, mv, start)
        meta.write_all(dst, [mv], start)
        start += len(mv)


def _hash_layer(fd: int) -> str:
    """sha256 over each maximal data run: 8-byte offset, 8-byte length, then the data."""
    h = hashlib.sha256()
    pos = 0
    while (d := seek_data(fd, pos)) is not None:
        end = os.lseek(fd, d, os.SEEK_HOLE)
        h.update(struct.pack(">QQ", d, end - d))
        pos = d
        while pos < end:
            chunk = os.pread(fd, min(_COPY_BUF, end - pos), pos)
            if not chunk:
                raise OSError(errno.EIO, "layer file shrank while hashing")
            h.update(chunk)
            pos += len(chunk)
    return h.hexdigest()


def _check_fs_block(path: Path) -> None:
    """Refuse filesystems whose blocks are larger than ours (a punch would not free them)."""
    st = os.statvfs(path)
    if max(st.f_frsize, 1) > BLOCK or BLOCK % max(st.f_frsize, 1):
        raise ReplicaError(f"{path}: filesystem block size {st.f_frsize} is not a divisor of "
                           f"{BLOCK}; a replica needs blocks of at most {BLOCK} bytes")


def _check_range(offset: int, length: int, size: int) -> None:
    """ValueError unless [offset, offset + length) lies within ``size``."""
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidRequestError(f"range {offset}+{length} is outside the volume (size {size})")


class _Files:
    """File descriptors of layer files: the pinned head plus an LRU of read-only ones.

    The LRU keeps a 300-layer chain within the open-file limit; an fd from
    :meth:`get` is valid until the next :meth:`get`, so use it at once.
    """

    def __init__(self, dirpath: Path, cap: int) -> None:
        """Open files of ``dirpath``, at most ``cap`` read-only ones at a time."""
        self._dir = dirpath
        self._cap = max(1, cap)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pinned: dict[str, int] = {}

    def get(self, file: str) -> int:
        """An fd reading ``file``."""
        fd = self._pinned.get(file)
        if fd is not None:
            return fd
        fd = self._fds.get(file)
        if fd is not None:
            self._fds.move_to_end(file)
            return fd
        fd = os.open(self._dir / file, _O_RO)
        self._fds[file] = fd
        if len(self._fds) > self._cap:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def pin(self, file: str, fd: int) -> None:
        """Serve ``file`` from ``fd`` (owned by the caller) until unpinned."""
        self.drop(file)
        self._pinned[file] = fd

    def unpin(self, file: str) -> None:
        """Stop serving ``file`` from its pinned fd (the caller closes it)."""
        self._pinned.pop(file, None)

    def drop(self, file: str) -> None:
        """Close the cached fd of ``file``, if any."""
        fd = self._fds.pop(file, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close every cached fd (pinned ones belong to their owner)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pinned.clear()


class _BackedSource:
    """The backing layer of an instant restore as the read index sees it: while blocks
    are still in the backup, every block the backup holds counts as data."""

    __slots__ = ("_backing", "_files", "file")

    def __init__(self, files: _Files, file: str, backing: bk.Backing) -> None:
        """Extents of ``file``, or of the backup behind it while it is being filled."""
        self._files = files
        self.file = file
        self._backing = backing

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """Blocks of [start, end) holding data (the backup's blocks until it is filled)."""
        if self._backing.active:
            return self._backing.extents(start, end)
        return block_extents(self._files.get(self.file), start, end, BLOCK)


class _LayerSource:
    """A layer file as the read index sees it (:class:`drove.replica.index.ExtentSource`)."""

    __slots__ = ("_files", "file")

    def __init__(self, files: _Files, file: str) -> None:
        """Extents of ``file``, read through ``files``."""
        self._files = files
        self.file = file

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """Blocks of [start, end) holding data (any byte of a block counts)."""
        return block_extents(self._files.get(self.file), start, end, BLOCK)


def _chain_readinto(index: ReadIndex, files: _Files, offset: int, mv: memoryview,
                    zeroed: bool, flags: int = 0) -> None:
    """Read ``len(mv)`` bytes at ``offset`` through the chain ``index`` describes.

    One preadv per run of blocks held by one layer, straight into ``mv``
    (``flags``: preadv2's, e.g. RWF_NOWAIT).
    """
    end = offset + len(mv)
    layers = index.layers
    for s, e, lid in index.runs(offset // BLOCK, -(-end // BLOCK)):
        a = max(s * BLOCK, offset)
        b = min(e * BLOCK, end)
        if lid == HOLE:
            if not zeroed:
                _fill_zero(mv[a - offset:b - offset])
        else:
            _pread_full(files.get(layers[lid].file), mv[a - offset:b - offset], a, flags)  # type: ignore[attr-defined]


def _chain_read(index: ReadIndex, files: _Files, offset: int, length: int,
                flags: int = 0) -> bytes | bytearray:
    """``length`` bytes at ``offset`` through the chain ``index`` describes (preadv2 ``flags``)."""
    first, end = offset // BLOCK, -(-(offset + length) // BLOCK)
    if end - first == 1:
        lid = index.layer_of(first)  # one block: no run lists at all
    else:
        runs = index.runs(first, end)
        lid = runs[0][2] if len(runs) == 1 else -1
    if lid >= 0:
        # One layer (or nothing) holds the whole range, the common case for small
        # requests: one pread, no buffer juggling (measured: 6.1 -> ~2.5 us a 4 KiB read).
        if lid == HOLE:
            return bytes(length)
        fd = files.get(index.layers[lid].file)  # type: ignore[attr-defined]
        if flags:
            buf = _read_buffer(length)
            _pread_full(fd, memoryview(buf), offset, flags)
            return buf
        data = os.pread(fd, length, offset)
        if len(data) == length:
            return data
    buf = _read_buffer(length)
    _chain_readinto(index, files, offset, memoryview(buf), zeroed=False, flags=flags)
    return buf


def _chain_block_status(index: ReadIndex, offset: int, length: int) -> list[tuple[int, bool]]:
    """(length, allocated) runs covering [offset, offset + length) of a chain."""
    end = offset + length
    out: list[tuple[int, bool]] = []
    for s, e, lid in index.runs(offset // BLOCK, -(-end // BLOCK)):
        n = min(e * BLOCK, end) - max(s * BLOCK, offset)
        alloc = lid != HOLE
        if out and out[-1][1] == alloc:
            out[-1] = (out[-1][0] + n, alloc)
        else:
            out.append((n, alloc))
    return out


# --------------------------------------------------------------------------- replica


class Replica:
    """One replica directory, open and locked: a writable head over a tree of snapshots."""

    def __init__(self, dirpath: Path, dirfd: int, lockfd: int, vol: VolumeMeta,
                 metas: dict[str, LayerMeta], chunk_blocks: int, max_open_files: int,
                 engine_state: dict[str, Any] | None = None, epoch: int = 0) -> None:
        """Wrap an already validated, locked directory; use :meth:`create` or :meth:`open`."""
        self._dir = dirpath
        self._dirfd = dirfd
        self._lockfd = lockfd
        self._vol = vol
        # An instant restore's bottom layer still being fetched from a backup (or None).
        self._backing = bk.Backing.load(dirpath, dirfd, [
            f for f in vol.layers if f != vol.head and not metas[f].incomplete])
        self._metas = metas
        self._chunk_blocks = chunk_blocks
        self._files = _Files(dirpath, max_open_files)
        self._head_fd = os.open(dirpath / vol.head, os.O_RDWR | os.O_CLOEXEC)
        self._files.pin(vol.head, self._head_fd)
        self._closed = False
        self._failed: BaseException | None = None
        self._purging = False
        # Structure generation: views rebuild their chain when it changes.
        self._gen = 0
        # Incarnation of each live snapshot, so a view notices deletion even if a
        # new snapshot later reuses the name and file.
        self._incarnations = itertools.count(1)
        self._live: dict[str, int] = {
            f: next(self._incarnations) for f, m in metas.items()
            if m.name is not None and not m.removed
        }
        # Data version per layer: a checksum computed across a change is not cached.
        self._versions: dict[str, int] = defaultdict(int)
        # Guards layer metadata against checksum() running in a worker thread.
        self._meta_lock = threading.Lock()
        # Incarnation of every layer file: a LayerHandle dies when its layer is dropped
        # or replaced (a rebuild prepare replaces them all, even files it keeps).
        self._layer_inc: dict[str, int] = {f: next(self._incarnations) for f in vol.layers}
        # Layers whose data a rebuild is still copying (see prepare_rebuild).
        self._incomplete: set[str] = {f for f, m in metas.items() if m.incomplete}
        # Shared layers a flatten is copying in a worker thread (see copy_shared).
        self._flattening: set[str] = set()
        # Whether the head's chain includes an incomplete layer: reads then fail and
        # writes must not read-modify-write (see _check_rebuild_edges).
        self._chain_incomplete = False
        # Bumped whenever layer data changes under the views' feet (rebuild writes).
        self._epoch = 0
        self._engine_state: dict[str, Any] = dict(engine_state or {})
        self._owner_epoch = epoch  # the highest engine epoch seen (drove.replica.fence)
        self._chain: list[str] = []
        self._index = self._new_index(top_empty=False)

    # ------------------------------------------------------------ create / open / close

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *,
               chunk_blocks: int = CHUNK_BLOCKS,
               max_open_files: int = DEFAULT_MAX_OPEN_FILES) -> Replica:
        """Create an empty replica of ``size`` bytes (a multiple of 4096) in ``path``; open it."""
        if not isinstance(size, int) or size <= 0 or size % BLOCK:
            raise InvalidRequestError(f"size must be a positive multiple of {BLOCK}, got {size!r}")
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        if (d / VOLUME_META).exists():
            raise ReplicaError(f"{d}: already holds a replica ({VOLUME_META} exists)")
        lockfd, _ = _lock(d)
        try:
            if (d / VOLUME_META).exists():
                raise ReplicaError(f"{d}: already holds a replica ({VOLUME_META} exists)")
            _check_fs_block(d)
            head = meta.head_file(1)
            fd = meta.fs.open_write(d / head, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                meta.fs.ftruncate(fd, size)
                meta.fs.fsync(fd)
            finally:
                os.close(fd)
            dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                hm = LayerMeta(file=head, name=None, parent=None, created=meta.now_iso(),
                               size=size)
                meta.write_json_atomic(d, dirfd, meta_file(head), hm.to_json())
                vol = VolumeMeta(size=size, head=head, layers=(head,), next_head=2)
                meta.write_json_atomic(d, dirfd, VOLUME_META, vol.to_json())
            finally:
                os.close(dirfd)
            return cls._open_locked(d, lockfd, chunk_blocks, max_open_files)
        except BaseException:
            os.close(lockfd)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, chunk_blocks: int = CHUNK_BLOCKS,
             max_open_files: int = DEFAULT_MAX_OPEN_FILES) -> Replica:
        """Open and lock an existing replica directory; ReplicaError if unusable."""
        d = Path(path)
        if not (d / VOLUME_META).is_file():
            raise ReplicaError(f"{d / VOLUME_META}: missing; {d} is not a replica directory")
        lockfd, created = _lock(d)
        try:
            return cls._open_locked(d, lockfd, chunk_blocks, max_open_files)
        except BaseException:
            if created:  # leave no trace of a failed open
                os.unlink(d / LOCK_FILE)
            os.close(lockfd)
            raise

    @classmethod
    def _open_locked(cls, d: Path, lockfd: int, chunk_blocks: int,
                     max_open_files: int) -> Replica:
        """Validate everything, then clean leftovers and build the Replica."""
        vpath = d / VOLUME_META
        vol = VolumeMeta.from_json(meta.read_json(vpath), str(vpath))
        metas: dict[str, LayerMeta] = {}
        sizes: dict[str, int] = {}
        resize: list[str] = []
        for f in vol.layers:
            p = d / f
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise ReplicaError(f"{p}: layer file listed in {VOLUME_META} is missing") from None
            if not stat.S_ISREG(st.st_mode):
                raise ReplicaError(f"{p}: layer file is not a regular file")
            sizes[f] = st.st_size
            if vol.staged and f in vol.staged:
                # Committed by volume.meta; its own .meta may still be the old one.
                m = metas[f] = vol.staged[f]
                if m.incomplete and f != vol.head and st.st_size != m.size:
                    # A kept older copy of another size: the prepare resizes it
                    # after its commit (the data is to be replaced anyway).
                    resize.append(f)
                    sizes[f] = m.size
                continue
            mp = d / meta_file(f)
            metas[f] = LayerMeta.from_json(meta.read_json(mp), str(mp))
        meta.check_tree(vol, metas, sizes, d)
        _check_fs_block(d)
        engine_state, epoch = _read_engine_state(d)
        # Everything listed is consistent.  Only now touch the disk: what is not
        # listed was written by an operation that never reached its commit.
        keep = {VOLUME_META, LOCK_FILE, *vol.layers, *(meta_file(f) for f in vol.layers)}
        dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            changed = False
            for entry in sorted(os.listdir(d)):
                if entry in keep or not meta.is_format_file(entry):
                    continue
                if not (d / entry).is_file() or (d / entry).is_symlink():
                    continue
                log.warning("%s: removing %s, left over by an interrupted operation", d, entry)
                meta.fs.unlink(d / entry)
                changed = True
            if sizes[vol.head] > vol.size:
                # An expand truncated the head up but never committed the size.
                log.warning("%s: truncating %s from %d to the volume size %d "
                            "(interrupted expand)", d, vol.head, sizes[vol.head], vol.size)
                fd = meta.fs.open_write(d / vol.head, os.O_RDWR)
                try:
                    meta.fs.ftruncate(fd, vol.size)
                    meta.fs.fsync(fd)
                finally:
                    os.close(fd)
            if changed:
                meta.fs.fsync(dirfd)
            for f in resize:
                fd = meta.fs.open_write(d / f, os.O_WRONLY)
                try:
                    meta.fs.ftruncate(fd, metas[f].size)
                    meta.fs.fsync(fd)
                finally:
                    os.close(fd)
            if vol.staged:
                # An interrupted rebuild prepare committed: finish installing its metadata.
                log.warning("%s: installing the metadata of %d layers committed by an "
                            "interrupted rebuild prepare", d, len(vol.staged))
                _install_metas(d, dirfd, vol.staged)
                vol = replace(vol, staged=None)
                meta.write_json_atomic(d, dirfd, VOLUME_META, vol.to_json())
            os.ftruncate(lockfd, 0)
            os.pwrite(lockfd, f"{os.getpid()}\n".encode(), 0)
            return cls(d, dirfd, lockfd, vol, metas, chunk_blocks, max_open_files,
                       engine_state, epoch)
        except BaseException:
            os.close(dirfd)
            raise

    def close(self) -> None:
        """Flush the head and release the directory (idempotent)."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self._fdatasync(self._head_fd)
        finally:
            with self._meta_lock:
                self._closed = True
            if self._backing is not None:
                if self._failed is None:
                    with contextlib.suppress(OSError):
                        self._backing.persist()  # what reads fetched need not be again
                self._backing.close()
            self._files.close()
            os.close(self._head_fd)
            os.close(self._dirfd)
            os.close(self._lockfd)  # releases the flock

    def __enter__(self) -> Replica:
        """Use as a context manager that closes the replica."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the replica."""
        self.close()

    @property
    def size(self) -> int:
        """Current volume size in bytes."""
        return self._vol.size

    @property
    def dir(self) -> Path:
        """The replica directory."""
        return self._dir

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # ------------------------------------------------------------ head I/O

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Return ``length`` bytes of the volume at ``offset``."""
        self._check_usable()
        _check_range(offset, length, self._vol.size)
        if self._chain_incomplete:
            self._refuse_rebuilding_read()
        if self._backing is not None:
            self._backing_need(self._index, offset, length)
        if self._index.top == 0:
            # Head-only chain: the head file is the volume (holes read as zeros).
            data = os.pread(self._head_fd, length, offset)
            if len(data) == length:
                return data
        return _chain_read(self._index, self._files, offset, length)

    def read_cached(self, offset: int, length: int) -> bytearray:
        """Like :meth:`read`, but only from the page cache: BlockingIOError if it would wait.

        An engine serving this replica in its own event loop reads so first
        (preadv2 with RWF_NOWAIT), and has what is not cached read elsewhere.
        """
        self._check_usable()
        _check_range(offset, length, self._vol.size)
        if self._chain_incomplete:
            self._refuse_rebuilding_read()
        if self._backing is not None:
            self._backing_need(self._index, offset, length, nowait=True)
        if self._index.top == 0:
            buf = _read_buffer(length)
            _pread_full(self._head_fd, memoryview(buf), offset, os.RWF_NOWAIT)
            return buf
        return _chain_read(self._index, self._files, offset, length, os.RWF_NOWAIT)

    def read_sources(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(fd, offset, length) of every layer file range a read of the volume range touches.

        Each fd is a duplicate the caller must close: it keeps the file open
        even if the chain closes or deletes it meanwhile (a purge), so another
        thread can read there to bring the data into the page cache.
        """
        self._check_usable()
        _check_range(offset, length, self._vol.size)
        if self._backing is not None:
            self._backing_need(self._index, offset, length)
        if self._index.top == 0:
            return [(os.dup(self._head_fd), offset, length)]
        end = offset + length
        out = []
        for s, e, lid in self._index.runs(offset // BLOCK, -(-end // BLOCK)):
            if lid != HOLE:
                a, b = max(s * BLOCK, offset), min(e * BLOCK, end)
                fd = self._files.get(self._index.layers[lid].file)
                out.append((os.dup(fd), a, b - a))
        return out

    def readinto(self, offset: int, buf: Any) -> int:
        """Fill the writable buffer ``buf`` from ``offset``; return its length."""
        self._check_usable()
        mv = memoryview(buf).cast("B")
        _check_range(offset, len(mv), self._vol.size)
        if self._chain_incomplete:
            self._refuse_rebuilding_read()
        if self._backing is not None:
            self._backing_need(self._index, offset, len(mv))
        if self._index.top == 0:
            _pread_full(self._head_fd, mv, offset)
        else:
            _chain_readinto(self._index, self._files, offset, mv, zeroed=False)
        return len(mv)

    def write(self, offset: int, data: Any, fua: bool = False) -> None:
        """Write ``data`` (any bytes-like) at ``offset``; durable on return when ``fua``."""
        self._check_usable()
        mv = memoryview(data).cast("B")
        n = len(mv)
        _check_range(offset, n, self._vol.size)
        if not n:
            return
        end = offset + n
        first, last = offset // BLOCK, (end - 1) // BLOCK
        bufs: list[Any] = [mv]
        woff = offset
        if self._chain_incomplete:
            # Older layers are still being copied: never read them to complete a block.
            self._check_rebuild_edges(offset, end)
        elif self._index.top:
            # A partly covered block that an older layer holds and the head does
            # not: complete it from the chain so the head holds all of it.
            head_gap = offset - first * BLOCK
            tail_gap = (last + 1) * BLOCK - end
            first_blk = None
            if head_gap and self._needs_rmw(first):
                first_blk = self._read_block(first)
                bufs.insert(0, first_blk[:head_gap])
                woff = first * BLOCK
            if tail_gap and self._needs_rmw(last):
                blk = first_blk if first == last and first_blk is not None \
                    else self._read_block(last)
                bufs.append(blk[BLOCK - tail_gap:])
        try:
            if n >= _PREALLOCATE_MIN and any(
                    v == HOLE for _, _, v in self._index.top_runs(first, last + 1)):
                # A large write into holes of the head: ext4's delayed allocation
                # costs up to ten times the CPU of writing into preallocated
                # (unwritten) extents.  Only the written span is allocated, and
                # unwritten extents read as holes, so a failed write shows nothing.
                meta.fs.preallocate(self._head_fd, first * BLOCK, (last + 1 - first) * BLOCK)
            meta.write_in_pieces(self._head_fd, bufs, woff, os.RWF_DSYNC if fua else 0)
        except BaseException:
            self._index.top_map.invalidate(first, last + 1)  # reload what really landed
            raise
        self._index.set_top(first, last + 1, True)

    def zero(self, offset: int, length: int, fua: bool = False, fast: bool = False) -> None:
        """Make the range read as zeros; ``fast`` raises ENOTSUP if zeros must be written."""
        self._check_usable()
        _check_range(offset, length, self._vol.size)
        if not length:
            return
        if self._chain_incomplete:
            self._zero_rebuilding(offset, length, fua, fast)
            return
        end = offset + length
        idx = self._index
        full_lo, full_hi = -(-offset // BLOCK), end // BLOCK
        partial: list[tuple[int, int, int]] = []  # (block, start, end) of partly covered blocks
        if full_lo > full_hi:
            partial.append((offset // BLOCK, offset, end))
        else:
            if offset % BLOCK:
                partial.append((offset // BLOCK, offset, full_lo * BLOCK))
            if end % BLOCK:
                partial.append((full_hi, full_hi * BLOCK, end))
        # Plan everything first, so fast=True can refuse before changing anything.
        in_head: list[tuple[int, int]] = []  # byte ranges of blocks the head holds
        rmw: list[tuple[int, int, int]] = []
        for b, a, z in partial:
            if idx.top_runs(b, b + 1)[0][2] != HOLE:
                in_head.append((a, z))
            elif idx.below_runs(b, b + 1)[0][2] != HOLE:
                rmw.append((b, a, z))
            # else nothing holds the block: it reads as zeros already.
        punch: list[tuple[int, int]] = []
        zero_fill: list[tuple[int, int]] = []
        if full_lo < full_hi:
            for s, e, v in idx.below_runs(full_lo, full_hi):
                if v != HOLE:
                    # An older layer holds data here: only real zeros hide it.  (Not
                    # FALLOC_FL_ZERO_RANGE: ext4's unwritten extents look like holes
                    # to SEEK_DATA, so the old data would show through after reopen.)
                    zero_fill.append((s, e))
                else:
                    punch.extend((ts, te) for ts, te, tv in idx.top_runs(s, e) if tv != HOLE)
        if fast and (rmw or zero_fill):
            raise OSError(errno.ENOTSUP, "zeroing this range needs real zeros over older data")
        fd = self._head_fd
        try:
            for a, z in in_head:
                _write_zeros(fd, a, z - a)
            for b, a, z in rmw:
                blk = self._read_block(b)
                blk[a - b * BLOCK:z - b * BLOCK] = bytes(z - a)
                meta.write_all(fd, [blk], b * BLOCK)
            for s, e in zero_fill:
                _write_zeros(fd, s * BLOCK, (e - s) * BLOCK)
            for s, e in punch:
                meta.fs.punch_hole(fd, s * BLOCK, (e - s) * BLOCK)
        except BaseException:
            idx.top_map.invalidate(offset // BLOCK, -(-end // BLOCK))
            raise
        for b, _, _ in rmw:
            idx.set_top(b, b + 1, True)
        for s, e in zero_fill:
            idx.set_top(s, e, True)
        for s, e in punch:
            idx.set_top(s, e, False)
        if fua:
            self._fdatasync(fd)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard the range: as :meth:`zero` where the head holds data, but whole blocks the
        head does not hold are left as they are.

        Writing zeros over what only an older layer holds would grow the head by every
        block trimmed (a filesystem's trim of its free space after a snapshot would fill
        the head with zeros): those blocks keep reading the older data instead, which NBD
        allows (a trimmed range is undefined until written).  It keeps the replicas
        alike: their heads hold the same blocks but where one punched and another wrote
        zeros (both read zeros), so a block one head lacks reads the same on all of them.
        """
        self._check_usable()
        _check_range(offset, length, self._vol.size)
        end = offset + length
        full_lo, full_hi = -(-offset // BLOCK), end // BLOCK
        if full_lo >= full_hi or self._index.top == 0:  # no whole block, or no older layer
            self.zero(offset, length, fua=fua)
            return
        if self._chain_incomplete:
            self._check_rebuild_edges(offset, end)  # refuse before changing anything
        todo = [(s * BLOCK, e * BLOCK) for s, e, v in self._index.top_runs(full_lo, full_hi)
                if v != HOLE]
        if offset < full_lo * BLOCK:
            todo.insert(0, (offset, full_lo * BLOCK))
        if end > full_hi * BLOCK:
            todo.append((full_hi * BLOCK, end))
        for a, z in todo:
            self.zero(a, z - a)
        if fua:
            self._fdatasync(self._head_fd)

    def flush(self) -> None:
        """Make every completed write durable (fdatasync the head)."""
        self._check_usable()
        self._fdatasync(self._head_fd)

    def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, allocated) runs covering the range; allocated = some layer holds data."""
        self._check_usable()
        _check_range(offset, length, self._vol.size)
        if self._chain_incomplete:
            self._refuse_rebuilding_read()
        if not length:
            return []
        return _chain_block_status(self._index, offset, length)

    # ------------------------------------------------------------ I/O while rebuilding

    def _refuse_rebuilding_read(self) -> None:
        """EIO: the head's chain includes a layer whose data is still being copied."""
        missing = [f for f in self._chain if f in self._incomplete]
        raise OSError(errno.EIO, f"replica is rebuilding: layer {missing[0]} is incomplete, "
                      "reads are served once it is verified")

    def _check_rebuild_edges(self, offset: int, end: int) -> None:
        """EINVAL unless every partly covered block of [offset, end) is held by the head.

        While an older layer of the chain is incomplete, completing a partial
        block from the chain would copy stale data into the head; the engine
        sends whole blocks to a rebuilding replica instead.
        """
        top = self._index.top_map
        for b in {offset // BLOCK, (end - 1) // BLOCK}:
            lo, hi = b * BLOCK, (b + 1) * BLOCK
            if (lo < offset or end < hi) and top.value(b) == HOLE:
                raise OSError(errno.EINVAL, "replica is rebuilding: a write that covers part "
                              f"of block {b} (bytes {max(lo, offset)}-{min(hi, end)}) needs the "
                              "whole block, as older layers are still being copied")

    def _zero_rebuilding(self, offset: int, length: int, fua: bool, fast: bool) -> None:
        """zero()/trim() while the chain is incomplete: real zeros, whole blocks only."""
        if fast:
            raise OSError(errno.ENOTSUP, "replica is rebuilding: zeroing needs real zeros")
        end = offset + length
        self._check_rebuild_edges(offset, end)
        # Real zeros everywhere: an incomplete older layer may hold data anywhere,
        # so a hole in the head could later show it through.
        first, last = offset // BLOCK, (end - 1) // BLOCK
        try:
            if length >= _PREALLOCATE_MIN:
                meta.fs.preallocate(self._head_fd, first * BLOCK, (last + 1 - first) * BLOCK)
            _write_zeros(self._head_fd, offset, length)
        except BaseException:
            self._index.top_map.invalidate(first, last + 1)
            raise
        self._index.set_top(first, last + 1, True)
        if fua:
            self._fdatasync(self._head_fd)

    def _needs_rmw(self, b: int) -> bool:
        """Whether block ``b`` is held by an older layer and not by the head."""
        idx = self._index
        return idx.top_runs(b, b + 1)[0][2] == HOLE and idx.below_runs(b, b + 1)[0][2] != HOLE

    def _read_block(self, b: int) -> bytearray:
        """Block ``b`` as the chain shows it."""
        if self._backing is not None:
            self._backing_need(self._index, b * BLOCK, BLOCK)
        blk = bytearray(BLOCK)
        _chain_readinto(self._index, self._files, b * BLOCK, memoryview(blk), zeroed=True)
        return blk

    def _fdatasync(self, fd: int) -> None:
        """fdatasync; a failure may have dropped dirty pages, so it fails the replica."""
        try:
            meta.fs.fdatasync(fd)
        except BaseException as e:
            self._fail(e)
            raise

    # ------------------------------------------------------------ structure

    def snapshot(self, name: str, labels: Mapping[str, str] | None = None) -> LayerInfo:
        """Turn the head into snapshot ``name`` and stack a new empty head on it."""
        self._check_usable()
        meta.validate_snapshot_name(name)
        labels = _check_labels(labels)
        if self._snapshot_meta(name) is not None:
            raise SnapshotExistsError(f"snapshot {name!r} already exists in {self._dir}")
        if len(self._chain) >= MAX_LAYERS:
            raise InvalidRequestError(f"the chain already holds {MAX_LAYERS} layers")
        vol = self._vol
        old_head = vol.head
        snap = meta.snapshot_file(name, taken=self._metas.keys())
        new_head = meta.head_file(vol.next_head)
        now = meta.now_iso()
        snap_meta = LayerMeta(file=snap, name=name, parent=self._metas[old_head].parent,
                              created=now, size=vol.size, labels=labels)
        head_meta = LayerMeta(file=new_head, name=None, parent=snap, created=now, size=vol.size)
        new_vol = replace(vol, head=new_head, next_head=vol.next_head + 1,
                          layers=(*(f for f in vol.layers if f != old_head), snap, new_head))
        # The snapshot must hold every write acknowledged before it.
        self._fdatasync(self._head_fd)
        new_fd = self._commit_new_head(new_vol, head_meta, snapshot=snap_meta)
        # Committed: the old head's inode is now the snapshot.
        with self._meta_lock:
            del self._metas[old_head]
            self._metas[snap] = snap_meta
            self._metas[new_head] = head_meta
            self._live[snap] = next(self._incarnations)
            self._versions[snap] = self._versions.pop(old_head, 0)
            self._layer_inc.pop(old_head, None)
            self._layer_inc[snap] = next(self._incarnations)
            self._layer_inc[new_head] = next(self._incarnations)
        self._switch_head(old_head, new_head, new_fd)
        self._index.layers[-1].file = snap  # type: ignore[attr-defined]
        self._index.push(_LayerSource(self._files, new_head))
        self._chain[-1:] = [snap, new_head]
        self._refresh_chain_state()
        self._gen += 1
        self._remove_quietly(old_head, meta_file(old_head))
        return self._info(snap)

    def revert(self, name: str) -> LayerInfo:
        """Start a new empty head on snapshot ``name``, dropping the current head's data."""
        self._check_usable()
        self._refuse_if_rebuilding("revert")
        target = self._require_snapshot(name)
        vol = self._vol
        old_head = vol.head
        new_head = meta.head_file(vol.next_head)
        head_meta = LayerMeta(file=new_head, name=None, parent=target.file,
                              created=meta.now_iso(), size=vol.size)
        new_vol = replace(vol, head=new_head, next_head=vol.next_head + 1,
                          layers=(*(f for f in vol.layers if f != old_head), new_head))
        new_fd = self._commit_new_head(new_vol, head_meta)
        with self._meta_lock:
            del self._metas[old_head]
            self._metas[new_head] = head_meta
            self._versions.pop(old_head, None)
            self._layer_inc.pop(old_head, None)
            self._layer_inc[new_head] = next(self._incarnations)
        self._switch_head(old_head, new_head, new_fd)
        self._index = self._new_index(top_empty=True)
        self._gen += 1
        self._remove_quietly(old_head, meta_file(old_head))
        return self._info(new_head)

    def expand(self, new_size: int) -> None:
        """Grow the volume to ``new_size`` bytes (a multiple of 4096); never shrinks."""
        self._check_usable()
        self._refuse_if_rebuilding("expand")
        old = self._vol.size
        if not isinstance(new_size, int) or new_size % BLOCK:
            raise InvalidRequestError(f"size must be a multiple of {BLOCK}, got {new_size!r}")
        if new_size < old:
            raise InvalidRequestError(f"cannot shrink the volume from {old} to {new_size}")
        if new_size == old:
            return
        new_vol = replace(self._vol, size=new_size)
        try:
            meta.fs.ftruncate(self._head_fd, new_size)
            meta.fs.fsync(self._head_fd)
            self._commit(new_vol)
        except BaseException:
            if self._vol is not new_vol and self._failed is None:
                # A head longer than the volume would make a later snapshot's file
                # disagree with its size: put it back, or give up on the replica.
                try:
                    meta.fs.ftruncate(self._head_fd, old)
                except BaseException as e:
                    self._fail(e)
            raise
        self._index.resize(new_size // BLOCK)
        self._gen += 1

    def delete_snapshot(self, name: str) -> None:
        """Mark snapshot ``name`` removed (atomically); :meth:`purge_steps` reclaims it."""
        self._check_usable()
        with self._meta_lock:
            m = self._require_snapshot(name)
            self._refuse_backing(m.file, "delete")
            new = replace(m, removed=True)
            self._install_json(meta_file(m.file), new.to_json())
            self._metas[m.file] = new
            del self._live[m.file]
        self._gen += 1

    def purge_steps(self) -> Iterator[None]:
        """Purge removed snapshots in bounded synchronous steps, yielding between them.

        A removed snapshot S with no children is dropped; with one snapshot child
        C, S is folded into C; with the head as only child, S is pruned where the
        head holds data (S stays until a snapshot makes it foldable); a branch
        point stays.  Any other structural change between steps restarts the plan.
        """
        self._check_usable()
        if self._purging:
            raise RuntimeError("a purge is already running on this replica")
        self._purging = True
        try:
            pruned: set[tuple[str, str]] = set()
            while True:
                self._check_usable()
                plan = self._plan_purge(pruned)
                if plan is None:
                    return
                kind, s, c = plan
                if kind == "remove":
                    self._remove_layer(s)
                    yield
                elif kind == "fold":
                    yield from self._fold(s, c)
                else:
                    yield from self._prune(s, c)
                    pruned.add((s, c))
        finally:
            self._purging = False

    def purge(self) -> None:
        """Run :meth:`purge_steps` to the end without interleaving."""
        for _ in self.purge_steps():
            pass

    def layers(self) -> list[LayerInfo]:
        """Every layer of the tree (removed ones included), in volume.meta order."""
        self._check_usable()
        children = self._children()
        return [self._info(f, children) for f in self._vol.layers]

    def view(self, name: str) -> View:
        """Read-only access to snapshot ``name`` as a volume."""
        self._check_usable()
        m = self._require_snapshot(name)
        return View(self, m.file, self._live[m.file])

    def checksum(self, name: str) -> str:
        """sha256 hex of snapshot ``name``'s own data runs, cached in its meta.

        Safe to call from a worker thread while the event loop keeps using the
        replica: it reads through its own fd and caches only if nothing changed.
        """
        with self._meta_lock:
            self._check_usable()
            file = self._require_snapshot(name).file
        return self.layer_checksum(file)

    def layer_checksum(self, file: str) -> str:
        """sha256 hex of snapshot layer ``file``'s own data runs (removed ones too), cached.

        Thread-safe like :meth:`checksum`.  An incomplete layer has no checksum
        yet (RebuildingError); the head has none (ValueError): it keeps changing.
        """
        with self._meta_lock:
            self._check_usable()
            m = self._layer_meta(file)
            if file == self._vol.head:
                raise InvalidRequestError(
                    f"{file} is the head: only snapshot layers have checksums")
            if m.incomplete:
                raise RebuildingError(f"layer {file} is incomplete: its rebuild has not been "
                                      "verified yet")
            self._refuse_backing(file, "checksum")
            if m.checksum is not None:
                return m.checksum
            version, inc = self._versions[file], self._layer_inc[file]
            fd = os.open(self._dir / file, _O_RO)
        try:
            digest = _hash_layer(fd)
        finally:
            os.close(fd)
        with self._meta_lock:
            cur = self._metas.get(file)
            if (not self._closed and self._failed is None and cur is not None
                    and cur.checksum is None and not cur.incomplete
                    and self._layer_inc.get(file) == inc
                    and self._versions[file] == version):
                new = replace(cur, checksum=digest)
                self._install_json(meta_file(file), new.to_json())
                self._metas[file] = new
        return digest

    # ------------------------------------------------------------ engine state

    @property
    def engine_state(self) -> dict[str, Any]:
        """The engine's opaque state stored with this replica ({} until first set); a copy."""
        return json.loads(json.dumps(self._engine_state))

    def set_engine_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """Store the engine's state (a JSON object of at most 64 KiB) atomically and durably.

        Its ``generation`` only grows: a lower one than stored is refused
        (StaleGenerationError), so a late or reordered update never steps back.
        """
        self._check_usable()
        if not isinstance(state, Mapping):
            raise InvalidRequestError(
                f"the engine state must be a JSON object, not {type(state).__name__}")
        try:
            text = json.dumps(dict(state), separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"the engine state is not plain JSON: {e}") from None
        if len(text.encode()) > meta.ENGINE_STATE_MAX:
            raise InvalidRequestError(
                f"the engine state is {len(text.encode())} bytes as JSON; at most "
                f"{meta.ENGINE_STATE_MAX} are stored")
        obj = json.loads(text)
        new, old = _generation(obj), _generation(self._engine_state)
        if new is None and "generation" in obj:
            raise InvalidRequestError(f"generation must be a non-negative integer, not "
                                      f"{obj['generation']!r}")
        if new is not None and old is not None and new < old:
            raise StaleGenerationError(
                f"generation {new} is older than the stored generation {old}: refused "
                "(generations only grow)")
        self._write_engine_meta(obj, self._owner_epoch)
        self._engine_state = obj
        return self.engine_state

    @property
    def epoch(self) -> int:
        """The highest engine epoch this replica has seen (0: none)."""
        return self._owner_epoch

    def set_epoch(self, epoch: int) -> None:
        """Store a higher engine epoch durably (ValueError if it is not higher)."""
        self._check_usable()
        if not isinstance(epoch, int) or epoch <= self._owner_epoch:
            raise ValueError(f"epoch {epoch!r} is not above the current epoch "
                             f"{self._owner_epoch}")
        self._write_engine_meta(self._engine_state, epoch)
        self._owner_epoch = epoch

    def _write_engine_meta(self, state: dict[str, Any], epoch: int) -> None:
        self._install_json(ENGINE_META, {"format": meta.FORMAT_VERSION, "epoch": epoch,
                                         "engine_state": state})

    # ------------------------------------------------------------ rebuild

    @property
    def incomplete(self) -> list[str]:
        """Files of the layers a rebuild is still copying (in volume.meta order)."""
        return [f for f in self._vol.layers if f in self._incomplete]

    def prepare_rebuild(self, layers: Sequence[Mapping[str, Any]], head_parent: str | None,
                        size: int, reuse_head_as: str | None = None) -> LayerInfo:
        """Make this replica's tree a copy of a source's, every layer incomplete; new empty head.

        ``layers`` are the source's layers without its head (dicts as
        ``GET /v1/layers?removed=true`` lists them, any order).  Afterwards this
        replica has exactly those snapshot layers (same files, names, parents,
        times, labels and removal flags), each flagged incomplete, under a new
        empty head whose parent is ``head_parent``.  A layer file this replica
        already has keeps its data (an older copy: only differences need copying);
        with ``reuse_head_as`` the current head's data becomes that layer when no
        layer has its name yet.  Every other layer, and the old head, is dropped.
        The volume grows to ``size`` (never shrinks).  No data is copied: one
        volume.meta commit (with the new layer metadata staged in it) switches.
        """
        self._check_usable()
        if self._purging:
            raise RebuildingError("cannot prepare a rebuild while a purge is running")
        vol = self._vol
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % BLOCK:
            raise InvalidRequestError(f"size must be a positive multiple of {BLOCK}, got {size!r}")
        if size < vol.size:
            raise InvalidRequestError(
                f"cannot shrink the volume from {vol.size} to {size} for a rebuild")
        new_metas = _parse_source_layers(layers)
        for what, f in (("head_parent", head_parent), ("reuse_head_as", reuse_head_as)):
            if f is not None and f not in new_metas:
                raise InvalidRequestError(f"{what} {f!r} is not among the given layers")
        new_head = meta.head_file(vol.next_head)
        head_meta = LayerMeta(file=new_head, name=None, parent=head_parent,
                              created=meta.now_iso(), size=size)
        all_metas = {**new_metas, new_head: head_meta}
        # Layers this replica has under the same file name keep their data.
        keep = {f for f in new_metas if f in vol.layers and f != vol.head}
        reuse = reuse_head_as if reuse_head_as is not None and reuse_head_as not in keep else None
        # A file shared with another replica (a clone's hard link) keeps its data only if
        # it needs no resize: a resize would change it for the others too.
        keep = {f for f in keep if os.stat(self._dir / f).st_nlink == 1
                or os.stat(self._dir / f).st_size == new_metas[f].size}
        current = {f: os.stat(self._dir / f).st_size for f in keep}
        if reuse is not None:
            current[reuse] = os.fstat(self._head_fd).st_size
        # A kept file of another size is resized after the commit (open redoes it).
        resize = [f for f, n in current.items() if n != new_metas[f].size]
        create = [f for f in new_metas if f not in current]
        sizes = {f: m.size for f, m in all_metas.items()}
        new_vol = VolumeMeta(size=size, head=new_head, layers=(*_topological(new_metas), new_head),
                             next_head=vol.next_head + 1, staged=all_metas)
        try:
            meta.check_tree(new_vol, all_metas, sizes, self._dir)
        except ReplicaError as e:
            raise InvalidRequestError(f"the layers do not form a valid tree: {e}") from None
        depth, cur = 0, head_meta.parent
        while cur is not None:
            depth += 1
            cur = all_metas[cur].parent
        if depth + 1 > MAX_LAYERS:
            raise InvalidRequestError(f"the head's chain would hold {depth + 1} layers; at most "
                                      f"{MAX_LAYERS} are supported")
        new_fd = -1
        made: list[str] = []
        try:
            self._clear_stale(*create, *([reuse] if reuse else []), new_head)
            fds = []
            try:
                for f in create:
                    made.append(f)
                    fds.append(meta.fs.open_write(self._dir / f,
                                                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
                    meta.fs.ftruncate(fds[-1], new_metas[f].size)
                for fd in fds:  # after the first, these find nothing left to commit
                    meta.fs.fsync(fd)
            finally:
                for fd in fds:
                    os.close(fd)
            if reuse is not None:
                # A hard link: until the commit, an unlisted name that open removes.
                meta.fs.link(self._dir / vol.head, self._dir / reuse)
                made.append(reuse)
            made.append(new_head)
            new_fd = self._create_file(new_head, size)
            self._commit(new_vol)
        except BaseException:
            if self._vol is not new_vol and self._failed is None:
                if new_fd >= 0:
                    os.close(new_fd)
                self._remove_quietly(*reversed(made))
            raise
        # Committed.  The layers' own .meta files still describe the old tree until
        # installed; a crash before volume.meta drops "staged" makes open redo this.
        final = replace(new_vol, staged=None)
        try:
            for f in resize:
                fd = meta.fs.open_write(self._dir / f, os.O_WRONLY)
                try:
                    meta.fs.ftruncate(fd, new_metas[f].size)
                    meta.fs.fsync(fd)
                finally:
                    os.close(fd)
            _install_metas(self._dir, self._dirfd, all_metas)
            self._commit(final)
        except BaseException as e:
            self._fail(e)  # reopening finishes the job
            os.close(new_fd)
            raise
        old_layers = vol.layers
        if self._backing is not None:
            # The tree is the source's now: its layers come from there, complete.
            self._drop_backing()
        with self._meta_lock:
            self._metas = dict(all_metas)
            for f in {*old_layers, *all_metas}:
                self._versions[f] += 1
            self._layer_inc = {f: next(self._incarnations) for f in final.layers}
            self._live = {f: next(self._incarnations) for f, m in all_metas.items()
                          if m.name is not None and not m.removed}
            self._incomplete = set(new_metas)
        self._switch_head(vol.head, new_head, new_fd)
        for f in {*old_layers, *new_metas}:
            self._files.drop(f)
        self._index = self._new_index(top_empty=True)
        self._epoch += 1
        self._gen += 1
        dropped = [f for f in old_layers if f not in all_metas]
        self._remove_quietly(*(n for f in dropped for n in (f, meta_file(f))))
        log.info("%s: prepared a rebuild: %d layers (%d kept, %s), new head %s", self._dir,
                 len(new_metas), len(keep), f"head reused as {reuse}" if reuse else "no reuse",
                 new_head)
        return self._info(new_head)

    def open_layer(self, file: str) -> LayerHandle:
        """Direct access to one layer file's own data (what a rebuild copies), by file name.

        Writable while the layer is incomplete; the caller closes the handle.
        """
        self._check_usable()
        self._layer_meta(file)
        self._refuse_backing(file, "copy")
        writable = file in self._incomplete
        if writable:
            self._make_private(file)  # a rebuild writes into it: never into a shared file
        path = self._dir / file
        fd = meta.fs.open_write(path, os.O_RDWR) if writable else os.open(path, _O_RO)
        return LayerHandle(self, file, self._layer_inc[file], fd, writable)

    def layer_digests(self, file: str, range_size: int = 1 << 20) -> list[str]:
        """blake2b-128 hex of each ``range_size`` range of layer ``file``'s own content.

        Each digest covers the data runs inside its range (offsets relative to
        the range, lengths) and their data, so two layers have equal digests for
        a range iff they hold the same blocks with the same data there.  Reads
        through its own descriptor: safe in a worker thread.
        """
        if (not isinstance(range_size, int) or range_size < BLOCK
                or range_size > MAX_DIGEST_RANGE or range_size & (range_size - 1)):
            raise InvalidRequestError(f"range_size must be a power of two from {BLOCK} to "
                                      f"{MAX_DIGEST_RANGE}, got {range_size!r}")
        with self._meta_lock:
            self._check_usable()
            m = self._layer_meta(file)
            self._refuse_backing(file, "digest")
            size = self._vol.size if file == self._vol.head else m.size
            if -(-size // range_size) > MAX_DIGESTS:
                raise InvalidRequestError(
                    f"{size} bytes in ranges of {range_size} would be more than "
                    f"{MAX_DIGESTS} digests: use a larger range_size")
            fd = os.open(self._dir / file, _O_RO)
        try:
            return _range_digests(fd, size, range_size)
        finally:
            os.close(fd)

    def range_digest(self, file: str, offset: int, length: int) -> str:
        """The digest :meth:`layer_digests` gives range [offset, offset+length) of snapshot
        layer ``file`` (a scrub's check before and after a repair).  Thread-safe."""
        with self._meta_lock:
            fd = self._scrub_fd(file, offset, length)
        try:
            return _range_digest(fd, offset, offset + length)
        finally:
            os.close(fd)

    def rehash_layer(self, file: str) -> tuple[str | None, str]:
        """(the checksum recorded for snapshot layer ``file``, the sha256 of its data now):
        which copy is right when two replicas disagree.  Thread-safe."""
        with self._meta_lock:
            fd = self._scrub_fd(file, 0, 0)
            recorded = self._metas[file].checksum
        try:
            return recorded, _hash_layer(fd)
        finally:
            os.close(fd)

    def repair_blocks(self, file: str, blocks: Sequence[tuple[int, Any]]) -> None:
        """Set blocks of complete snapshot layer ``file``: each (offset, BLOCK bytes), or
        (offset, None) for a hole: a scrub's repair of bit-rot from a good replica.  A
        shared (hard-linked) layer is copied first, so no other volume's file changes.
        Only page-cache writes here; :meth:`sync_layer` then makes them durable."""
        os.close(self._scrub_fd(file, 0, 0))
        size = self._metas[file].size
        for off, data in blocks:
            if (not isinstance(off, int) or off % BLOCK or off < 0 or off + BLOCK > size
                    or (data is not None and len(data) != BLOCK)):
                raise InvalidRequestError(f"block {off!r} of layer {file} is not a whole "
                                          f"{BLOCK}-byte block inside it")
        if not blocks:
            return
        self._make_private(file)
        self._changing(file)  # the recorded checksum goes: the scrub records it again
        fd = os.open(self._dir / file, os.O_RDWR | os.O_CLOEXEC)
        try:
            for off, data in blocks:
                if data is None:
                    meta.fs.punch_hole(fd, off, BLOCK)
                else:
                    meta.write_all(fd, [memoryview(data).cast("B")], off)
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            os.close(fd)
        # After the writes: a read meanwhile cannot have cached the old allocation.
        self._layer_changed(file, min(o for o, _ in blocks) // BLOCK,
                            max(o for o, _ in blocks) // BLOCK + 1)

    def sync_layer(self, file: str) -> None:
        """fdatasync snapshot layer ``file`` (after :meth:`repair_blocks`).  Thread-safe."""
        with self._meta_lock:
            fd = self._scrub_fd(file, 0, 0)
        try:
            meta.fs.fdatasync(fd)
        finally:
            os.close(fd)

    def _scrub_fd(self, file: str, offset: int, length: int) -> int:
        """A read-only descriptor of complete snapshot layer ``file`` checked for a scrub."""
        self._check_usable()
        m = self._layer_meta(file)
        if file == self._vol.head:
            raise InvalidRequestError(f"{file} is the head: a scrub covers snapshot layers")
        if m.incomplete:
            raise RebuildingError(f"layer {file} is being rebuilt")
        self._refuse_backing(file, "scrub")
        if offset < 0 or length < 0 or offset + length > m.size:
            raise InvalidRequestError(f"range {offset}+{length} is outside layer {file} "
                                      f"(size {m.size})")
        return os.open(self._dir / file, _O_RO)

    def verify_layer(self, file: str) -> VerifiedLayer:
        """Make layer ``file``'s data durable and hash it, for :meth:`complete_layer`.

        The slow half of completing a rebuilt layer: safe in a worker thread.
        """
        with self._meta_lock:
            self._check_usable()
            m = self._layer_meta(file)
            if file == self._vol.head:
                raise InvalidRequestError(f"{file} is the head: only snapshot layers are rebuilt")
            inc, version = self._layer_inc[file], self._versions[file]
            if not m.incomplete and m.checksum is not None:
                return VerifiedLayer(file, inc, version, m.checksum)
            fd = os.open(self._dir / file, _O_RO)
        try:
            # What was copied into the layer must be on disk before it counts as complete.
            meta.fs.fdatasync(fd)
            digest = _hash_layer(fd)
        finally:
            os.close(fd)
        return VerifiedLayer(file, inc, version, digest)

    def complete_layer(self, file: str, checksum: str,
                       verified: VerifiedLayer | None = None) -> str:
        """Clear layer ``file``'s incomplete flag if its checksum equals ``checksum``.

        ``verified`` is :meth:`verify_layer`'s result (computed now when None).
        A different checksum raises ChecksumMismatchError and the flag stays;
        so does a layer changed since it was hashed (RebuildingError).
        """
        self._check_usable()
        if not isinstance(checksum, str) or not checksum:
            raise InvalidRequestError("checksum must be the source layer's sha256 hex string")
        if verified is None:
            verified = self.verify_layer(file)
        with self._meta_lock:
            self._check_usable()
            m = self._layer_meta(file)
            if self._layer_inc.get(file) != verified.inc:
                raise RebuildingError(f"layer {file} was replaced while it was being verified")
            if self._versions[file] != verified.version:
                raise RebuildingError(f"layer {file} changed while it was being verified; "
                                      "verify it again")
            if verified.checksum != checksum.lower():
                raise ChecksumMismatchError(file, checksum, verified.checksum)
            if not m.incomplete:
                return verified.checksum
            new = replace(m, incomplete=False, checksum=verified.checksum)
            self._install_json(meta_file(file), new.to_json())
            self._metas[file] = new
            self._incomplete.discard(file)
        if file in self._chain:
            # Nothing read the older layers while incomplete; start from the files anyway.
            self._index.invalidate_below(0, self._index.nblocks)
        self._refresh_chain_state()
        self._epoch += 1
        log.info("%s: layer %s verified and complete (%d still incomplete)", self._dir, file,
                 len(self._incomplete))
        return verified.checksum

    # ------------------------------------------------------------ instant restore

    @property
    def backing(self) -> bk.Backing | None:
        """The bottom layer still being fetched from a backup (None: there is none)."""
        return self._backing

    def install_backing(self, name: str, backup: str, target: Mapping[str, Any], size: int,
                        blocks: Mapping[int, str], rate: int = 0) -> LayerInfo:
        """Put backup ``backup`` under the empty head as snapshot ``name`` (an instant
        restore): its blocks are fetched as they are read (see :mod:`drove.replica.backing`).

        Only a fresh replica qualifies: one layer, the head, holding nothing.
        """
        self._check_usable()
        meta.validate_snapshot_name(name)
        vol = self._vol
        head = vol.head
        if vol.layers != (head,) or self._metas[head].parent is not None or self._backing:
            raise InvalidRequestError("only a fresh replica (no snapshots) can be restored into")
        if seek_data(self._head_fd, 0) is not None:
            raise InvalidRequestError("the replica holds data already: an instant restore "
                                      "needs an empty one")
        if size != vol.size:
            raise InvalidRequestError(f"the backup is {size} bytes, the replica {vol.size}")
        snap = meta.snapshot_file(name, taken=self._metas.keys())
        b_meta = LayerMeta(file=snap, name=name, parent=None, created=meta.now_iso(),
                           size=vol.size, labels={"drove.backing": backup})
        head_meta = replace(self._metas[head], parent=snap)
        cfg = bk.BackingConfig(layer=snap, backup=backup, target=dict(target), size=size,
                               blocks=dict(blocks), rate=rate)
        new_vol = replace(vol, layers=(snap, head), staged={head: head_meta})
        try:
            self._clear_stale(snap)
            # Until the commit both are leftovers that open removes.
            bk.write_config(self._dir, self._dirfd, cfg)
            os.close(self._create_file(snap, vol.size))
            meta.write_json_atomic(self._dir, self._dirfd, meta_file(snap), b_meta.to_json())
            self._commit(new_vol)
        except BaseException:
            if self._vol is not new_vol and self._failed is None:
                self._remove_quietly(snap, meta_file(snap))
                bk.remove_files(self._dir, self._dirfd)
            raise
        try:
            _install_metas(self._dir, self._dirfd, {head: head_meta})
            self._commit(replace(new_vol, staged=None))
        except BaseException as e:
            self._fail(e)  # reopening finishes the job
            raise
        with self._meta_lock:
            self._metas[snap] = b_meta
            self._metas[head] = head_meta
            self._live[snap] = next(self._incarnations)
            self._layer_inc[snap] = next(self._incarnations)
        self._backing = bk.Backing.load(self._dir, self._dirfd, [snap])
        self._index = self._new_index(top_empty=True)
        self._gen += 1
        return self._info(snap)

    def adopt_backing(self, file: str, backup: str, target: Mapping[str, Any], size: int,
                      blocks: Mapping[int, str], rate: int = 0) -> LayerInfo:
        """A rebuild's alternative to copying layer ``file`` from the source replica while
        the source still fills it from ``backup``: fetch it from the backup here too.

        ``file`` must be this replica's incomplete bottom layer (a rebuild prepared it);
        it becomes complete, backed by the backup like the source's.
        """
        self._check_usable()
        m = self._layer_meta(file)
        if file not in self._incomplete or m.parent is not None or self._backing is not None:
            raise InvalidRequestError(f"layer {file} is not an incomplete bottom layer of a "
                                      "rebuild: it cannot adopt a backup")
        if size != m.size:
            raise InvalidRequestError(f"the backup is {size} bytes, layer {file} {m.size}")
        cfg = bk.BackingConfig(layer=file, backup=backup, target=dict(target), size=size,
                               blocks=dict(blocks), rate=rate)
        # While the layer is still incomplete this file is ignored (and removed) at open.
        bk.write_config(self._dir, self._dirfd, cfg)
        with self._meta_lock:
            new = replace(m, incomplete=False, checksum=None)
            self._install_json(meta_file(file), new.to_json())
            self._metas[file] = new
            self._incomplete.discard(file)
            self._versions[file] += 1
        self._backing = bk.Backing.load(self._dir, self._dirfd, [file])
        if file in self._chain:
            # The head keeps what it took meanwhile; the layers under it are read anew.
            self._index.rebase([self._source(f) for f in self._chain[:-1]])
        self._refresh_chain_state()
        self._epoch += 1
        self._gen += 1
        return self._info(file)

    def finish_backing(self) -> None:
        """Every block is filled: the backing layer becomes an ordinary snapshot."""
        b = self._backing
        if b is None:
            return
        if not b.done:
            raise InvalidRequestError(f"backing layer {b.layer} still lacks blocks")
        b.persist()
        meta.fs.fdatasync(self._files.get(b.layer))
        self._drop_backing()

    def backing_missing(self, offset: int, length: int) -> list[int]:
        """The backup's 2 MiB blocks a read of the volume range needs and lacks (in order)."""
        b = self._backing
        if b is None or not b.active:
            return []
        _check_range(offset, length, self._vol.size)
        return self._backing_blocks(self._index, offset, length)

    def _backing_blocks(self, index: ReadIndex, offset: int, length: int) -> list[int]:
        """Unfilled backup blocks under the runs of ``index`` the backing layer serves."""
        b = self._backing
        if b is None or not length or index.layers[0].file != b.layer:  # type: ignore[attr-defined]
            return []
        runs = [(s, e) for s, e, lid in index.runs(offset // BLOCK, -(-(offset + length) // BLOCK))
                if lid == 0]
        return b.missing(runs) if runs else []

    def _backing_need(self, index: ReadIndex, offset: int, length: int,
                      nowait: bool = False) -> None:
        """Fetch what a read through ``index`` needs from the backup, here and now.

        ``nowait``: BlockingIOError instead (a caller that reads only what is at hand).
        """
        b = self._backing
        if b is None or not b.active:
            return
        missing = self._backing_blocks(index, offset, length)
        if missing:
            if nowait:
                raise BlockingIOError(errno.EAGAIN, "the data is still in the backup")
            b.fill_now(missing)

    def _refuse_backing(self, file: str, what: str) -> None:
        """RebuildingError if ``file`` is the backing layer, still being filled."""
        b = self._backing
        if b is not None and b.active and b.layer == file:
            raise RebuildingError(f"cannot {what} layer {file}: it is still being filled from "
                                  f"backup {b.cfg.backup}")

    def _drop_backing(self) -> None:
        """Forget the backing files (the layer's data is complete, or replaced)."""
        b, self._backing = self._backing, None
        if b is None:
            return
        bk.remove_files(self._dir, self._dirfd)
        b.close()
        with self._meta_lock:
            self._versions[b.layer] += 1
        if b.layer in self._chain:
            self._index.invalidate_below(0, self._index.nblocks)
        self._epoch += 1
        self._gen += 1

    def _source(self, file: str) -> _BackedSource | _LayerSource:
        """What the read index reads of layer ``file``."""
        b = self._backing
        if b is not None and b.layer == file:
            return _BackedSource(self._files, file, b)
        return _LayerSource(self._files, file)

    def _layer_meta(self, file: str) -> LayerMeta:
        """The metadata of layer ``file`` (any layer of the tree), or LayerNotFoundError."""
        m = self._metas.get(file) if isinstance(file, str) else None
        if m is None:
            raise LayerNotFoundError(f"no layer file {file!r} in {self._dir}")
        return m

    def _layer_changed(self, file: str, start: int, end: int) -> None:
        """Layer ``file``'s own data changed over blocks [start, end) (a rebuild wrote it)."""
        self._versions[file] += 1
        self._epoch += 1
        if file in self._chain:
            self._index.invalidate_below(start, end)

    # ------------------------------------------------------------ purge internals

    def _plan_purge(self, pruned: set[tuple[str, str]]) -> tuple[str, str, str] | None:
        """The next purge action (kind, removed layer, its child) or None when done."""
        children = self._children()
        for f in self._vol.layers:
            if (not self._metas[f].removed or f in self._incomplete
                    or self._metas[f].base is not None):
                continue  # an incomplete layer waits for its rebuild; a base one is not ours
            kids = children.get(f, [])
            if not kids:
                return "remove", f, ""
            if len(kids) == 1:
                c = kids[0]
                if c in self._incomplete:
                    continue
                if c != self._vol.head:
                    return "fold", f, c
                if (f, c) not in pruned:
                    return "prune", f, c
        return None

    def _remove_layer(self, s: str) -> None:
        """Drop removed layer ``s`` that has no children."""
        self._commit(replace(self._vol, layers=tuple(f for f in self._vol.layers if f != s)))
        with self._meta_lock:
            del self._metas[s]
            self._versions.pop(s, None)
            self._layer_inc.pop(s, None)
        self._files.drop(s)
        self._gen += 1
        self._remove_quietly(s, meta_file(s))

    def _fold(self, s: str, c: str) -> Iterator[None]:
        """Fold removed snapshot ``s`` into its only child ``c`` (a snapshot), in steps."""
        gen = self._gen
        sm = self._metas[s]
        # Invalidate c's cached checksum before its data changes, then make sure no other
        # replica shares c's file (a clone's hard link): in that order, so a clone made
        # concurrently sees either the checksum gone or the link count (drove.replica.clone).
        self._changing(c)
        self._make_private(c)
        src = os.open(self._dir / s, _O_RO)
        dst = meta.fs.open_write(self._dir / c, os.O_RDWR)
        try:
            for lo, hi in self._purge_windows(src, sm.size // BLOCK):
                # Copy s where c has a hole: c then shows exactly what it showed
                # through s before, and descendants of c cannot tell.
                todo = subtract(block_extents(src, lo, hi, BLOCK),
                                block_extents(dst, lo, hi, BLOCK))
                for a, b in todo:
                    _copy_range(src, dst, a * BLOCK, b * BLOCK)
                if todo:
                    meta.fs.fdatasync(dst)
                yield
                if self._gen != gen or self._closed or self._failed is not None:
                    return  # the tree changed: the caller plans again
        finally:
            os.close(src)
            os.close(dst)
        # c now holds all of s it lacked, durably: s can leave the chain.
        with self._meta_lock:
            new_c = replace(self._metas[c], parent=sm.parent, checksum=None)
            self._install_json(meta_file(c), new_c.to_json())
            self._metas[c] = new_c
        # A crash here leaves s listed, removed and childless: a valid tree.
        self._commit(replace(self._vol, layers=tuple(f for f in self._vol.layers if f != s)))
        with self._meta_lock:
            del self._metas[s]
            self._versions.pop(s, None)
            self._layer_inc.pop(s, None)
        self._files.drop(s)
        if s in self._chain:
            self._chain = self._chain_of(self._vol.head)
            self._index.rebase([self._source(f) for f in self._chain[:-1]])
            self._refresh_chain_state()
        self._gen += 1
        self._remove_quietly(s, meta_file(s))
        yield

    def _prune(self, s: str, head: str) -> Iterator[None]:
        """Punch removed snapshot ``s`` wherever its only child, the head, holds data."""
        gen = self._gen
        sm = self._metas[s]
        if os.stat(self._dir / s).st_nlink > 1:
            # Shared with a clone (a hard link): punching it would change what the clone
            # reads.  Pruning only saves space, so leave s whole; a fold reclaims it later.
            return
        self._changing(s)
        dst = meta.fs.open_write(self._dir / s, os.O_RDWR)
        try:
            for lo, hi in self._purge_windows(dst, sm.size // BLOCK):
                both = intersect(block_extents(dst, lo, hi, BLOCK),
                                 block_extents(self._head_fd, lo, hi, BLOCK))
                if both:
                    # The head's copy must be durable before s loses its own.
                    self._fdatasync(self._head_fd)
                    for a, b in both:
                        meta.fs.punch_hole(dst, a * BLOCK, (b - a) * BLOCK)
                    self._index.invalidate_below(lo, hi)
                yield
                if self._gen != gen or self._closed or self._failed is not None:
                    return
        finally:
            os.close(dst)

    def _purge_windows(self, fd: int, nblocks: int) -> Iterator[tuple[int, int]]:
        """Windows of at most PURGE_STEP_BYTES, each starting at the next data of ``fd``."""
        step = max(1, PURGE_STEP_BYTES // BLOCK)
        pos = 0
        while pos < nblocks:
            d = seek_data(fd, pos * BLOCK)
            if d is None or d // BLOCK >= nblocks:
                return
            pos = min(d // BLOCK + step, nblocks)
            yield d // BLOCK, pos

    def _changing(self, file: str) -> None:
        """About to change ``file``'s data: drop its cached checksum first."""
        with self._meta_lock:
            self._versions[file] += 1
            m = self._metas[file]
            if m.checksum is not None:
                new = replace(m, checksum=None)
                self._install_json(meta_file(file), new.to_json())
                self._metas[file] = new

    def _make_private(self, file: str) -> None:
        """Give layer ``file`` a file of its own if it is shared (hard-linked) with another
        replica: the format's rule is that a file with more than one link is never modified
        in place, so nothing done here changes what another volume reads."""
        st = os.stat(self._dir / file)
        if st.st_nlink <= 1:
            return
        if file in self._flattening:
            raise RebuildingError(f"layer {file} is being copied by a flatten; try again")
        self._swap_private(file, st.st_ino, self.copy_shared(file, st.st_ino))
        log.info("%s: layer %s was shared with another replica: copied it to write it", self._dir,
                 file)

    def flatten_plan(self) -> list[tuple[str, int]]:
        """The base layers (a linked clone's) still to flatten, in chain order, with the
        inode each names now: pass them to :meth:`copy_shared` and :meth:`flatten_layer`."""
        self._check_usable()
        self._refuse_if_rebuilding("flatten")
        return [(f, os.stat(self._dir / f).st_ino) for f in self._vol.layers
                if self._metas[f].base is not None]

    def copy_shared(self, file: str, ino: int) -> Path | None:
        """Copy layer ``file`` (inode ``ino``) to a temporary file, or None when it is not
        shared.  Thread-safe: a shared file is never written in place, so the copy is
        exact; the event loop must not make it private meanwhile (it refuses)."""
        path = self._dir / file
        tmp = self._dir / (file + meta.TMP_SUFFIX)  # an unlisted leftover if we crash
        src = os.open(path, _O_RO)
        self._flattening.add(file)
        try:
            st = os.fstat(src)
            if st.st_ino != ino:
                raise RebuildingError(f"layer {file} was replaced meanwhile; try again")
            if st.st_nlink <= 1:
                return None
            dst = meta.fs.open_write(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                meta.fs.ftruncate(dst, st.st_size)
                for a, b in block_extents(src, 0, -(-st.st_size // BLOCK), BLOCK):
                    _copy_range(src, dst, a * BLOCK, min(b * BLOCK, st.st_size))
                meta.fs.fsync(dst)
            finally:
                os.close(dst)
            return tmp
        finally:
            os.close(src)
            self._flattening.discard(file)

    def flatten_layer(self, file: str, ino: int, copy: Path | None) -> int:
        """Put :meth:`copy_shared`'s ``copy`` in place of base layer ``file`` (if it still
        names inode ``ino``) and make it a removed snapshot of this replica, which
        :meth:`purge` folds; the bytes of the copy."""
        self._check_usable()
        m = self._layer_meta(file)
        if m.base is None:
            return 0
        if m.incomplete or os.stat(self._dir / file).st_ino != ino:
            if copy is not None:
                self._remove_quietly(copy.name)
            raise RebuildingError(f"layer {file} changed while it was copied; try again")
        size = 0
        if copy is not None:
            size = os.stat(copy).st_blocks * 512
            self._swap_private(file, ino, copy)
        with self._meta_lock:
            new = replace(self._metas[file], base=None, removed=True)
            self._install_json(meta_file(file), new.to_json())
            self._metas[file] = new
            self._live.pop(file, None)
        self._gen += 1
        return size

    def _swap_private(self, file: str, ino: int, copy: Path | None) -> None:
        """Rename ``copy`` over layer ``file`` (inode ``ino``), durably."""
        if copy is None:
            return
        meta.fs.replace(copy, self._dir / file)
        try:
            meta.fs.fsync(self._dirfd)
        except BaseException as e:
            self._fail(e)
            raise
        self._files.drop(file)

    def flatten(self) -> list[str]:
        """Stop sharing: every base layer (a linked clone's) gets its own file and becomes a
        removed snapshot of this replica, which :meth:`purge` then folds.  The files
        flattened, in chain order.  Copies on the caller's thread; a replica process uses
        the three steps (:meth:`flatten_plan`) to copy in a worker thread."""
        done = []
        for f, ino in self.flatten_plan():
            self.flatten_layer(f, ino, self.copy_shared(f, ino))
            done.append(f)
        return done

    def shared(self) -> tuple[int, int]:
        """(bytes allocated in layer files shared with another replica, bytes in our own)."""
        self._check_usable()
        shared = owned = 0
        for f in self._vol.layers:
            st = os.fstat(self._head_fd) if f == self._vol.head else os.stat(self._dir / f)
            if st.st_nlink > 1:
                shared += st.st_blocks * 512
            else:
                owned += st.st_blocks * 512
        return shared, owned

    # ------------------------------------------------------------ internals

    def _check_usable(self) -> None:
        """Raise unless the replica is open and has not failed."""
        if self._closed:
            raise OSError(errno.ESHUTDOWN, f"replica {self._dir} is closed")
        if self._failed is not None:
            raise OSError(errno.EIO, f"replica {self._dir} failed earlier "
                          f"({self._failed!r}); reopen it")

    def _fail(self, exc: BaseException) -> None:
        """Refuse all further use: the disk state is no longer known for sure."""
        if self._failed is None:
            log.error("replica %s failed: %r", self._dir, exc)
            self._failed = exc

    def _commit(self, vol: VolumeMeta) -> None:
        """Atomically replace volume.meta with ``vol``: the commit point."""
        self._install_json(VOLUME_META, vol.to_json())
        self._vol = vol

    def _install_json(self, name: str, obj: Any) -> None:
        """Atomically replace a metadata file; a failure after the rename fails the replica."""
        tmp = meta.stage_json(self._dir, name, obj)
        meta.fs.replace(tmp, self._dir / name)
        try:
            meta.fs.fsync(self._dirfd)
        except BaseException as e:
            # The rename is visible but maybe not durable: nobody can say which
            # state a crash would leave, so stop serving.
            self._fail(e)
            raise

    def _create_head_file(self, file: str) -> int:
        """Create an empty, durable head file of the volume size; return its O_RDWR fd."""
        return self._create_file(file, self._vol.size)

    def _create_file(self, file: str, size: int) -> int:
        """Create an empty, durable file of ``size`` bytes; return its O_RDWR fd."""
        fd = meta.fs.open_write(self._dir / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            meta.fs.ftruncate(fd, size)
            meta.fs.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _commit_new_head(self, new_vol: VolumeMeta, head_meta: LayerMeta,
                         snapshot: LayerMeta | None = None) -> int:
        """Make an empty head (and link the old head as ``snapshot``), then commit ``new_vol``.

        Until the commit every file made here is an unlisted leftover: on
        failure it is removed now, or at the next open if the process dies.
        Returns the new head's descriptor.
        """
        layers = [snapshot, head_meta] if snapshot else [head_meta]
        new_fd = -1
        made: list[str] = []
        try:
            self._clear_stale(*(m.file for m in layers))
            if snapshot:
                # A hard link: the head's data becomes the snapshot's without a copy;
                # until the commit the link is an unlisted name, removed on open.
                meta.fs.link(self._dir / self._vol.head, self._dir / snapshot.file)
                made.append(snapshot.file)
            made.append(head_meta.file)
            new_fd = self._create_head_file(head_meta.file)
            for m in layers:
                made.append(meta_file(m.file))
                meta.write_json_atomic(self._dir, self._dirfd, meta_file(m.file), m.to_json())
            self._commit(new_vol)
        except BaseException:
            if self._vol is not new_vol:  # not committed: take back what we made
                if new_fd >= 0:
                    os.close(new_fd)
                self._remove_quietly(*reversed(made))
            raise
        return new_fd

    def _clear_stale(self, *files: str) -> None:
        """Remove unlisted leftovers of an earlier failed attempt that used these names."""
        for f in files:
            for n in (f, meta_file(f)):
                if n not in self._vol.layers and os.path.lexists(self._dir / n):
                    meta.fs.unlink(self._dir / n)

    def _remove_quietly(self, *names: str) -> None:
        """Best effort unlink of files nothing lists (a failure is left for the next open)."""
        for n in names:
            try:
                meta.fs.unlink(self._dir / n)
            except FileNotFoundError:
                pass
            except BaseException as e:
                # Unlisted, so the next open removes it: no reason to fail here.
                log.warning("%s: could not remove %s (%r); it is removed at the next open",
                            self._dir, n, e)

    def _switch_head(self, old_head: str, new_head: str, new_fd: int) -> None:
        """Serve the committed ``new_head`` from ``new_fd``; close the old head's fd."""
        self._files.unpin(old_head)
        os.close(self._head_fd)
        self._head_fd = new_fd
        self._files.pin(new_head, new_fd)

    def _chain_of(self, file: str) -> list[str]:
        """Files from the root of ``file``'s chain down to ``file``."""
        chain = []
        cur: str | None = file
        while cur is not None:
            chain.append(cur)
            cur = self._metas[cur].parent
        chain.reverse()
        return chain

    def _refresh_chain_state(self) -> None:
        """Recompute what depends on the head's chain and the incomplete layers."""
        self._chain_incomplete = not self._incomplete.isdisjoint(self._chain)

    def _refuse_if_rebuilding(self, what: str) -> None:
        """RebuildingError while any layer is incomplete."""
        if self._incomplete:
            raise RebuildingError(f"cannot {what}: replica is rebuilding "
                                  f"({len(self._incomplete)} layers incomplete)")

    def _new_index(self, top_empty: bool) -> ReadIndex:
        """A fresh read index over the head's chain."""
        self._chain = self._chain_of(self._vol.head)
        self._refresh_chain_state()
        return ReadIndex([self._source(f) for f in self._chain],
                         self._vol.size // BLOCK, self._chunk_blocks, top_empty=top_empty)

    def _children(self) -> dict[str, list[str]]:
        """Children (layer files) of each layer file."""
        out: dict[str, list[str]] = defaultdict(list)
        for f in self._vol.layers:
            p = self._metas[f].parent
            if p is not None:
                out[p].append(f)
        return out

    def _snapshot_meta(self, name: str) -> LayerMeta | None:
        """The live snapshot called ``name``, if any (a clone's base layers are not its own)."""
        for m in self._metas.values():
            if m.name == name and not m.removed and m.base is None:
                return m
        return None

    def _require_snapshot(self, name: str) -> LayerMeta:
        """The live snapshot called ``name``, or SnapshotNotFoundError."""
        m = self._snapshot_meta(name)
        if m is None:
            raise SnapshotNotFoundError(f"no snapshot named {name!r} in {self._dir}")
        return m

    def _info(self, file: str, children: dict[str, list[str]] | None = None) -> LayerInfo:
        """LayerInfo of layer ``file`` (``children`` as from :meth:`_children`)."""
        if children is None:
            children = self._children()
        m = self._metas[file]
        head = file == self._vol.head
        st = os.fstat(self._head_fd) if head else os.stat(self._dir / file)
        return LayerInfo(
            name=m.name, file=file, parent=m.parent,
            children=tuple(children.get(file, ())), created=m.created,
            labels=dict(m.labels), removed=m.removed, size=self._vol.size if head else m.size,
            allocated=st.st_blocks * 512, checksum=m.checksum, head=head,
            incomplete=m.incomplete, base=dict(m.base) if m.base is not None else None,
            backing=b.cfg.backup if (b := self._backing) is not None and b.active
            and b.layer == file else None,
        )


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """A plain dict of labels, or ValueError unless it maps strings to strings."""
    out = dict(labels or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in out.items()):
        raise InvalidRequestError("labels must map strings to strings")
    return out


def _lock(d: Path) -> tuple[int, bool]:
    """flock volume.lock in ``d``; return (fd, whether the file was created)."""
    path = d / LOCK_FILE
    created = not os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ReplicaError(f"{d}: replica is in use: {path.name} is locked by pid {pid}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, created


class View:
    """Read-only access to one snapshot as a volume (what a snapshot export serves)."""

    def __init__(self, replica: Replica, file: str, incarnation: int) -> None:
        """A view of layer ``file``; use :meth:`Replica.view`."""
        self._r = replica
        self.file = file
        self.name = replica._metas[file].name
        self._inc = incarnation
        self._dead = False
        self._chain: list[str] = []
        self._index: ReadIndex | None = None
        self._gen = -1
        self._epoch = -1

    def _ready(self, readable: bool = True) -> ReadIndex:
        """The index of the snapshot's chain; ESHUTDOWN once the snapshot is deleted.

        With ``readable``, EIO while a layer of the chain is being rebuilt.
        """
        r = self._r
        if self._dead or r._closed or r._live.get(self.file) != self._inc:
            self._dead = True
            raise OSError(errno.ESHUTDOWN, f"snapshot {self.name!r} was deleted or its "
                          "replica closed")
        r._check_usable()
        if self._gen != r._gen or self._epoch != r._epoch or self._index is None:
            chain = r._chain_of(self.file)
            if chain != self._chain or self._index is None or self._epoch != r._epoch:
                self._chain = chain
                self._index = ReadIndex([r._source(f) for f in chain],
                                        r._metas[self.file].size // BLOCK, r._chunk_blocks)
            self._gen = r._gen
            self._epoch = r._epoch
        if readable and r._incomplete and not r._incomplete.isdisjoint(self._chain):
            missing = next(f for f in self._chain if f in r._incomplete)
            raise OSError(errno.EIO, f"replica is rebuilding: layer {missing} of snapshot "
                          f"{self.name!r} is incomplete")
        return self._index

    @property
    def size(self) -> int:
        """The snapshot's size in bytes."""
        self._ready(readable=False)
        return self._r._metas[self.file].size

    @property
    def backing(self) -> bk.Backing | None:
        """The replica's instant-restore layer still being filled (None: none)."""
        return self._r.backing

    def backing_missing(self, offset: int, length: int) -> list[int]:
        """The backup blocks a read of the snapshot's range needs and lacks (in order)."""
        if self._r.backing is None or not length:
            return []
        index = self._ready()
        _check_range(offset, length, index.nblocks * BLOCK)
        return self._r._backing_blocks(index, offset, length)

    def read(self, offset: int, length: int) -> bytearray:
        """``length`` bytes of the snapshot at ``offset``."""
        index = self._ready()
        _check_range(offset, length, index.nblocks * BLOCK)
        self._r._backing_need(index, offset, length)
        return _chain_read(index, self._r._files, offset, length)

    def readinto(self, offset: int, buf: Any) -> int:
        """Fill ``buf`` from ``offset`` of the snapshot; return its length."""
        index = self._ready()
        mv = memoryview(buf).cast("B")
        _check_range(offset, len(mv), index.nblocks * BLOCK)
        self._r._backing_need(index, offset, len(mv))
        _chain_readinto(index, self._r._files, offset, mv, zeroed=False)
        return len(mv)

    def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, allocated) runs of the snapshot over the range."""
        index = self._ready()
        _check_range(offset, length, index.nblocks * BLOCK)
        if not length:
            return []
        return _chain_block_status(index, offset, length)


# --------------------------------------------------------------------------- rebuild helpers

MAX_DIGEST_RANGE = 1 << 30
"""Largest range one digest of :meth:`Replica.layer_digests` may cover."""

MAX_DIGESTS = 1 << 21
"""Most digests one :meth:`Replica.layer_digests` call returns."""

MAX_LAYER_EXTENTS = 1024
"""Most extents one :meth:`LayerHandle.block_status` call reports (it may cover less)."""

_SOURCE_KEYS = ("file", "name", "parent", "created", "labels", "removed", "size")


@dataclass(frozen=True, slots=True)
class VerifiedLayer:
    """A layer's checksum as :meth:`Replica.verify_layer` found it, and what it hashed."""

    file: str
    inc: int
    version: int
    checksum: str


def _parse_source_layers(layers: Any) -> dict[str, LayerMeta]:
    """The source's layers (dicts as its control API lists them) as incomplete LayerMetas."""
    if not isinstance(layers, list | tuple):
        raise InvalidRequestError("layers must be a list of the source's layers")
    out: dict[str, LayerMeta] = {}
    for i, d in enumerate(layers):
        if not isinstance(d, Mapping):
            raise InvalidRequestError(f"layers[{i}] is not an object")
        missing = [k for k in _SOURCE_KEYS if k not in d]
        if missing:
            raise InvalidRequestError(f"layers[{i}] lacks {', '.join(missing)}")
        if d.get("head"):
            raise InvalidRequestError(
                f"layers[{i}] ({d['file']!r}) is the source's head: leave it out")
        obj = {k: d[k] for k in _SOURCE_KEYS}
        if d.get("base") is not None:  # a clone's base layer stays one on the copy
            obj["base"] = d["base"]
        obj["format"] = meta.FORMAT_VERSION
        obj["checksum"] = None
        try:
            m = LayerMeta.from_json(obj, f"layers[{i}]")
        except ReplicaError as e:
            raise InvalidRequestError(str(e)) from None
        if m.name is None or not meta.SNAP_RE.match(m.file):
            raise InvalidRequestError(f"layers[{i}]: {m.file!r} is not a named snapshot layer")
        if m.file in out:
            raise InvalidRequestError(f"layers[{i}]: layer {m.file!r} is listed twice")
        out[m.file] = replace(m, incomplete=True)
    return out


def _topological(metas: Mapping[str, LayerMeta]) -> list[str]:
    """Layer files with every parent before its children (oldest first among siblings)."""
    return meta.parents_first({f: m.parent for f, m in metas.items()},
                              order=lambda f: (metas[f].created, f))


def _install_metas(d: Path, dirfd: int, metas: Mapping[str, LayerMeta]) -> None:
    """Atomically replace many layers' .meta files, with one directory fsync."""
    staged = [(meta.stage_json(d, meta_file(f), m.to_json()), meta_file(f))
              for f, m in metas.items()]
    for tmp, name in staged:
        meta.fs.replace(tmp, d / name)
    meta.fs.fsync(dirfd)


def _read_engine_state(d: Path) -> tuple[dict[str, Any], int]:
    """The engine state and epoch stored in ``d`` (({}, 0) when none was ever stored)."""
    path = d / ENGINE_META
    if not path.exists():
        return {}, 0
    obj = meta.read_json(path)
    epoch = obj.get("epoch", 0) if isinstance(obj, dict) else None
    if (not isinstance(obj, dict) or obj.get("format") != meta.FORMAT_VERSION
            or not isinstance(obj.get("engine_state"), dict)
            or not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0):
        raise ReplicaError(f"{path}: not an engine state file of format {meta.FORMAT_VERSION}")
    return obj["engine_state"], epoch


def _generation(state: Mapping[str, Any]) -> int | None:
    """The ``generation`` of an engine state, None when absent or not a plain integer."""
    g = state.get("generation")
    return g if isinstance(g, int) and not isinstance(g, bool) and g >= 0 else None


def _file_extents(fd: int, start: int, end: int, max_extents: int) -> list[tuple[int, bool]]:
    """(length, data) runs of the file's own allocation from ``start`` (may stop early)."""
    out: list[tuple[int, bool]] = []
    pos = start
    while pos < end and len(out) < max_extents:
        d = seek_data(fd, pos)
        if d is None or d >= end:
            out.append((end - pos, False))
            break
        if d > pos:
            out.append((d - pos, False))
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        out.append((h - d, True))
        pos = h
    return out


def _range_digests(fd: int, size: int, range_size: int) -> list[str]:
    """Per-range blake2b-128 of a file's data runs (see :meth:`Replica.layer_digests`)."""
    empty = hashlib.blake2b(digest_size=16).hexdigest()
    out = [empty] * -(-size // range_size)
    buf = memoryview(bytearray(min(_COPY_BUF, range_size)))
    cur = -1
    h = hashlib.blake2b(digest_size=16)
    pos = 0
    while pos < size and (d := seek_data(fd, pos)) is not None and d < size:
        e = min(os.lseek(fd, d, os.SEEK_HOLE), size)
        p = d
        while p < e:
            k = p // range_size
            base = k * range_size
            q = min(e, base + range_size)
            if k != cur:
                if cur >= 0:
                    out[cur] = h.hexdigest()
                cur = k
                h = hashlib.blake2b(digest_size=16)
            h.update(struct.pack("<QQ", p - base, q - p))
            while p < q:
                mv = buf[:min(len(buf), q - p)]
                _pread_full(fd, mv, p)
                h.update(mv)
                p += len(mv)
        pos = e
    if cur >= 0:
        out[cur] = h.hexdigest()
    return out


def _range_digest(fd: int, start: int, end: int) -> str:
    """The blake2b-128 :func:`_range_digests` gives the range [start, end) (one range)."""
    h = hashlib.blake2b(digest_size=16)
    buf = memoryview(bytearray(min(_COPY_BUF, max(end - start, 1))))
    pos = start
    while pos < end and (d := seek_data(fd, pos)) is not None and d < end:
        e = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        h.update(struct.pack("<QQ", d - start, e - d))
        p = d
        while p < e:
            mv = buf[:min(len(buf), e - p)]
            _pread_full(fd, mv, p)
            h.update(mv)
            p += len(mv)
        pos = e
    return h.hexdigest()


class LayerHandle:
    """One layer file's own data, by file name: holes read as zeros and mean "see parent".

    What a rebuild reads on the source and writes on the target (the
    ``layer/FILE`` NBD export).  Writes are allowed while the layer is
    incomplete.  The checks run on the event loop; the ``*_fd`` methods use
    only the handle's own descriptor, so they may run in a worker thread.
    """

    def __init__(self, replica: Replica, file: str, inc: int, fd: int, writable: bool) -> None:
        """Use :meth:`Replica.open_layer`."""
        self._r = replica
        self.file = file
        self._inc = inc
        self.fd = fd
        self._writable = writable
        self._finalizer = weakref.finalize(self, os.close, fd)

    def check(self, write: bool = False) -> None:
        """Raise unless the layer still exists as opened (and, for ``write``, is incomplete)."""
        r = self._r
        r._check_usable()
        if r._layer_inc.get(self.file) != self._inc:
            raise OSError(errno.ESHUTDOWN, f"layer {self.file} was dropped or replaced")
        if write and not (self._writable and self.file in r._incomplete):
            raise OSError(errno.EPERM, f"layer {self.file} is complete: it is read-only")

    @property
    def writable(self) -> bool:
        """Whether writes are allowed now (the layer is incomplete)."""
        return self._writable and self.file in self._r._incomplete

    @property
    def size(self) -> int:
        """The layer's size (the volume size for the head)."""
        r = self._r
        if self.file == r._vol.head:
            return r._vol.size
        m = r._metas.get(self.file)
        return m.size if m is not None else 0

    def read(self, offset: int, length: int) -> bytearray:
        """The layer's own bytes (holes as zeros)."""
        self.check()
        _check_range(offset, length, self.size)
        return self.read_fd(offset, length)

    def read_fd(self, offset: int, length: int) -> bytearray:
        """:meth:`read` without the checks (thread-safe)."""
        buf = _read_buffer(length)
        _pread_full(self.fd, memoryview(buf), offset)
        return buf

    def block_status(self, offset: int, length: int,
                     max_extents: int = MAX_LAYER_EXTENTS) -> list[tuple[int, bool]]:
        """(length, data) runs of the layer file's own allocation; may cover less."""
        self.check()
        _check_range(offset, length, self.size)
        return _file_extents(self.fd, offset, offset + length, max_extents) if length else []

    def block_status_fd(self, offset: int, length: int,
                        max_extents: int = MAX_LAYER_EXTENTS) -> list[tuple[int, bool]]:
        """:meth:`block_status` without the checks (thread-safe)."""
        return _file_extents(self.fd, offset, offset + length, max_extents)

    def write(self, offset: int, data: Any, fua: bool = False) -> None:
        """Write into the (incomplete) layer file."""
        self.check(write=True)
        mv = memoryview(data).cast("B")
        _check_range(offset, len(mv), self.size)
        if not len(mv):
            return
        self._r._layer_changed(self.file, offset // BLOCK, -(-(offset + len(mv)) // BLOCK))
        meta.write_all(self.fd, [mv], offset, os.RWF_DSYNC if fua else 0)

    def punch(self, offset: int, length: int, fua: bool = False) -> None:
        """Deallocate whole blocks of the (incomplete) layer: there it holds nothing."""
        self.check(write=True)
        _check_range(offset, length, self.size)
        if (offset | length) % BLOCK:
            raise OSError(errno.EINVAL, f"layer {self.file}: zero/trim must cover whole "
                          f"{BLOCK}-byte blocks")
        if not length:
            return
        self._r._layer_changed(self.file, offset // BLOCK, (offset + length) // BLOCK)
        meta.fs.punch_hole(self.fd, offset, length)
        if fua:
            meta.fs.fdatasync(self.fd)

    def flush_fd(self) -> None:
        """fdatasync the layer file (thread-safe)."""
        meta.fs.fdatasync(self.fd)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        self._finalizer()
