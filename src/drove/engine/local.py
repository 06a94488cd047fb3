"""The engine's local replica: a replica served inside the engine process (data locality).

The replica on the attach node is opened by the engine itself with the same
code a replica process runs (:class:`drove.replica.process.ReplicaService`):
its snapshot and layer exports and its control API are served from this
process for backups, exports and rebuilds of other replicas, and the mirror
reaches its head by plain calls instead of NBD.

Chain I/O runs inline on the event loop, as in a replica process: a pread or
pwrite against the page cache costs microseconds, less than a hop to a worker
thread, and running between awaits keeps every request atomic with respect to
snapshot and purge steps.  What waits on the disk does not: FLUSH and FUA
requests run their fdatasync in a worker thread, and a read first asks the page
cache alone (preadv2 with RWF_NOWAIT); what is not cached is read by a worker
thread through duplicated file descriptors (so a purge meanwhile cannot pull the
file away), after which the read is served inline from the now warm cache
(``bench/local_io.py`` measures both sides of that line).  Writes into the page
cache do not wait for the disk unless memory is short of clean pages.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from drove.engine.replicas import Disconnected, ReplicaControlError, ReplicaHandle
from drove.nbd import eager
from drove.replica.chain import NoWaitUnsupportedError
from drove.replica.fence import head_export_name
from drove.replica.process import ReplicaService
from drove.webclient import HttpClient


class LocalIO:
    """The local replica's head as a mirror member's I/O: in-process calls, no NBD.

    Reads, writes, zeroes and trims run inline; FUA makes the request durable
    with a flush in a worker thread rather than an O_DSYNC write on the loop.
    """

    def __init__(self, head: Any, flush_in_thread: Any) -> None:
        self._head = head  # drove.replica.exports.HeadExport, tracked by the fence
        self._flush = flush_in_thread  # FlushGate.run bound to the replica's flush
        self.cache = head.cache
        self.block_status = head.block_status
        self.aborted = False
        self.cold_reads = 0  # reads that had to wait for the disk (in a worker thread)
        self.nowait = True  # False where the filesystem cannot say (tmpfs: it never waits)

    def _read_cached(self, offset: int, length: int) -> Any:
        """Read from the page cache only; BlockingIOError where the disk must be read."""
        if not self.nowait:
            return self._head.read_now(offset, length)
        try:
            return self._head.read_cached(offset, length)
        except NoWaitUnsupportedError:
            self.nowait = False
            return self._head.read_now(offset, length)

    async def read(self, offset: int, length: int) -> Any:
        """Read from the page cache inline, or from the disk through a worker thread."""
        try:
            return self._read_cached(offset, length)
        except BlockingIOError:
            return await self._cold_read(offset, length)

    async def _cold_read(self, offset: int, length: int) -> Any:
        """Bring the range into the page cache in a worker thread, then read it inline."""
        self.cold_reads += 1
        await self._head.prepare_read(offset, length)  # an instant restore's data, fetched
        sources = self._head.read_sources(offset, length)
        await asyncio.get_running_loop().run_in_executor(None, warm_cache, sources)
        return self._head.read_now(offset, length)

    @property
    def head(self) -> Any:
        """The head export this I/O goes to (what the fence tracks and cuts)."""
        return self._head

    async def write(self, offset: int, data: Any, *, fua: bool = False) -> None:
        """Write into the head; with ``fua`` durable before returning."""
        await self._head.write(offset, data)
        if fua:
            await self._flush()

    async def zero(self, offset: int, length: int, *, fua: bool = False,
                   may_trim: bool = True, fast: bool = False) -> None:
        """Zero the range (punching where the chain allows)."""
        await self._head.zero(offset, length, may_trim=may_trim, fast=fast)
        if fua:
            await self._flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard the range (reads zeros after)."""
        await self._head.trim(offset, length)
        if fua:
            await self._flush()

    async def flush(self) -> None:
        """fdatasync the head in a worker thread."""
        await self._flush()

    def submit(self, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: eager.Done) -> None:
        """READ and plain WRITE inline (done before returning); FLUSH and FUA via a thread."""
        if cmd == eager.READ:
            try:
                value = self._read_cached(offset, length)
            except BlockingIOError:
                eager.run(self._cold_read(offset, length), done)
            except Exception as exc:
                done(None, exc)
            else:
                done(value, None)
        elif cmd == eager.WRITE and not fua:
            try:
                self._head.write_now(offset, data)
            except BlockingIOError:  # it needs data from a backup first (instant restore)
                eager.run(self.write(offset, data), done)
            except Exception as exc:
                done(None, exc)
            else:
                done(None, None)
        elif cmd == eager.WRITE:
            eager.run(self.write(offset, data, fua=True), done)
        else:
            eager.run(self._flush(), done)

    def abort(self) -> None:
        """Refuse every further change through this head (the member left the volume)."""
        self.aborted = True
        self._head.revoke()


_WARM_CHUNK = 1 << 20


def warm_cache(sources: list[tuple[int, int, int]]) -> None:
    """Read the (fd, offset, length) ranges into the page cache, then close the fds."""
    try:
        if not sources:
            return
        buf = memoryview(bytearray(min(_WARM_CHUNK, max(n for _, _, n in sources))))
        for fd, offset, length in sources:
            end = offset + length
            while offset < end:
                got = os.preadv(fd, [buf[:min(len(buf), end - offset)]], offset)
                if got <= 0:
                    break  # past the end of the file: holes read as zeros anyway
                offset += got
    finally:
        for fd, _, _ in sources:
            os.close(fd)


class LocalReplica(ReplicaHandle):
    """A mirror member whose replica this engine serves itself (``--local-replica``)."""

    local = True

    def __init__(self, name: str, directory: Path, size: int | None, timeout: float, *,
                 nbd: tuple[str, int] | None = ("127.0.0.1", 0), unix: str | None = None,
                 control: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        super().__init__(name, "http://127.0.0.1:0", timeout)
        self.directory = directory
        self.service = ReplicaService(directory, size, nbd=nbd, unix=unix, control=control,
                                      size_to_create_only=True)
        self.service.on_cut(self._cut)

    async def open(self) -> dict[str, Any]:
        """Open the chain and serve its exports and control API; the addresses."""
        addresses = await self.service.start()
        self.url = addresses["control"]
        headers = dict(self.http.headers)
        await self.http.aclose()
        self.http = HttpClient(self.url, timeout=self.timeout, headers=headers)
        return addresses

    @property
    def opened(self) -> bool:
        """Whether the chain is open here."""
        return self.service.replica is not None

    async def refresh(self) -> dict[str, Any]:
        """The replica's info; refused at once while its chain is not open here."""
        if not self.opened:
            raise ReplicaControlError(0, f"local replica {self.name} is not open: {self.error}")
        return await super().refresh()

    def _cut(self, which: Any) -> int:
        """The fence cut heads (a newer engine, a revert, a rebuild): ours leaves if picked."""
        io = self.io
        if not isinstance(io, LocalIO) or io.aborted or not which(io.head):
            return 0  # already out of the volume (dropped, reverting): nothing to report
        self.io = Disconnected()
        io.abort()
        if self.on_lost is not None:
            self.on_lost(self, "the replica cut the engine's head (fenced or rebuilt)")
        return 1

    def to_json(self) -> dict[str, Any]:
        """What the engine's API says about this replica: also that it is local, and where."""
        io = self.io
        return {**super().to_json(), "local": True, "directory": str(self.directory),
                "cold_reads": io.cold_reads if isinstance(io, LocalIO) else None}

    async def connect(self) -> Any:
        """Open the head in-process for this engine's epoch and use it for I/O."""
        if not self.opened:
            raise ConnectionError(f"local replica {self.name} is not open")
        export = "head" if self.epoch is None else head_export_name(self.epoch)
        head = self.service.open_head(export)
        io = LocalIO(head, lambda: self.service.gate.run(self.service.replica.flush))
        old, self.io = self.io, io
        old.abort()
        return io

    async def close(self) -> None:
        """Stop using the head, then stop serving the replica and close its chain."""
        self.disconnect()
        await self.http.aclose()
        await self.service.stop()


__all__ = ["LocalIO", "LocalReplica", "warm_cache"]
