"""The pull sync job in process: an NBD server on the source's layer exports, the real
async client, tiny windows and extent limits so every boundary of the pipeline is hit."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest

from drove.nbd import client as nbd_client
from drove.nbd.server import NbdServer
from drove.replica import Replica, chain, rebuild
from drove.replica.exports import FlushGate, ReplicaExports
from drove.replica.fence import Fence
from drove.replica.rebuild import SyncJob, normalize_ranges

BS = 4096
SIZE = 256 * BS
FILE = "volume-snap-s.img"


@pytest.fixture(autouse=True)
def small_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 16 blocks, 3 runs per window, 5 extents per status reply, 2 in flight."""
    monkeypatch.setattr(rebuild, "WINDOW", 16 * BS)
    monkeypatch.setattr(rebuild, "MAX_RUNS", 3)
    monkeypatch.setattr(rebuild, "DEPTH", 2)
    monkeypatch.setattr(nbd_client, "STATUS_REQUEST", 64 * BS)
    monkeypatch.setattr(chain, "MAX_LAYER_EXTENTS", 5)
    monkeypatch.setattr(rebuild, "_PREALLOCATE_MIN", 8 * BS)


def random_layer(r: Replica, rnd: random.Random, runs: int) -> None:
    for _ in range(runs):
        start = rnd.randrange(256)
        n = rnd.choice([1, 1, 2, 5, 17, 40])
        n = min(n, 256 - start)
        if rnd.random() < 0.8:
            r.write(start * BS, rnd.randbytes(n * BS))
        else:
            r.zero(start * BS, n * BS)


def source_layers(r: Replica) -> list[dict[str, Any]]:
    return [dataclasses.asdict(i) for i in r.layers() if not i.head]


async def run_job(src: Replica, tgt: Replica, sock: Path, ranges: Any) -> SyncJob:
    server = NbdServer(ReplicaExports(src, FlushGate(), Fence(src)))
    await server.listen_unix(sock)
    try:
        job = SyncJob(tgt, FILE, f"nbd+unix:///layer/{FILE}?socket={sock}", ranges)
        job.start()
        await job.wait()
        return job
    finally:
        await server.close()


def diff_ranges(a: Replica, b: Replica, rs: int) -> list[list[int]]:
    da, db = a.layer_digests(FILE, rs), b.layer_digests(FILE, rs)
    return [[k * rs, rs] for k in range(len(da)) if da[k] != db[k]]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["fresh", "older-full", "older-delta"])
def test_sync_makes_layer_equal(tmp_path: Path, seed: int, mode: str) -> None:
    rnd = random.Random(seed)
    src = Replica.create(tmp_path / "src", SIZE, chunk_blocks=16)
    random_layer(src, rnd, 30)
    src.snapshot("s")
    tgt = Replica.create(tmp_path / "tgt", SIZE, chunk_blocks=16)
    if mode != "fresh":
        random_layer(tgt, rnd, 20)
        tgt.snapshot("s")
    tgt.prepare_rebuild(source_layers(src), FILE, SIZE)
    ranges = diff_ranges(tgt, src, 8 * BS) if mode == "older-delta" else None
    job = asyncio.run(run_job(src, tgt, tmp_path / "s.sock", ranges))
    assert job.state == "done", job.error
    assert job.bytes_done == job.bytes_total
    assert diff_ranges(tgt, src, BS) == []
    tgt.complete_layer(FILE, src.layer_checksum(FILE))
    assert tgt.read(0, SIZE) == src.view("s").read(0, SIZE)
    src.close()
    tgt.close()


def test_sync_refusals_and_failures(tmp_path: Path) -> None:
    src = Replica.create(tmp_path / "src", SIZE)
    src.write(0, b"a" * BS)
    src.snapshot("s")
    tgt = Replica.create(tmp_path / "tgt", SIZE)
    tgt.prepare_rebuild(source_layers(src), FILE, SIZE)
    with pytest.raises(ValueError, match="NBD URI"):
        SyncJob(tgt, FILE, "http://x", None)
    for bad in ([[0, 100]], [[0, SIZE + BS]], [[-BS, BS]], [["a", 1]], [[0]]):
        with pytest.raises(ValueError):
            SyncJob(tgt, FILE, "nbd://x/", bad)
    with pytest.raises(LookupError):
        SyncJob(tgt, "volume-snap-x.img", "nbd://x/", None)
    with pytest.raises(ValueError, match="not incomplete"):
        SyncJob(src, FILE, "nbd://x/", None)
    assert normalize_ranges([[8 * BS, BS], [0, BS], [BS, 2 * BS], [0, 0]], SIZE) == [
        (0, 3 * BS), (8 * BS, BS)]

    async def wrong_size() -> SyncJob:
        # The source layer of another replica is bigger: refused before copying.
        big = Replica.create(tmp_path / "big", 2 * SIZE)
        big.snapshot("s")
        try:
            return await run_job(big, tgt, tmp_path / "b.sock", None)
        finally:
            big.close()

    job = asyncio.run(wrong_size())
    assert job.state == "failed" and "bytes" in (job.error or "")
    src.close()
    tgt.close()


class SlowClient:
    """Answers block status at once, never finishes a read (until cancelled)."""

    size = SIZE

    def __init__(self) -> None:
        self.closed = False
        self.reads = 0

    async def block_status(self, offset: int, length: int) -> list[Any]:
        return [chain_extent(length, 0)]

    async def readinto(self, offset: int, buf: Any) -> None:
        self.reads += 1
        await asyncio.sleep(3600)

    async def close(self) -> None:
        self.closed = True


def chain_extent(length: int, flags: int) -> Any:
    from drove.nbd.export import Extent
    return Extent(length, flags)


def test_sync_cancel(tmp_path: Path) -> None:
    src = Replica.create(tmp_path / "src", SIZE)
    src.snapshot("s")
    tgt = Replica.create(tmp_path / "tgt", SIZE)
    tgt.prepare_rebuild(source_layers(src), FILE, SIZE)
    client = SlowClient()

    async def connect(uri: str) -> SlowClient:
        return client

    async def main() -> SyncJob:
        job = SyncJob(tgt, FILE, "nbd://x/", None, connect=connect)
        job.start()
        while client.reads < 2:
            await asyncio.sleep(0.001)
        assert job.status()["state"] == "running"
        await job.cancel()
        return job

    job = asyncio.run(main())
    assert job.state == "cancelled" and client.closed
    assert job._handle.fd and job._handle._finalizer.alive is False
    src.close()
    tgt.close()
