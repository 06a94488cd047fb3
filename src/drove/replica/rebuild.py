"""The target side of a rebuild: pull one layer's data from a source replica.

A :class:`SyncJob` copies a source layer (the source replica's ``layer/FILE``
NBD export) into the same, incomplete layer of this replica.  Without ranges
it copies every allocated extent; with ranges (a delta against an older copy)
it makes the layer equal to the source inside them: data where the source has
data, holes where it has holes.  Where this layer held nothing when the job
started, holes need no punching.

The pipeline: block status in large requests (the next one already in flight
while the current reply is used), data extents coalesced into windows of up to
:data:`WINDOW` bytes (holes inside a window are read as zeros and not
written), :data:`DEPTH` window reads in flight, and each window's data extents
pwritten straight from the receive buffer in a worker thread.  The layer file
is fdatasynced at the end; :meth:`drove.replica.chain.Replica.complete_layer`
then verifies it against the source's checksum.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drove.nbd.client import extents
from drove.replica import meta
from drove.replica.access import redact
from drove.replica.chain import _PREALLOCATE_MIN, BLOCK, LayerHandle, Replica
from drove.replica.errors import InvalidRequestError, RebuildingError
from drove.tokenbucket import Pacer

log = logging.getLogger("drove.replica")

WINDOW = 4 << 20
"""Largest read: data extents closer together than this are read as one."""

DEPTH = 6
"""Window reads in flight."""

WRITERS = 2
"""Windows being written at once (in worker threads: the kernel's page cache work is the
bulk of a sync's CPU, and two cores can share it)."""

MAX_RUNS = 4096
"""Most extents one window writes or punches."""

Connect = Callable[[str], Awaitable[Any]]


@dataclass(slots=True)
class _Item:
    """One unit of work: read [start, end) (when it has data runs), write and punch runs."""

    start: int
    end: int
    data: list[tuple[int, int]] = field(default_factory=list)
    punch: list[tuple[int, int]] = field(default_factory=list)
    done_after: int = 0


def normalize_ranges(ranges: Sequence[Sequence[int]] | None, size: int) -> list[tuple[int, int]]:
    """Sorted, merged (offset, length) ranges within ``size``, block-aligned; None = all."""
    if ranges is None:
        return [(0, size)]
    spans: list[tuple[int, int]] = []
    for r in ranges:
        if (not isinstance(r, list | tuple) or len(r) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in r)):
            raise InvalidRequestError(f"range {r!r} is not [offset, length]")
        off, n = r
        if off < 0 or n < 0 or off + n > size:
            raise InvalidRequestError(f"range {off}+{n} is outside the layer (size {size})")
        if (off | n) % BLOCK:
            raise InvalidRequestError(f"range {off}+{n} is not aligned to {BLOCK} bytes")
        if n:
            spans.append((off, off + n))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return [(s, e - s) for s, e in merged]


async def _in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func`` in a worker thread; on cancellation, still wait for it to end.

    The thread uses a file descriptor the caller closes afterwards: it must not
    outlive the await.
    """
    fut = asyncio.get_running_loop().run_in_executor(None, func, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await fut
        raise


_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
_SYNC_FILE_RANGE_WRITE = 2


def _apply(fd: int, base: int, mv: memoryview | None, item: _Item) -> None:
    """Punch the item's hole runs and write its data runs from ``mv`` (read at ``base``)."""
    for s, e in item.punch:
        meta.fs.punch_hole(fd, s, e - s)
    if mv is None:
        return
    for s, e in item.data:
        if e - s >= _PREALLOCATE_MIN:
            # Writing into preallocated (unwritten) extents costs ext4 far less CPU
            # than delayed allocation; unwritten extents still read as holes.
            meta.fs.preallocate(fd, s, e - s)
        meta.write_all(fd, [mv[s - base:e - base]], s)
    # Start writeback now (not waiting for it): the final fdatasync then finds
    # little left, and dirty pages do not pile up to the kernel's throttling limit.
    _sync_file_range(fd, item.start, item.end - item.start, _SYNC_FILE_RANGE_WRITE)


class SyncJob:
    """Pull layer ``file`` of this replica from ``source`` (an NBD URI of the source's layer)."""

    def __init__(self, replica: Replica, file: str, source: str,
                 ranges: Sequence[Sequence[int]] | None, connect: Connect | None = None,
                 rate: int = 0) -> None:
        """Check the request; :meth:`start` runs it (reading at most ``rate`` bytes/s)."""
        handle = replica.open_layer(file)
        try:
            if not handle.writable:
                raise RebuildingError(f"layer {file} is not incomplete: nothing to sync")
            if not isinstance(source, str) or not source.startswith(("nbd://", "nbd+unix://",
                                                                     "nbds://", "nbds+unix://")):
                raise InvalidRequestError(
                    f"source must be an NBD URI of the source layer, got {redact(str(source))!r}")
            self.ranges = normalize_ranges(ranges, handle.size)
        except BaseException:
            handle.close()
            raise
        self._replica = replica
        self._handle: LayerHandle = handle
        self.file = file
        self.source = source
        self.delta = ranges is not None
        self._connect = connect
        self._pacer = Pacer(rate, burst=0.1)  # a short burst: a copy runs for long anyway
        self.state = "running"
        self.error: str | None = None
        self.bytes_total = sum(n for _, n in self.ranges)
        self.bytes_done = 0
        self.bytes_written = 0
        self.started = time.monotonic()
        self.finished: float | None = None
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        """The job as the control API reports it."""
        end = self.finished if self.finished is not None else time.monotonic()
        return {
            "state": self.state, "file": self.file, "source": redact(self.source),
            "delta": self.delta, "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total, "bytes_written": self.bytes_written,
            "seconds": round(end - self.started, 3), "error": self.error,
        }

    @property
    def running(self) -> bool:
        """Whether the job has not ended yet."""
        return self.state == "running"

    def start(self) -> None:
        """Run the job as a background task."""
        self._task = asyncio.get_running_loop().create_task(self._main(), name=f"sync {self.file}")

    async def cancel(self) -> None:
        """Cancel the job and wait for it to end."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self) -> None:
        """Wait for the job to end (whatever its outcome)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def _main(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            self.state = "cancelled"
            log.info("sync of %s cancelled after %d of %d bytes", self.file, self.bytes_done,
                     self.bytes_total)
            raise
        except Exception as e:
            self.state = "failed"
            self.error = redact(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            log.warning("sync of %s from %s failed: %s", self.file, redact(self.source),
                        self.error)
        else:
            self.state = "done"
            secs = time.monotonic() - self.started
            log.info("sync of %s done: %d bytes in %.1f s (%.0f MiB/s), %d written",
                     self.file, self.bytes_total, secs, self.bytes_total / max(secs, 1e-9) / 2**20,
                     self.bytes_written)
        finally:
            self.finished = time.monotonic()
            self._handle.close()

    async def _run(self) -> None:
        connect = self._connect
        if connect is None:
            from drove.nbd.client import connect_uri  # the client is only needed here
            connect = connect_uri
        handle = self._handle
        # Where this layer holds nothing yet, the source's holes need no punching.
        empty = _first_data(handle.fd) is None
        client = await connect(self.source)
        try:
            size = getattr(client, "size", None)
            if isinstance(size, int) and size != handle.size:
                raise OSError(errno.EINVAL, f"source layer is {size} bytes, layer {self.file} "
                              f"here is {handle.size}")
            await self._copy(client, punch=not empty)
            self.bytes_done = self.bytes_total  # trailing holes needed nothing
            handle.check(write=True)
            await _in_thread(handle.flush_fd)
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    async def _copy(self, client: Any, punch: bool) -> None:
        """The pipeline: items from block status, DEPTH reads ahead, WRITERS writes at once."""
        pool = [bytearray(WINDOW) for _ in range(DEPTH + WRITERS)]
        free = list(range(len(pool)))
        reads: collections.deque[tuple[_Item, int, asyncio.Future[Any] | None]] = \
            collections.deque()
        writes: collections.deque[tuple[_Item, int, asyncio.Future[Any]]] = collections.deque()

        async def start_write() -> None:
            """The oldest read's data goes to a worker thread."""
            item, slot, fut = reads.popleft()
            try:
                if fut is not None:
                    await fut
            except BaseException:
                if slot >= 0:
                    free.append(slot)
                raise
            view = memoryview(pool[slot])[:item.end - item.start] if slot >= 0 else None
            writes.append((item, slot, asyncio.ensure_future(self._write(item, view))))

        async def retire() -> None:
            """Wait for the oldest write; its buffer is free again."""
            item, slot, task = writes.popleft()
            try:
                await task
            finally:
                if slot >= 0:
                    free.append(slot)
            self.bytes_written += sum(e - s for s, e in item.data)
            self.bytes_done = item.done_after

        async def advance() -> None:
            """Move the oldest unit of work one step: retire a write or start one."""
            if writes and (len(writes) >= WRITERS or not reads or writes[0][2].done()):
                await retire()
            elif reads:
                await start_write()

        try:
            async with contextlib.aclosing(self._items(client, punch)) as items:
                async for item in items:
                    slot = -1
                    fut = None
                    if item.data:
                        await self._pacer.take(item.end - item.start)  # the rebuild QoS
                        slot = free.pop()
                        view = memoryview(pool[slot])[:item.end - item.start]
                        fut = asyncio.ensure_future(client.readinto(item.start, view))
                    reads.append((item, slot, fut))
                    # Eagerly: finished writes retire, finished reads start writing.
                    while writes and writes[0][2].done():
                        await retire()
                    while reads and len(writes) < WRITERS and (
                            reads[0][2] is None or reads[0][2].done()):
                        await start_write()
                    while len(reads) >= DEPTH or not free:
                        await advance()
            while reads or writes:
                await advance()
        finally:
            for _, _, fut in reads:
                if fut is not None:
                    fut.cancel()
            for _, _, task in writes:
                task.cancel()
            for fut in [f for _, _, f in reads if f is not None] + [t for _, _, t in writes]:
                with contextlib.suppress(BaseException):
                    await fut

    async def _write(self, item: _Item, view: memoryview | None) -> None:
        """Punch and write one item's runs in a worker thread (small ones inline)."""
        handle = self._handle
        handle.check(write=True)
        lo, hi = item.start // BLOCK, -(-item.end // BLOCK)
        if item.punch:
            lo = min(lo, item.punch[0][0] // BLOCK)
            hi = max(hi, -(-item.punch[-1][1] // BLOCK))
        changed = self._replica._layer_changed
        changed(self.file, lo, hi)
        try:
            if len(item.data) + len(item.punch) <= 2 and (item.end - item.start) < (256 << 10):
                _apply(handle.fd, item.start, view, item)
            else:
                await _in_thread(_apply, handle.fd, item.start, view, item)
        finally:
            # Again after the thread: nothing may cache what it saw midway.
            changed(self.file, lo, hi)

    async def _items(self, client: Any, punch: bool) -> AsyncIterator[_Item]:
        """Work items in offset order, from the source's block status."""
        done = 0
        for start, length in self.ranges:
            item: _Item | None = None
            async with contextlib.aclosing(extents(client, start, start + length)) as runs:
                async for off, n, data in runs:
                    if not data:
                        done += n
                        if punch:
                            if item is None:
                                item = _Item(off, off)
                            item.punch.append((off, off + n))
                        if item is not None:
                            item.done_after = done
                            if len(item.punch) >= MAX_RUNS:
                                yield item
                                item = None
                        continue
                    a, b = off, off + n
                    while a < b:
                        if item is not None and len(item.data) < MAX_RUNS and (
                                not item.data or a - item.start < WINDOW):
                            if not item.data:
                                item.start = a
                            stop = min(b, item.start + WINDOW)
                            item.data.append((a, stop))
                            item.end = stop
                            done += stop - a
                            item.done_after = done
                            a = stop
                            if stop == item.start + WINDOW:
                                yield item
                                item = None
                        else:
                            if item is not None:
                                yield item
                            item = _Item(a, a)
            if item is not None:
                yield item


def _first_data(fd: int) -> int | None:
    """Offset of the file's first data, or None when it holds none."""
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise
