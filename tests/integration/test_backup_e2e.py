"""Backups through a real `drove serve`: a directory target and Ceph radosgw over HTTP.

Every test runs once per target.  Data is written with qemu-io and real
filesystems, compared with `qemu-img compare` over the volumes' NBD exports,
and the target's contents are read back to check what is stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

# A real `drove serve` per test, and Ceph radosgw for the s3 half.
pytestmark = pytest.mark.slow

MiB = 1 << 20
BLOCK = 2 * MiB


@pytest.fixture(params=["file", "s3"])
def target(request, manager, tmp_path):
    """The manager with a backup target set; yields an object that can list stored keys."""
    if request.param == "file":
        root = tmp_path / "backups"
        root.mkdir()
        manager.cli("backup", "target", "set", f"file://{root}")
        yield FileStore(root)
    else:
        gw = request.getfixturevalue("radosgw")
        bucket = f"t{os.getpid()}-{time.monotonic_ns() % 10**9}"
        gw.make_bucket(bucket)
        manager.cli("backup", "target", "set", f"s3://{bucket}/drove", "--endpoint",
                    gw.endpoint, "--region", gw.region, "--access-key", gw.access_key,
                    "--secret-key", gw.secret_key)
        yield S3Store(gw.client(), bucket, "drove/")


class FileStore:
    """What a directory target holds."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def keys(self, prefix: str) -> list[str]:
        """Keys under prefix."""
        base = self.root / prefix
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and ".tmp-" not in p.name) if base.exists() else []

    def read(self, key: str) -> bytes:
        """One object."""
        return (self.root / key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        """Replace one object."""
        (self.root / key).write_bytes(data)

    def remove(self, key: str) -> None:
        """Delete one object."""
        (self.root / key).unlink()


class S3Store:
    """What a bucket prefix holds."""

    def __init__(self, client, bucket: str, prefix: str) -> None:
        self.c, self.bucket, self.prefix = client, bucket, prefix

    def keys(self, prefix: str) -> list[str]:
        """Keys under prefix (relative to the target's prefix)."""
        out = []
        for page in self.c.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix):
            out += [o["Key"][len(self.prefix):] for o in page.get("Contents", [])]
        return sorted(out)

    def read(self, key: str) -> bytes:
        """One object."""
        return self.c.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        """Replace one object."""
        self.c.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def remove(self, key: str) -> None:
        """Delete one object."""
        self.c.delete_object(Bucket=self.bucket, Key=self.prefix + key)


def block_hashes(store) -> set[str]:
    """Hashes of every block on the target."""
    return {Path(k).stem for k in store.keys("blocks/")}


def manifest(store, volume: str, name: str) -> dict:
    """A backup's manifest as stored."""
    return json.loads(store.read(f"volumes/{volume}/backups/{name}.cfg"))


def qemu_io(uri: str, *commands: str) -> None:
    """Run qemu-io commands against an NBD URI."""
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, uri], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def fill(uri: str, pieces: list[tuple[int, int]], seed: int) -> None:
    """Write a distinct byte pattern into each (offset, length) piece with qemu-io."""
    cmds = [f"write -P {(seed + i) % 251 + 1} {off} {length}"
            for i, (off, length) in enumerate(pieces)]
    for i in range(0, len(cmds), 50):
        qemu_io(uri, *cmds[i:i + 50])


def compare(a: str, b: str) -> None:
    """qemu-img compare of two NBD URIs (identical contents)."""
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def backup(manager, volume: str, *args: str) -> dict:
    """`drove backup create VOLUME --json`: the Backup."""
    out = manager.cli_json("backup", "create", volume, *args)
    assert out["name"].startswith("backup-")
    return out


def test_backup_restore_filesystem_identical(manager, target, tmp_path):
    manager.cli("disk", "add", str(tmp_path / "d2"))
    manager.cli("volume", "create", "src", "--size", "128M", "--replicas", "2")
    mnt = tmp_path / "mnt"
    manager.cli("volume", "attach", "src", "--mount", str(mnt))
    for i in range(6):
        (mnt / f"f{i}").write_bytes(os.urandom(300_000 + i * 4099))
    (mnt / "zeros").write_bytes(bytes(3 * MiB))
    os.sync()
    b = backup(manager, "src")
    assert b["volume"] == "src" and b["size"] == 128 * MiB
    assert b["bytes_new"] > 0 and b["bytes_reused"] == 0
    listed = manager.cli_json("backup", "list", "src")
    bad = manager.api("GET", "/v1/backups", params={"volume": "Not A Name"})
    assert bad.status_code == 422 and "volume" in bad.json()["detail"], bad.text
    assert [x["name"] for x in listed] == [b["name"]]
    for key in ("name", "volume", "snapshot", "size", "bytes_new", "bytes_reused", "created"):
        assert key in listed[0], key

    restored = manager.cli_json("backup", "restore", b["name"], "--to", "copy",
                                "--replicas", "2")
    assert restored["volume"] == "copy"
    vol = manager.cli_json("volume", "get", "copy")
    assert vol["size"] == 128 * MiB and vol["state"] == "detached"
    copy = manager.cli_json("volume", "attach", "copy")
    snap = manager.cli_json("snapshot", "export", "src", b["snapshot"])
    compare(snap["nbd_uri"], copy["nbd_uri"])
    # Sparse: the copy holds about what the backup holds, not the whole volume.
    mapped = json.loads(subprocess.run(["nbdinfo", "--map", "--json", copy["nbd_uri"]],
                                       capture_output=True, text=True, check=True).stdout)
    data = sum(e["length"] for e in mapped if not e["type"] & 1)
    assert data <= b["data_size"] and data < 64 * MiB, (data, b["data_size"])

    # And the filesystem mounts with the files in it.
    manager.cli("volume", "detach", "copy")
    mnt2 = tmp_path / "mnt2"
    manager.cli("volume", "attach", "copy", "--mount", str(mnt2))
    for i in range(6):
        assert (mnt2 / f"f{i}").read_bytes() == (mnt / f"f{i}").read_bytes()
    manager.cli("volume", "detach", "copy")
    manager.cli("volume", "detach", "src")


def test_backup_while_being_written(manager, target):
    manager.cli("volume", "create", "busy", "--size", "256M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "busy")["nbd_uri"]
    fill(uri, [(i * 16 * MiB, 4 * MiB) for i in range(16)], seed=11)
    writer = subprocess.Popen(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=64k",
         "--iodepth=8", "--size=256M", "--time_based", "--runtime=60",
         "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        b = backup(manager, "busy")
        assert writer.poll() is None, "the writer stopped before the backup ended"
    finally:
        writer.terminate()
        out, err = writer.communicate(timeout=60)
    # The writer saw no error while the snapshot was taken and read.
    (job,) = json.loads(out[out.index("{"):])["jobs"]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0, err
    # The backup holds the snapshot as it was, whatever came after.
    manager.cli("backup", "restore", b["name"], "--to", "busy2", "--replicas", "1")
    copy = manager.cli_json("volume", "attach", "busy2")
    snap = manager.cli_json("snapshot", "export", "busy", b["snapshot"])
    compare(snap["nbd_uri"], copy["nbd_uri"])
    for v in ("busy", "busy2"):
        manager.cli("volume", "detach", v)


def test_incremental_reads_and_uploads_only_what_changed(manager, target):
    size = 4 << 30
    manager.cli("volume", "create", "big", "--size", "4G", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "big")["nbd_uri"]
    # 64 MiB of data spread over the volume, then a full backup.
    fill(uri, [(i * (size // 32), BLOCK) for i in range(32)], seed=1)
    full = backup(manager, "big")
    assert full["parent"] is None
    assert full["bytes_read"] == 32 * BLOCK and full["bytes_new"] == 32 * BLOCK
    # Change 1% of the volume (40 MiB: 20 scattered 2 MiB pieces, two over old data).
    changed = [(i * 200 * MiB + (BLOCK if i % 2 else 0), BLOCK) for i in range(20)]
    overwritten = {off for off, _ in changed} & {i * (size // 32) for i in range(32)}
    assert len(overwritten) == 2
    fill(uri, changed, seed=100)
    inc = backup(manager, "big")
    assert inc["parent"] == full["name"]
    one_percent = size // 100
    assert inc["bytes_read"] == 20 * BLOCK <= one_percent * 1.1, inc
    assert inc["bytes_new"] == 20 * BLOCK, inc
    assert inc["bytes_reused"] == (32 - 2) * BLOCK, inc
    # The incremental is complete on its own: restore it and compare.
    manager.cli("backup", "restore", inc["name"], "--to", "big2", "--replicas", "1")
    copy = manager.cli_json("volume", "attach", "big2")
    snap = manager.cli_json("snapshot", "export", "big", inc["snapshot"])
    compare(snap["nbd_uri"], copy["nbd_uri"])
    manager.cli("volume", "detach", "big2")
    manager.cli("volume", "detach", "big")


def test_dedup_delete_and_gc(manager, target):
    pieces = [(i * 8 * MiB, BLOCK) for i in range(8)]
    uris = {}
    for v in ("a", "b"):
        manager.cli("volume", "create", v, "--size", "64M", "--replicas", "1")
        uris[v] = manager.cli_json("volume", "attach", v)["nbd_uri"]
        fill(uris[v], pieces, seed=7)
    ba = backup(manager, "a")
    after_a = block_hashes(target)
    assert len(after_a) == 8 and ba["bytes_new"] == 8 * BLOCK
    bb = backup(manager, "b")
    assert bb["bytes_new"] == 0 and bb["bytes_reused"] == 8 * BLOCK
    assert block_hashes(target) == after_a
    # Two more backups of a with new data; then delete all but b's.
    fill(uris["a"], [(40 * MiB, BLOCK)], seed=50)
    ba2 = backup(manager, "a")
    assert ba2["bytes_new"] == BLOCK
    fill(uris["a"], [(44 * MiB, BLOCK)], seed=60)
    ba3 = backup(manager, "a")
    for name in (ba["name"], ba2["name"], ba3["name"]):
        manager.cli("backup", "delete", name, "--yes")
    kept = manifest(target, "b", bb["name"])
    assert block_hashes(target) == set(kept["blocks"].values())
    assert [x["name"] for x in manager.cli_json("backup", "list")] == [bb["name"]]
    for v in ("a", "b"):
        manager.cli("volume", "detach", v)


def test_delete_racing_a_backup_keeps_its_blocks(manager, target):
    manager.cli("volume", "create", "a", "--size", "512M", "--replicas", "1")
    manager.cli("volume", "create", "b", "--size", "512M", "--replicas", "1")
    pieces = [(i * 4 * MiB, BLOCK) for i in range(100)]
    for v in ("a", "b"):
        fill(manager.cli_json("volume", "attach", v)["nbd_uri"], pieces, seed=3)
    ba = backup(manager, "a")
    # b's backup reuses a's blocks; a's delete starts while it runs and must not
    # remove them.
    task = manager.ok("POST", "/v1/volumes/b/backups", json={})
    deleting = manager.ok("DELETE", f"/v1/backups/{ba['name']}")
    for t in (task, deleting):
        deadline = time.monotonic() + 300
        while manager.ok("GET", f"/v1/tasks/{t['id']}")["state"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    done = manager.ok("GET", f"/v1/tasks/{task['id']}")
    assert done["state"] == "succeeded", done
    assert manager.ok("GET", f"/v1/tasks/{deleting['id']}")["state"] == "succeeded"
    name = done["result"]["name"]
    verified = manager.cli_json("backup", "verify", name)
    assert verified["errors"] == [] and verified["blocks"] == 100
    assert block_hashes(target) == set(manifest(target, "b", name)["blocks"].values())
    for v in ("a", "b"):
        manager.cli("volume", "detach", v)


def test_corrupt_and_missing_blocks_are_named(manager, target):
    manager.cli("volume", "create", "c", "--size", "64M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "c")["nbd_uri"]
    fill(uri, [(0, BLOCK), (10 * MiB, BLOCK), (20 * MiB, BLOCK)], seed=9)
    b = backup(manager, "c")
    blocks = manifest(target, "c", b["name"])["blocks"]
    offset, digest = "10485760", blocks["10485760"]
    key = f"blocks/{digest[:2]}/{digest[2:4]}/{digest}.blk"
    data = bytearray(target.read(key))
    data[len(data) // 2] ^= 0x40
    target.write(key, bytes(data))

    r = manager.cli("backup", "verify", b["name"], check=False)
    assert r.returncode == 1
    assert digest[:12] in r.stdout + r.stderr and "10485760" in r.stdout + r.stderr
    r = manager.cli("backup", "restore", b["name"], "--to", "bad", "--replicas", "1",
                    check=False)
    assert r.returncode == 1 and digest[:12] in r.stdout + r.stderr
    assert "bad" not in {v["name"] for v in manager.cli_json("volume", "list")}

    target.remove(key)
    r = manager.cli("backup", "verify", b["name"], "--json", check=False)
    assert r.returncode == 1
    result = json.loads(r.stdout)
    assert [(e["offset"], e["hash"]) for e in result["errors"]] == [(int(offset), digest)]
    assert "missing" in result["errors"][0]["error"]
    manager.cli("volume", "detach", "c")

