"""The engine's growable view for host attach, over an in-memory export."""

from __future__ import annotations

import asyncio
import errno

import pytest

from drove.engine.hostview import VIEW_SIZE, GrowableView, view_name
from drove.nbd import eager
from drove.nbd.memory import MemoryExport
from drove.nbd.proto import NBD_STATE_HOLE, NBD_STATE_ZERO

KiB = 1024


def run(coro):
    return asyncio.run(coro)


def submitted(view: GrowableView, cmd: int, offset: int, length: int, data=None):
    """(value, error) of one callback-style call."""
    out = []

    async def go():
        view.submit(cmd, offset, length, data, False, lambda v, e: out.append((v, e)))
        while not out:
            await asyncio.sleep(0)
    asyncio.run(go())
    return out[0]


def test_advertised_large_serving_only_the_volume():
    inner = MemoryExport(64 * KiB, name="vol")
    view = GrowableView(inner)
    assert view.size == VIEW_SIZE and view.name == view_name("vol") == "vol:host"
    run(view.write(60 * KiB, memoryview(b"x" * 4 * KiB)))
    assert bytes(run(view.read(60 * KiB, 8 * KiB))) == b"x" * 4 * KiB + bytes(4 * KiB)
    assert bytes(run(view.read(VIEW_SIZE - 4 * KiB, 4 * KiB))) == bytes(4 * KiB)
    with pytest.raises(OSError) as err:
        run(view.write(62 * KiB, memoryview(b"y" * 4 * KiB)))
    assert err.value.errno == errno.ENOSPC
    assert bytes(inner.data[60 * KiB:]) == b"x" * 4 * KiB  # nothing of the refused write


def test_it_follows_the_volume_as_it_grows():
    inner = MemoryExport(64 * KiB, name="vol")
    view = GrowableView(inner)
    inner.data.extend(bytes(64 * KiB))  # the volume grew
    inner.allocated.extend(bytes(16))
    run(view.write(100 * KiB, memoryview(b"z" * 4 * KiB)))
    assert bytes(run(view.read(100 * KiB, 4 * KiB))) == b"z" * 4 * KiB


def test_zero_trim_cache_and_block_status_are_clipped():
    inner = MemoryExport(64 * KiB, name="vol")
    view = GrowableView(inner)
    run(view.write(0, memoryview(b"d" * 64 * KiB)))
    run(view.zero(60 * KiB, 64 * KiB))  # past the end: only the part within
    run(view.trim(VIEW_SIZE - 4 * KiB, 4 * KiB))
    run(view.cache(0, VIEW_SIZE))
    assert bytes(inner.data[56 * KiB:]) == b"d" * 4 * KiB + bytes(4 * KiB)
    past = run(view.block_status(128 * KiB, 4 * KiB))
    assert [(e.length, e.flags) for e in past] == [(4 * KiB, NBD_STATE_HOLE | NBD_STATE_ZERO)]
    within = run(view.block_status(0, 128 * KiB))
    assert sum(e.length for e in within) <= 64 * KiB


def test_the_callback_path_is_bounded_too():
    inner = MemoryExport(64 * KiB, name="vol")
    view = GrowableView(inner)
    value, error = submitted(view, eager.WRITE, 0, 4 * KiB, memoryview(b"w" * 4 * KiB))
    assert error is None
    value, error = submitted(view, eager.READ, 62 * KiB, 4 * KiB)
    assert error is None and bytes(value) == bytes(2 * KiB) + bytes(2 * KiB)
    value, error = submitted(view, eager.WRITE, 64 * KiB, 4 * KiB, memoryview(bytes(4 * KiB)))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    value, error = submitted(view, eager.FLUSH, 0, 0)
    assert error is None
