"""A replica chain over a backup (drove.replica.backing), with a real directory target.

Each test backs an in-memory image up with the real block store, installs the backup
under a fresh replica's head, and checks the chain against the image (the oracle):
reads fetch, writes stay above, zero/trim/block status treat unfilled backup blocks
as data, a bad block fails only its own reads, the fill makes it an ordinary layer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import random
from pathlib import Path

import pytest

from drove.backup import BackupStore, FileTarget
from drove.backup.blocks import BLOCK_SIZE, block_key, encode
from drove.replica import backing as bk
from drove.replica.chain import Replica
from drove.replica.clone import CloneError, make_clone
from drove.replica.errors import RebuildingError, ReplicaError

MiB = 1 << 20
SIZE = 16 * MiB
DATA = [(0, 700_000), (3 * MiB + 5000, 1_500_000), (9 * MiB, 2 * MiB), (SIZE - 300_000, 300_000)]


class _Image:
    """The block store's Source over a bytearray."""

    def __init__(self, img: bytearray) -> None:
        self.img = img

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self.img[offset:offset + length])


@pytest.fixture
def backed(tmp_path: Path):
    """(replica with backup "b1" installed, the image, target dir); the replica is closed after."""
    rnd = random.Random(7)
    img = bytearray(SIZE)
    for off, n in DATA:
        img[off:off + n] = rnd.randbytes(n)
    tdir = tmp_path / "target"
    tdir.mkdir()

    async def make() -> None:
        with BackupStore(FileTarget(str(tdir))) as store:
            await store.create(_Image(img), volume="v", size=SIZE, snapshot="s",
                               ranges=[(0, SIZE)], name="b1")

    asyncio.run(make())
    cfg = {"url": f"file://{tdir}"}
    size, blocks = bk.read_manifest(cfg, "b1")
    r = Replica.create(tmp_path / "rep", SIZE)
    r.install_backing("b1", "b1", cfg, size, blocks)
    yield r, img, tdir
    r.close()


def _fill(r: Replica) -> None:
    """Run the background fill to its end."""
    async def go() -> None:
        done = asyncio.Event()

        def finish() -> None:
            r.finish_backing()
            done.set()

        r.backing.start_fill(finish)
        await asyncio.wait_for(done.wait(), 60)

    asyncio.run(go())


def test_reads_fetch_writes_stay_above(backed):
    r, img, _ = backed
    assert r.read(SIZE - MiB, MiB) == img[SIZE - MiB:]
    assert r.backing.status()["filled"] == 1
    # A partial 4 KiB write over backup data: the rest of the block comes from the backup.
    r.write(3 * MiB + 5003, b"abc")
    img[3 * MiB + 5003:3 * MiB + 5006] = b"abc"
    # Zero over unfilled backup data really hides it (no punch showing it through); a trim
    # drops only the head's copy of whole blocks (the backup's data shows again) and zeroes
    # the partly covered ones.
    r.zero(9 * MiB, MiB)
    img[9 * MiB:10 * MiB] = bytes(MiB)
    r.trim(8, 4096 * 3)
    img[8:4096] = bytes(4096 - 8)
    img[3 * 4096:3 * 4096 + 8] = bytes(8)
    assert r.read(0, SIZE) == img
    _fill(r)
    assert r.backing is None
    assert r.read(0, SIZE) == img
    # Reopened: an ordinary chain with the same data.
    d = r.dir
    r.close()
    r2 = Replica.open(d)
    try:
        assert r2.backing is None and r2.read(0, SIZE) == img
        assert not (d / bk.BACKING_FILE).exists()
    finally:
        r2.close()


def test_block_status_counts_unfilled_backup_blocks_as_data(backed):
    r, _, _ = backed
    status = r.block_status(0, SIZE)
    data = [(pos, n) for pos, (n, alloc) in zip(
        [sum(x for x, _ in status[:i]) for i in range(len(status))], status, strict=True)
        if alloc]
    # Every 2 MiB block the backup holds is data; nothing was fetched for it.
    held = sorted({off // BLOCK_SIZE for o, n in DATA for off in range(o, o + n, 4096)})
    assert sum(n for _, n in data) == len(held) * BLOCK_SIZE
    assert r.backing.status()["filled"] == 0


def test_snapshots_and_revert_over_the_backing_layer(backed):
    r, img, _ = backed
    r.write(0, b"x" * 4096)
    r.snapshot("s1")
    r.write(0, b"y" * 4096)
    view = r.view("s1")
    expect = bytearray(img)
    expect[:4096] = b"x" * 4096
    assert view.read(0, SIZE) == expect
    r.revert("b1")
    assert r.read(0, SIZE) == img
    with pytest.raises(RebuildingError):
        r.delete_snapshot("b1")
    with pytest.raises(RebuildingError):
        r.checksum("b1")


def test_bad_block_fails_its_reads_only(backed):
    r, img, tdir = backed
    h = r.backing.cfg.blocks[(9 * MiB) // BLOCK_SIZE * BLOCK_SIZE]
    path = tdir / block_key(h)
    good = path.read_bytes()
    path.write_bytes(encode(b"\1" * BLOCK_SIZE, "none"))
    with pytest.raises(OSError) as exc:
        r.read(9 * MiB + 4096, 4096)
    assert exc.value.errno == errno.EIO and bk.is_unavailable(exc.value)
    assert "checksum mismatch" in str(exc.value)
    assert r.read(0, 8 * MiB) == img[:8 * MiB]
    assert r.read(10 * MiB, SIZE - 10 * MiB) == img[10 * MiB:]
    # A write that covers whole 4 KiB blocks needs nothing from the backup.
    r.write(9 * MiB, b"z" * 8192)
    assert r.read(9 * MiB, 8192) == b"z" * 8192
    assert r.backing.status()["errors"][0]["offset"] == 8 * MiB
    path.unlink()
    with pytest.raises(OSError, match="missing"):
        r.read(9 * MiB + 16384, 4096)
    path.write_bytes(good)
    img[9 * MiB:9 * MiB + 8192] = b"z" * 8192
    _fill(r)
    assert r.read(0, SIZE) == img


def test_filled_blocks_persist_and_a_lost_bitmap_fetches_again(backed):
    r, img, _ = backed
    r.read(0, SIZE)
    d = r.dir
    r.close()
    r2 = Replica.open(d)
    try:
        assert r2.backing.done  # persisted at close
    finally:
        r2.close()
    (d / bk.FILLED_FILE).unlink()  # as if the crash came before the bitmap's rename
    r3 = Replica.open(d)
    try:
        assert r3.backing.status()["filled"] == 0
        assert r3.read(0, SIZE) == img
    finally:
        r3.close()


def test_only_a_fresh_empty_replica_takes_a_backup(tmp_path, backed):
    r, _, tdir = backed
    cfg = {"url": f"file://{tdir}"}
    size, blocks = bk.read_manifest(cfg, "b1")
    other = Replica.create(tmp_path / "other", SIZE)
    try:
        other.write(0, b"d" * 4096)
        with pytest.raises(ValueError, match="holds data"):
            other.install_backing("b1", "b1", cfg, size, blocks)
        assert [la.file for la in other.layers()] == ["volume-head-001.img"]
        assert not (other.dir / bk.BACKING_FILE).exists()
    finally:
        other.close()
    with pytest.raises(ValueError, match="fresh"):
        r.install_backing("b2", "b1", cfg, size, blocks)


def test_backing_file_is_private_and_a_stray_one_is_removed(tmp_path, backed):
    r, _, _ = backed
    d = r.dir
    assert (d / bk.BACKING_FILE).stat().st_mode & 0o777 == 0o600
    r.close()
    # A backing file naming a layer the chain does not list (an install that never
    # committed) is removed at open; a corrupt one is refused.
    other = Replica.create(tmp_path / "o2", SIZE)
    other.close()
    (tmp_path / "o2" / bk.BACKING_FILE).write_bytes((d / bk.BACKING_FILE).read_bytes())
    Replica.open(tmp_path / "o2").close()
    assert not (tmp_path / "o2" / bk.BACKING_FILE).exists()
    (d / bk.BACKING_FILE).write_text("{}")
    with pytest.raises(ReplicaError, match="backing"):
        Replica.open(d)


def test_a_layer_being_filled_is_not_linked_into_a_clone(tmp_path, backed):
    r, img, _ = backed
    base = {"volume": "v", "snapshot": "b1"}
    with pytest.raises(CloneError, match="being filled"):
        make_clone(r.dir, tmp_path / "c1", "b1", base)
    assert not (tmp_path / "c1").exists()
    _fill(r)
    make_clone(r.dir, tmp_path / "c2", "b1", base)
    c = Replica.open(tmp_path / "c2")
    try:
        assert c.read(0, SIZE) == img
    finally:
        c.close()


def test_a_rebuild_target_adopts_the_backup(tmp_path, backed):
    r, img, tdir = backed
    r.write(4096, b"w" * 4096)
    img[4096:8192] = b"w" * 4096
    r.snapshot("s1")
    layers = [dataclasses.asdict(la) for la in r.layers() if not la.head]
    bottom = next(la for la in layers if la["backing"] == "b1")
    assert r.layers()[0].backing == "b1" and bottom["parent"] is None
    t = Replica.create(tmp_path / "target", SIZE)
    try:
        t.prepare_rebuild(layers, "volume-snap-s1.img", SIZE)
        cfg = {"url": f"file://{tdir}"}
        size, blocks = bk.read_manifest(cfg, "b1")
        with pytest.raises(ValueError, match="bottom"):
            t.adopt_backing("volume-snap-s1.img", "b1", cfg, size, blocks)
        t.adopt_backing(bottom["file"], "b1", cfg, size, blocks)
        # The other layer is copied as a rebuild does, then verified.
        src, dst = r.open_layer("volume-snap-s1.img"), t.open_layer("volume-snap-s1.img")
        dst.write(4096, src.read(4096, 4096))
        t.complete_layer("volume-snap-s1.img", r.layer_checksum("volume-snap-s1.img"))
        src.close()
        dst.close()
        assert not t.incomplete
        assert t.read(0, SIZE) == img  # fetched from the backup, like the source
    finally:
        t.close()
