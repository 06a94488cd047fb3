"""Metadata files: names, JSON round trips, validation messages, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from drove.replica import ReplicaError, meta
from drove.replica.meta import LayerMeta, VolumeMeta


def test_names() -> None:
    assert meta.head_file(7) == "volume-head-007.img"
    assert meta.head_file(1234) == "volume-head-1234.img"
    assert meta.head_number("volume-head-1234.img") == 1234
    assert meta.head_number("volume-snap-a.img") is None
    assert meta.snapshot_file("a", set()) == "volume-snap-a.img"
    assert meta.snapshot_file("a", {"volume-snap-a.img", "volume-snap-a~2.img"}) == \
        "volume-snap-a~3.img"
    assert meta.SNAP_RE.match("volume-snap-a~3.img")
    for ok in ("a", "A.b_c-9", "9" * 64):
        assert meta.validate_snapshot_name(ok) == ok
    for bad in ("", ".a", "a/b", "a~2", "x" * 65, None, 3):
        with pytest.raises(ValueError):
            meta.validate_snapshot_name(bad)
    for ours in ("volume-head-002.img", "volume-snap-x.img.meta", "volume.meta.tmp",
                 "volume-snap-x.img.meta.tmp"):
        assert meta.is_format_file(ours)
    for other in ("volume.meta", "volume.lock", "notes.txt", "volume-head-x.img"):
        assert not meta.is_format_file(other)


def test_round_trip() -> None:
    v = VolumeMeta(size=8192, head="volume-head-002.img",
                   layers=("volume-snap-a.img", "volume-head-002.img"), next_head=3)
    assert VolumeMeta.from_json(json.loads(json.dumps(v.to_json())), "v") == v
    m = LayerMeta(file="volume-snap-a.img", name="a", parent=None, created=meta.now_iso(),
                  size=8192, labels={"k": "v"}, removed=True, checksum="ab")
    assert LayerMeta.from_json(json.loads(json.dumps(m.to_json())), "m") == m
    assert m.created.endswith("Z")


@pytest.mark.parametrize("change, words", [
    ({"format": 2}, ["format version 2"]),
    ({"size": 1000}, ["size 1000"]),
    ({"size": True}, ["'size'"]),
    ({"layers": ["volume-head-002.img", "volume-head-002.img"]}, ["twice"]),
    ({"layers": ["../etc/passwd", "volume-head-002.img"]}, ["../etc/passwd"]),
    ({"next_head": 2}, ["next_head"]),
    ({"head": "volume-snap-a.img"}, ["volume-snap-a.img"]),
])
def test_volume_meta_validation(change: dict, words: list[str]) -> None:
    obj = {"format": 1, "size": 8192, "head": "volume-head-002.img",
           "layers": ["volume-snap-a.img", "volume-head-002.img"], "next_head": 3}
    obj.update(change)
    with pytest.raises(ReplicaError) as e:
        VolumeMeta.from_json(obj, "/x/volume.meta")
    assert "/x/volume.meta" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_layer_meta_validation() -> None:
    good = LayerMeta(file="volume-snap-a.img", name="a", parent=None, created=meta.now_iso(),
                     size=8192).to_json()
    for key, value in [("created", "yesterday"), ("name", "a/b"), ("removed", "no"),
                       ("labels", {"a": 1}), ("size", 0)]:
        obj = dict(good, **{key: value})
        with pytest.raises(ReplicaError, match=r"f\.meta"):
            LayerMeta.from_json(obj, "f.meta")
    obj = dict(good)
    del obj["parent"]
    with pytest.raises(ReplicaError, match="missing key 'parent'"):
        LayerMeta.from_json(obj, "f.meta")
    with pytest.raises(ReplicaError, match="JSON object"):
        LayerMeta.from_json([1], "f.meta")


def test_write_json_atomic(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        meta.write_json_atomic(tmp_path, fd, "x.meta", {"a": 1})
        meta.write_json_atomic(tmp_path, fd, "x.meta", {"a": 2})
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == ["x.meta"]
    assert meta.read_json(tmp_path / "x.meta") == {"a": 2}
    (tmp_path / "bad").write_bytes(b"\xff\xfe")
    with pytest.raises(ReplicaError, match="corrupt"):
        meta.read_json(tmp_path / "bad")
    with pytest.raises(ReplicaError, match="missing"):
        meta.read_json(tmp_path / "nope")


def test_write_all_handles_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = meta.fs.pwritev

    def short(fd: int, bufs: list, offset: int, flags: int = 0) -> int:
        first = memoryview(bufs[0])[:3]  # at most 3 bytes per call
        return real(fd, [first], offset, flags)

    monkeypatch.setattr(meta.fs, "pwritev", short)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        meta.write_all(fd, [b"hello", b"", bytearray(b" world")], 2)
        assert os.pread(fd, 20, 0) == b"\0\0hello world"
    finally:
        os.close(fd)


def test_write_in_pieces_aligns_every_call_and_keeps_the_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = meta.fs.pwritev
    calls: list[tuple[int, int, int]] = []

    def record(fd: int, bufs: list, offset: int, flags: int = 0) -> int:
        calls.append((offset, sum(memoryview(b).nbytes for b in bufs), flags))
        return real(fd, bufs, offset, flags)

    monkeypatch.setattr(meta.fs, "pwritev", record)
    piece = meta.FOLIO_PIECE
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        data = [os.urandom(1000), os.urandom(3 * piece), os.urandom(5)]
        meta.write_in_pieces(fd, data, piece - 100)
        total = sum(len(b) for b in data)
        assert os.pread(fd, total, piece - 100) == b"".join(data)
        assert calls[0] == (piece - 100, 100, 0)  # up to the first boundary
        assert all(off % piece == 0 and n <= piece for off, n, _ in calls[1:])
        assert sum(n for _, n, _ in calls) == total
        calls.clear()
        meta.write_in_pieces(fd, [b"s" * (2 * piece)], 0, os.RWF_DSYNC)
        assert calls == [(0, 2 * piece, os.RWF_DSYNC)]  # a FUA write stays one synced call
    finally:
        os.close(fd)
