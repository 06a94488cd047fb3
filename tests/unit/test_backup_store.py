"""Backups, restores, verification, deletion and gc of the backup store."""

import asyncio
import json
import threading
import time

import pytest

from backuptools import BS, MemorySink, MemorySource, volume_data
from drove.backup import BackupStore, blocks
from drove.backup.errors import (
    BackupError,
    CorruptBlockError,
    LockError,
    MissingBlockError,
    NotFoundError,
    TargetError,
)
from drove.backup.filetarget import FileTarget


@pytest.fixture(params=["file", "s3"])
def target(request, tmp_path):
    """An empty target of each kind."""
    t = FileTarget(tmp_path) if request.param == "file" else request.getfixturevalue(
        "moto").target()
    yield t
    t.close()


@pytest.fixture
def file_target(tmp_path):
    """An empty file target (for tests that need no S3 run)."""
    return FileTarget(tmp_path)


def make_store(target, **kwargs) -> BackupStore:
    """A store that retries locks quickly."""
    kwargs.setdefault("lock_poll", 0.05)
    kwargs.setdefault("lock_wait", 20)
    return BackupStore(target, **kwargs)


def run(coro):
    """Run ``coro`` on a fresh event loop."""
    return asyncio.run(coro)


async def backup(store, data, name, volume="v1", ranges=None, **kwargs):
    """Back up ``data`` (all of it unless ``ranges``) as ``name``."""
    source = kwargs.pop("source", None) or MemorySource(data)
    if ranges is None:
        ranges = [(0, len(data))]
    return await store.create(source, volume=volume, size=len(data), snapshot=f"snap-{name}",
                              snapshot_id=f"id-{name}", ranges=ranges, name=name, **kwargs)


async def restored(store, name, size):
    """The bytes and sink of restoring ``name``."""
    sink = MemorySink(size)
    stats = await store.restore(name, sink)
    assert sink.flushed
    return sink, stats


def stored_hashes(target) -> set[str]:
    """Hashes of the blocks on the target."""
    return {k.rsplit("/", 1)[1].removesuffix(".blk") for k in target.list("blocks/")}


def test_full_backup_and_restore_keep_holes(target):
    data = volume_data("RZTHZS", tail=12345)  # the last block is short
    size = len(data)
    progress = []

    async def main():
        with make_store(target) as store:
            m = await backup(store, data, "full", labels={"k": "v"}, progress=lambda d, t:
                             progress.append((d, t)))
            sink, stats = await restored(store, "full", size)
            return m, await store.manifest("full"), sink, stats, await store.volume_config("v1")

    m, full, sink, stats, cfg = run(main())
    assert sink.data == data
    assert "blocks" not in m and full["blocks"]
    assert set(full["blocks"]) == {str(o * BS) for o in (0, 2, 3, 5, 6)}
    assert m["format"] == "drove-backup/1" and m["name"] == "full" and m["volume"] == "v1"
    assert (m["snapshot"], m["snapshot_id"], m["size"], m["block_size"]) == (
        "snap-full", "id-full", size, BS)
    assert m["labels"] == {"k": "v"} and m["compression"] == "zstd" and m["parent"] is None
    assert m["created"].endswith("Z")
    assert m["bytes_read"] == size and m["blocks_new"] == 5 and m["blocks_reused"] == 0
    assert m["bytes_new"] == 4 * BS + 12345 and m["data_size"] == m["bytes_new"]
    assert m["bytes_stored"] < m["bytes_new"]  # text and half-zero blocks compress
    assert m["bytes_reused"] == 0
    assert stats == {"bytes_written": sink_bytes(sink), "blocks": 5, "size": size}
    # Zero blocks, and zero pages inside blocks, were never written.
    assert not sink.touched(BS, BS) and not sink.touched(4 * BS, BS)
    assert not sink.touched(3 * BS + 4096, 4096) and not sink.touched(5 * BS + BS // 2, BS // 2)
    assert progress[-1] == (size, size) and len(progress) == 7
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert cfg["name"] == "v1" and cfg["last_backup"] == "full" and cfg["size"] == size
    assert (cfg["last_snapshot"], cfg["last_snapshot_id"]) == ("snap-full", "id-full")
    assert len(stored_hashes(target)) == 5
    assert list(target.list("locks/")) == []


def sink_bytes(sink: MemorySink) -> int:
    """Bytes the sink was sent."""
    return sum(n for _, n in sink.writes)


@pytest.mark.parametrize("codec", ["lz4", "none"])
def test_other_codecs(file_target, codec):
    data = volume_data("TR")

    async def main():
        with make_store(file_target) as store:
            m = await backup(store, data, "b", compression=codec)
            return m, (await restored(store, "b", len(data)))[0]

    m, sink = run(main())
    assert sink.data == data and m["compression"] == codec
    assert (m["bytes_stored"] < m["bytes_new"]) == (codec == "lz4")


def test_incremental_reads_only_the_ranges(target):
    old = volume_data("RRTZR")
    new = bytearray(old)
    new[2 * BS + 100:2 * BS + 200] = b"x" * 100  # changes block 2
    new[3 * BS + BS - 1] = 7  # makes block 3 data
    ranges = [(2 * BS + 100, 100), (3 * BS + BS - 1, 1)]

    async def main():
        with make_store(target) as store:
            await backup(store, old, "full")
            source = MemorySource(new)
            m = await backup(store, new, "incr", ranges=ranges, base="full", source=source)
            full, incr = await store.manifest("full"), await store.manifest("incr")
            sink, _ = await restored(store, "incr", len(new))
            return source, m, full, incr, sink, await store.list()

    source, m, full, incr, sink, listing = run(main())
    assert source.reads == [(2 * BS, BS), (3 * BS, BS)] and source.bytes_read == 2 * BS
    assert sink.data == new
    assert m["parent"] == "full" and m["bytes_read"] == 2 * BS
    assert m["blocks_new"] == 2 and m["blocks_reused"] == 3 and m["bytes_reused"] == 3 * BS
    for o in ("0", str(BS), str(4 * BS)):
        assert incr["blocks"][o] == full["blocks"][o]
    assert incr["blocks"][str(2 * BS)] != full["blocks"][str(2 * BS)]
    assert str(3 * BS) in incr["blocks"] and str(3 * BS) not in full["blocks"]
    assert [b["name"] for b in listing] == ["incr", "full"]


def test_incremental_turning_a_block_to_zero(file_target):
    old = volume_data("RR")
    new = volume_data("RZ")

    async def main():
        with make_store(file_target) as store:
            await backup(store, old, "full")
            await backup(store, new, "incr", ranges=[(BS, BS)], base="full")
            return await store.manifest("incr"), (await restored(store, "incr", len(new)))[0]

    incr, sink = run(main())
    assert list(incr["blocks"]) == ["0"] and sink.data == new


def test_incremental_after_resize_rereads_the_old_last_block(file_target):
    old = volume_data("R", tail=5000)
    new = bytes(old) + bytes(BS)  # grown by 2 MiB of zeros

    async def main():
        with make_store(file_target) as store:
            await backup(store, old, "full")
            source = MemorySource(new)
            await backup(store, new, "grown", ranges=[], base="full", source=source)
            return source, (await restored(store, "grown", len(new)))[0]

    source, sink = run(main())
    assert source.reads == [(BS, BS)]
    assert sink.data == new


def test_bad_base(file_target):
    data = volume_data("R")

    async def main():
        with make_store(file_target) as store:
            await backup(store, data, "full", volume="v1")
            with pytest.raises(NotFoundError, match="backup 'nope' does not exist"):
                await backup(store, data, "i1", base="nope")
            with pytest.raises(ValueError, match="base backup 'full' is of volume 'v1'"):
                await backup(store, data, "i2", volume="v2", base="full")
            with pytest.raises(BackupError, match="'full' already exists"):
                await backup(store, data, "full")
            return await store.list()

    assert [b["name"] for b in run(main())] == ["full"]
    assert list(file_target.list("locks/")) == []


@pytest.mark.parametrize("kwargs", [
    {"volume": "Bad"}, {"name": "-x"}, {"name": "x" * 64}, {"compression": "gzip"},
    {"ranges": [(0, 3 * BS)]}, {"ranges": [(-1, 1)]}, {"labels": {"a": 1}},
])
def test_bad_arguments(file_target, kwargs):
    data = volume_data("RZ")
    args = {"volume": "v", "size": len(data), "snapshot": "s", "ranges": [(0, len(data))],
            **kwargs}

    async def main():
        with make_store(file_target) as store:
            await store.create(MemorySource(data), **args)

    with pytest.raises(ValueError):
        run(main())


def test_default_name_and_queries(file_target):
    data = volume_data("R")

    async def main():
        with make_store(file_target) as store:
            m = await store.create(MemorySource(data), volume="v", size=len(data),
                                   snapshot="s", ranges=[(0, len(data))])
            with pytest.raises(NotFoundError):
                await store.info("nope")
            with pytest.raises(ValueError):
                await store.info("../x")
            return m, await store.info(m["name"]), await store.volume_config("w")

    m, info, cfg = run(main())
    assert m["name"].startswith("backup-") and len(m["name"]) == 7 + 16
    assert info == m and cfg is None


def test_dedup_across_volumes(target):
    data = volume_data("RTRZ")

    async def main():
        with make_store(target) as store:
            first = await backup(store, data, "a", volume="v1")
            second = await backup(store, data, "b", volume="v2")
            return first, second, await store.list("v2")

    first, second, v2 = run(main())
    assert first["blocks_new"] == 3
    assert second["bytes_new"] == 0 and second["blocks_new"] == 0
    assert second["blocks_reused"] == 3 and second["bytes_reused"] == 3 * BS
    assert len(list(target.list("blocks/"))) == 3
    assert [b["name"] for b in v2] == ["b"]


class CountingTarget(FileTarget):
    """A file target that counts puts of blocks (and is slow, to overlap them)."""

    def __init__(self, path):
        super().__init__(path)
        self.block_puts = 0

    def put(self, key, data):
        if key.startswith("blocks/"):
            self.block_puts += 1
            time.sleep(0.02)
        super().put(key, data)


def test_identical_blocks_in_one_backup_are_put_once(tmp_path):
    target = CountingTarget(tmp_path)
    data = volume_data("R") * 6 + volume_data("T") * 2

    async def main():
        with make_store(target, parallel=4) as store:
            m = await backup(store, data, "a")
            return m, (await restored(store, "a", len(data)))[0]

    m, sink = run(main())
    assert target.block_puts == 2 and m["blocks_new"] == 2 and m["blocks_reused"] == 6
    assert sink.data == data


def test_delete_all_but_one(target):
    v1 = volume_data("RRT", seed=1)
    v1b = bytearray(v1)
    v1b[:10] = b"0123456789"
    v2 = volume_data("RTZ", seed=2)

    async def main():
        with make_store(target) as store:
            await backup(store, v1, "a1", volume="v1")
            await backup(store, v1b, "a2", volume="v1", ranges=[(0, 10)], base="a1")
            await backup(store, v2, "b1", volume="v2")
            await backup(store, v2, "b2", volume="v2")
            d = await store.delete("a2")
            cfg1 = await store.volume_config("v1")
            await store.delete("a1")
            await store.delete("b2")
            cfg2 = await store.volume_config("v2")
            remaining = await store.manifest("b1")
            sink, _ = await restored(store, "b1", len(v2))
            return (d, cfg1, await store.volume_config("v1"), cfg2, remaining, sink,
                    await store.list())

    d, cfg1, cfg1_after, cfg2, remaining, sink, listing = run(main())
    assert d == {"name": "a2", "blocks_removed": 1, "bytes_removed": d["bytes_removed"]}
    assert d["bytes_removed"] > BS  # random data is stored raw, with a header
    assert cfg1["last_backup"] == "a1" and cfg1["last_snapshot"] == "snap-a1"
    assert cfg1["last_snapshot_id"] == "id-a1"
    assert cfg1_after is None
    assert cfg2["last_backup"] == "b1"
    assert stored_hashes(target) == set(remaining["blocks"].values())
    assert sink.data == v2
    assert [b["name"] for b in listing] == ["b1"]
    assert list(target.list("locks/")) == []


def test_delete_racing_a_backup(target):
    data = volume_data("RRTRRTRR")
    size = len(data)

    async def main():
        with make_store(target, parallel=2) as store:
            await backup(store, data, "a", volume="v1")
            source = MemorySource(data)
            source.hold(4 * BS)  # blocks 0-3 are read and found on the target first
            b_task = asyncio.create_task(backup(store, data, "b", volume="v2", source=source))
            await asyncio.wait_for(source.waiting.wait(), 10)
            waits: list[str] = []
            d_task = asyncio.create_task(store.delete("a", on_wait=waits.append))
            for _ in range(500):
                if waits:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert not d_task.done() and not b_task.done()
            source.release.set()
            b = await b_task
            d = await d_task
            return waits, b, d, await store.manifest("b"), (await restored(store, "b", size))[0]

    waits, b, d, manifest, sink = run(main())
    assert waits and "shared lock of drove@" in waits[0] and "(backup b of v2)" in waits[0]
    assert b["bytes_new"] == 0 and b["blocks_reused"] == 8
    assert d["blocks_removed"] == 0
    assert sink.data == data
    assert stored_hashes(target) == set(manifest["blocks"].values())


def test_failed_backup_leaves_no_manifest(target):
    data = volume_data("RRTR")

    async def main():
        with make_store(target, parallel=1) as store:  # one at a time: blocks 0, 1 get put
            source = MemorySource(data)
            source.fail_from = 2 * BS
            with pytest.raises(OSError, match="simulated read error"):
                await backup(store, data, "a", source=source)
            listing = await store.list()
            gc = await store.gc()
            return listing, gc

    listing, gc = run(main())
    assert listing == []
    assert list(target.list("locks/")) == [] and list(target.list("volumes/")) == []
    assert gc["blocks_removed"] == 2 and list(target.list("blocks/")) == []


def test_cancelled_backup_stops_promptly_and_unlocks(target):
    data = volume_data("RRRRRR")

    async def main():
        with make_store(target, parallel=1) as store:  # blocks 0-2 are put before the hold
            source = MemorySource(data)
            source.hold(3 * BS)
            task = asyncio.create_task(backup(store, data, "a", source=source))
            await asyncio.wait_for(source.waiting.wait(), 10)
            start = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            elapsed = time.monotonic() - start
            assert list(target.list("locks/")) == []
            return elapsed, await store.list(), await store.gc()

    elapsed, listing, gc = run(main())
    assert elapsed < 2
    assert listing == [] and list(target.list("volumes/")) == []
    assert gc["blocks_removed"] == 3 and list(target.list("blocks/")) == []


def test_stale_lock_is_ignored(file_target):
    data = volume_data("R")
    file_target.put("locks/dead.json", json.dumps({
        "kind": "exclusive", "owner": "dead@host pid 1 (delete x)",
        "created": "2020-01-01T00:00:00+00:00", "refreshed": time.time() - 10_000}).encode())

    async def main():
        with make_store(file_target, lock_wait=0) as store:
            await backup(store, data, "a")
            assert file_target.exists("locks/dead.json")
            await store.gc()  # an exclusive acquirer removes stale locks

    run(main())
    assert list(file_target.list("locks/")) == []


def test_live_lock_of_another_manager_times_out(file_target):
    data = volume_data("R")
    file_target.put("locks/live.json", json.dumps({
        "kind": "exclusive", "owner": "manager@other pid 7 (delete x)",
        "created": "2024-01-01T00:00:00+00:00", "refreshed": time.time()}).encode())
    waits = []

    async def main():
        with make_store(file_target, lock_wait=0.3) as store:
            await backup(store, data, "a", on_wait=waits.append)

    with pytest.raises(LockError, match=r"exclusive lock of manager@other pid 7 \(delete x\)"):
        run(main())
    assert waits and waits[0].startswith("waiting: ")
    assert list(file_target.list("locks/")) == ["locks/live.json"]


def flip_byte(target, h: str, pos: int = -1) -> None:
    """Damage the stored block ``h``."""
    key = blocks.block_key(h)
    raw = bytearray(target.get(key))
    raw[pos] ^= 0x55
    target.put(key, bytes(raw))


def test_corrupt_and_missing_blocks(target):
    data = volume_data("RTRR")

    async def main():
        with make_store(target) as store:
            await backup(store, data, "a")
            ok = await store.verify("a")
            manifest = await store.manifest("a")
            h1, h2 = manifest["blocks"][str(BS)], manifest["blocks"][str(3 * BS)]
            flip_byte(target, h1, -10)
            target.delete(blocks.block_key(h2))
            report = await store.verify("a")
            with pytest.raises(CorruptBlockError) as info:
                await store.restore("a", MemorySink(len(data)))
            return ok, h1, h2, report, info.value

    ok, h1, h2, report, error = run(main())
    assert ok == {"name": "a", "blocks": 4, "bytes": 4 * BS, "errors": []}
    assert [(e["offset"], e["hash"]) for e in report["errors"]] == [(BS, h1), (3 * BS, h2)]
    assert f"block {h1} at offset {BS} (2 MiB) is corrupt" in report["errors"][0]["error"]
    assert "is missing from the target" in report["errors"][1]["error"]
    assert (error.hash, error.offset) in [(h1, BS), (h2, 3 * BS)]
    assert error.hash in str(error) and str(error.offset) in str(error)
    assert list(target.list("locks/")) == []


def test_missing_block_on_restore(file_target):
    data = volume_data("RR")

    async def main():
        with make_store(file_target) as store:
            await backup(store, data, "a")
            h = (await store.manifest("a"))["blocks"][str(BS)]
            file_target.delete(blocks.block_key(h))
            with pytest.raises(MissingBlockError) as info:
                await store.restore("a", MemorySink(len(data)))
            return h, info.value

    h, error = run(main())
    assert (error.hash, error.offset) == (h, BS)
    assert str(error) == f"block {h} at offset {BS} (2 MiB) is missing from the target"


def test_shared_block_reported_at_every_offset(file_target):
    data = volume_data("R") * 3

    async def main():
        with make_store(file_target) as store:
            await backup(store, data, "a")
            h = (await store.manifest("a"))["blocks"]["0"]
            flip_byte(file_target, h)
            return h, await store.verify("a")

    h, report = run(main())
    assert [(e["offset"], e["hash"]) for e in report["errors"]] == [
        (0, h), (BS, h), (2 * BS, h)]


def test_unparsable_manifest_stops_gc(target):
    data = volume_data("RT")

    async def main():
        with make_store(target) as store:
            await backup(store, data, "a")
            before = stored_hashes(target)
            target.put("volumes/v1/backups/broken.cfg", b"{oops")
            # A block only the broken manifest might reference must survive.
            target.put(blocks.block_key("f" * 64), blocks.encode(b"x", "none"))
            with pytest.raises(BackupError, match=r"manifest volumes/v1/backups/broken.cfg is "
                                                  r"not valid JSON"):
                await store.gc()
            assert stored_hashes(target) == before | {"f" * 64}
            report = await store.verify("broken")
            with pytest.raises(BackupError, match="not valid JSON"):
                await store.info("broken")
            await store.delete("broken")  # deleting the broken manifest lets gc run again
            return before, report

    before, report = run(main())
    assert report["blocks"] == 0 and "not valid JSON" in report["errors"][0]["error"]
    assert stored_hashes(target) == before
    assert list(target.list("locks/")) == []


def test_gc_removes_old_temp_files(file_target, tmp_path):
    import os

    async def main():
        with make_store(file_target) as store:
            await backup(store, volume_data("R"), "a")
            tmp = tmp_path / "blocks" / "ab" / "cd"
            tmp.mkdir(parents=True)
            old = tmp / ("ab" * 32 + ".blk.tmp-0123456789ab")
            old.write_bytes(b"partial")
            os.utime(old, (time.time() - 7200, time.time() - 7200))
            gc = await store.gc()
            return old, gc

    old, gc = run(main())
    assert not old.exists() and gc["temp_files_removed"] == 1 and gc["blocks_removed"] == 0


def test_backup_that_lost_its_lock_publishes_nothing(file_target):
    data = volume_data("RRR")

    async def main():
        with make_store(file_target, parallel=1) as store:
            source = MemorySource(data)
            source.hold(2 * BS)
            task = asyncio.create_task(backup(store, data, "a", source=source))
            await asyncio.wait_for(source.waiting.wait(), 10)
            # As if we had stalled past the stale time and a gc had removed our lock.
            [lock] = file_target.list("locks/")
            file_target.delete(lock)
            source.release.set()
            with pytest.raises(LockError, match="lost the shared lock"):
                await task
            return await store.list()

    assert run(main()) == []
    assert list(file_target.list("locks/")) == []


def test_cancel_with_work_in_flight(target):
    data = volume_data("RTRTRTRT")

    async def main():
        with make_store(target, parallel=4) as store:
            source = MemorySource(data)
            source.hold(5 * BS)
            task = asyncio.create_task(backup(store, data, "a", source=source))
            await asyncio.wait_for(source.waiting.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert list(target.list("locks/")) == []
            listing = await store.list()
        # The pool is shut down: any upload cut off by the cancel has ended; gc takes all.
        with make_store(target) as store:
            await store.gc()
        return listing

    assert run(main()) == []
    assert list(target.list("blocks/")) == [] and list(target.list("volumes/")) == []


class SlowManifestTarget(FileTarget):
    """A file target whose manifest puts take a while (and say when they start)."""

    def __init__(self, path):
        super().__init__(path)
        self.publishing = threading.Event()

    def put(self, key, data):
        if "/backups/" in key:
            self.publishing.set()
            time.sleep(0.3)
        super().put(key, data)


def test_cancel_while_publishing_takes_the_manifest_back(tmp_path):
    target = SlowManifestTarget(tmp_path)
    data = volume_data("RT")

    async def main():
        with make_store(target) as store:
            task = asyncio.create_task(backup(store, data, "a"))
            while not target.publishing.is_set():
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await store.list(), await store.volume_config("v1")

    assert run(main()) == ([], None)
    assert list(target.list("volumes/")) == [] and list(target.list("locks/")) == []


class LockStealingTarget(FileTarget):
    """A file target where every lock file vanishes once gc has listed the blocks."""

    def list_sizes(self, prefix):
        yield from super().list_sizes(prefix)
        for key in list(self.list("locks/")):
            self.delete(key)


def test_gc_that_lost_its_lock_deletes_nothing(tmp_path):
    target = LockStealingTarget(tmp_path)

    async def main():
        with make_store(target) as store:
            await backup(store, volume_data("RR"), "a")
            target.put(blocks.block_key("e" * 64), blocks.encode(b"orphan", "none"))
            with pytest.raises(LockError, match="lost the exclusive lock"):
                await store.gc()

    run(main())
    assert target.exists(blocks.block_key("e" * 64))


class NoVolumeConfigTarget(FileTarget):
    """A file target that refuses to write volume.cfg."""

    def put(self, key, data):
        if key.endswith("/volume.cfg"):
            raise TargetError("simulated write error")
        super().put(key, data)


def test_failed_publish_leaves_no_manifest(tmp_path):
    target = NoVolumeConfigTarget(tmp_path)

    async def main():
        with make_store(target) as store:
            with pytest.raises(TargetError, match="simulated"):
                await backup(store, volume_data("R"), "a")
            return await store.list()

    assert run(main()) == []
    assert list(target.list("volumes/")) == []
