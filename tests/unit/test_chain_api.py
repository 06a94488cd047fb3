"""Replica API details: errors, fast zero, views, checksums, purge steps, layers."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from drove.replica import (
    Replica,
    SnapshotExistsError,
    SnapshotNotFoundError,
    chain,
)

BS = 4096


@pytest.fixture
def r(tmp_path: Path):
    rep = Replica.create(tmp_path / "r", 64 * BS, chunk_blocks=4)
    yield rep
    if not rep.closed:
        rep.close()


def test_ranges_and_sizes_are_checked(r: Replica) -> None:
    for call in (lambda: r.read(63 * BS, BS + 1), lambda: r.write(64 * BS, b"x"),
                 lambda: r.zero(-1, 5), lambda: r.block_status(0, 65 * BS)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="shrink"):
        r.expand(32 * BS)
    with pytest.raises(ValueError):
        r.expand(64 * BS + 1)
    r.expand(64 * BS)  # same size: nothing to do
    assert r.size == 64 * BS


def test_snapshot_names(r: Replica) -> None:
    for bad in ("", "../x", "-a", "a/b", "x" * 65, "a b", "é"):
        with pytest.raises(ValueError, match="invalid snapshot name"):
            r.snapshot(bad)
    r.snapshot("ok.1_-A")
    with pytest.raises(SnapshotExistsError) as e:
        r.snapshot("ok.1_-A")
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileExistsError)
    with pytest.raises(SnapshotNotFoundError):
        r.view("nope")
    with pytest.raises(SnapshotNotFoundError):
        r.revert("nope")
    with pytest.raises(SnapshotNotFoundError):
        r.delete_snapshot("nope")
    with pytest.raises(ValueError, match="labels"):
        r.snapshot("l", labels={"a": 1})  # type: ignore[dict-item]


def test_fast_zero_refuses_before_changing_anything(r: Replica) -> None:
    r.write(0, b"a" * 8 * BS)
    r.snapshot("s")
    r.write(10 * BS, b"b" * BS)  # head-only data: fast zero may punch it
    r.zero(10 * BS, BS, fast=True)
    assert r.read(10 * BS, BS) == bytes(BS)
    r.write(10 * BS, b"b" * BS)
    with pytest.raises(OSError) as e:
        r.zero(6 * BS, 6 * BS, fast=True)  # crosses data the snapshot holds
    assert e.value.errno == errno.ENOTSUP
    assert r.read(6 * BS, 2 * BS) == b"a" * 2 * BS
    assert r.read(10 * BS, BS) == b"b" * BS
    r.zero(6 * BS, 6 * BS)  # slow zero writes real zeros over the snapshot's data
    assert r.read(0, 12 * BS) == b"a" * 6 * BS + bytes(6 * BS)


def test_zero_over_older_data_survives_reopen(tmp_path: Path) -> None:
    d = tmp_path / "r"
    with Replica.create(d, 16 * BS) as r:
        r.write(0, b"o" * 16 * BS)
        r.snapshot("s")
        r.zero(BS, 4 * BS)
        r.trim(8 * BS + 100, 50)
    with Replica.open(d) as r:
        want = bytearray(b"o" * 16 * BS)
        want[BS:5 * BS] = bytes(4 * BS)
        want[8 * BS + 100:8 * BS + 150] = bytes(50)
        assert r.read(0, 16 * BS) == want


def test_punch_frees_head_blocks(r: Replica) -> None:
    r.write(0, b"x" * 16 * BS)
    r.zero(4 * BS, 8 * BS)
    assert r.block_status(0, 64 * BS) == [(4 * BS, True), (8 * BS, False), (4 * BS, True),
                                          (48 * BS, False)]
    info = next(i for i in r.layers() if i.head)
    assert info.allocated == 8 * BS


def test_block_status_unaligned(r: Replica) -> None:
    r.write(BS, b"d" * BS)
    assert r.block_status(100, 3 * BS) == [(BS - 100, False), (BS, True), (BS + 100, False)]
    r.snapshot("s")
    r.write(3 * BS, b"e")
    # Allocation across the chain: the snapshot's block and the head's merge.
    assert r.block_status(0, 8 * BS) == [(BS, False), (BS, True), (BS, False), (BS, True),
                                         (4 * BS, False)]


def test_view_dies_with_its_snapshot_even_if_name_returns(r: Replica) -> None:
    r.write(0, b"1" * BS)
    r.snapshot("s")
    v = r.view("s")
    assert v.size == 64 * BS and v.read(0, BS) == b"1" * BS
    r.delete_snapshot("s")
    r.write(0, b"2" * BS)
    r.snapshot("s")  # same name while the removed one still waits for purge
    files = sorted(i.file for i in r.layers() if i.name == "s")
    assert files == ["volume-snap-s.img", "volume-snap-s~2.img"]
    for call in (lambda: v.read(0, BS), lambda: v.block_status(0, BS), lambda: v.size):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ESHUTDOWN
    assert r.view("s").read(0, BS) == b"2" * BS


def test_view_size_is_snapshot_size(r: Replica) -> None:
    r.write(0, b"q" * BS)
    r.snapshot("small")
    r.expand(80 * BS)
    r.write(70 * BS, b"w" * BS)
    r.snapshot("big")
    assert r.view("small").size == 64 * BS
    assert r.view("big").read(70 * BS, BS) == b"w" * BS
    r.revert("small")
    assert r.size == 80 * BS
    assert r.read(0, BS) == b"q" * BS and r.read(64 * BS, 16 * BS) == bytes(16 * BS)


def test_revert_keeps_newer_snapshots_as_branch(r: Replica) -> None:
    r.write(0, b"1" * BS)
    r.snapshot("one")
    r.write(0, b"2" * BS)
    r.snapshot("two")
    r.write(0, b"3" * BS)
    r.revert("one")
    assert r.read(0, BS) == b"1" * BS
    assert r.view("two").read(0, BS) == b"2" * BS
    layers = {i.name or "head": i for i in r.layers()}
    one = layers["one"]
    assert set(one.children) == {layers["two"].file, layers["head"].file}
    r.delete_snapshot("one")  # a branch point: purge leaves it
    r.purge()
    assert any(i.name == "one" and i.removed for i in r.layers())
    assert r.view("two").read(0, BS) == b"2" * BS and r.read(0, BS) == b"1" * BS


def test_checksum_cached_invalidated_by_fold_and_thread_safe(r: Replica) -> None:
    r.write(0, b"a" * 4 * BS)
    r.snapshot("a")
    r.write(8 * BS, b"b" * BS)
    r.snapshot("b")
    results: list[str] = []
    t = threading.Thread(target=lambda: results.append(r.checksum("b")))
    t.start()
    for i in range(50):  # head I/O on this thread meanwhile
        r.write(20 * BS + i, b"c" * 100)
    t.join()
    sb = results[0]
    assert len(sb) == 64 and r.checksum("b") == sb
    assert next(i for i in r.layers() if i.name == "b").checksum == sb
    r.delete_snapshot("a")
    r.purge()  # folds a into b: b's own data changed
    assert next(i for i in r.layers() if i.name == "b").checksum is None
    sb2 = r.checksum("b")
    assert sb2 != sb
    # Same content in another replica, written differently, gives the same sum.
    other = Replica.create(r.dir.parent / "o", 64 * BS)
    other.write(0, b"a" * 4 * BS)
    other.write(8 * BS, b"b" * BS)
    other.snapshot("b")
    assert other.checksum("b") == sb2
    other.close()


def test_purge_steps_are_bounded_and_interleave(r: Replica,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain, "PURGE_STEP_BYTES", 2 * BS)
    r.write(0, b"s" * 32 * BS)
    r.snapshot("s")
    r.write(0, b"h" * 32 * BS)  # the head covers all of s: prune punches it all
    r.delete_snapshot("s")
    steps = 0
    for _ in r.purge_steps():
        steps += 1
        r.write(40 * BS + steps, b"i")  # I/O between steps
        if steps == 1:
            with pytest.raises(RuntimeError, match="already running"):
                next(r.purge_steps())
    assert steps >= 16
    assert r.read(0, 32 * BS) == b"h" * 32 * BS
    snap = next(i for i in r.layers() if i.name == "s")
    assert snap.removed and snap.allocated == 0


def test_failed_fsync_fails_the_replica(r: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    r.write(0, b"x")

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(chain.meta.fs, "fdatasync", eio)
    with pytest.raises(OSError):
        r.flush()
    monkeypatch.undo()
    with pytest.raises(OSError) as e:
        r.read(0, 1)
    assert e.value.errno == errno.EIO and "reopen" in str(e.value)
    r.close()


def test_failed_snapshot_before_commit_leaves_replica_usable(
        r: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    r.write(0, b"x" * BS)

    def nospace(*args: object) -> None:
        raise OSError(errno.ENOSPC, "injected")

    monkeypatch.setattr(chain.meta.fs, "replace", nospace)
    with pytest.raises(OSError):
        r.snapshot("s")
    monkeypatch.undo()
    assert sorted(os.listdir(r.dir)) == sorted(
        ["volume.lock", "volume.meta", "volume-head-001.img", "volume-head-001.img.meta",
         "volume-snap-s.img.meta.tmp"])
    r.snapshot("s")
    r.write(0, b"y" * BS)
    assert r.view("s").read(0, BS) == b"x" * BS and r.read(0, BS) == b"y" * BS


def test_context_manager_and_closed_errors(tmp_path: Path) -> None:
    with Replica.create(tmp_path / "r", 4 * BS) as r:
        r.write(0, b"a")
    with pytest.raises(OSError) as e:
        r.read(0, 1)
    assert e.value.errno == errno.ESHUTDOWN
    r.close()  # idempotent


def test_large_writes_preallocate_only_their_span(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    size = 4 << 20
    rep = Replica.create(tmp_path / "big", size, chunk_blocks=64)
    old = bytes([7]) * size
    rep.write(0, old)
    rep.snapshot("base")
    calls: list[tuple[int, int]] = []
    real = chain.meta.fs.preallocate
    monkeypatch.setattr(chain.meta.fs, "preallocate",
                        lambda fd, off, n: (calls.append((off, n)), real(fd, off, n)))
    # Unaligned at both ends over older data: the edge blocks are read-modify-written.
    rep.write(5000, b"n" * (300 << 10))
    assert calls == [(4096, ((5000 + (300 << 10) - 1) // BS + 1 - 1) * BS)]
    expect = bytearray(old)
    expect[5000:5000 + (300 << 10)] = b"n" * (300 << 10)
    assert rep.read(0, size) == expect
    # Allocated space is the written span, not more.
    head = next(x for x in rep.layers() if x.head)
    assert head.allocated <= (300 << 10) + 2 * BS
    # A write that fails after preallocating leaves older data visible, now and on reopen.
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "injected")
    monkeypatch.setattr(chain.meta.fs, "pwritev", broken)
    with pytest.raises(OSError):
        rep.write(1 << 20, b"x" * (512 << 10))
    assert rep.read(1 << 20, 512 << 10) == old[: 512 << 10]
    monkeypatch.undo()
    rep.close()
    with Replica.open(tmp_path / "big") as again:
        assert again.read(0, size) == expect
        assert [a for a in again.block_status(0, size)] == [(size, True)]
