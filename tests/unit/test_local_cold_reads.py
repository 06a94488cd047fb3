"""Reads of the engine's local replica that are not in the page cache go to a worker thread."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import tempfile
import time
from pathlib import Path

import pytest

from drove.engine.local import LocalIO, warm_cache
from drove.nbd import eager
from drove.replica.chain import Replica
from drove.replica.process import ReplicaService

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def _cached(fd: int, length: int = 65536) -> bool:
    """Whether any page of the start of ``fd`` is in the page cache, by mincore(2).

    Not by a no-wait read: a RWF_NOWAIT read that misses still starts reading the pages
    in (readahead), so the probe itself would refill the cache it checks: under load the
    read completed before the test's own no-wait read, which then found the data cached.
    """
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        pages = -(-length // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(addr, length, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return any(b & 1 for b in vec.raw)
    finally:
        _libc.munmap(addr, length)


def _drop_cache(directory: Path) -> None:
    """Evict the replica's files from the page cache, until the data they hold is gone from it.

    DONTNEED is advice: a page still under writeback stays, which made this test flaky
    under load. fsync first, and advise again until a no-wait read of a file that holds
    data misses (or a deadline: the test's own asserts then say what went wrong).
    """
    deadline = time.monotonic() + 10
    for f in directory.glob("*.img"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            holds_data = os.lseek(fd, 0, os.SEEK_DATA) == 0 if os.fstat(fd).st_size else False
            while holds_data and _cached(fd) and time.monotonic() < deadline:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # SEEK_DATA finds no data (ENXIO): nothing of it to evict
        finally:
            os.close(fd)


def test_read_cached_refuses_what_the_disk_must_serve(tmp_path: Path) -> None:
    """read_cached: data from the cache, holes at once, EAGAIN for evicted data."""
    r = Replica.create(tmp_path / "r", 16 << 20)
    try:
        data = os.urandom(1 << 20)
        r.write(0, data)
        r.flush()
        assert r.read_cached(4096, 8192) == data[4096:12288]
        _drop_cache(tmp_path / "r")
        with pytest.raises(BlockingIOError):
            r.read_cached(4096, 8192)
        assert r.read_cached(8 << 20, 4096) == bytes(4096)  # a hole never waits
        warm_cache(r.read_sources(4096, 8192))
        assert r.read_cached(4096, 8192) == data[4096:12288]
    finally:
        r.close()


def test_read_sources_follow_the_chain(tmp_path: Path) -> None:
    """One (fd, offset, length) per run held by one layer; holes are left out; fds are dups."""
    r = Replica.create(tmp_path / "r", 16 << 20)
    try:
        r.write(0, b"a" * 16384)
        r.snapshot("s1")
        r.write(4096, b"b" * 4096)
        sources = r.read_sources(0, 65536)
        assert [(off, n) for _, off, n in sources] == [(0, 4096), (4096, 4096), (8192, 8192)]
        files = {os.readlink(f"/proc/self/fd/{fd}") for fd, _, _ in sources}
        assert len(files) == 2  # the snapshot's layer and the head
        warm_cache(sources)
        for fd, _, _ in sources:
            with pytest.raises(OSError):
                os.fstat(fd)  # warm_cache closed its duplicates
    finally:
        r.close()


def test_local_io_reads_evicted_data_through_a_thread(tmp_path: Path) -> None:
    """LocalIO's submit and coroutine reads serve evicted data right, counted as cold."""
    async def main() -> None:
        service = ReplicaService(tmp_path / "r", 16 << 20, nbd=None, unix=None,
                                 control=("127.0.0.1", 0))
        await service.start()
        try:
            io = LocalIO(service.open_head("head"),
                         lambda: service.gate.run(service.replica.flush))
            data = os.urandom(65536)
            await io.write(0, memoryview(data), fua=True)
            _drop_cache(tmp_path / "r")
            loop = asyncio.get_running_loop()
            got: asyncio.Future = loop.create_future()
            io.submit(eager.READ, 0, 8192, None, False,
                      lambda v, e: got.set_exception(e) if e else got.set_result(v))
            assert not got.done()  # it waits for the thread, not the loop
            assert bytes(await got) == data[:8192]
            _drop_cache(tmp_path / "r")
            assert bytes(await io.read(8192, 4096)) == data[8192:12288]
            assert io.cold_reads == 2
            assert bytes(await io.read(8192, 4096)) == data[8192:12288]  # warm now: inline
            assert io.cold_reads == 2
        finally:
            await service.stop()

    asyncio.run(main())


def test_a_filesystem_without_nowait_reads_is_read_inline(tmp_path: Path) -> None:
    """On tmpfs (no RWF_NOWAIT reads) the first read finds out; none goes to a thread."""
    async def main(directory: Path) -> None:
        service = ReplicaService(directory, 1 << 20, nbd=None, unix=None,
                                 control=("127.0.0.1", 0))
        await service.start()
        try:
            io = LocalIO(service.open_head("head"),
                         lambda: service.gate.run(service.replica.flush))
            await io.write(0, memoryview(b"t" * 8192))
            try:
                service.replica.read_cached(0, 4096)
                supported = True
            except BlockingIOError:
                supported = False
            assert bytes(await io.read(0, 8192)) == b"t" * 8192
            assert io.nowait is supported
            assert io.cold_reads == 0
        finally:
            await service.stop()

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        asyncio.run(main(Path(shm) / "r"))
