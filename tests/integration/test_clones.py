"""Linked clones end to end: a real `drove serve`, the CLI, and qemu-io / qemu-img on the
volumes' NBD exports."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_agent import agents, node  # noqa: F401 - agents is a fixture

from managertools import ManagerProc
from replicatools import qemu_io

MIB = 1 << 20


def attach(m: ManagerProc, name: str) -> str:
    """Attach ``name`` (no host device); its NBD URI."""
    return m.cli_json("volume", "attach", name)["nbd_uri"]


def save_image(uri: str, dest: Path) -> Path:
    """The whole export at ``uri`` as a raw file (the reference for later compares)."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(dest)],
                   check=True, capture_output=True)
    return dest


def same(uri: str, image: Path) -> bool:
    """Whether the export at ``uri`` equals ``image`` (qemu-img compare, strict sizes)."""
    r = subprocess.run(["qemu-img", "compare", "-s", "-f", "raw", "-F", "raw", uri,
                        str(image)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode == 0


def replica_dirs(m: ManagerProc, name: str) -> list[Path]:
    return [Path(r["path"]) for r in m.volume(name)["replicas"]]


def links(d: Path) -> dict[str, int]:
    return {f: os.stat(d / f).st_nlink for f in os.listdir(d) if f.endswith(".img")}


def error(m: ManagerProc, *args: str) -> tuple[int, str]:
    r = m.cli(*args, check=False)
    assert r.returncode != 0, r.stdout
    return r.returncode, r.stdout + r.stderr


@pytest.fixture
def source(manager: ManagerProc, tmp_path: Path) -> tuple[ManagerProc, Path]:
    """Volume src (64 MiB, one replica) with data, snapshot s1 saved to s1.raw, then more
    writes; attached."""
    m = manager
    m.cli("volume", "create", "src", "--size", "64M", "--replicas", "1")
    uri = attach(m, "src")
    qemu_io(uri, "write -P 0x11 0 8M", "write -P 0x22 20M 4M", "write -P 0x33 60M 1M")
    m.cli("snapshot", "create", "src", "s1")
    qemu_io(uri, "write -P 0x44 0 1M", "write -P 0x55 30M 2M")
    ref = m.cli_json("snapshot", "export", "src", "s1")["nbd_uri"]
    return m, save_image(ref, tmp_path / "s1.raw")


@pytest.mark.exclusive  # timed
def test_clones_read_the_snapshot_and_stay_apart(source: tuple[ManagerProc, Path],
                                                 tmp_path: Path) -> None:
    m, s1 = source
    head = save_image(m.volume("src")["nbd_uri"], tmp_path / "src.raw")
    t0 = time.monotonic()
    c1 = m.cli_json("volume", "clone", "src", "c1", "--snapshot", "s1", "--label", "t=1")
    took = time.monotonic() - t0
    assert took < 2, f"clone took {took:.2f} s"
    assert c1["clone_of"] == {"volume": "src", "snapshot": "s1"}
    assert c1["labels"] == {"t": "1"} and c1["size"] == 64 * MIB
    m.cli("volume", "clone", "src", "c2", "--snapshot", "s1")
    # The base layers are the source's files, linked, not copied.
    src_dir, c1_dir = replica_dirs(m, "src")[0], replica_dirs(m, "c1")[0]
    assert os.stat(c1_dir / "volume-snap-s1.img").st_ino == \
        os.stat(src_dir / "volume-snap-s1.img").st_ino
    u1, u2 = attach(m, "c1"), attach(m, "c2")
    assert same(u1, s1) and same(u2, s1)
    # A clone's writes reach neither the source nor its sibling.
    qemu_io(u1, "write -P 0x66 0 16M", "write -z 20M 4M")
    assert same(u2, s1)
    assert same(m.volume("src")["nbd_uri"], head)
    assert not same(u1, s1)
    # Its own snapshots list without the base's.
    m.cli("snapshot", "create", "c1", "s1")  # a base layer's name is free for its own
    names = [s["name"] for s in m.cli_json("snapshot", "list", "c1")]
    assert sorted(names) == ["s1", "volume-head"]
    listed = {v["name"]: v["clone_of"] for v in m.cli_json("volume", "list")}
    assert listed == {"src": None, "c1": {"volume": "src", "snapshot": "s1"},
                      "c2": {"volume": "src", "snapshot": "s1"}}
    table = m.cli("volume", "list").stdout
    assert "src@s1" in table
    got = m.cli_json("volume", "get", "c2")["clone"]
    assert got["parent"] == {"volume": "src", "snapshot": "s1"}
    assert got["shared_bytes"] >= 13 * MIB and got["owned_bytes"] < MIB
    assert m.cli_json("volume", "get", "src")["clone"]["dependants"] == ["c1", "c2"]
    # The source can go: the clones' links keep the base layers' data.
    m.cli("volume", "delete", "src", "--force")
    assert not src_dir.exists()
    assert same(u2, s1)
    m.cli("volume", "detach", "c2")
    assert same(attach(m, "c2"), s1)


def test_bad_clone_requests_change_nothing(source: tuple[ManagerProc, Path]) -> None:
    m, _ = source
    m.cli("volume", "clone", "src", "c1", "--snapshot", "s1")
    before = m.cli_json("volume", "list")
    for args, status, words in (
            (("src", "c2", "--snapshot", "nope"), 404, "has no snapshot 'nope'"),
            (("src", "c1", "--snapshot", "s1"), 409, "exists"),
            (("nosuch", "c3", "--snapshot", "s1"), 404, "no volume 'nosuch'"),
            (("src", "Bad/Name", "--snapshot", "s1"), 422, "")):
        r = m.api("POST", f"/v1/volumes/{args[0]}/clone",
                  json={"name": args[1], "snapshot": args[3]})
        assert r.status_code == status, r.text
        assert words in r.json()["detail"]
    _, text = error(m, "volume", "clone", "src", "c2", "--snapshot", "nope")
    assert "nope" in text
    assert m.cli_json("volume", "list") == before
    disk = replica_dirs(m, "src")[0].parent
    assert sorted(p.name.rsplit("-", 1)[0] for p in disk.iterdir()) == ["c1-r1", "src-r1"]


@pytest.mark.slow
def test_deleted_snapshot_is_hidden_until_the_last_clone_goes(
        source: tuple[ManagerProc, Path]) -> None:
    m, s1 = source
    m.cli("snapshot", "create", "src", "s2")
    m.cli("volume", "clone", "src", "c1", "--snapshot", "s1")
    m.cli("volume", "clone", "src", "c2", "--snapshot", "s2")
    res = m.cli_json("snapshot", "delete", "src", "s1")
    assert res == {"deleted": "s1", "hidden": True, "dependants": ["c1", "c2"]}
    assert "hidden" in m.cli("snapshot", "delete", "src", "s1").stdout
    assert [s["name"] for s in m.cli_json("snapshot", "list", "src")
            if not s["head"]] == ["s2"]
    hidden = [s for s in m.cli_json("snapshot", "list", "src", "--all") if s.get("hidden")]
    assert [(s["name"], s["dependants"]) for s in hidden] == [("s1", ["c1", "c2"])]
    assert "hidden" in m.cli("snapshot", "list", "src", "--all").stdout
    # A hidden snapshot is no base for new clones.
    r = m.api("POST", "/v1/volumes/src/clone", json={"name": "c3", "snapshot": "s1"})
    assert r.status_code == 404
    assert same(attach(m, "c1"), s1)
    m.cli("volume", "delete", "c1", "--force")
    assert [s["name"] for s in m.cli_json("snapshot", "list", "src", "--all")
            if s.get("hidden")] == ["s1"]  # c2 (on s2, above s1) still needs it
    m.cli("volume", "delete", "c2")
    names = [s["name"] for s in m.cli_json("snapshot", "list", "src", "--all")]
    assert sorted(names) == ["s2", "volume-head"]
    kinds = [e["kind"] for e in m.events("src")]
    assert "snapshot-hidden" in kinds and kinds.count("snapshot-deleted") >= 1


@pytest.mark.parametrize("locality", ["disabled", "best-effort"])
def test_flatten_makes_a_clone_stand_alone(source: tuple[ManagerProc, Path], tmp_path: Path,
                                           locality: str) -> None:
    """Flatten online, with a client writing meanwhile (its replica in a process, or in the
    engine): the clone then shares nothing and outlives its source."""
    m, _ = source
    m.cli("volume", "update", "src", "--data-locality", locality)
    m.cli("volume", "clone", "src", "c1", "--snapshot", "s1", "--replicas", "1")
    _, text = error(m, "volume", "flatten", "src")
    assert "not a linked clone" in text
    u = attach(m, "c1")
    qemu_io(u, "write -P 0x77 40M 1M")
    writer = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x78 48M 8M",
                               "-c", "write -P 0x79 2M 1M", u],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    task = m.cli_json("volume", "flatten", "c1")
    done = m.cli_json("task", "wait", task["id"])
    assert writer.wait(60) == 0, writer.stdout.read() if writer.stdout else ""
    assert done["state"] == "succeeded", done
    assert done["result"]["bytes_copied"] >= 13 * MIB
    assert done["kind"] == "volume-flatten"
    for d in replica_dirs(m, "c1"):
        assert set(links(d).values()) == {1}, links(d)
    v = m.cli_json("volume", "get", "c1")
    assert v["clone_of"] is None and v["clone"] is None
    qemu_io(u, "read -P 0x79 2M 1M", "read -P 0x11 3M 5M", "read -P 0x77 40M 1M",
            "read -P 0x78 48M 8M", "read -P 0x22 20M 4M", read_only=True)
    want = save_image(u, tmp_path / "c1.raw")
    m.cli("volume", "detach", "c1")
    m.cli("volume", "delete", "src", "--force")
    assert same(attach(m, "c1"), want)


def test_full_clone(source: tuple[ManagerProc, Path]) -> None:
    m, s1 = source
    v = m.cli_json("volume", "clone", "src", "c1", "--snapshot", "s1", "--full")
    done = m.cli_json("task", "wait", v["task"]["id"])
    assert done["state"] == "succeeded", done
    assert m.volume("c1")["clone_of"] is None
    m.cli("volume", "delete", "src", "--force")
    assert same(attach(m, "c1"), s1)


def test_clone_without_snapshot_of_a_detached_volume(manager: ManagerProc,
                                                     tmp_path: Path) -> None:
    m = manager
    m.cli("volume", "create", "src", "--size", "16M", "--replicas", "1")
    qemu_io(attach(m, "src"), "write -P 0x5a 1M 3M")
    m.cli("volume", "detach", "src")
    c = m.cli_json("volume", "clone", "src", "c1")
    snap = c["clone_of"]["snapshot"]
    assert snap.startswith("clone-")
    assert [s["name"] for s in m.cli_json("snapshot", "list", "src") if not s["head"]] == [snap]
    u = attach(m, "c1")
    qemu_io(u, "read -P 0x5a 1M 3M", "read -P 0 0 1M", read_only=True)
    # Attached, the engine takes the snapshot (with every acknowledged write in it).
    qemu_io(attach(m, "src"), "write -P 0x5b 0 1M")
    c2 = m.cli_json("volume", "clone", "src", "c2")
    assert c2["clone_of"]["snapshot"] not in (snap, None)
    qemu_io(attach(m, "c2"), "read -P 0x5b 0 1M", "read -P 0x5a 1M 3M", read_only=True)


def du(paths: list[Path]) -> int:
    """Bytes allocated under ``paths``, each inode counted once (as `du` does)."""
    r = subprocess.run(["du", "-s", "-B1", *map(str, paths)], capture_output=True, text=True,
                       check=True)
    return sum(int(line.split()[0]) for line in r.stdout.splitlines())


@pytest.mark.exclusive  # timed
@pytest.mark.slow
def test_fifty_clones_cost_almost_nothing(manager: ManagerProc, tmp_path: Path) -> None:
    """50 linked clones of a 512 MiB volume holding 256 MiB: each ready in under 2 s, the
    disk's extra space under 2% of the data, and a few read back equal to the snapshot."""
    m = manager
    m.cli("volume", "create", "src", "--size", "512M", "--replicas", "1")
    uri = attach(m, "src")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 256M", uri], check=True,
                   capture_output=True)
    m.cli("snapshot", "create", "src", "base")
    m.cli("volume", "detach", "src")
    disk = replica_dirs(m, "src")[0].parent
    before = du([disk])
    times = []
    for i in range(50):
        t0 = time.monotonic()
        m.ok("POST", "/v1/volumes/src/clone", json={"name": f"c{i}", "snapshot": "base"})
        times.append(time.monotonic() - t0)
    extra = du([disk]) - before
    print(f"50 clones: slowest {max(times):.3f} s, mean {sum(times) / 50:.3f} s, "
          f"extra space {extra} bytes ({100 * extra / (256 * MIB):.3f}% of the data)")
    assert max(times) < 2
    assert extra < 0.02 * 256 * MIB
    for i in (0, 49):
        qemu_io(attach(m, f"c{i}"), "read -P 0x3c 0 256M", "read -P 0 256M 256M",
                read_only=True)
    vols: list[dict[str, Any]] = m.cli_json("volume", "list")
    assert sum(1 for v in vols if v["clone_of"]) == 50


def test_base_copied_once_to_a_disk_then_shared(source: tuple[ManagerProc, Path],
                                                tmp_path: Path) -> None:
    """A clone with more replicas than the source has: the replica on the disk without the
    base layers is rebuilt (they are copied there, still base layers), and the next clone
    links from that copy."""
    m, s1 = source
    m.cli("disk", "add", str(tmp_path / "disk-b"))
    out = m.cli("volume", "clone", "src", "c1", "--snapshot", "s1", "--replicas", "2").stdout
    assert "copied there after the first attach" in " ".join(out.split())
    c1 = m.volume("c1")
    assert sorted(r["state"] for r in c1["replicas"]) == ["pending", "stopped"]
    u = attach(m, "c1")
    m.wait_volume("c1", lambda v: v["health"] == "healthy", what="c1 healthy")
    assert same(u, s1)
    far = next(Path(r["path"]) for r in m.volume("c1")["replicas"] if "disk-b" in r["path"])
    assert set(links(far).values()) == {1}  # copied there, not linked
    m.cli("volume", "detach", "c1")
    c2 = m.cli_json("volume", "clone", "src", "c2", "--snapshot", "s1", "--replicas", "2")
    assert [r["state"] for r in c2["replicas"]] == ["stopped", "stopped"]
    b2 = next(Path(r["path"]) for r in c2["replicas"] if "disk-b" in r["path"])
    assert os.stat(b2 / "volume-snap-s1.img").st_ino == os.stat(far / "volume-snap-s1.img").st_ino
    assert same(attach(m, "c2"), s1)
    m.wait_volume("c2", lambda v: v["health"] == "healthy", what="c2 healthy")


@pytest.mark.slow
def test_clones_across_nodes(manager: ManagerProc, agents: Any, tmp_path: Path) -> None:  # noqa: F811
    """Three nodes (the manager's and two agents'); a 2-replica source: a 3-replica clone
    links on the source's two nodes (one through a remote agent's API) and is copied to the
    third by the rebuild; the next clone links on all three."""
    m = manager
    agents("n2", tmp_path / "n2", address="127.0.0.2")
    agents("n3", tmp_path / "n3", address="127.0.0.3")
    deadline = time.monotonic() + 30
    while len([n for n in m.cli_json("node", "list") if n["state"] == "up"]) < 3:
        assert time.monotonic() < deadline, m.cli_json("node", "list")
        time.sleep(0.2)
    m.cli("volume", "create", "src", "--size", "32M", "--replicas", "2",
          "--data-locality", "disabled")
    qemu_io(attach(m, "src"), "write -P 0x42 0 20M")
    m.cli("snapshot", "create", "src", "s1")
    ref = save_image(m.cli_json("snapshot", "export", "src", "s1")["nbd_uri"],
                     tmp_path / "s1.raw")
    src_nodes = {r["node"] for r in m.volume("src")["replicas"]}
    c1 = m.cli_json("volume", "clone", "src", "c1", "--snapshot", "s1", "--replicas", "3")
    by_state = {r["node"]: r["state"] for r in c1["replicas"]}
    assert len(by_state) == 3
    assert {n for n, st in by_state.items() if st == "stopped"} == src_nodes
    u1 = attach(m, "c1")
    m.wait_volume("c1", lambda v: v["health"] == "healthy", what="c1 healthy")
    assert same(u1, ref)
    m.cli("volume", "detach", "c1")
    c2 = m.cli_json("volume", "clone", "src", "c2", "--snapshot", "s1", "--replicas", "3")
    assert sorted(r["state"] for r in c2["replicas"]) == ["stopped"] * 3
    assert same(attach(m, "c2"), ref)
    m.wait_volume("c2", lambda v: v["health"] == "healthy", what="c2 healthy")
    for r in c2["replicas"]:
        assert os.stat(Path(r["path"]) / "volume-snap-s1.img").st_nlink >= 2, r


def test_a_replica_added_to_a_clone_links_its_base(manager: ManagerProc, tmp_path: Path) -> None:
    """`volume update --replicas` on a clone: the new replica's disk holds a replica of the
    source, so it links the base layers there; its rebuild then copies none of them."""
    m = manager
    m.cli("disk", "add", str(tmp_path / "disk-b"))
    m.cli("volume", "create", "src", "--size", "32M", "--replicas", "2")
    qemu_io(attach(m, "src"), "write -P 0x24 0 12M")
    m.cli("snapshot", "create", "src", "s1")
    ref = save_image(m.cli_json("snapshot", "export", "src", "s1")["nbd_uri"],
                     tmp_path / "s1.raw")
    m.cli("volume", "clone", "src", "c1", "--snapshot", "s1", "--replicas", "1")
    u = attach(m, "c1")
    qemu_io(u, "write -P 0x25 0 1M")
    m.cli("volume", "update", "c1", "--replicas", "2")
    kinds = [e["kind"] for e in m.events("c1")]
    assert "clone-linked" in kinds, kinds
    m.wait_volume("c1", lambda v: v["health"] == "healthy" and len(v["replicas"]) == 2,
                  what="c1 healthy on two replicas")
    for r in m.volume("c1")["replicas"]:
        assert os.stat(Path(r["path"]) / "volume-snap-s1.img").st_nlink >= 2, r
    qemu_io(u, "read -P 0x25 0 1M", "read -P 0x24 1M 11M", read_only=True)
    m.cli("volume", "update", "c1", "--replicas", "1")
    assert same(m.cli_json("snapshot", "export", "src", "s1")["nbd_uri"], ref)
