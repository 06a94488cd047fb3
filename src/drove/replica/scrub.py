"""The replica side of a scrub: re-hash a layer, and repair one range of it from a good copy.

A scrub (drove.manager.scrub) compares the replicas' per-range digests of each
snapshot layer; where one replica's range is wrong it asks that replica to
repair it: the replica reads the range from the good replica's ``layer/FILE``
NBD export, checks that both sides still hold what the scrub saw (its own
range's digest and the source's), and rewrites only the 4 KiB blocks that
differ (data, or a hole where the good copy has none).  The writes are a few
page-cache writes on the event loop; the digests and the fdatasync run in
worker threads, so I/O is never held up for long.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from drove.replica.chain import BLOCK, Replica
from drove.replica.errors import InvalidRequestError, RebuildingError

MAX_REPAIR = 16 << 20
"""Largest range one repair call covers."""


def _lowest_priority() -> None:
    """Make the calling thread the last to get a CPU (nice 19, this thread only)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


@functools.cache
def idle_executor() -> ThreadPoolExecutor:
    """One worker thread at the lowest CPU priority: a scrub's hashing gives way to I/O
    (the event loop, flushes, rebuild copies) on a busy machine."""
    return ThreadPoolExecutor(1, thread_name_prefix="drove-scrub", initializer=_lowest_priority)


class RangeChangedError(RebuildingError):
    """The range is no longer what the scrub compared (a purge or a repair ran meanwhile)."""


def _digest(start: int, runs: list[tuple[int, bytes]]) -> str:
    """The range digest of data ``runs`` (the format of Replica.layer_digests)."""
    h = hashlib.blake2b(digest_size=16)
    for off, data in runs:
        h.update(struct.pack("<QQ", off - start, len(data)))
        h.update(data)
    return h.hexdigest()


async def read_source(uri: str, offset: int, length: int) -> list[tuple[int, bytes]]:
    """The data runs (offset, bytes), maximal, of [offset, offset+length) of a layer export."""
    from drove.nbd.client import connect_uri, extents

    client = await connect_uri(uri, request_timeout=30)
    try:
        spans: list[list[int]] = []
        async for pos, n, data in extents(client, offset, offset + length):
            if not data:
                continue
            if spans and spans[-1][0] + spans[-1][1] == pos:
                spans[-1][1] += n
            else:
                spans.append([pos, n])
        return [(pos, bytes(await client.read(pos, n))) for pos, n in spans]
    finally:
        await client.close()


def _own_blocks(replica: Replica, file: str, offset: int, length: int) -> list[Any]:
    """This replica's blocks of the range: BLOCK bytes each, None for a hole."""
    handle = replica.open_layer(file)
    try:
        out: list[Any] = [None] * (length // BLOCK)
        pos = offset
        for n, data in handle.block_status_fd(offset, length, max_extents=1 << 20):
            if data:
                buf = handle.read_fd(pos, n)
                for i in range(0, n, BLOCK):
                    out[(pos + i - offset) // BLOCK] = bytes(buf[i:i + BLOCK])
            pos += n
        return out
    finally:
        handle.close()


def _blocks(runs: list[tuple[int, bytes]], offset: int, length: int) -> list[Any]:
    """``runs`` as one entry per block of the range (BLOCK bytes, or None for a hole)."""
    out: list[Any] = [None] * (length // BLOCK)
    for pos, data in runs:
        for i in range(0, len(data), BLOCK):
            out[(pos + i - offset) // BLOCK] = data[i:i + BLOCK]
    return out


async def repair(replica: Replica, file: str, offset: int, length: int, source: str,
                 expect: str, expect_source: str, recheck: Callable[[], None]) -> dict[str, Any]:
    """Make range [offset, offset+length) of ``file`` equal to the source's; the blocks
    changed and the range's digest afterwards.  ``recheck`` runs right before writing."""
    if length <= 0 or length > MAX_REPAIR or (offset | length) % BLOCK:
        raise InvalidRequestError(f"a repair covers whole {BLOCK}-byte blocks, at most "
                                  f"{MAX_REPAIR} bytes, not {offset}+{length}")
    loop = asyncio.get_running_loop()
    mine = await loop.run_in_executor(None, replica.range_digest, file, offset, length)
    if mine != expect.lower():
        raise RangeChangedError(f"layer {file} at {offset}: this replica's range changed since "
                                "the scrub compared it; scrub again")
    runs = await read_source(source, offset, length)
    if _digest(offset, runs) != expect_source.lower():
        raise RangeChangedError(f"layer {file} at {offset}: the good replica's range changed "
                                "since the scrub compared it; scrub again")
    own = await loop.run_in_executor(None, _own_blocks, replica, file, offset, length)
    good = _blocks(runs, offset, length)
    fix = [(offset + i * BLOCK, g) for i, (o, g) in enumerate(zip(own, good, strict=True))
           if o != g]
    recheck()
    replica.repair_blocks(file, fix)
    await loop.run_in_executor(None, replica.sync_layer, file)
    after = await loop.run_in_executor(None, replica.range_digest, file, offset, length)
    return {"file": file, "offset": offset, "length": length,
            "blocks": [off for off, _ in fix], "digest": after,
            "repaired": after == expect_source.lower()}


__all__ = ["MAX_REPAIR", "RangeChangedError", "idle_executor", "read_source", "repair"]
