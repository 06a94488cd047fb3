"""Opening a replica directory: refusals name the file and change nothing; leftovers go."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from drove.replica import Replica, ReplicaError

BS = 4096


def make(d: Path) -> None:
    """s1 <- s2 <- head, closed."""
    with Replica.create(d, 16 * BS) as r:
        r.write(0, b"1" * BS)
        r.snapshot("s1")
        r.write(BS, b"2" * BS)
        r.snapshot("s2")
        r.write(2 * BS, b"3" * BS)


def fingerprint(d: Path) -> dict[str, tuple[int, str]]:
    """Every file's size and content hash (with the lock file)."""
    return {
        p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(d.iterdir())
    }


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def set_key(key: str, value: object) -> Callable[[dict], None]:
    def change(obj: dict) -> None:
        obj[key] = value
    return change


def corrupt(path: Path) -> None:
    path.write_bytes(b"{not json")


BREAKAGES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "volume.meta garbage": (lambda d: corrupt(d / "volume.meta"), ["volume.meta", "corrupt"]),
    "volume.meta empty": (lambda d: (d / "volume.meta").write_bytes(b""), ["volume.meta"]),
    "volume.meta wrong type": (
        lambda d: edit_json(d / "volume.meta", set_key("size", "big")), ["volume.meta", "size"]),
    "volume.meta unknown version": (
        lambda d: edit_json(d / "volume.meta", set_key("format", 99)), ["volume.meta", "99"]),
    "volume.meta lists unknown head": (
        lambda d: edit_json(d / "volume.meta", set_key("head", "volume-head-099.img")),
        ["volume.meta", "volume-head-099.img"]),
    "layer meta garbage": (
        lambda d: corrupt(d / "volume-snap-s1.img.meta"), ["volume-snap-s1.img.meta"]),
    "layer meta missing": (
        lambda d: (d / "volume-snap-s2.img.meta").unlink(),
        ["volume-snap-s2.img.meta", "missing"]),
    "layer file missing": (
        lambda d: (d / "volume-snap-s1.img").unlink(), ["volume-snap-s1.img", "missing"]),
    "head file missing": (
        lambda d: (d / "volume-head-003.img").unlink(), ["volume-head-003.img", "missing"]),
    "parent not found": (
        lambda d: edit_json(d / "volume-snap-s2.img.meta",
                            set_key("parent", "volume-snap-zz.img")),
        ["volume-snap-s2.img.meta", "volume-snap-zz.img"]),
    "parent cycle": (
        lambda d: edit_json(d / "volume-snap-s1.img.meta",
                            set_key("parent", "volume-snap-s2.img")),
        ["volume-snap-s", "cycle"]),
    "snapshot size mismatch": (
        lambda d: os.truncate(d / "volume-snap-s1.img", 8 * BS), ["volume-snap-s1.img", "size"]),
    "head too small": (
        lambda d: os.truncate(d / "volume-head-003.img", 8 * BS), ["volume-head-003.img"]),
    "meta names another file": (
        lambda d: edit_json(d / "volume-snap-s1.img.meta", set_key("file", "x.img")),
        ["volume-snap-s1.img.meta", "x.img"]),
    "duplicate live name": (
        lambda d: edit_json(d / "volume-snap-s2.img.meta", set_key("name", "s1")),
        ["s1", "volume-snap-s"]),
    "bad labels": (
        lambda d: edit_json(d / "volume-snap-s1.img.meta", set_key("labels", {"a": 1})),
        ["volume-snap-s1.img.meta", "labels"]),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_open_refuses_and_changes_nothing(tmp_path: Path, case: str) -> None:
    d = tmp_path / "r"
    make(d)
    breakage, words = BREAKAGES[case]
    breakage(d)
    # A leftover that a good open would remove: a failed open must leave it too.
    (d / "volume-head-009.img").write_bytes(b"leftover")
    before = fingerprint(d)
    with pytest.raises(ReplicaError) as e:
        Replica.open(d)
    for word in words:
        assert word in str(e.value), (word, str(e.value))
    assert fingerprint(d) == before


def test_open_without_lock_file_leaves_none_on_failure(tmp_path: Path) -> None:
    d = tmp_path / "r"
    make(d)
    (d / "volume.lock").unlink()
    corrupt(d / "volume.meta")
    with pytest.raises(ReplicaError):
        Replica.open(d)
    assert not (d / "volume.lock").exists()


def test_not_a_replica(tmp_path: Path) -> None:
    with pytest.raises(ReplicaError, match=r"volume\.meta"):
        Replica.open(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_second_open_names_holder_pid(tmp_path: Path) -> None:
    d = tmp_path / "r"
    make(d)
    r = Replica.open(d)
    before = fingerprint(d)
    with pytest.raises(ReplicaError) as e:
        Replica.open(d)
    assert str(os.getpid()) in str(e.value) and "volume.lock" in str(e.value)
    assert fingerprint(d) == before
    r.close()
    Replica.open(d).close()  # released on close


def test_create_refuses_existing_replica(tmp_path: Path) -> None:
    d = tmp_path / "r"
    make(d)
    before = fingerprint(d)
    with pytest.raises(ReplicaError, match="already"):
        Replica.create(d, 16 * BS)
    assert fingerprint(d) == before
    with pytest.raises(ValueError):
        Replica.create(tmp_path / "odd", 1000)


def test_leftovers_removed_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "r"
    make(d)
    leftovers = ["volume-head-009.img", "volume-head-009.img.meta", "volume-snap-x.img",
                 "volume-snap-x.img.meta.tmp", "volume.meta.tmp"]
    for name in leftovers:
        (d / name).write_bytes(b"junk")
    (d / "notes.txt").write_text("not ours")
    with caplog.at_level(logging.WARNING, logger="drove.replica.chain"):
        r = Replica.open(d)
    for name in leftovers:
        assert not (d / name).exists()
        assert any(name in rec.getMessage() for rec in caplog.records), name
    assert (d / "notes.txt").exists()
    assert r.read(0, 3 * BS) == b"1" * BS + b"2" * BS + b"3" * BS
    r.close()


def test_interrupted_expand_is_undone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "r"
    make(d)
    os.truncate(d / "volume-head-003.img", 32 * BS)  # truncated up, size never committed
    with caplog.at_level(logging.WARNING, logger="drove.replica.chain"):
        r = Replica.open(d)
    assert r.size == 16 * BS
    assert os.path.getsize(d / "volume-head-003.img") == 16 * BS
    assert "expand" in caplog.text
    r.snapshot("s3")  # its file size must match its meta on the next open
    r.close()
    Replica.open(d).close()
