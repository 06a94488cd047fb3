"""Rebuild between two real replica processes: prepare, layer exports, sync, verify.

The test plays the engine: it snapshots the source, prepares the target, mirrors
new writes to both heads, pulls every layer (all data, then only the ranges
whose digests differ), verifies each layer's checksum, and compares the
exports of both replicas with qemu-img.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from replicatools import ReplicaProc, nbdinfo_json, nbdsh, run

MiB = 1 << 20


def qemu_io(uri: str, *commands: str, check: bool = True, readonly: bool = False) -> str:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if readonly else [])
    for command in commands:
        args += ["-c", command]
    out = run([*args, uri], check=False)
    text = (out.stdout + out.stderr).decode(errors="replace")
    if check:
        assert out.returncode == 0 and "failed" not in text, text
    return text


def compare(a: str, b: str) -> None:
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b])


def source_layers(src: ReplicaProc) -> list[dict[str, Any]]:
    return [x for x in src.ok("GET", "/v1/layers", params={"removed": True}) if not x["head"]]


def prepare(tgt: ReplicaProc, src: ReplicaProc, head_parent: str,
            reuse: str | None = None) -> dict[str, Any]:
    size = src.ok("GET", "/v1/info")["size"]
    return tgt.ok("POST", "/v1/rebuild/prepare", json={
        "layers": source_layers(src), "head_parent": head_parent, "size": size,
        "reuse_head_as": reuse})


def sync(tgt: ReplicaProc, src: ReplicaProc, file: str,
         ranges: list[list[int]] | None = None) -> dict[str, Any]:
    job = tgt.ok("POST", "/v1/rebuild/sync", json={
        "file": file, "source": src.unix_uri(f"layer/{file}"), "ranges": ranges})
    assert job["state"] in ("running", "done")
    deadline = time.monotonic() + 60
    while job["state"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
        job = tgt.ok("GET", "/v1/rebuild/sync")
    assert job["state"] == "done", job
    assert job["bytes_done"] == job["bytes_total"]
    return job


def complete(tgt: ReplicaProc, src: ReplicaProc, file: str) -> None:
    checksum = src.ok("GET", f"/v1/layers/{file}/checksum")["checksum"]
    done = tgt.ok("POST", f"/v1/rebuild/layers/{file}/complete", json={"checksum": checksum})
    assert done["file"] == file and done["checksum"] == checksum


def differing(tgt: ReplicaProc, src: ReplicaProc, file: str, rs: int = MiB) -> list[list[int]]:
    a = tgt.ok("GET", f"/v1/layers/{file}/digests", params={"range_size": rs})
    b = src.ok("GET", f"/v1/layers/{file}/digests", params={"range_size": rs})
    assert a["range_size"] == b["range_size"] == rs
    return [[k * rs, rs] for k, (x, y) in enumerate(zip(a["digests"], b["digests"], strict=True))
            if x != y]


def compare_all(tgt: ReplicaProc, src: ReplicaProc) -> None:
    compare(src.uri("head"), tgt.uri("head"))
    names = [x["name"] for x in src.ok("GET", "/v1/layers") if x["name"]]
    assert names == [x["name"] for x in tgt.ok("GET", "/v1/layers") if x["name"]]
    for name in names:
        compare(src.uri(f"snapshot/{name}"), tgt.uri(f"snapshot/{name}"))


@pytest.mark.slow
def test_rebuild_full_then_delta(replicas) -> None:
    src = replicas("src", "32M")
    qemu_io(src.uri(), "write -P 0x11 0 2M", "write -P 0x12 5M 512k")
    src.ok("POST", "/v1/snapshots", json={"name": "s1", "labels": {"k": "v"}})
    qemu_io(src.uri(), "write -P 0x21 1M 1M", "write -P 0x22 20M 64k", "write -z 0 64k")
    src.ok("POST", "/v1/snapshots", json={"name": "s2"})
    qemu_io(src.uri(), "write -P 0x31 30M 1M", "discard 5M 64k", "write -P 0x32 100 1000")
    src.ok("POST", "/v1/snapshots", json={"name": "s3"})
    # The engine pauses I/O, snapshots every healthy replica, prepares the target.
    src.ok("POST", "/v1/snapshots", json={"name": "rb1"})
    tgt = replicas("tgt", "16M")
    info = prepare(tgt, src, "volume-snap-rb1.img")
    assert info["rebuilding"] and info["size"] == 32 * MiB
    assert info["incomplete"] == ["volume-snap-s1.img", "volume-snap-s2.img",
                                  "volume-snap-s3.img", "volume-snap-rb1.img"]
    # New writes reach both heads (whole blocks: the engine completes edges itself).
    for r in (src, tgt):
        qemu_io(r.uri(), "write -P 0x41 2M 128k", "write -z 6M 64k")
    assert "Invalid argument" in qemu_io(tgt.uri(), "write -P 0x42 4095 2", check=False)
    assert "Input/output error" in qemu_io(tgt.uri(), "read 0 4k", check=False)
    assert "Input/output error" in qemu_io(tgt.uri("snapshot/s1"), "read 0 4k", check=False,
                                           readonly=True)
    for file in info["incomplete"]:
        job = sync(tgt, src, file)
        assert job["bytes_total"] == 32 * MiB
        complete(tgt, src, file)
    info = tgt.ok("GET", "/v1/info")
    assert not info["rebuilding"] and info["incomplete"] == []
    compare_all(tgt, src)

    # The target goes away; a write reached only it (never acknowledged), the
    # source changes on, and a snapshot is deleted (folded into its child).
    qemu_io(tgt.uri(), "write -P 0x66 12M 64k")
    tgt.stop()
    qemu_io(src.uri(), "write -P 0x51 7M 1M")
    src.ok("DELETE", "/v1/snapshots/s2")
    src.ok("POST", "/v1/snapshots", json={"name": "rb2"})
    tgt = replicas("tgt", None)
    info = prepare(tgt, src, "volume-snap-rb2.img", reuse="volume-snap-rb2.img")
    assert info["incomplete"] == ["volume-snap-s1.img", "volume-snap-s3.img",
                                  "volume-snap-rb1.img", "volume-snap-rb2.img"]
    qemu_io(src.uri(), "write -P 0x71 9M 64k")
    qemu_io(tgt.uri(), "write -P 0x71 9M 64k")
    diffs = {f: differing(tgt, src, f) for f in info["incomplete"]}
    assert diffs["volume-snap-s1.img"] == diffs["volume-snap-rb1.img"] == []
    assert diffs["volume-snap-s3.img"] == [[0, MiB], [MiB, MiB], [20 * MiB, MiB]]  # s2's data
    # 6M: zeros the target wrote for real (it was rebuilding) where the source punched.
    assert diffs["volume-snap-rb2.img"] == [[6 * MiB, MiB], [7 * MiB, MiB], [12 * MiB, MiB]]
    for file, ranges in diffs.items():
        if ranges:
            job = sync(tgt, src, file, ranges)
            assert job["bytes_total"] == len(ranges) * MiB
        complete(tgt, src, file)
    assert not tgt.ok("GET", "/v1/info")["rebuilding"]
    compare_all(tgt, src)


def test_rebuild_api(replicas) -> None:
    src = replicas("src", "8M")
    nbdsh(src.uri(), "h.pwrite(b'a' * 65536, 0); h.pwrite(b'b' * 4096, 1048576)")
    src.ok("POST", "/v1/snapshots", json={"name": "s1"})
    tgt = replicas("tgt", "8M")
    # Engine state: stored, shown in info, limited.
    assert tgt.ok("GET", "/v1/info")["engine_state"] == {}
    state = {"generation": 3, "clean": True, "members": ["r1", "r2"]}
    assert tgt.ok("PUT", "/v1/engine-state", json=state) == state
    assert tgt.api("PUT", "/v1/engine-state", json={"x": "y" * 70000}).status_code == 400
    assert tgt.api("PUT", "/v1/engine-state", json=[1, 2]).status_code == 422
    info = tgt.ok("GET", "/v1/info")
    assert info["engine_state"] == state and info["rebuilding"] is False
    # Nothing to sync or complete before a prepare.
    file = "volume-snap-s1.img"
    assert tgt.ok("GET", "/v1/rebuild/sync")["state"] == "idle"
    assert tgt.api("POST", "/v1/rebuild/sync", json={
        "file": file, "source": src.uri(f"layer/{file}")}).status_code == 404
    prepare(tgt, src, file)
    layers = {x["file"]: x for x in tgt.ok("GET", "/v1/layers")}
    assert layers[file]["incomplete"] is True and layers[file]["checksum"] is None
    head = next(f for f, x in layers.items() if x["head"])
    assert layers[head]["incomplete"] is False
    # Layer exports: listed, writable only while incomplete, their own data map.
    names = {e["export-name"] for e in nbdinfo_json(tgt.uri(), "--list")["exports"]}
    assert {f"layer/{file}", f"layer/{head}", "snapshot/s1", "head"} <= names
    assert nbdinfo_json(tgt.uri(f"layer/{file}"))["exports"][0]["is_read_only"] is False
    assert nbdinfo_json(src.uri(f"layer/{file}"))["exports"][0]["is_read_only"] is True
    extents = nbdinfo_json(src.uri(f"layer/{file}"), "--map")
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
        (0, 65536, 0), (65536, 983040, 3), (MiB, 4096, 0), (MiB + 4096, 7 * MiB - 4096, 3)]
    raw = (src.dir / file).read_bytes()
    out = nbdsh(src.uri(f"layer/{file}"),
                "import sys; sys.stdout.buffer.write(h.pread(8388608, 0))")
    assert out.stdout == raw
    refused = nbdsh(src.uri(f"layer/{file}"), "h.pwrite(b'x' * 4096, 0)", check=False)
    assert refused.returncode != 0
    # Complete with a wrong checksum: 409, both checksums, the flag stays.
    right = src.ok("GET", f"/v1/layers/{file}/checksum")["checksum"]
    assert right == src.ok("GET", "/v1/snapshots/s1/checksum")["checksum"]
    resp = tgt.api("POST", f"/v1/rebuild/layers/{file}/complete", json={"checksum": right})
    assert resp.status_code == 409
    body = resp.json()
    assert body["expected"] == right and body["checksum"] != right
    assert tgt.ok("GET", "/v1/info")["incomplete"] == [file]
    # Writing the layer export directly is what a sync does.
    nbdsh(tgt.uri(f"layer/{file}"), "h.pwrite(b'a' * 65536, 0); h.pwrite(b'b' * 4096, 1048576);"
          "h.pwrite(b'c' * 4096, 2 * 1048576); h.trim(4096, 2 * 1048576); h.flush()")
    complete(tgt, src, file)
    assert tgt.ok("GET", "/v1/info")["rebuilding"] is False
    assert nbdinfo_json(tgt.uri(f"layer/{file}"))["exports"][0]["is_read_only"] is True
    compare(src.uri("snapshot/s1"), tgt.uri("snapshot/s1"))
    # Refusals: sync of a complete layer, a job while one runs, a bad source.
    resp = tgt.api("POST", "/v1/rebuild/sync", json={
        "file": file, "source": src.uri(f"layer/{file}")})
    assert resp.status_code == 409
    prepare(tgt, src, file)
    assert tgt.api("POST", "/v1/expand", json={"size": 16 * MiB}).status_code == 409
    assert tgt.api("POST", "/v1/revert", json={"snapshot": "s1"}).status_code == 409
    bad = tgt.ok("POST", "/v1/rebuild/sync", json={
        "file": file, "source": "nbd+unix:///layer/nope?socket=/nonexistent.sock"})
    deadline = time.monotonic() + 10
    while bad["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
        bad = tgt.ok("GET", "/v1/rebuild/sync")
    assert bad["state"] == "failed" and bad["error"]
    assert tgt.api("POST", "/v1/rebuild/sync", json={
        "file": file, "source": src.uri(f"layer/{file}"),
        "ranges": [[1, 4096]]}).status_code == 400
    job = sync(tgt, src, file, [[0, MiB], [MiB, MiB]])
    assert job["bytes_total"] == 2 * MiB and job["bytes_written"] == 65536 + 4096
    complete(tgt, src, file)
    cancelled = tgt.ok("DELETE", "/v1/rebuild/sync")
    assert cancelled["state"] == "done"


@pytest.mark.parametrize("pattern", ["full", "alternating"])
@pytest.mark.slow
def test_sync_patterns(replicas, pattern: str) -> None:
    """A layer of one 24 MiB extent, or with 4 KiB data / 4 KiB holes, copies exactly."""
    src = replicas("src", "32M")
    if pattern == "full":
        nbdsh(src.uri(), "h.pwrite(bytes(range(256)) * 98304, 4096)")
        written = 24 * MiB
    else:
        # 4 MiB of alternating blocks between stretches of data crossing 4 MiB windows.
        nbdsh(src.uri(), "\n".join([
            "import os",
            "h.pwrite(os.urandom(12 << 20), 1 << 20)",
            "for i in range(5 << 20, 9 << 20, 8192):",
            "    h.trim(4096, i)",
        ]))
        written = 10 * MiB
    src.ok("POST", "/v1/snapshots", json={"name": "s"})
    file = "volume-snap-s.img"
    tgt = replicas("tgt", "32M")
    prepare(tgt, src, file)
    job = sync(tgt, src, file)
    assert job["bytes_written"] == written
    assert differing(tgt, src, file, 64 * 1024) == []
    complete(tgt, src, file)
    compare(src.uri("snapshot/s"), tgt.uri("snapshot/s"))
