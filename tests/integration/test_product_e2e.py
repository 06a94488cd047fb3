"""drove as a user meets it: `drove serve`, then only the CLI, real filesystems, real kills."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest


def _write_files(root: Path, n: int = 8) -> dict[str, str]:
    sums = {}
    for i in range(n):
        data = os.urandom(256 * 1024 + i * 4097)
        (root / f"f{i}.bin").write_bytes(data)
        sums[f"f{i}.bin"] = hashlib.sha256(data).hexdigest()
    os.sync()
    return sums


def _check_files(root: Path, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.slow
def test_three_replicas_mounted_survive_a_kill_and_a_restart(manager, tmp_path):
    for d in ("d1", "d2"):
        manager.cli("disk", "add", str(tmp_path / d), "--tag", "ssd")
    disks = manager.cli_json("disk", "list")
    assert len(disks) == 3
    created = manager.cli_json("volume", "create", "db", "--size", "256M", "--replicas", "3",
                               "--label", "app=pg")
    assert created["name"] == "db" and created["state"] == "detached"
    mnt = tmp_path / "mnt"
    att = manager.cli_json("volume", "attach", "db", "--mount", str(mnt))
    assert att["nbd_uri"].startswith("nbd://") and att["device"].startswith("/dev/loop")
    assert att["mountpoint"] == str(mnt)
    sums = _write_files(mnt)

    snap = manager.cli_json("snapshot", "create", "db", "s1")
    assert snap["name"] == "s1"
    assert "s1" in {s["name"] for s in manager.cli_json("snapshot", "list", "db")}
    exported = manager.cli_json("snapshot", "export", "db", "s1")
    assert exported["nbd_uri"].startswith("nbd://")

    vol = manager.cli_json("volume", "get", "db")
    assert vol["health"] == "healthy" and len(vol["replicas"]) == 3
    assert {r["mode"] for r in vol["replicas"]} == {"RW"}
    # best-effort (the default): one replica is served by the engine, the others each by
    # a process of their own; a process is killed.
    assert vol["data_locality"] == "best-effort"
    assert [bool(r["pid"]) for r in vol["replicas"]].count(False) == 1
    victim = next(r for r in vol["replicas"] if not r["local"])
    os.kill(victim["pid"], signal.SIGKILL)
    # The volume notices, keeps taking writes while degraded, and heals by itself.
    deadline = time.monotonic() + 30
    while manager.cli_json("volume", "get", "db")["health"] == "healthy":
        assert time.monotonic() < deadline, "never noticed the dead replica"
        time.sleep(0.2)
    (mnt / "later").mkdir()
    more = {f"later/{k}": v for k, v in _write_files(mnt / "later", 3).items()}
    manager.cli("volume", "wait", "db", "--timeout", "120")
    vol = manager.cli_json("volume", "get", "db")
    assert vol["health"] == "healthy"
    assert {r["mode"] for r in vol["replicas"]} == {"RW"}
    assert {r["name"]: r for r in vol["replicas"]}[victim["name"]]["pid"] != victim["pid"]
    _check_files(mnt, {**sums, **more})
    kinds = {e["kind"] for e in manager.cli_json("event", "list", "--volume", "db")}
    assert {"replica-failed", "rebuild-started", "rebuild-finished", "volume-attached"} <= kinds

    # Restart `drove serve`: the volume comes back attached and mounted.
    manager.stop()
    assert not manager.pids() and not manager.loops()
    manager.start()
    vol = manager.cli_json("volume", "get", "db")
    assert vol["state"] == "attached" and vol["mountpoint"] == str(mnt)
    _check_files(mnt, sums)
    _check_files(mnt, more)

    # Detach leaves nothing behind: no process, mount, loop device or socket.
    manager.cli("volume", "detach", "db")
    assert not manager.pids(), manager.pids()
    assert not manager.mounts(), manager.mounts()
    assert not manager.loops(), manager.loops()
    assert not [p for p in Path(manager.run_dir).rglob("*") if p.is_socket()]
    assert manager.cli_json("volume", "get", "db")["state"] == "detached"


def test_existing_filesystem_is_never_reformatted(manager, tmp_path):
    manager.cli("volume", "create", "fs", "--size", "128M", "--replicas", "1")
    mnt = tmp_path / "m"
    first = manager.cli_json("volume", "attach", "fs", "--mount", str(mnt), "--fs", "ext4")
    assert first["fs"] == "ext4"
    (mnt / "keep").write_text("precious")
    manager.cli("volume", "detach", "fs")
    # Asking for xfs on a volume that holds ext4 mounts the ext4 as it is.
    again = manager.cli_json("volume", "attach", "fs", "--mount", str(mnt), "--fs", "xfs")
    assert again["fs"] == "ext4"
    assert (mnt / "keep").read_text() == "precious"
    manager.cli("volume", "detach", "fs")
    r = manager.cli("volume", "delete", "nope", check=False)
    assert r.returncode != 0 and "nope" in (r.stderr + r.stdout)
