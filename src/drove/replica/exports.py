"""The replica's NBD exports: its writable head, read-only snapshots, and raw layers.

``layer/FILE`` serves one layer file's own data, not the chain's: what a rebuild
copies.  Its holes read as zeros and block status reports the file's own
allocation, so a reader sees exactly the layer's data map.  It is writable only
while the layer is incomplete (being rebuilt): writes go into the file, zero
and trim punch holes (in a layer a hole means "not held here").

The chain's I/O is synchronous and runs inline on the event loop: pread/pwrite
against the page cache take microseconds, far less than a hop to a worker
thread, and running them between awaits makes every request atomic with
respect to snapshot, revert and purge steps, which also run on the loop.  Only
FLUSH, whose fdatasync can take milliseconds, goes to a thread; head-changing
operations first wait for such flushes to finish (:class:`FlushGate`).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence

from drove.nbd.errors import ExportRefused
from drove.nbd.export import NBD_STATE_HOLE, NBD_STATE_ZERO, Capabilities, Extent
from drove.replica.access import Gate
from drove.replica.diff import Delta
from drove.replica.errors import InvalidRequestError, RebuildingError
from drove.replica.fence import Fence, StaleEpochError, parse_head_epoch

HEAD_EXPORT = "head"
SNAPSHOT_PREFIX = "snapshot/"
SINCE_MARK = "@since="
BACKING_MARK = "@holes=backing"
LAYER_PREFIX = "layer/"

# Bulk reads and block status of layer exports run in a worker thread from this
# size on: a rebuild pulls whole layers while the loop keeps serving the head.
_THREAD_READ_MIN = 256 * 1024

_HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO
_RW_CAPS = Capabilities()
_RO_CAPS = Capabilities(
    readonly=True, fua=False, trim=False, zero=False, fast_zero=False, flush=True,
)
# Layers are written in whole blocks: a partial hole cannot say "see parent".
_LAYER_RW_CAPS = Capabilities(min_block=4096)
_LAYER_RO_CAPS = Capabilities(
    readonly=True, fua=False, trim=False, zero=False, fast_zero=False, flush=True,
    min_block=4096,
)


def _extents(runs: Sequence[tuple[int, bool]]) -> list[Extent]:
    """Chain runs (length, allocated) as NBD base:allocation extents."""
    return [Extent(length, 0 if allocated else _HOLE) for length, allocated in runs]


_STATUS_FIRST = 64 << 10
_STATUS_ENOUGH = 64


def _chain_status(status, offset: int, length: int) -> list[Extent]:
    """Block status of a chain from ``offset``, covering less than ``length`` when fragmented.

    Clients like qemu ask with REQ_ONE for the whole rest of the disk and use the
    first extent only, so describing everything would cost O(n) per request and
    O(n^2) per scan.  Windows start at 64 KiB and double until enough extents
    are found (a sparse or fully allocated disk still takes few steps).
    """
    out: list[tuple[int, bool]] = []
    pos, end, step = offset, offset + length, _STATUS_FIRST
    while pos < end:
        n = min(step, end - pos)
        for run in status(pos, n):
            if out and out[-1][1] == run[1]:
                out[-1] = (out[-1][0] + run[0], run[1])
            else:
                out.append(run)
        pos += n
        step *= 2
        if len(out) > _STATUS_ENOUGH:
            break
    return _extents(out)


class FlushGate:
    """Counts flushes running in worker threads so head changes can wait them out."""

    def __init__(self) -> None:
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self, func) -> None:
        """Run the blocking ``func`` in a thread, counted as one flush."""
        self._running += 1
        self._idle.clear()
        try:
            await asyncio.get_running_loop().run_in_executor(None, func)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def drain(self) -> None:
        """Return once no flush is running (the caller must not await before acting)."""
        while self._running:
            await self._idle.wait()


async def fetch_backing(replica, offset: int, length: int) -> None:
    """Fetch the backup blocks a read of the range needs (an instant restore) without
    blocking the loop; the chain would otherwise fetch them inline."""
    if replica.backing is not None:
        missing = replica.backing_missing(offset, length)
        if missing:
            await replica.backing.ensure(missing)


def _edge_blocks_missing(replica, offset: int, length: int) -> bool:
    """Whether a write of the range reads backup blocks not fetched yet (its partial edges)."""
    end = offset + length
    return bool((offset % 4096 and replica.backing_missing(offset - offset % 4096, 4096))
                or (end % 4096 and replica.backing_missing(end - end % 4096, 4096)))


async def fetch_backing_edges(replica, offset: int, length: int) -> None:
    """:func:`fetch_backing` for the partly covered 4 KiB blocks a write reads to complete."""
    if replica.backing is None or not length:
        return
    end = offset + length
    if offset % 4096:
        await fetch_backing(replica, offset - offset % 4096, 4096)
    if end % 4096:
        await fetch_backing(replica, end - end % 4096, 4096)


def _head_description(readonly: bool) -> str:
    return "drove replica head " + ("(read-only: an engine owns this replica)" if readonly
                                    else "(read-write)")


class HeadExport:
    """The replica's live volume (the chain's head) as a read-write export.

    One per connection, carrying the epoch it was opened with (0: none), so
    the fence can revoke the connections of a stale engine.  ``readonly``: a
    plain ``head`` opened once an engine owns the replica, for people and tools
    that only look (qemu-img compare, nbdinfo); writes are refused.
    """

    def __init__(self, replica, gate: FlushGate, name: str = HEAD_EXPORT,
                 epoch: int = 0, readonly: bool = False) -> None:
        self.name = name
        self.epoch = epoch
        self.caps = _RO_CAPS if readonly else _RW_CAPS
        self.description = _head_description(readonly)
        self._replica = replica
        self._gate = gate
        self._revoked = readonly

    def revoke(self) -> None:
        """Refuse every change from now on (its connection is being cut)."""
        self._revoked = True

    def _check(self) -> None:
        if self._revoked:
            if self.caps.readonly:
                raise OSError(errno.EPERM, "this head export is read-only")
            raise OSError(errno.ESHUTDOWN, "fenced: a newer engine owns this replica")

    @property
    def size(self) -> int:
        """The volume size, which grows on expand."""
        return self._replica.size

    async def read(self, offset: int, length: int) -> bytes:
        """Read through the chain."""
        await fetch_backing(self._replica, offset, length)
        return self._replica.read(offset, length)

    def read_now(self, offset: int, length: int) -> bytes:
        """Read through the chain, synchronously (an engine's in-process head)."""
        return self._replica.read(offset, length)

    def read_cached(self, offset: int, length: int) -> bytearray:
        """Read from the page cache only: BlockingIOError where the disk would be read."""
        return self._replica.read_cached(offset, length)

    async def prepare_read(self, offset: int, length: int) -> None:
        """Fetch what a read of the range still needs from a backup (an instant restore)."""
        await fetch_backing(self._replica, offset, length)

    def read_sources(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(duplicated fd, offset, length) of the file ranges a read touches (close the fds)."""
        return self._replica.read_sources(offset, length)

    def write_now(self, offset: int, data: memoryview) -> None:
        """Write into the head, synchronously and not durably (an engine's in-process head).

        BlockingIOError (nothing written) when the write must first fetch the rest of a
        block from a backup (an instant restore): use :meth:`write` for it.
        """
        if self._revoked:
            self._check()
        if self._replica.backing is not None and _edge_blocks_missing(self._replica, offset,
                                                                      len(data)):
            raise BlockingIOError(errno.EAGAIN, "the write completes a block still in a backup")
        self._replica.write(offset, data)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        """Read through the chain straight into ``buf`` (an engine's arena slot)."""
        await fetch_backing(self._replica, offset, memoryview(buf).nbytes)
        self._replica.readinto(offset, buf)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write into the head."""
        if self._revoked:
            self._check()
        await fetch_backing_edges(self._replica, offset, len(data))
        self._replica.write(offset, data, fua=fua)

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Make the range read zeros (punching where no older layer shows through)."""
        self._check()
        await fetch_backing_edges(self._replica, offset, length)
        self._replica.zero(offset, length, fua=fua, fast=fast)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard the range (drove.replica.chain.Replica.trim: the head's copy goes, a
        block only an older layer holds is left as it is)."""
        self._check()
        await fetch_backing_edges(self._replica, offset, length)
        self._replica.trim(offset, length, fua=fua)

    async def flush(self) -> None:
        """fdatasync the head in a worker thread."""
        await self._gate.run(self._replica.flush)

    async def cache(self, offset: int, length: int) -> None:
        """Accept the hint; the page cache does the prefetching."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation across the whole chain."""
        return _chain_status(self._replica.block_status, offset, length)


class SnapshotExport:
    """One snapshot, read-only, as it was when taken."""

    caps = _RO_CAPS

    def __init__(self, name: str, view) -> None:
        self.name = SNAPSHOT_PREFIX + name
        self.description = f"drove snapshot {name} (read-only)"
        self._view = view

    @property
    def size(self) -> int:
        """The volume size when the snapshot was taken."""
        return self._view.size

    async def read(self, offset: int, length: int) -> bytes:
        """Read the snapshot through its part of the chain."""
        missing = self._view.backing_missing(offset, length)
        if missing:  # an instant restore's data: fetched without blocking the loop
            await self._view.backing.ensure(missing)
        return self._view.read(offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Refuse: snapshots never change."""
        raise OSError(errno.EPERM, "snapshot exports are read-only")

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Refuse: snapshots never change."""
        raise OSError(errno.EPERM, "snapshot exports are read-only")

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Refuse: snapshots never change."""
        raise OSError(errno.EPERM, "snapshot exports are read-only")

    async def flush(self) -> None:
        """Nothing to make durable: snapshot layers were synced when taken."""

    async def cache(self, offset: int, length: int) -> None:
        """Accept the hint."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation in the snapshot's chain."""
        return _chain_status(self._view.block_status, offset, length)


def delta_export_name(snapshot: str, since: str, backing: bool = False) -> str:
    """The name of the export of ``snapshot`` showing only what changed since ``since``
    (``backing``: its unchanged extents are holes without ZERO; see DeltaExport)."""
    return f"{SNAPSHOT_PREFIX}{snapshot}{SINCE_MARK}{since}{BACKING_MARK if backing else ''}"


class DeltaExport(SnapshotExport):
    """Snapshot TO as changed since snapshot FROM (``snapshot/TO@since=FROM``).

    Block status reports the changed extents (drove.replica.diff) as data and the
    rest as HOLE|ZERO; reads give TO's data on the changed extents and zeros
    elsewhere, as that status promises.  A client that skips zero extents onto an
    image of FROM (nbdcopy --destination-is-zero) so copies only the delta and
    leaves TO.  Changed extents are data even where TO reads zeros: those zeros
    must reach the copy (hence also ``--sparse=0`` on nbdcopy, which would skip
    zero data too, and ``--request-size=4096``, as it reads whole requests around
    any data).  qemu-img has no such mode (``-S 0`` ignores block status): it
    uses the ``backing`` flavour below.

    With ``backing`` (``...@holes=backing``) the unchanged extents are holes
    without the ZERO flag and read as TO's data: what a client writing an
    image over a backing file of FROM wants (qemu-img convert -B leaves such
    holes to the backing file, and writes zero data as zero clusters that hide
    it), where HOLE|ZERO would make it write zeros over the backing file.
    """

    def __init__(self, name: str, since: str, view, delta: Delta,
                 backing: bool = False) -> None:
        super().__init__(name, view)
        self.name = delta_export_name(name, since, backing)
        self.description = f"drove snapshot {name}, changes since {since} (read-only)"
        self._delta = delta
        self._unchanged = NBD_STATE_HOLE if backing else _HOLE
        self._backing = backing

    async def read(self, offset: int, length: int) -> bytes:
        """TO's data where it changed, and elsewhere zeros (or TO's data with ``backing``)."""
        if self._backing:
            return self._view.read(offset, length)
        changed = self._delta.extents(offset, offset + length)
        if changed == [(offset, offset + length)]:
            return self._view.read(offset, length)
        self._view.size  # noqa: B018 - raises ESHUTDOWN once TO is deleted
        buf = bytearray(length)
        for s, e in changed:
            buf[s - offset:e - offset] = self._view.read(s, e - s)
        return bytes(buf)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Changed extents as data (flags 0), the rest as HOLE|ZERO (HOLE with ``backing``);
        may cover less."""
        self._view.size  # noqa: B018 - raises ESHUTDOWN once TO is deleted
        return [e if e.flags == 0 else Extent(e.length, self._unchanged)
                for e in _chain_status(self._changed_runs, offset, length)]

    def _changed_runs(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, changed) runs covering [offset, offset + length)."""
        out: list[tuple[int, bool]] = []
        pos = offset
        for s, e in self._delta.extents(offset, offset + length):
            if s > pos:
                out.append((s - pos, False))
            out.append((e - s, True))
            pos = e
        if pos < offset + length:
            out.append((offset + length - pos, False))
        return out


class LayerExport:
    """One layer file's own data (``layer/FILE``): read-only unless the layer is incomplete."""

    def __init__(self, handle) -> None:
        self._h = handle
        self.name = LAYER_PREFIX + handle.file
        writable = handle.writable
        self.caps = _LAYER_RW_CAPS if writable else _LAYER_RO_CAPS
        state = "incomplete, writable" if writable else "read-only"
        self.description = f"drove layer {handle.file} ({state})"

    @property
    def size(self) -> int:
        """The layer's size."""
        return self._h.size

    async def read(self, offset: int, length: int) -> bytearray:
        """The layer file's bytes (holes read as zeros)."""
        self._h.check()
        if length < _THREAD_READ_MIN:
            return self._h.read_fd(offset, length)
        return await asyncio.get_running_loop().run_in_executor(
            None, self._h.read_fd, offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write into the layer file (EPERM once the layer is complete)."""
        self._h.write(offset, data, fua=fua)

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Punch a hole: the layer then holds nothing there."""
        self._h.punch(offset, length, fua=fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Punch a hole, as zero."""
        self._h.punch(offset, length, fua=fua)

    async def flush(self) -> None:
        """fdatasync the layer file in a worker thread."""
        self._h.check()
        await asyncio.get_running_loop().run_in_executor(None, self._h.flush_fd)

    async def cache(self, offset: int, length: int) -> None:
        """Accept the hint."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """The layer file's own allocation (data: flags 0; hole: HOLE|ZERO); may cover less."""
        self._h.check()
        if length < _THREAD_READ_MIN:
            runs = self._h.block_status_fd(offset, length)
        else:
            runs = await asyncio.get_running_loop().run_in_executor(
                None, self._h.block_status_fd, offset, length)
        return _extents(runs)


class ReplicaExports:
    """Names the replica's exports: ``head`` (also ``""``), ``head@epoch=N`` (an engine's),
    ``snapshot/NAME``, ``layer/FILE``; each behind ``key=KEY/`` when ``access`` demands a
    key (drove.replica.access)."""

    def __init__(self, replica, gate: FlushGate, fence: Fence,
                 access: Gate | None = None) -> None:
        self._replica = replica
        self._gate = gate
        self._fence = fence
        self._access = access or Gate(None)

    def _live_snapshots(self) -> list[str]:
        return [
            layer.name for layer in self._replica.layers()
            if layer.name is not None and not layer.removed
        ]

    def list_exports(self) -> list[tuple[str, str]]:
        """The head, every live snapshot and every layer file (refused behind a key)."""
        self._access.check_listing()
        layers = self._replica.layers()
        names = [(HEAD_EXPORT, _head_description(self._fence.epoch > 0))]
        names += [
            (SNAPSHOT_PREFIX + layer.name, f"drove snapshot {layer.name} (read-only)")
            for layer in layers if layer.name is not None and not layer.removed
        ]
        names += [
            (LAYER_PREFIX + layer.file,
             f"drove layer {layer.file} ({'incomplete' if layer.incomplete else 'read-only'})")
            for layer in layers
        ]
        return names

    def open_export(self, name: str):
        """The export called ``name`` or None; ExportRefused for a fenced head, AccessDenied
        (whatever the name) without the volume's key."""
        return self.open_local(self._access.admit(name))

    def open_local(self, name: str):
        """The export called ``name`` for this process itself (no key: it is the volume's)."""
        if name in ("", HEAD_EXPORT):
            # Writable until an engine owns the replica; then for looking only.
            return self._fence.track(HeadExport(self._replica, self._gate, name=name,
                                                readonly=self._fence.epoch > 0))
        epoch = parse_head_epoch(name)
        if epoch is not None:
            try:
                self._fence.admit(epoch, f"export {name!r}")
            except StaleEpochError as exc:
                raise ExportRefused(str(exc)) from None
            return self._fence.track(HeadExport(self._replica, self._gate, name=name,
                                                epoch=epoch))
        if name.startswith(SNAPSHOT_PREFIX) and SINCE_MARK in name:
            snap, since = name[len(SNAPSHOT_PREFIX):].split(SINCE_MARK, 1)
            backing = since.endswith(BACKING_MARK)
            since = since.removesuffix(BACKING_MARK)
            live = self._live_snapshots()
            if snap in live and since in live:
                try:
                    delta = Delta.open(self._replica, since, snap)
                except (InvalidRequestError, RebuildingError) as exc:
                    raise ExportRefused(str(exc)) from None  # the client sees why
                return DeltaExport(snap, since, self._replica.view(snap), delta, backing)
        elif name.startswith(SNAPSHOT_PREFIX):
            snap = name[len(SNAPSHOT_PREFIX):]
            if snap in self._live_snapshots():
                return SnapshotExport(snap, self._replica.view(snap))
        if name.startswith(LAYER_PREFIX):
            file = name[len(LAYER_PREFIX):]
            if any(layer.file == file for layer in self._replica.layers()):
                return LayerExport(self._replica.open_layer(file))
        return None
