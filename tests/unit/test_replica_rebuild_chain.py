"""The replica side of a rebuild, in process: prepare, rebuild I/O rules, layer access,
digests, verify, engine state, and crashes at every filesystem mutation of prepare."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from crashinject import Crash, Injector, reopen_through_crashes
from drove.replica import Replica, chain, meta
from drove.replica.errors import ChecksumMismatchError, LayerNotFoundError, RebuildingError
from drove.replica.meta import ENGINE_META, LOCK_FILE, VOLUME_META, LayerMeta

BS = 4096
CHUNK = 4
SIZE = 64 * BS


def pat(c: int, n: int) -> bytes:
    return bytes([c]) * n


def source_tree(d: Path) -> Replica:
    """s1 <- s2 <- s3 <- rb <- head, with holes, overwrites, a removed branch point."""
    r = Replica.create(d, SIZE, chunk_blocks=CHUNK)
    r.write(0, pat(1, 10 * BS))
    r.write(40 * BS, pat(2, 3 * BS))
    r.snapshot("s1", labels={"k": "v"})
    r.write(5 * BS, pat(3, 4 * BS))
    r.write(20 * BS + 100, pat(4, 5000))
    r.snapshot("s2")
    r.zero(0, 2 * BS)
    r.write(60 * BS, pat(5, 4 * BS))
    r.snapshot("s3")
    r.write(30 * BS, pat(6, BS))
    r.snapshot("rb")
    r.write(50 * BS, pat(7, BS))
    return r


def source_layers(r: Replica) -> list[dict[str, Any]]:
    """What GET /v1/layers?removed=true lists, minus the head, shuffled."""
    out = [dataclasses.asdict(i) for i in r.layers() if not i.head]
    return list(reversed(out))


def copy_layer(src: Replica, dst: Replica, file: str) -> None:
    """Make dst's layer equal to src's through layer handles (what a sync does)."""
    s = src.open_layer(file)
    t = dst.open_layer(file)
    try:
        pos = 0
        for n, data in s.block_status(0, s.size, max_extents=1 << 30):
            if data:
                t.write(pos, s.read(pos, n))
            else:
                t.punch(pos, n)
            pos += n
    finally:
        s.close()
        t.close()


def rebuild_all(src: Replica, dst: Replica) -> None:
    for f in list(dst.incomplete):
        copy_layer(src, dst, f)
        dst.complete_layer(f, src.layer_checksum(f))


def own_data(r: Replica, file: str) -> tuple[list[tuple[int, bool]], bytes]:
    h = r.open_layer(file)
    try:
        return h.block_status(0, h.size, max_extents=1 << 30), bytes(h.read(0, h.size))
    finally:
        h.close()


def structure(r: Replica) -> list[tuple[Any, ...]]:
    """Every layer's identity and flags (not times of heads, which are new)."""
    return sorted((i.file, i.name, i.parent, tuple(sorted(i.labels.items())), i.removed,
                   i.incomplete, i.head, i.size) for i in r.layers())


def check_clean_dir(r: Replica) -> None:
    listed = {VOLUME_META, LOCK_FILE}
    for info in r.layers():
        listed |= {info.file, info.file + ".meta"}
    assert set(os.listdir(r.dir)) - {ENGINE_META} == listed


@pytest.fixture
def src(tmp_path: Path):
    r = source_tree(tmp_path / "src")
    yield r
    r.close()


# ------------------------------------------------------------------ prepare


def test_prepare_fresh_replica(src: Replica, tmp_path: Path) -> None:
    t = Replica.create(tmp_path / "t", 16 * BS, chunk_blocks=CHUNK)
    t.write(0, pat(9, BS))
    info = t.prepare_rebuild(source_layers(src), "volume-snap-rb.img", SIZE)
    assert info.head and info.parent == "volume-snap-rb.img" and info.allocated == 0
    assert t.size == SIZE
    def ident(i: chain.LayerInfo) -> tuple[Any, ...]:
        return (i.file, i.name, i.parent, i.created, tuple(sorted(i.labels.items())),
                i.removed, i.size)
    want = {ident(i) for i in src.layers() if not i.head}
    got = {ident(i) for i in t.layers() if not i.head}
    assert got == want
    assert all(i.incomplete and i.checksum is None for i in t.layers() if not i.head)
    assert t.incomplete == ["volume-snap-s1.img", "volume-snap-s2.img", "volume-snap-s3.img",
                            "volume-snap-rb.img"]  # topological order
    for f in t.incomplete:
        assert own_data(t, f) == ([(SIZE, False)], bytes(SIZE))
    check_clean_dir(t)
    t.close()
    t = Replica.open(tmp_path / "t", chunk_blocks=CHUNK)
    assert len(t.incomplete) == 4
    rebuild_all(src, t)
    assert not t.incomplete
    assert t.read(0, SIZE) == src.view("rb").read(0, SIZE)
    for name in ("s1", "s2", "s3", "rb"):
        assert t.view(name).read(0, SIZE) == src.view(name).read(0, SIZE)
    t.close()


def test_prepare_keeps_older_copies_and_reuses_head(src: Replica, tmp_path: Path) -> None:
    # An older replica of the same volume: s1 as on the source, s2 holding older data,
    # a layer the source no longer has, and a head that becomes the source's "rb".
    t = Replica.create(tmp_path / "t", SIZE, chunk_blocks=CHUNK)
    t.write(0, pat(1, 10 * BS))
    t.write(40 * BS, pat(2, 3 * BS))
    t.snapshot("s1")
    t.write(5 * BS, pat(3, 2 * BS))  # older: the source's s2 has more
    t.snapshot("s2")
    t.snapshot("gone")
    t.write(30 * BS, pat(6, BS))
    old_s1 = own_data(t, "volume-snap-s1.img")
    old_s2 = own_data(t, "volume-snap-s2.img")
    old_head = own_data(t, t.layers()[-1].file)
    t.prepare_rebuild(source_layers(src), "volume-snap-rb.img", SIZE,
                      reuse_head_as="volume-snap-rb.img")
    assert {i.file for i in t.layers()} == {"volume-snap-s1.img", "volume-snap-s2.img",
                                            "volume-snap-s3.img", "volume-snap-rb.img",
                                            "volume-head-005.img"}
    assert own_data(t, "volume-snap-s1.img") == old_s1
    assert own_data(t, "volume-snap-s2.img") == old_s2
    assert own_data(t, "volume-snap-rb.img") == old_head
    assert own_data(t, "volume-snap-s3.img")[0] == [(SIZE, False)]
    check_clean_dir(t)
    # Digests tell what differs: s1 nothing, s2 the ranges of blocks 5-8 and 20-21.
    rs = 4 * BS
    assert t.layer_digests("volume-snap-s1.img", rs) == src.layer_digests("volume-snap-s1.img", rs)
    a = t.layer_digests("volume-snap-s2.img", rs)
    b = src.layer_digests("volume-snap-s2.img", rs)
    assert [k for k in range(len(a)) if a[k] != b[k]] == [1, 2, 5]
    assert t.layer_digests("volume-snap-rb.img", rs) == src.layer_digests("volume-snap-rb.img", rs)
    t.complete_layer("volume-snap-s1.img", src.layer_checksum("volume-snap-s1.img"))
    rebuild_all(src, t)
    assert t.read(0, SIZE) == src.view("rb").read(0, SIZE)
    t.close()


def test_prepare_reuse_ignored_when_layer_is_kept(src: Replica, tmp_path: Path) -> None:
    t = Replica.create(tmp_path / "t", SIZE, chunk_blocks=CHUNK)
    t.write(0, pat(1, BS))
    t.snapshot("s1")
    t.write(0, pat(8, BS))
    t.prepare_rebuild(source_layers(src), "volume-snap-rb.img", SIZE,
                      reuse_head_as="volume-snap-s1.img")
    assert own_data(t, "volume-snap-s1.img")[1][:BS] == pat(1, BS)
    assert own_data(t, "volume-snap-rb.img")[0] == [(SIZE, False)]
    t.close()


def test_prepare_resizes_kept_layer_of_another_size(src: Replica, tmp_path: Path) -> None:
    t = Replica.create(tmp_path / "t", 32 * BS, chunk_blocks=CHUNK)
    t.write(0, pat(1, 32 * BS))
    t.snapshot("s1")
    t.prepare_rebuild(source_layers(src), "volume-snap-rb.img", SIZE)
    assert os.path.getsize(t.dir / "volume-snap-s1.img") == SIZE
    t.close()
    t = Replica.open(tmp_path / "t", chunk_blocks=CHUNK)
    rebuild_all(src, t)
    assert t.view("s1").read(0, SIZE) == src.view("s1").read(0, SIZE)
    t.close()


def test_prepare_refuses_bad_requests(src: Replica, tmp_path: Path) -> None:
    t = Replica.create(tmp_path / "t", SIZE, chunk_blocks=CHUNK)
    layers = source_layers(src)
    before = structure(t)
    bad: list[tuple[Any, ...]] = [
        (layers, "volume-snap-rb.img", SIZE - BS, None),  # shrink
        (layers, "volume-snap-nope.img", SIZE, None),
        (layers, "volume-snap-rb.img", SIZE, "volume-snap-nope.img"),
        ([x for x in layers if x["name"] != "s1"], "volume-snap-rb.img", SIZE, None),  # orphan
        ([*layers, dataclasses.asdict(src.layers()[-1])], "volume-snap-rb.img", SIZE, None),
        ([{**layers[0], "name": "a/b"}, *layers[1:]], "volume-snap-rb.img", SIZE, None),
        ([{**layers[0], "size": SIZE * 2}, *layers[1:]], "volume-snap-rb.img", SIZE, None),
        ([*layers, layers[0]], "volume-snap-rb.img", SIZE, None),
        ([{"file": "x"}], None, SIZE, None),
        ("nope", None, SIZE, None),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            t.prepare_rebuild(*args)
    assert structure(t) == before
    check_clean_dir(t)
    t.close()


# ------------------------------------------------------------------ I/O while rebuilding


@pytest.fixture
def rebuilding(src: Replica, tmp_path: Path):
    t = Replica.create(tmp_path / "t", SIZE, chunk_blocks=CHUNK)
    t.prepare_rebuild(source_layers(src), "volume-snap-rb.img", SIZE)
    yield t
    t.close()


def test_rebuilding_reads_fail_with_eio(rebuilding: Replica) -> None:
    t = rebuilding
    t.write(0, pat(1, BS))
    for call in (lambda: t.read(0, BS), lambda: t.readinto(0, bytearray(BS)),
                 lambda: t.block_status(0, BS), lambda: t.view("s1").read(0, BS)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EIO and "rebuilding" in str(e.value)
    assert t.view("s1").size == SIZE  # opening a snapshot export still works


def test_rebuilding_writes_need_whole_edge_blocks(rebuilding: Replica) -> None:
    t = rebuilding
    head = t.layers()[-1].file
    for call in (lambda: t.write(3 * BS + 1, b"x" * 10),
                 lambda: t.write(3 * BS, b"x" * (BS + 1)),
                 lambda: t.zero(3 * BS + 5, BS),
                 lambda: t.trim(2 * BS, BS + 7)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EINVAL and "rebuilding" in str(e.value)
    assert own_data(t, head)[0] == [(SIZE, False)]  # nothing changed
    t.write(3 * BS, pat(2, 2 * BS))  # whole blocks
    t.write(3 * BS + 10, b"y" * 100)  # partial, but the head holds the block
    t.zero(4 * BS + 1, 5)
    with pytest.raises(OSError) as e:
        t.zero(10 * BS, 2 * BS, fast=True)
    assert e.value.errno == errno.ENOTSUP
    t.zero(10 * BS, 2 * BS)  # real zeros, even though no layer here holds data yet
    t.trim(12 * BS, BS)  # a whole block the head lacks: left as the older layers show it
    t.trim(11 * BS, BS)  # one it holds: real zeros, as a zero while rebuilding
    extents, data = own_data(t, head)
    assert extents == [(3 * BS, False), (2 * BS, True), (5 * BS, False), (2 * BS, True),
                       (52 * BS, False)]
    want = bytearray(pat(2, 2 * BS))
    want[10:110] = b"y" * 100
    want[BS + 1:BS + 6] = bytes(5)
    assert data[3 * BS:5 * BS] == want
    assert data[10 * BS:13 * BS] == bytes(3 * BS)  # block 12: a hole (reads zeros here)


def test_rebuilding_structure_rules(rebuilding: Replica, src: Replica) -> None:
    t = rebuilding
    t.write(0, pat(3, BS))
    snap = t.snapshot("during")  # the engine snapshots every replica, this one too
    assert not snap.incomplete
    assert "volume-snap-during.img" not in t.incomplete
    for call, what in ((lambda: t.revert("s1"), "revert"), (lambda: t.expand(2 * SIZE), "expand")):
        with pytest.raises(RebuildingError, match=what):
            call()
    with pytest.raises(RebuildingError):
        t.layer_checksum("volume-snap-s2.img")
    with pytest.raises(RebuildingError):
        t.checksum("s2")
    t.delete_snapshot("s2")  # only marks it: purging waits for the rebuild
    t.purge()
    assert "volume-snap-s2.img" in {i.file for i in t.layers()}
    rebuild_all(src, t)
    t.purge()
    assert "volume-snap-s2.img" not in {i.file for i in t.layers()}
    assert t.read(0, BS) == pat(3, BS)
    assert t.read(BS, 63 * BS) == src.view("rb").read(BS, 63 * BS)


# ------------------------------------------------------------------ layer handles


def test_layer_handle_reads_own_data_and_writes_only_when_incomplete(
        src: Replica, rebuilding: Replica) -> None:
    s2 = src.open_layer("volume-snap-s2.img")
    ext = s2.block_status(0, SIZE)
    assert ext == [(5 * BS, False), (4 * BS, True), (11 * BS, False), (2 * BS, True),
                   (42 * BS, False)]
    raw = (src.dir / "volume-snap-s2.img").read_bytes()
    assert bytes(s2.read(0, SIZE)) == raw
    assert s2.block_status(6 * BS, 2 * BS) == [(2 * BS, True)]
    assert s2.block_status(0, SIZE, max_extents=2) == [(5 * BS, False), (4 * BS, True)]
    with pytest.raises(OSError) as e:
        s2.write(0, pat(1, BS))
    assert e.value.errno == errno.EPERM
    head = src.open_layer(src.layers()[-1].file)
    assert head.block_status(0, SIZE) == [(50 * BS, False), (BS, True), (13 * BS, False)]
    with pytest.raises(OSError):
        head.punch(0, BS)
    t = rebuilding.open_layer("volume-snap-s2.img")
    assert t.writable
    t.write(BS, pat(4, 2 * BS))
    t.punch(2 * BS, BS)
    with pytest.raises(OSError) as e:
        t.punch(BS + 1, BS)
    assert e.value.errno == errno.EINVAL
    assert t.block_status(0, SIZE) == [(BS, False), (BS, True), (62 * BS, False)]
    # A snapshot of the head leaves the other layers' handles usable; a rebuild
    # prepare replaces every layer, and old handles die.
    rebuilding.snapshot("x")
    t.write(0, pat(5, BS))
    rebuilding.close()
    with pytest.raises(OSError) as e:
        t.read(0, BS)
    assert e.value.errno == errno.ESHUTDOWN
    with pytest.raises(LayerNotFoundError):
        src.open_layer("volume-snap-nope.img")
    for h in (s2, head, t):
        h.close()


def test_handles_die_when_prepare_replaces_layers(src: Replica, tmp_path: Path) -> None:
    t = Replica.create(tmp_path / "t", SIZE, chunk_blocks=CHUNK)
    t.prepare_rebuild(source_layers(src), "volume-snap-rb.img", SIZE)
    h = t.open_layer("volume-snap-s1.img")
    t.prepare_rebuild(source_layers(src), "volume-snap-rb.img", SIZE)
    with pytest.raises(OSError) as e:
        h.write(0, pat(1, BS))
    assert e.value.errno == errno.ESHUTDOWN
    h.close()
    t.close()


def test_digests(src: Replica, tmp_path: Path) -> None:
    f = "volume-snap-s2.img"
    d = src.layer_digests(f)
    assert len(d) == 1 and len(d[0]) == 32
    small = src.layer_digests(f, BS)
    assert len(small) == 64
    empty = small[0]
    assert [k for k, x in enumerate(small) if x != empty] == [5, 6, 7, 8, 20, 21]
    t = Replica.create(tmp_path / "t", SIZE, chunk_blocks=CHUNK)
    t.prepare_rebuild(source_layers(src), "volume-snap-rb.img", SIZE)
    copy_layer(src, t, f)
    assert t.layer_digests(f, 8 * BS) == src.layer_digests(f, 8 * BS)
    h = t.open_layer(f)
    h.write(21 * BS, pat(0, BS))  # same bytes? no: the source has data 4s there
    h.write(40 * BS, bytes(BS))  # zeros as data differ from a hole
    a, b = t.layer_digests(f, 8 * BS), src.layer_digests(f, 8 * BS)
    assert [k for k in range(8) if a[k] != b[k]] == [2, 5]
    h.close()
    for bad in (0, 1000, 3 * BS, 2 << 30, True):
        with pytest.raises(ValueError):
            src.layer_digests(f, bad)
    t.close()


def test_complete_checks_the_checksum(src: Replica, rebuilding: Replica) -> None:
    t = rebuilding
    f = "volume-snap-s1.img"
    right = src.layer_checksum(f)
    with pytest.raises(ChecksumMismatchError) as e:
        t.complete_layer(f, right)  # nothing copied yet
    assert e.value.expected == right and e.value.actual != right
    assert f in t.incomplete
    copy_layer(src, t, f)
    verified = t.verify_layer(f)
    h = t.open_layer(f)
    h.write(63 * BS, pat(9, BS))  # changed after hashing
    with pytest.raises(RebuildingError, match="changed"):
        t.complete_layer(f, right, verified)
    h.punch(63 * BS, BS)
    assert t.complete_layer(f, right) == right
    assert f not in t.incomplete
    with pytest.raises(OSError) as e2:
        h.write(0, pat(1, BS))
    assert e2.value.errno == errno.EPERM
    h.close()
    assert t.complete_layer(f, right) == right  # again: nothing to do
    assert t.layer_checksum(f) == right
    d = t.dir
    t.close()
    t2 = Replica.open(d, chunk_blocks=CHUNK)
    m = next(i for i in t2.layers() if i.file == f)
    assert not m.incomplete and m.checksum == right
    t2.close()


# ------------------------------------------------------------------ engine state


def test_engine_state(tmp_path: Path) -> None:
    d = tmp_path / "r"
    r = Replica.create(d, SIZE)
    assert r.engine_state == {}
    state = {"generation": 7, "clean": False, "members": ["a", "b"]}
    assert r.set_engine_state(state) == state
    r.engine_state["generation"] = 99  # a copy
    assert r.engine_state == state
    for bad in ([1], "x", {"x": float("nan")}, {"big": "x" * (64 * 1024)}, {"s": {1, 2}}):
        with pytest.raises(ValueError):
            r.set_engine_state(bad)  # type: ignore[arg-type]
    r.close()
    (d / "engine.meta.tmp").write_text("leftover")
    r = Replica.open(d)
    assert r.engine_state == state
    assert not (d / "engine.meta.tmp").exists()
    r.set_engine_state({"generation": 8})
    r.close()
    r = Replica.open(d)
    assert r.engine_state == {"generation": 8}
    r.close()
    (d / ENGINE_META).write_text("{garbage")
    with pytest.raises(meta.ReplicaError, match=r"engine\.meta"):
        Replica.open(d)


def test_engine_state_crash_points(tmp_path: Path) -> None:
    old, new = {"generation": 1}, {"generation": 2, "members": ["x"]}
    for allow in itertools.count():
        d = tmp_path / f"c{allow}"
        r = Replica.create(d, SIZE)
        r.set_engine_state(old)
        with pytest.MonkeyPatch.context() as mp:
            inj = Injector(mp, allow)
            with contextlib.suppress(Crash):
                r.set_engine_state(new)
            fired = inj.fired
            with contextlib.suppress(BaseException):
                r.close()
        r2 = Replica.open(d)
        assert r2.engine_state in ((old, new) if fired else (new,))
        r2.close()
        if fired is None:
            assert allow >= 3
            return


def test_layer_meta_incomplete_is_optional() -> None:
    m = LayerMeta(file="volume-snap-a.img", name="a", parent=None, created=meta.now_iso(),
                  size=BS)
    obj = m.to_json()
    assert "incomplete" not in obj
    assert LayerMeta.from_json(obj, "m") == m
    m2 = dataclasses.replace(m, incomplete=True)
    assert LayerMeta.from_json(json.loads(json.dumps(m2.to_json())), "m") == m2
    with pytest.raises(meta.ReplicaError):
        LayerMeta.from_json({**obj, "incomplete": "yes"}, "m")
    with pytest.raises(meta.ReplicaError):
        LayerMeta.from_json({**m2.to_json(), "checksum": "ab"}, "m")


# ------------------------------------------------------------------ crashes during prepare


def snapshot_state(r: Replica) -> tuple[Any, ...]:
    """Structure plus every layer's own data."""
    data = {i.file: own_data(r, i.file) for i in r.layers()}
    return r.size, structure(r), data


def older_copy(d: Path) -> Replica:
    """A stale replica: s1 as the source's, an older s2, a layer to drop, a head to reuse."""
    t = Replica.create(d, 32 * BS, chunk_blocks=CHUNK)
    t.write(0, pat(1, 10 * BS))
    t.snapshot("s1")
    t.write(5 * BS, pat(3, 2 * BS))
    t.snapshot("s2")
    t.snapshot("gone")
    t.write(30 * BS, pat(6, BS))
    return t


@pytest.mark.parametrize("reuse", [None, "volume-snap-rb.img"])
@pytest.mark.slow
def test_prepare_crash_points(src: Replica, tmp_path: Path, reuse: str | None) -> None:
    layers = source_layers(src)

    def op(r: Replica) -> None:
        r.prepare_rebuild(layers, "volume-snap-rb.img", SIZE, reuse_head_as=reuse)

    ref = older_copy(tmp_path / "ref")
    before = snapshot_state(ref)
    op(ref)
    after = snapshot_state(ref)
    ref.close()
    seen = set()
    for allow in itertools.count():
        d = tmp_path / f"crash{allow}"
        r = older_copy(d)
        with pytest.MonkeyPatch.context() as mp:
            inj = Injector(mp, allow)
            with contextlib.suppress(Crash):
                op(r)
            fired = inj.fired
            with contextlib.suppress(BaseException):
                r.close()
        r2 = reopen_through_crashes(d, CHUNK)
        got = snapshot_state(r2)
        assert got in (before, after), f"crash at {fired}: neither before nor after"
        seen.add(got == after)
        check_clean_dir(r2)
        if got == after:
            rebuild_all(src, r2)
            assert r2.read(0, SIZE) == src.view("rb").read(0, SIZE)
        else:
            assert r2.read(30 * BS, BS) == pat(6, BS)
        r2.close()
        if fired is None:
            assert allow >= 10 and seen == {False, True}
            return


def test_prepare_is_one_commit(src: Replica, tmp_path: Path) -> None:
    """Nothing listed is touched before volume.meta's commit; open finishes after it."""
    t = older_copy(tmp_path / "t")
    calls: list[tuple[str, str]] = []
    with pytest.MonkeyPatch.context() as mp:
        for name in meta.FsOps.MUTATIONS:
            fn = getattr(meta.fs, name)

            def wrap(*a: Any, _n: str = name, _f: Any = fn) -> Any:
                calls.append((_n, Path(a[0]).name if isinstance(a[0], str | Path) else "fd"))
                return _f(*a)
            mp.setattr(meta.fs, name, wrap)
        t.prepare_rebuild(source_layers(src), "volume-snap-rb.img", SIZE)
    commits = [i for i, c in enumerate(calls) if c == ("replace", VOLUME_META + ".tmp")]
    assert len(commits) == 2  # with staged metadata, then without
    first = commits[0]
    listed_before = {"volume-snap-s1.img", "volume-snap-s2.img", "volume-snap-gone.img",
                     "volume-head-004.img"}
    for name, target in calls[:first]:
        if name in ("replace", "unlink", "open_write"):
            assert target.removesuffix(".tmp") not in listed_before | {
                f + ".meta" for f in listed_before}, (name, target)
    fsyncs = sum(1 for n, _ in calls if n in ("fsync", "fdatasync"))
    assert fsyncs <= 16  # 2 new files, head, 2 resized, 5 metas, 2 commits, 2 dir
    t.close()
