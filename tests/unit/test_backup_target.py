"""Backup targets: a directory and S3 (moto standing in for radosgw)."""

import os
import socket
import time

import pytest

from drove.backup import s3target
from drove.backup.errors import NotFoundError, TargetError
from drove.backup.filetarget import FileTarget
from drove.backup.target import open_target


@pytest.fixture(params=["file", "s3"])
def target(request, tmp_path):
    """A fresh, empty target of each kind."""
    if request.param == "file":
        (tmp_path / "t").mkdir()
        t = open_target(f"file://{tmp_path}/t")
    else:
        t = request.getfixturevalue("moto").target()
    yield t
    t.close()


def test_put_get_exists_list_delete(target):
    assert list(target.list("")) == []
    target.put("a/b/c.blk", b"one")
    target.put("a/b/d.blk", b"two")
    target.put("a/x.cfg", b"three")
    target.put("locks/1.json", b"{}")
    assert target.get("a/b/c.blk") == b"one"
    assert target.exists("a/b/d.blk") and not target.exists("a/b/e.blk")
    assert sorted(target.list("a/")) == ["a/b/c.blk", "a/b/d.blk", "a/x.cfg"]
    assert sorted(target.list("a/b/")) == ["a/b/c.blk", "a/b/d.blk"]
    assert sorted(target.list("a/b/c")) == ["a/b/c.blk"]
    assert sorted(target.list("")) == ["a/b/c.blk", "a/b/d.blk", "a/x.cfg", "locks/1.json"]
    assert list(target.list("nothing/")) == []
    assert dict(target.list_sizes("a/b/")) == {"a/b/c.blk": 3, "a/b/d.blk": 3}
    target.put("a/b/c.blk", b"replaced")
    assert target.get("a/b/c.blk") == b"replaced"
    target.delete("a/b/c.blk")
    target.delete("a/b/c.blk")  # absent is fine
    assert not target.exists("a/b/c.blk")
    with pytest.raises(NotFoundError, match=r"a/b/c\.blk does not exist"):
        target.get("a/b/c.blk")
    target.delete_many(["a/b/d.blk", "a/x.cfg", "not/there"])
    assert list(target.list("")) == ["locks/1.json"]
    target.sync()


def test_delete_many_in_batches(target, monkeypatch):
    monkeypatch.setattr(s3target, "_DELETE_BATCH", 3)
    keys = [f"blocks/{i:02d}.blk" for i in range(8)]
    for k in keys:
        target.put(k, b"x")
    target.delete_many(keys[:7])
    assert list(target.list("blocks/")) == keys[7:]


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "../b", "a/./b", "a/"])
def test_bad_keys_are_refused(target, key):
    with pytest.raises(ValueError, match="bad target key"):
        target.put(key, b"x")


def test_file_put_is_atomic_and_leaves_no_temp(tmp_path):
    t = FileTarget(tmp_path)
    t.put("x/y.blk", b"data")
    assert os.listdir(tmp_path / "x") == ["y.blk"]
    # A put that fails (the parent is a file) leaves nothing behind.
    with pytest.raises(TargetError, match=r"cannot write x/y\.blk/z"):
        t.put("x/y.blk/z", b"data")
    assert os.listdir(tmp_path / "x") == ["y.blk"]


def test_file_temp_files_are_hidden_and_collected(tmp_path):
    t = FileTarget(tmp_path)
    t.put("blocks/aa/a.blk", b"a")
    fresh = tmp_path / "blocks/aa/b.blk.tmp-0123456789ab"
    old = tmp_path / "blocks/aa/c.blk.tmp-ba9876543210"
    fresh.write_bytes(b"partial")
    old.write_bytes(b"partial")
    hour_ago = time.time() - 3700
    os.utime(old, (hour_ago, hour_ago))
    assert list(t.list("blocks/")) == ["blocks/aa/a.blk"]
    stale = list(t.stale_temp_files(3600))
    assert stale == ["blocks/aa/c.blk.tmp-ba9876543210"]
    t.delete_many(stale)
    assert not old.exists() and fresh.exists()


def test_file_target_needs_an_existing_directory(tmp_path):
    with pytest.raises(TargetError, match="does not exist: create it"):
        open_target(f"file://{tmp_path}/missing")
    with pytest.raises(ValueError, match="absolute"):
        FileTarget("relative/dir")


def test_file_url_round_trip(tmp_path):
    t = open_target(f"file://{tmp_path}")
    assert isinstance(t, FileTarget) and t.root == tmp_path
    assert t.url == f"file://{tmp_path}"
    assert open_target(f"file://localhost{tmp_path}").root == tmp_path


@pytest.mark.parametrize(("url", "message"), [
    ("http://example.com/x", "unsupported backup target scheme 'http'"),
    ("/abs/path", "has no scheme"),
    ("file:relative/dir", "needs an absolute path"),
    ("file://relative/dir", "names host 'relative'"),
    ("s3:///prefix", "names no bucket"),
    ("s3://", "names no bucket"),
])
def test_bad_urls(url, message):
    with pytest.raises(ValueError, match=message):
        open_target(url)


def test_s3_missing_bucket(moto):
    with pytest.raises(TargetError, match=r"bucket 'nope' does not exist at http://127.0.0.1:"
                                          r"\d+: create it first"):
        open_target("s3://nope/x", endpoint=moto.endpoint, access_key="a", secret_key="b")


def test_s3_unreachable_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TargetError, match=r"cannot reach .*check the endpoint"):
        open_target("s3://b", endpoint=f"http://127.0.0.1:{port}", access_key="a",
                    secret_key="b")
    assert time.monotonic() - start < 10


def test_s3_half_credentials_are_refused(moto):
    with pytest.raises(ValueError, match="both access_key and secret_key"):
        open_target("s3://b", endpoint=moto.endpoint, access_key="a")


def test_s3_prefixes_are_separate(moto):
    bucket = moto.new_bucket()
    one = open_target(f"s3://{bucket}/one", endpoint=moto.endpoint, access_key="a",
                      secret_key="b")
    two = moto.target(bucket, "two/deeper")
    whole = moto.target(bucket, "")
    assert one.url == f"s3://{bucket}/one" and whole.url == f"s3://{bucket}"
    one.put("k", b"1")
    two.put("k", b"2")
    assert (one.get("k"), two.get("k")) == (b"1", b"2")
    assert list(one.list("")) == ["k"]
    assert sorted(whole.list("")) == ["one/k", "two/deeper/k"]
    raw = moto.client().get_object(Bucket=bucket, Key="two/deeper/k")["Body"].read()
    assert raw == b"2"
