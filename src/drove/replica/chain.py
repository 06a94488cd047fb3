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

import ctypes
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import stat
import struct
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from drove.replica import meta
from drove.replica.errors import ReplicaError, SnapshotExistsError, SnapshotNotFoundError
from drove.replica.index import CHUNK_BLOCKS, HOLE, MAX_LAYERS, ReadIndex
from drove.replica.meta import BLOCK, LOCK_FILE, VOLUME_META, LayerMeta, VolumeMeta, meta_file

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


# --------------------------------------------------------------------------- helpers


def _seek_data(fd: int, pos: int) -> int | None:
    """Offset of the first data at or after ``pos``, or None when only holes follow."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise


def _block_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """Blocks of [start, end) where the file holds any data, rounded outward, merged."""
    out: list[tuple[int, int]] = []
    pos = start * BLOCK
    stop = end * BLOCK
    while pos < stop:
        d = _seek_data(fd, pos)
        if d is None or d >= stop:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        s, e = d // BLOCK, min(-(-h // BLOCK), end)
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
        pos = h
    return out


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted disjoint ranges ``a`` minus sorted disjoint ranges ``b``."""
    out: list[tuple[int, int]] = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while s < e:
            if k >= len(b) or b[k][0] >= e:
                out.append((s, e))
                break
            if b[k][0] > s:
                out.append((s, b[k][0]))
            s = max(s, b[k][1])
            k += 1
    return out


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intersection of two sorted disjoint range lists."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


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


def _pread_full(fd: int, mv: memoryview, offset: int) -> None:
    """Fill ``mv`` from ``fd`` at ``offset``; past the end of the file reads as zeros."""
    while len(mv):
        n = os.preadv(fd, [mv], offset)
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
    while (d := _seek_data(fd, pos)) is not None:
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
        raise ValueError(f"range {offset}+{length} is outside the volume (size {size})")


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


class _LayerSource:
    """A layer file as the read index sees it (:class:`drove.replica.index.ExtentSource`)."""

    __slots__ = ("_files", "file")

    def __init__(self, files: _Files, file: str) -> None:
        """Extents of ``file``, read through ``files``."""
        self._files = files
        self.file = file

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """Blocks of [start, end) holding data (any byte of a block counts)."""
        return _block_extents(self._files.get(self.file), start, end)


def _chain_readinto(index: ReadIndex, files: _Files, offset: int, mv: memoryview,
                    zeroed: bool) -> None:
    """Read ``len(mv)`` bytes at ``offset`` through the chain ``index`` describes.

    One preadv per run of blocks held by one layer, straight into ``mv``.
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
            _pread_full(files.get(layers[lid].file), mv[a - offset:b - offset], a)  # type: ignore[attr-defined]


def _chain_read(index: ReadIndex, files: _Files, offset: int, length: int) -> bytes | bytearray:
    """``length`` bytes at ``offset`` through the chain ``index`` describes."""
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
        data = os.pread(files.get(index.layers[lid].file), length, offset)  # type: ignore[attr-defined]
        if len(data) == length:
            return data
    buf = _read_buffer(length)
    _chain_readinto(index, files, offset, memoryview(buf), zeroed=False)
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
                 metas: dict[str, LayerMeta], chunk_blocks: int, max_open_files: int) -> None:
        """Wrap an already validated, locked directory; use :meth:`create` or :meth:`open`."""
        self._dir = dirpath
        self._dirfd = dirfd
        self._lockfd = lockfd
        self._vol = vol
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
        self._chain: list[str] = []
        self._index = self._new_index(top_empty=False)

    # ------------------------------------------------------------ create / open / close

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *,
               chunk_blocks: int = CHUNK_BLOCKS,
               max_open_files: int = DEFAULT_MAX_OPEN_FILES) -> Replica:
        """Create an empty replica of ``size`` bytes (a multiple of 4096) in ``path``; open it."""
        if not isinstance(size, int) or size <= 0 or size % BLOCK:
            raise ValueError(f"size must be a positive multiple of {BLOCK}, got {size!r}")
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
        for f in vol.layers:
            p = d / f
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise ReplicaError(f"{p}: layer file listed in {VOLUME_META} is missing") from None
            if not stat.S_ISREG(st.st_mode):
                raise ReplicaError(f"{p}: layer file is not a regular file")
            sizes[f] = st.st_size
            mp = d / meta_file(f)
            metas[f] = LayerMeta.from_json(meta.read_json(mp), str(mp))
        meta.check_tree(vol, metas, sizes, d)
        _check_fs_block(d)
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
            os.ftruncate(lockfd, 0)
            os.pwrite(lockfd, f"{os.getpid()}\n".encode(), 0)
            return cls(d, dirfd, lockfd, vol, metas, chunk_blocks, max_open_files)
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
        if self._index.top == 0:
            # Head-only chain: the head file is the volume (holes read as zeros).
            data = os.pread(self._head_fd, length, offset)
            if len(data) == length:
                return data
        return _chain_read(self._index, self._files, offset, length)

    def readinto(self, offset: int, buf: Any) -> int:
        """Fill the writable buffer ``buf`` from ``offset``; return its length."""
        self._check_usable()
        mv = memoryview(buf).cast("B")
        _check_range(offset, len(mv), self._vol.size)
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
        if self._index.top:
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
            meta.write_all(self._head_fd, bufs, woff, os.RWF_DSYNC if fua else 0)
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
        """Discard the range; in drove it then reads as zeros (same as :meth:`zero`)."""
        self.zero(offset, length, fua=fua)

    def flush(self) -> None:
        """Make every completed write durable (fdatasync the head)."""
        self._check_usable()
        self._fdatasync(self._head_fd)

    def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, allocated) runs covering the range; allocated = some layer holds data."""
        self._check_usable()
        _check_range(offset, length, self._vol.size)
        if not length:
            return []
        return _chain_block_status(self._index, offset, length)

    def _needs_rmw(self, b: int) -> bool:
        """Whether block ``b`` is held by an older layer and not by the head."""
        idx = self._index
        return idx.top_runs(b, b + 1)[0][2] == HOLE and idx.below_runs(b, b + 1)[0][2] != HOLE

    def _read_block(self, b: int) -> bytearray:
        """Block ``b`` as the chain shows it."""
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
            raise ValueError(f"the chain already holds {MAX_LAYERS} layers")
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
        self._switch_head(old_head, new_head, new_fd)
        self._index.layers[-1].file = snap  # type: ignore[attr-defined]
        self._index.push(_LayerSource(self._files, new_head))
        self._chain[-1:] = [snap, new_head]
        self._gen += 1
        self._remove_quietly(old_head, meta_file(old_head))
        return self._info(snap)

    def revert(self, name: str) -> LayerInfo:
        """Start a new empty head on snapshot ``name``, dropping the current head's data."""
        self._check_usable()
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
        self._switch_head(old_head, new_head, new_fd)
        self._index = self._new_index(top_empty=True)
        self._gen += 1
        self._remove_quietly(old_head, meta_file(old_head))
        return self._info(new_head)

    def expand(self, new_size: int) -> None:
        """Grow the volume to ``new_size`` bytes (a multiple of 4096); never shrinks."""
        self._check_usable()
        old = self._vol.size
        if not isinstance(new_size, int) or new_size % BLOCK:
            raise ValueError(f"size must be a multiple of {BLOCK}, got {new_size!r}")
        if new_size < old:
            raise ValueError(f"cannot shrink the volume from {old} to {new_size}")
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
            m = self._require_snapshot(name)
            if m.checksum is not None:
                return m.checksum
            file, version, inc = m.file, self._versions[m.file], self._live[m.file]
            fd = os.open(self._dir / file, _O_RO)
        try:
            digest = _hash_layer(fd)
        finally:
            os.close(fd)
        with self._meta_lock:
            cur = self._metas.get(file)
            if (not self._closed and self._failed is None and cur is not None
                    and cur.checksum is None and self._live.get(file) == inc
                    and self._versions[file] == version):
                new = replace(cur, checksum=digest)
                self._install_json(meta_file(file), new.to_json())
                self._metas[file] = new
        return digest

    # ------------------------------------------------------------ purge internals

    def _plan_purge(self, pruned: set[tuple[str, str]]) -> tuple[str, str, str] | None:
        """The next purge action (kind, removed layer, its child) or None when done."""
        children = self._children()
        for f in self._vol.layers:
            if not self._metas[f].removed:
                continue
            kids = children.get(f, [])
            if not kids:
                return "remove", f, ""
            if len(kids) == 1:
                c = kids[0]
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
        self._files.drop(s)
        self._gen += 1
        self._remove_quietly(s, meta_file(s))

    def _fold(self, s: str, c: str) -> Iterator[None]:
        """Fold removed snapshot ``s`` into its only child ``c`` (a snapshot), in steps."""
        gen = self._gen
        sm = self._metas[s]
        # Invalidate c's cached checksum before its data changes.
        self._changing(c)
        src = os.open(self._dir / s, _O_RO)
        dst = meta.fs.open_write(self._dir / c, os.O_RDWR)
        try:
            for lo, hi in self._purge_windows(src, sm.size // BLOCK):
                # Copy s where c has a hole: c then shows exactly what it showed
                # through s before, and descendants of c cannot tell.
                todo = _subtract(_block_extents(src, lo, hi), _block_extents(dst, lo, hi))
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
        self._files.drop(s)
        if s in self._chain:
            self._chain = self._chain_of(self._vol.head)
            self._index.rebase([_LayerSource(self._files, f) for f in self._chain[:-1]])
        self._gen += 1
        self._remove_quietly(s, meta_file(s))
        yield

    def _prune(self, s: str, head: str) -> Iterator[None]:
        """Punch removed snapshot ``s`` wherever its only child, the head, holds data."""
        gen = self._gen
        sm = self._metas[s]
        self._changing(s)
        dst = meta.fs.open_write(self._dir / s, os.O_RDWR)
        try:
            for lo, hi in self._purge_windows(dst, sm.size // BLOCK):
                both = _intersect(_block_extents(dst, lo, hi),
                                  _block_extents(self._head_fd, lo, hi))
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
            d = _seek_data(fd, pos * BLOCK)
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
        fd = meta.fs.open_write(self._dir / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            meta.fs.ftruncate(fd, self._vol.size)
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

    def _new_index(self, top_empty: bool) -> ReadIndex:
        """A fresh read index over the head's chain."""
        self._chain = self._chain_of(self._vol.head)
        return ReadIndex([_LayerSource(self._files, f) for f in self._chain],
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
        """The live snapshot called ``name``, if any."""
        for m in self._metas.values():
            if m.name == name and not m.removed:
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
        )


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """A plain dict of labels, or ValueError unless it maps strings to strings."""
    out = dict(labels or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in out.items()):
        raise ValueError("labels must map strings to strings")
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

    def _ready(self) -> ReadIndex:
        """The index of the snapshot's chain; ESHUTDOWN once the snapshot is deleted."""
        r = self._r
        if self._dead or r._closed or r._live.get(self.file) != self._inc:
            self._dead = True
            raise OSError(errno.ESHUTDOWN, f"snapshot {self.name!r} was deleted or its "
                          "replica closed")
        r._check_usable()
        if self._gen != r._gen or self._index is None:
            chain = r._chain_of(self.file)
            if chain != self._chain or self._index is None:
                self._chain = chain
                self._index = ReadIndex([_LayerSource(r._files, f) for f in chain],
                                        r._metas[self.file].size // BLOCK, r._chunk_blocks)
            self._gen = r._gen
        return self._index

    @property
    def size(self) -> int:
        """The snapshot's size in bytes."""
        self._ready()
        return self._r._metas[self.file].size

    def read(self, offset: int, length: int) -> bytearray:
        """``length`` bytes of the snapshot at ``offset``."""
        index = self._ready()
        _check_range(offset, length, index.nblocks * BLOCK)
        return _chain_read(index, self._r._files, offset, length)

    def readinto(self, offset: int, buf: Any) -> int:
        """Fill ``buf`` from ``offset`` of the snapshot; return its length."""
        index = self._ready()
        mv = memoryview(buf).cast("B")
        _check_range(offset, len(mv), index.nblocks * BLOCK)
        _chain_readinto(index, self._r._files, offset, mv, zeroed=False)
        return len(mv)

    def block_status(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, allocated) runs of the snapshot over the range."""
        index = self._ready()
        _check_range(offset, length, index.nblocks * BLOCK)
        if not length:
            return []
        return _chain_block_status(index, offset, length)
