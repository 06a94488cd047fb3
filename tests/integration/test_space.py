"""Space honesty through a real `drove serve`: files written into a drove-mounted ext4, the
per-snapshot data and freed-by-delete figures against what was written, `drove volume trim`
(fstrim through nbdfuse, a loop device and the engine down to the replicas' heads), and
the `trim` job kind."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

MiB = 1 << 20
SLACK = 2 * MiB  # ext4's own writes (journal, bitmaps, inode tables) beside the files' data


def write_file(path: Path, size: int, offset: int = 0) -> None:
    """Write ``size`` random bytes at ``offset`` (in place for an existing file), fsync."""
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.seek(offset)
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())


def sync_fs(mnt: Path) -> None:
    """Flush the filesystem (data, metadata, journal) down to the volume."""
    fd = os.open(mnt, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.sync()
    finally:
        os.close(fd)


def du(path: str) -> int:
    """Bytes the files of a replica directory allocate (st_blocks, each inode once)."""
    seen, n = set(), 0
    for e in os.scandir(path):
        st = e.stat(follow_symlinks=False)
        if e.is_file(follow_symlinks=False) and st.st_ino not in seen:
            seen.add(st.st_ino)
            n += st.st_blocks * 512
    return n


def space(manager, volume: str) -> dict:
    """`drove volume get --json`'s space section."""
    return manager.cli_json("volume", "get", volume)["space"]


def snap(sp: dict, name: str) -> dict:
    (row,) = [s for s in sp["snapshots"] if s["name"] == name and not s["removed"]]
    return row


@pytest.mark.slow  # ~30 s: ext4 over nbdfuse, 40 MiB written, snapshots, fstrim
def test_space_figures_follow_writes_snapshots_deletes_and_trim(manager, tmp_path):
    mnt = tmp_path / "mnt"
    (tmp_path / "disk2").mkdir()
    manager.cli("disk", "add", str(tmp_path / "disk2"))
    manager.cli("volume", "create", "sp", "--size", "256M", "--replicas", "2")
    manager.cli("volume", "attach", "sp", "--mount", str(mnt))
    sync_fs(mnt)
    h0 = space(manager, "sp")
    assert len(h0["replicas"]) == 2 and not any(r["error"] for r in h0["replicas"]), h0
    paths = {r["name"]: r["path"] for r in manager.volume("sp")["replicas"]}

    write_file(mnt / "a", 8 * MiB)
    write_file(mnt / "b", 8 * MiB)
    sync_fs(mnt)
    h1 = space(manager, "sp")
    for r0, r1 in zip(h0["replicas"], h1["replicas"], strict=True):
        assert 16 * MiB <= r1["head"] - r0["head"] <= 16 * MiB + SLACK, (r0, r1)
        assert 16 * MiB <= r1["actual"] - r0["actual"] <= 16 * MiB + SLACK, (r0, r1)
        assert r1["actual"] == du(paths[r1["replica"]])  # nothing shared: all its own
        assert r1["shared"] == 0

    manager.cli("snapshot", "create", "sp", "s1")
    write_file(mnt / "a", 4 * MiB)  # overwrite half of a, in place
    sync_fs(mnt)
    h2 = space(manager, "sp")
    s1 = snap(h2, "s1")
    assert s1["data"] == h1["head"]  # the head it froze
    assert 4 * MiB <= h2["head"] <= 4 * MiB + SLACK
    # Its only child is the head: a delete now frees what the head overwrote.
    assert 4 * MiB <= s1["freed_by_delete"] <= 4 * MiB + SLACK, s1
    assert "head overwrote" in s1["why"]

    manager.cli("snapshot", "create", "sp", "s2")
    write_file(mnt / "c", 8 * MiB)  # only in the head
    sync_fs(mnt)
    h3 = space(manager, "sp")
    s1, s2 = snap(h3, "s1"), snap(h3, "s2")
    assert 4 * MiB <= s2["data"] <= 4 * MiB + SLACK
    # s1 folds into s2: what s2 overwrote is freed, the rest moves into s2.
    assert 4 * MiB <= s1["freed_by_delete"] <= 4 * MiB + SLACK, s1
    assert "folds into s2" in s1["why"]
    listed = {s["name"]: s for s in manager.cli_json("snapshot", "list", "sp")}
    assert listed["s1"]["freed_by_delete"] == s1["freed_by_delete"]
    assert listed["s2"]["data"] == s2["data"]
    text = manager.cli("snapshot", "list", "sp").stdout
    assert "delete frees" in text

    # The figure is exact: each replica directory shrinks by its own figure when s1 goes.
    sync_fs(mnt)
    expect = {r["replica"]: r["snapshots"]["s1"]["freed_by_delete"]
              for r in space(manager, "sp")["replicas"]}
    sizes = {name: du(p) for name, p in paths.items()}
    manager.cli("snapshot", "delete", "sp", "s1")
    for name, p in paths.items():
        drop = sizes[name] - du(p)
        assert abs(drop - expect[name]) <= 64 * 1024, (name, drop, expect[name])

    # Deleting c and trimming frees its space from the heads.
    head_before = space(manager, "sp")
    (mnt / "c").unlink()
    sync_fs(mnt)
    res = manager.cli_json("volume", "trim", "sp")
    assert res["trimmed"] >= 8 * MiB
    after = space(manager, "sp")
    for r0, r1 in zip(head_before["replicas"], after["replicas"], strict=True):
        assert 8 * MiB - SLACK <= r0["head"] - r1["head"] <= 8 * MiB + SLACK, (r0, r1)
        assert 8 * MiB - SLACK <= r0["actual"] - r1["actual"], (r0, r1)
    assert res["freed"] >= 2 * (8 * MiB - SLACK)
    assert any(e["kind"] == "volume-trimmed" for e in manager.events("sp"))
    # Trimming a file only a snapshot holds: the snapshot keeps its blocks, and the head
    # does not grow (no zeros are written over them).
    s2_data = snap(after, "s2")["data"]
    (mnt / "b").unlink()
    sync_fs(mnt)
    manager.cli("volume", "trim", "sp")
    again = space(manager, "sp")
    assert snap(again, "s2")["data"] == s2_data
    for r0, r1 in zip(after["replicas"], again["replicas"], strict=True):
        assert r1["head"] <= r0["head"] + SLACK, (r0, r1)

    # Detached, the agent reads the same figures from the replica directories.
    manager.cli("volume", "detach", "sp")
    off = space(manager, "sp")
    assert not any(r["error"] for r in off["replicas"]), off
    assert snap(off, "s2")["data"] == s2_data


def test_trim_refuses_a_volume_drove_did_not_mount(manager):
    manager.cli("volume", "create", "raw", "--size", "64M", "--replicas", "1")
    r = manager.cli("volume", "trim", "raw", check=False)
    assert r.returncode != 0 and "--mount" in r.stderr + r.stdout
    manager.cli("volume", "attach", "raw")
    r = manager.cli("volume", "trim", "raw", check=False)
    assert r.returncode != 0
    out = r.stderr + r.stdout
    assert "--mount" in out and "fstrim in the container" in out
    manager.cli("volume", "detach", "raw")


def test_trim_job_runs_once_with_an_event(manager, tmp_path):
    mnt = tmp_path / "mnt"
    manager.cli("volume", "create", "tj", "--size", "64M", "--replicas", "1")
    manager.cli("volume", "attach", "tj", "--mount", str(mnt))
    write_file(mnt / "f", 4 * MiB)
    sync_fs(mnt)
    (mnt / "f").unlink()
    sync_fs(mnt)
    cron = f"{(datetime.now(UTC) + timedelta(minutes=30)).minute} * * * *"
    manager.cli_json("job", "create", "--name", "weekly-trim", "--kind", "trim", "--cron", cron,
                     "--retain", "1", "--volume", "tj")
    manager.cli("job", "run", "weekly-trim")
    job = manager.cli_json("job", "get", "weekly-trim")
    assert job["last_result"]["ok"], job
    runs = [e for e in manager.events() if e["kind"] == "job-run"]
    assert len(runs) == 1 and "trimmed" in runs[0]["message"], runs
    trims = [e for e in manager.events("tj") if e["kind"] == "volume-trimmed"]
    assert len(trims) == 1 and "fell by" in trims[0]["message"]
    manager.cli("volume", "detach", "tj")


def test_space_of_a_linked_clone_and_the_snapshot_it_needs(manager):
    manager.cli("volume", "create", "base", "--size", "64M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "base")["nbd_uri"]
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 4M", uri], check=True,
                   capture_output=True, timeout=120)
    manager.cli("snapshot", "create", "base", "s1")
    manager.cli("volume", "clone", "base", "kid", "--snapshot", "s1")
    s1 = snap(space(manager, "base"), "s1")
    assert s1["data"] == 4 * MiB and s1["shared"]  # its file is linked into the clone's
    assert s1["freed_by_delete"] == 0 and "kid" in s1["why"], s1
    # The clone (detached: its node's agent reads the directory) shares the 4 MiB.
    (kid,) = space(manager, "kid")["replicas"]
    assert kid["error"] is None and kid["shared"] >= 4 * MiB and kid["own"] < MiB, kid
    # Deleted, s1 is only hidden: it still frees nothing, and says why.
    manager.cli("snapshot", "delete", "base", "s1")
    (hidden,) = [s for s in manager.cli_json("snapshot", "list", "base", "--all")
                 if s["name"] == "s1"]
    assert hidden["hidden"] and hidden["freed_by_delete"] == 0 and "hidden" in hidden["why"]
    manager.cli("volume", "detach", "base")


def test_space_and_trim_on_another_node_go_through_its_agent(manager, tmp_path):
    from test_agent import AgentProc

    from backuptools import wait_for

    agent = AgentProc(manager, "n2", tmp_path / "n2")
    try:
        wait_for(lambda: any(d["state"] == "ready" for n in manager.ok("GET", "/v1/nodes")
                             if n["name"] == "n2" for d in n["disks"]), 15, "n2's disk")
        manager.cli("volume", "create", "far", "--size", "64M", "--replicas", "2")
        mnt = tmp_path / "mnt"
        att = manager.cli_json("volume", "attach", "far", "--node", "n2", "--mount", str(mnt))
        assert att["node"] == "n2" and att["mountpoint"] == str(mnt)
        write_file(mnt / "f", 6 * MiB)
        sync_fs(mnt)
        before = space(manager, "far")
        (mnt / "f").unlink()
        sync_fs(mnt)
        res = manager.cli_json("volume", "trim", "far")  # fstrim by n2's agent
        assert res["node"] == "n2" and res["trimmed"] >= 6 * MiB
        after = space(manager, "far")
        for r0, r1 in zip(before["replicas"], after["replicas"], strict=True):
            assert r0["head"] - r1["head"] >= 6 * MiB - SLACK, (r0, r1)
        manager.cli("volume", "detach", "far")
        off = space(manager, "far")  # n2's replica read by n2's agent
        assert [r["node"] for r in off["replicas"] if r["error"] is None] \
            and not any(r["error"] for r in off["replicas"]), off
        assert {r["head"] for r in off["replicas"]} == {r["head"] for r in after["replicas"]}
    finally:
        agent.proc.terminate()
        agent.proc.wait(30)
