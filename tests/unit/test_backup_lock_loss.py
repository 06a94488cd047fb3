"""Backups, restores and deletions whose store lock is lost stop, fail and publish nothing.

Faults come from FaultyTarget (tests/backuptools.py): lock refreshes made to fail, or a
call held at a gate while the test acts; no test waits for time to pass by sleeping.
"""

import asyncio
import json
import time

import pytest

from backuptools import BS, FaultyTarget, MemorySink, MemorySource, make_target, volume_data
from backuptools import wait_for as wait_until
from drove.backup import BackupStore
from drove.backup.errors import LockError
from drove.backup.manifest import manifest_key

STALE = 2.0
"""stale_after of the stores under test: refresh every 0.4 s, give up after 1.4 s."""


@pytest.fixture(params=["file", "moto"])
def inner(request, tmp_path):
    """An empty target of each quick kind."""
    t = make_target(request.param, request, tmp_path)
    yield t
    t.close()


@pytest.fixture(params=["file", "moto", pytest.param("radosgw", marks=pytest.mark.slow)])
def any_inner(request, tmp_path):
    """An empty target of each kind, real S3 (Ceph radosgw) included."""
    t = make_target(request.param, request, tmp_path)
    yield t
    t.close()


def make_store(target, **kwargs) -> BackupStore:
    """A store that retries locks quickly."""
    kwargs.setdefault("lock_poll", 0.05)
    kwargs.setdefault("lock_wait", 20)
    return BackupStore(target, **kwargs)


async def backup(store, data, name, volume="v1", **kwargs):
    """Back up all of ``data`` as ``name``."""
    source = kwargs.pop("source", None) or MemorySource(data)
    return await store.create(source, volume=volume, size=len(data), snapshot=f"snap-{name}",
                              snapshot_id=f"id-{name}", ranges=[(0, len(data))], name=name,
                              **kwargs)


async def refreshes(target: FaultyTarget, count: int) -> None:
    """Wait until ``count`` lock refreshes have succeeded."""
    await asyncio.to_thread(
        wait_until, lambda: sum(1 for op, key, out in target.calls
                                if op == "replace" and key.startswith("locks/")
                                and out not in ("None", "TargetError")) >= count,
        30, f"{count} lock refreshes")


async def until(predicate, what: str, timeout: float = 30) -> None:
    """Poll ``predicate`` on the event loop until it holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_backup_stops_when_its_lock_cannot_be_kept_fresh(inner):
    data = volume_data("RRRRRR")
    ft = FaultyTarget(inner)

    async def main():
        with make_store(ft, parallel=1, stale_after=STALE) as store:
            source = MemorySource(data)
            source.hold(2 * BS)  # blocks 0 and 1 are stored, then the read of 2 waits
            task = asyncio.create_task(backup(store, data, "a", source=source))
            await source.waiting.wait()
            reads = list(source.reads)
            ft.fail("replace", "locks/", times=10**6, message="injected outage")
            start = time.monotonic()
            with pytest.raises(LockError) as info:
                await asyncio.wait_for(task, 30)
            elapsed = time.monotonic() - start
            source.release.set()
            await asyncio.sleep(0)
            assert source.reads == reads  # the held read was cancelled, nothing read since
            ft.heal()
            return info.value, elapsed, await store.list(), await store.gc()

    error, elapsed, listing, gc = asyncio.run(main())
    assert "could not keep it fresh" in str(error) and "injected outage" in str(error)
    assert "(backup a of v1)" in str(error)
    assert elapsed < STALE  # gave up before anyone may call the lock stale
    assert listing == [] and list(inner.list("volumes/")) == []
    assert gc["blocks_removed"] == 2 and list(inner.list("locks/")) == []


def test_restore_stops_when_its_lock_cannot_be_kept_fresh(inner):
    data = volume_data("RRR")
    ft = FaultyTarget(inner)

    async def main():
        with make_store(ft, parallel=1, stale_after=STALE) as store:
            await backup(store, data, "a")
            sink = MemorySink(len(data))
            gate = ft.gate("get", "blocks/")
            task = asyncio.create_task(store.restore("a", sink))
            await gate.entered_async()  # fetching the first block, which does not come
            ft.fail("replace", "locks/", times=10**6)
            with pytest.raises(LockError, match="could not keep it fresh"):
                await asyncio.wait_for(task, 30)
            gate.open()
            await asyncio.to_thread(gate.left.wait, 30)
            return sink

    sink = asyncio.run(main())
    assert sink.writes == [] and not sink.flushed
    assert list(inner.list("locks/")) == []


def test_delete_stops_before_collecting_when_its_lock_is_lost(inner):
    ft = FaultyTarget(inner)

    async def main():
        with make_store(ft, stale_after=STALE) as store:
            await backup(store, volume_data("RR", seed=1), "a")
            blocks = sorted(inner.list("blocks/"))
            gate = ft.gate("list_sizes", "blocks/")  # the gc's look for unreferenced blocks
            task = asyncio.create_task(store.delete("a"))
            await gate.entered_async()
            ft.fail("replace", "locks/", times=10**6)
            with pytest.raises(LockError, match=r"lost the exclusive lock .* could not keep"):
                await asyncio.wait_for(task, 30)
            gate.open()
            await asyncio.to_thread(gate.left.wait, 30)
            assert sorted(inner.list("blocks/")) == blocks  # nothing deleted after the loss
            assert ft.count("delete_many") == 0
            ft.heal()
            return await store.gc()

    gc = asyncio.run(main())
    assert gc["blocks_removed"] == 2  # the manifest was gone already: a later gc collects
    assert list(inner.list("locks/")) == []


def test_backup_that_lost_its_lock_while_publishing_fails_and_is_taken_back(inner):
    data_a = volume_data("RR", seed=1)
    data_b = data_a[:BS] + volume_data("R", seed=2)  # block 1 is new in b
    ft = FaultyTarget(inner)

    async def main():
        with make_store(ft) as store, make_store(inner, owner="manager-2") as other:
            await backup(store, data_a, "a")
            cfg_a = await store.volume_config("v1")
            gate = ft.gate("put", "volumes/v1/backups/b.cfg")
            task = asyncio.create_task(backup(store, data_b, "b"))
            await gate.entered_async()  # b's blocks are stored, its manifest on its way
            # Seen from another manager, b's lock is stale (as if b had stalled for long):
            # it removes the lock and runs a gc, which cannot see b's manifest yet.
            [key] = list(inner.list("locks/"))
            doc = json.loads(inner.get(key))
            inner.put(key, json.dumps({**doc, "refreshed": time.time() - 1000}).encode())
            gc = await other.gc()
            gate.open()
            with pytest.raises(LockError, match="lock file was removed") as info:
                await asyncio.wait_for(task, 30)
            return (info.value, cfg_a, gc, await store.list(), await store.volume_config("v1"),
                    await store.verify("a"))

    error, cfg_a, gc, listing, cfg, verified = asyncio.run(main())
    assert "(backup b of v1)" in str(error)
    assert gc["blocks_removed"] == 1  # b's new block, which b's manifest named
    assert not inner.exists(manifest_key("v1", "b"))  # never to be trusted: gone
    assert [m["name"] for m in listing] == ["a"] and cfg == cfg_a
    assert verified["errors"] == [] and list(inner.list("locks/")) == []


def test_backup_and_delete_across_refreshes(any_inner):
    data = volume_data("RRRR")
    ft = FaultyTarget(any_inner)

    async def main():
        with make_store(ft, parallel=1, stale_after=STALE) as store:
            source = MemorySource(data)
            source.hold(2 * BS)
            task = asyncio.create_task(backup(store, data, "a", source=source))
            await source.waiting.wait()
            await refreshes(ft, 3)  # the lock outlives several refresh intervals
            source.release.set()
            made = await asyncio.wait_for(task, 30)
            restored = MemorySink(len(data))
            await store.restore("a", restored)
            deleted = await store.delete("a")
            return made, restored, deleted

    made, restored, deleted = asyncio.run(main())
    assert made["blocks_new"] == 4 and restored.data == data
    assert deleted["blocks_removed"] == 4
    assert list(any_inner.list("blocks/")) == [] and list(any_inner.list("locks/")) == []
    # A refresh found its lock file gone only when it raced the release that deleted it.
    for i, (op, key, outcome) in enumerate(ft.calls):
        if op == "replace" and outcome == "None":
            assert ("delete", key, "None") in ft.calls[:i]


def test_lock_lost_while_the_manifest_is_being_put_takes_it_back(inner):
    data = volume_data("RR")
    ft = FaultyTarget(inner)

    async def main():
        with make_store(ft, stale_after=STALE) as store:
            gate = ft.gate("put", "volumes/v1/backups/a.cfg")
            task = asyncio.create_task(backup(store, data, "a"))
            await gate.entered_async()
            ft.fail("replace", "locks/", times=10**6)
            # The watchdog cancels the backup while its manifest put hangs; the put lands
            # once let go, and is then taken back.
            await until(lambda: task.cancelling() > 0, "the lock's watchdog to cancel")
            gate.open()
            with pytest.raises(LockError, match="could not keep it fresh"):
                await asyncio.wait_for(task, 30)
            return await store.list()

    listing = asyncio.run(main())
    assert listing == [] and list(inner.list("volumes/")) == []
    assert list(inner.list("locks/")) == []
