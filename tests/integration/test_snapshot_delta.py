"""Incremental export on one replica process: the diff of two snapshots from the chain, the
delta NBD export (``snapshot/TO@since=FROM``) copied with nbdcopy onto an image of FROM,
and a qcow2 delta over a qcow2 of FROM written by qemu-img."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from exporttools import delta_copy, same_image
from replicatools import nbdinfo_json, qemu_io, run

MiB = 1 << 20


def _snapshot(r, name: str) -> None:
    r.ok("POST", "/v1/snapshots", json={"name": name})


def _image(uri: str, path: Path, fmt: str = "raw") -> Path:
    """A copy of the export at ``uri`` (qemu-img convert, sparse)."""
    run(["qemu-img", "convert", "-f", "raw", "-O", fmt, uri, str(path)])
    return path


def _volume(replicas):
    """A replica with snapshot a, then writes (data, zeros over a's data, zeros over
    nothing), snapshot b, then more writes in the head."""
    r = replicas("r1", "32M")
    head = r.uri("head")
    qemu_io(head, "write -P 1 0 1M", "write -P 2 4M 64k", "write -P 9 20M 256k")
    _snapshot(r, "a")
    qemu_io(head, "write -P 3 8k 4k", "write -z 4M 8k", "write -P 5 10M 1M",
            "write -z 12M 64k", "write -P 6 20M 5000")
    _snapshot(r, "b")
    qemu_io(head, "write -P 7 30M 4k")
    return r


# The blocks written between a and b (a zero over blocks nothing holds changes nothing;
# a 5000-byte write touches two blocks).
A_TO_B = [[8192, 4096], [4 * MiB, 8192], [10 * MiB, MiB], [20 * MiB, 8192]]


def test_diff_lists_the_written_extents(replicas):
    r = _volume(replicas)
    d = r.ok("GET", "/v1/diff", params={"since": "a", "to": "b"})
    assert d["extents"] == A_TO_B
    assert d["bytes"] == sum(n for _, n in A_TO_B)
    assert (d["ancestor"], d["branch"], d["head"], d["size"]) == ("a", False, False, 32 * MiB)
    to_head = r.ok("GET", "/v1/diff", params={"since": "a"})
    assert to_head["head"] and to_head["extents"] == [*A_TO_B, [30 * MiB, 4096]]
    assert r.ok("GET", "/v1/diff", params={"since": "b", "to": "b"})["extents"] == []


def test_diff_across_a_revert_goes_through_the_common_ancestor(replicas):
    r = _volume(replicas)
    r.ok("POST", "/v1/revert", json={"snapshot": "a"})
    qemu_io(r.uri("head"), "write -P 8 16M 4k")
    _snapshot(r, "c")
    d = r.ok("GET", "/v1/diff", params={"since": "b", "to": "c"})
    # b's own changes must be undone, c's made: both sides above a.
    assert d["ancestor"] == "a" and d["branch"]
    assert d["extents"] == sorted([*A_TO_B, [16 * MiB, 4096]])


def test_diff_bad_input_is_refused(replicas):
    r = _volume(replicas)
    before = r.ok("GET", "/v1/layers")
    res = r.api("GET", "/v1/diff", params={"since": "nope", "to": "b"})
    assert res.status_code == 404 and "nope" in res.json()["detail"]
    res = r.api("GET", "/v1/diff", params={"since": "b", "to": "a"})
    assert res.status_code == 400 and "swap" in res.json()["detail"]
    res = r.api("GET", "/v1/diff", params={"to": "a"})
    assert res.status_code == 422
    assert r.ok("GET", "/v1/layers") == before
    # The delta export of a refused pair is refused (NBD_REP_ERR_POLICY, with the reason).
    res = run(["nbdinfo", r.uri("snapshot/a@since=b")], check=False)
    assert res.returncode != 0 and b"not supported" in res.stderr


def test_delta_export_map_and_nbdcopy_onto_from(replicas, tmp_path):
    r = _volume(replicas)
    uri = r.uri("snapshot/b@since=a")
    extents = nbdinfo_json(uri, "--map")
    data = [[e["offset"], e["length"]] for e in extents if e["type"] == 0]
    assert data == A_TO_B
    assert all(e["type"] == 3 for e in extents if e["type"] != 0)
    a = _image(r.uri("snapshot/a"), tmp_path / "a.img")
    b = _image(r.uri("snapshot/b"), tmp_path / "b.img")
    target = tmp_path / "target.img"
    shutil.copy(a, target)
    read = delta_copy(uri, target, tmp_path / "stats.txt")
    assert same_image(target, b)
    assert read == sum(n for _, n in A_TO_B)  # the delta, not the 1.3 MiB of a nor 32 MiB


def test_qcow2_delta_over_a_backing_file(replicas, tmp_path):
    r = _volume(replicas)
    b = _image(r.uri("snapshot/b"), tmp_path / "b.img")
    _image(r.uri("snapshot/a"), tmp_path / "a.qcow2", "qcow2")
    delta = tmp_path / "b-since-a.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", "a.qcow2", "-F", "qcow2",
         r.uri("snapshot/b@since=a@holes=backing"), str(delta)])
    assert same_image(delta, b, "qcow2")
    # Only clusters around the changed extents are in the delta itself (64 KiB clusters).
    mapped = json.loads(run(["qemu-img", "map", "--output=json", str(delta)]).stdout)
    assert sum(e["length"] for e in mapped if e["depth"] == 0) <= 4 * 64 * 1024 + MiB


def test_qemu_img_turns_a_raw_image_of_from_into_to(replicas, tmp_path):
    """qemu-img alone: a qcow2 delta over the raw image of a, committed into it."""
    r = _volume(replicas)
    b = _image(r.uri("snapshot/b"), tmp_path / "b.img")
    a = _image(r.uri("snapshot/a"), tmp_path / "a.img")
    delta = tmp_path / "delta.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", "a.img", "-F", "raw",
         r.uri("snapshot/b@since=a@holes=backing"), str(delta)])
    run(["qemu-img", "commit", "-f", "qcow2", str(delta)])
    assert same_image(a, b)


def test_deleted_snapshot_between_and_an_expand(replicas, tmp_path):
    """A snapshot deleted between FROM and TO (folded into its child) still counts; a
    volume grown between them reports both sizes, and the grown part's data is changed."""
    r = _volume(replicas)
    qemu_io(r.uri("head"), "write -P 4 16M 64k")
    _snapshot(r, "m")
    r.ok("POST", "/v1/expand", json={"size": 48 * MiB})
    qemu_io(r.uri("head"), "write -P 5 40M 8k")
    _snapshot(r, "c")
    before = r.ok("GET", "/v1/diff", params={"since": "a", "to": "c"})
    r.ok("DELETE", "/v1/snapshots/b")  # purged: folded into m
    r.ok("DELETE", "/v1/snapshots/m")
    assert {la["name"] for la in r.ok("GET", "/v1/layers", params={"removed": "true"})
            if la["name"]} == {"a", "c"}
    d = r.ok("GET", "/v1/diff", params={"since": "a", "to": "c"})
    assert d == before
    assert d["extents"] == sorted([*A_TO_B, [16 * MiB, 64 * 1024], [30 * MiB, 4096],
                                   [40 * MiB, 8192]])
    assert (d["size"], d["since_size"]) == (48 * MiB, 32 * MiB)
    # Grow the image of a to c's size first; then the delta makes it c.
    a = _image(r.uri("snapshot/a"), tmp_path / "a.img")
    run(["qemu-img", "resize", "-f", "raw", str(a), str(48 * MiB)])
    c = _image(r.uri("snapshot/c"), tmp_path / "c.img")
    assert delta_copy(r.uri("snapshot/c@since=a"), a, tmp_path / "stats") == d["bytes"]
    assert same_image(a, c)
