"""Linked clone directories (drove.replica.clone) and the chain's rule that a shared layer
file is never modified in place."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from pathlib import Path

import pytest

from crashinject import Crash, Injector
from drove.agent.clones import clone_replica, replica_usage
from drove.replica import Replica, meta
from drove.replica.clone import CloneError, make_clone, temp_dir
from drove.replica.errors import SnapshotNotFoundError

BS = 4096
SIZE = 256 * BS
BASE = {"volume": "src", "snapshot": "s2"}


def pattern(c: int, n: int) -> bytes:
    return bytes([c]) * n


def source(d: Path) -> Replica:
    """s1 <- s2 <- head, with data in each layer."""
    r = Replica.create(d, SIZE)
    r.write(0, pattern(1, 64 * BS))
    r.snapshot("s1")
    r.write(32 * BS, pattern(2, 64 * BS))
    r.snapshot("s2", labels={"k": "v"})
    r.write(100 * BS, pattern(3, 8 * BS))
    return r


def image(r: Replica | object) -> bytes:
    return bytes(r.read(0, SIZE))  # type: ignore[attr-defined]


def test_clone_reads_the_snapshot_and_shares_its_files(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    want = bytes(src.view("s2").read(0, SIZE))
    res = make_clone(tmp_path / "src", tmp_path / "c1", "s2", BASE)
    assert res.layers == ("volume-snap-s1.img", "volume-snap-s2.img")
    assert res.linked_bytes >= 96 * BS
    for f in res.layers:
        assert os.stat(tmp_path / "c1" / f).st_ino == os.stat(tmp_path / "src" / f).st_ino
    with Replica.open(tmp_path / "c1") as c:
        assert image(c) == want
        # Its base layers are not its snapshots: not listed as such, not deletable.
        assert [la.base for la in c.layers() if not la.head] == [BASE, BASE]
        with pytest.raises(SnapshotNotFoundError):
            c.delete_snapshot("s2")
        with pytest.raises(SnapshotNotFoundError):
            c.revert("s1")
        # A snapshot of its own may take a base layer's name.
        c.write(0, pattern(9, BS))
        info = c.snapshot("s2")
        assert info.file != "volume-snap-s2.img" and info.base is None
        assert c.shared()[0] >= 96 * BS
    src.close()


def test_writes_to_a_clone_change_neither_source_nor_sibling(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    before = image(src)
    make_clone(tmp_path / "src", tmp_path / "c1", "s2", BASE)
    make_clone(tmp_path / "src", tmp_path / "c2", "s2", BASE)
    with Replica.open(tmp_path / "c1") as c1:
        c1.write(10 * BS, pattern(7, 50 * BS))
        c1.zero(70 * BS, 10 * BS)
        c1.snapshot("mine")
        c1.write(0, pattern(8, BS))
    assert image(src) == before
    with Replica.open(tmp_path / "c2") as c2:
        assert image(c2) == bytes(src.view("s2").read(0, SIZE))
    src.close()


def test_a_fold_into_a_shared_layer_copies_it_first(tmp_path: Path) -> None:
    """The source deletes s1 (as if the manager had not hidden it): folding s1 into s2,
    which a clone shares, gives the source its own s2 and leaves the clone's alone."""
    src = source(tmp_path / "src")
    want = bytes(src.view("s2").read(0, SIZE))
    make_clone(tmp_path / "src", tmp_path / "c1", "s2", BASE)
    shared_ino = os.stat(tmp_path / "c1" / "volume-snap-s2.img").st_ino
    src.delete_snapshot("s1")
    src.purge()
    assert os.stat(tmp_path / "src" / "volume-snap-s2.img").st_ino != shared_ino
    assert os.stat(tmp_path / "c1" / "volume-snap-s2.img").st_nlink == 1
    assert bytes(src.view("s2").read(0, SIZE)) == want
    with Replica.open(tmp_path / "c1") as c:
        assert image(c) == want
        c.close()
    src.close()


def test_a_prune_leaves_a_shared_layer_whole(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    want = bytes(src.view("s2").read(0, SIZE))
    make_clone(tmp_path / "src", tmp_path / "c1", "s2", BASE)
    src.write(32 * BS, pattern(5, 64 * BS))  # the head now covers much of s2
    src.delete_snapshot("s2")
    src.purge()
    with Replica.open(tmp_path / "c1") as c:
        assert image(c) == want
    src.close()


def test_a_rebuild_writing_a_shared_layer_copies_it_first(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    want = bytes(src.view("s2").read(0, SIZE))
    make_clone(tmp_path / "src", tmp_path / "c1", "s2", BASE)
    make_clone(tmp_path / "src", tmp_path / "c2", "s2", BASE)
    with Replica.open(tmp_path / "c1") as c1:
        layers = [dataclasses.asdict(la) for la in c1.layers()]
        c1.prepare_rebuild([la for la in layers if not la["head"]],
                           "volume-snap-s2.img", SIZE)
        assert c1.incomplete == ["volume-snap-s1.img", "volume-snap-s2.img"]
        h = c1.open_layer("volume-snap-s2.img")
        h.write(0, pattern(6, BS))  # what a rebuild would copy
        h.close()
        assert os.stat(tmp_path / "c1" / "volume-snap-s2.img").st_nlink == 1
    with Replica.open(tmp_path / "c2") as c2:
        assert image(c2) == want
    assert bytes(src.view("s2").read(0, SIZE)) == want
    src.close()


def test_flatten_stands_alone(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    want = bytes(src.view("s2").read(0, SIZE))
    make_clone(tmp_path / "src", tmp_path / "c1", "s2", BASE)
    with Replica.open(tmp_path / "c1") as c:
        c.write(200 * BS, pattern(4, BS))
        want = want[:200 * BS] + pattern(4, BS) + want[201 * BS:]
        assert c.flatten() == ["volume-snap-s1.img", "volume-snap-s2.img"]
        c.purge()
        assert image(c) == want
        assert all(la.base is None for la in c.layers())
        assert c.shared()[0] == 0
    src.close()
    for f in os.listdir(tmp_path / "c1"):
        assert os.stat(tmp_path / "c1" / f).st_nlink == 1
    with Replica.open(tmp_path / "c1") as c:
        assert image(c) == want


def test_clone_of_a_clone_and_from_a_sibling(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    want = bytes(src.view("s2").read(0, SIZE))
    make_clone(tmp_path / "src", tmp_path / "c1", "s2", BASE)
    # Another clone of src@s2 linked from c1's copy of the base layers.
    make_clone(tmp_path / "c1", tmp_path / "c2", "s2", BASE, within=BASE)
    assert (os.stat(tmp_path / "c2" / "volume-snap-s2.img").st_ino
            == os.stat(tmp_path / "src" / "volume-snap-s2.img").st_ino)
    with Replica.open(tmp_path / "c1") as c1:
        c1.write(0, pattern(9, BS))
        c1.snapshot("t")
        want_t = bytes(c1.view("t").read(0, SIZE))
    make_clone(tmp_path / "c1", tmp_path / "cc", "t", {"volume": "c1", "snapshot": "t"})
    with Replica.open(tmp_path / "cc") as cc:
        assert image(cc) == want_t
        assert [la.base for la in cc.layers() if not la.head] == [BASE, BASE, {
            "volume": "c1", "snapshot": "t"}]
    with Replica.open(tmp_path / "c2") as c2:
        assert image(c2) == want
    src.close()


def test_bad_requests_change_nothing(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    with pytest.raises(CloneError, match="no snapshot 'nope'"):
        make_clone(tmp_path / "src", tmp_path / "c1", "nope", BASE)
    (tmp_path / "c2").mkdir()
    with pytest.raises(CloneError, match="exists already"):
        make_clone(tmp_path / "src", tmp_path / "c2", "s2", BASE)
    with pytest.raises(CloneError, match="not a replica directory"):
        make_clone(tmp_path / "nowhere", tmp_path / "c3", "s2", BASE)
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c3").exists()
    assert not temp_dir(tmp_path / "c1").exists()
    for f in ("volume-snap-s1.img", "volume-snap-s2.img"):
        assert os.stat(tmp_path / "src" / f).st_nlink == 1
    src.close()


def test_a_source_changing_while_linked_is_tried_again(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A checksum cached (a .meta rewritten) between reading and linking: linked again."""
    src = source(tmp_path / "src")
    real_link = meta.fs.link
    calls = itertools.count()

    def link(a: str | Path, b: str | Path) -> None:
        real_link(a, b)
        if next(calls) == 0:
            src.checksum("s1")  # rewrites volume-snap-s1.img.meta

    monkeypatch.setattr(meta.fs, "link", link)
    make_clone(tmp_path / "src", tmp_path / "c1", "s2", BASE)
    monkeypatch.undo()
    with Replica.open(tmp_path / "c1") as c:
        assert image(c) == bytes(src.view("s2").read(0, SIZE))
        assert [la.checksum is not None for la in c.layers() if not la.head] == [True, False]
    src.close()


def test_crash_at_every_step_leaves_no_clone_or_a_whole_one(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    want = bytes(src.view("s2").read(0, SIZE))
    src.close()
    for allow in itertools.count():
        dst = tmp_path / f"c{allow}"
        with pytest.MonkeyPatch.context() as mp:
            inj = Injector(mp, allow)
            with contextlib.suppress(Crash):
                make_clone(tmp_path / "src", dst, "s2", BASE)
            fired = inj.fired
        if dst.exists():
            with Replica.open(dst) as c:
                assert image(c) == want
        else:
            # A crash leaves at most the temporary directory; the next attempt goes on.
            make_clone(tmp_path / "src", dst, "s2", BASE)
            with Replica.open(dst) as c:
                assert image(c) == want
        if fired is None:
            break
    assert allow > 5
    with Replica.open(tmp_path / "src") as s:
        assert bytes(s.view("s2").read(0, SIZE)) == want


@pytest.mark.parametrize("what", ["flatten", "fold"])
def test_crash_while_unsharing_leaves_every_volume_whole(tmp_path: Path, what: str) -> None:
    """A crash at any filesystem mutation of a flatten (in the clone) or of a fold into a
    shared layer (in the source): both reopen reading what they read before."""
    for allow in itertools.count():
        d = tmp_path / str(allow)
        src = source(d / "src")
        want_src, want_s2 = image(src), bytes(src.view("s2").read(0, SIZE))
        src.close()
        make_clone(d / "src", d / "c1", "s2", BASE)
        make_clone(d / "src", d / "c2", "s2", BASE)
        target = Replica.open(d / ("c1" if what == "flatten" else "src"))
        with pytest.MonkeyPatch.context() as mp:
            inj = Injector(mp, allow)
            with contextlib.suppress(Crash):
                if what == "flatten":
                    target.flatten()
                    target.purge()
                else:
                    target.delete_snapshot("s1")
                    target.purge()
            fired = inj.fired
        with contextlib.suppress(Exception):
            target.close()  # (its flush may fail after the crash; the lock goes anyway)
        for name, want in (("src", want_src), ("c1", want_s2), ("c2", want_s2)):
            with Replica.open(d / name) as r:
                assert image(r) == want, (allow, fired, name)
                if name == "src":
                    assert bytes(r.view("s2").read(0, SIZE)) == want_s2, (allow, fired)
        if fired is None:
            break
    assert allow > 3


def test_the_agents_clone_call(tmp_path: Path) -> None:
    """Only DISK/replicas/NAME paths on one disk; stale half-built clones are swept, fresh
    ones (another clone being made) kept; usage counts linked files as shared."""
    reps = tmp_path / "disk" / "replicas"
    src = source(reps / "src")
    src.close()
    with pytest.raises(ValueError, match="not a replica directory"):
        clone_replica(str(reps / "src"), str(tmp_path / "elsewhere"), "s2", BASE)
    with pytest.raises(CloneError, match="not on the disk"):
        clone_replica(str(reps / "src"), str(tmp_path / "disk2" / "replicas" / "c"), "s2", BASE)
    stale, fresh = temp_dir(reps / "old"), temp_dir(reps / "new")
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (1, 1))
    res = clone_replica(str(reps / "src"), str(reps / "c1"), "s2", BASE)
    assert res["layers"] == ["volume-snap-s1.img", "volume-snap-s2.img"]
    assert not stale.exists() and fresh.exists()
    use = replica_usage(str(reps / "c1"))
    assert use["shared"] >= 96 * BS and use["owned"] == 0
    assert replica_usage(str(reps / "gone")) == {"shared": 0, "owned": 0}
