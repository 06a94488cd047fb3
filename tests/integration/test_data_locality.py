"""Data locality through a real `drove serve`: the engine serves one replica itself.

Real NBD clients (qemu-io, nbdcopy, libnbd's writer) read and write the
volumes.  A second node is simulated the way the manager sees nodes: disks in
its store whose ``node`` is another name (the directories are on this machine,
and this machine's agent runs their replica processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from accesstools import engine_headers
from crashlog import check_blocks, parse_log, read_volume

WRITER = Path(__file__).parent.parent / "crash_writer.py"
MiB = 1 << 20
BLOCKS = 64 * MiB // 4096


def _qemu_io(uri: str, cmd: str, *, read_only: bool = False) -> None:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else []) + ["-c", cmd, uri]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), (cmd, r.stdout, r.stderr)


def _local(v: dict) -> list[dict]:
    return [r for r in v["replicas"] if r["local"]]


def _engine_replicas(v: dict) -> dict[str, dict]:
    info = httpx.get(v["engine"]["control_url"] + "/v1/info", timeout=10,
                     headers=engine_headers(v["engine"]["pid"])).json()
    return {r["name"]: r for r in info["replicas"]}


def _settled(v: dict) -> bool:
    return (v["health"] == "healthy" and v["rebuild"] is None
            and len(v["replicas"]) == v["replica_count"]
            and all(r["mode"] == "RW" for r in v["replicas"]))


def _foreign_disk(manager, path: Path, name: str, node: str, tags: list[str]) -> None:
    """Register ``path`` as disk ``name`` of another node, in the manager's store."""
    from drove.agent.disks import init_disk
    from drove.manager.store import SqliteStore

    disk_id = init_disk(path, name)
    store = SqliteStore(manager.data_dir / "drove.db")
    try:
        store.put("nodes", node, {"name": node, "address": "127.0.0.2"})
        store.put("disks", name, {"name": name, "node": node, "path": str(path.resolve()),
                                  "tags": tags, "reserved": 0, "id": disk_id})
    finally:
        store.close()


def _start_writer(uri: str, log: Path) -> subprocess.Popen:
    """libnbd writer logging every acknowledged 4 KiB write (tests/crash_writer.py)."""
    w = subprocess.Popen(["/usr/bin/python3", str(WRITER), uri, str(log), str(BLOCKS), "7", "4"],
                         stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().count("\nA ") > 16):
        assert w.poll() is None, w.stderr.read()
        assert time.monotonic() < deadline, "the writer wrote nothing"
        time.sleep(0.05)
    return w


def _stop_writer(w: subprocess.Popen) -> None:
    # Still running: no write failed (the writer stops at its first error).
    assert w.poll() is None, f"the writer stopped: {w.stderr.read()}"
    w.send_signal(signal.SIGTERM)
    w.wait(30)


def test_default_best_effort_serves_one_replica_in_the_engine(manager, tmp_path):
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "d1")})
    assert manager.ok("GET", "/v1/settings")["default_data_locality"] == "best-effort"
    v = manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 2})
    assert v["data_locality"] == "best-effort"
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    assert att["health"] == "healthy" and att["node"]
    (local,) = _local(att)
    assert local["pid"] is None and local["mode"] == "RW" and local["node"] == att["node"]
    (remote,) = [r for r in att["replicas"] if not r["local"]]
    assert remote["pid"] and os.path.exists(f"/proc/{remote['pid']}")
    engine = _engine_replicas(att)
    assert engine[local["name"]].get("local") is True
    assert not engine[remote["name"]].get("local")
    # Its directory is the engine's: no replica process holds it.
    assert not [p for p in manager.pids()
                if local["path"].encode() in Path(f"/proc/{p}/cmdline").read_bytes()
                and p != att["engine"]["pid"]]

    _qemu_io(att["nbd_uri"], "write -P 0x4c 1M 4M")
    manager.ok("POST", "/v1/volumes/v/snapshots", json={"name": "s1"})
    # A snapshot export and a backup read from an RW replica: the local one is first.
    exp = manager.ok("POST", "/v1/volumes/v/snapshots/s1/export")
    _qemu_io(exp["nbd_uri"], "read -P 0x4c 1M 4M", read_only=True)

    manager.ok("POST", "/v1/volumes/v/detach", json={})
    v = manager.volume("v")
    assert v["state"] == "detached" and v["health"] == "healthy"
    again = manager.ok("POST", "/v1/volumes/v/attach", json={})
    assert [r["name"] for r in _local(again)] == [local["name"]]  # the same one stays local
    _qemu_io(again["nbd_uri"], "read -P 0x4c 1M 4M")

    # The CLI shows it: `volume get` marks the local replica, `volume list` the locality.
    table = manager.cli("volume", "get", "v").stdout
    assert "local" in table and "best-effort" in table
    got = manager.cli_json("volume", "get", "v")
    assert {r["name"]: r["local"] for r in got["replicas"]} == {
        local["name"]: True, remote["name"]: False}
    assert "best-effort" in manager.cli("volume", "list").stdout


def test_settings_and_refusals(manager, tmp_path):
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "d1")})
    # Bad values: 422 naming the allowed ones, nothing changes.
    for path, method, body in [("/v1/volumes", "POST", {"name": "x", "size": "16M",
                                                         "data_locality": "local"}),
                               ("/v1/settings", "PATCH", {"default_data_locality": "nearby"})]:
        r = manager.api(method, path, json=body)
        assert r.status_code == 422, r.text
        assert "disabled, best-effort, strict-local" in r.json()["detail"]
    assert manager.ok("GET", "/v1/volumes") == []
    # strict-local: exactly one replica.
    r = manager.api("POST", "/v1/volumes", json={"name": "x", "size": "16M", "replicas": 2,
                                                 "data_locality": "strict-local"})
    assert r.status_code == 422 and "exactly one replica" in r.json()["detail"], r.text
    s = manager.ok("POST", "/v1/volumes", json={"name": "s", "size": "16M",
                                                "data_locality": "strict-local"})
    assert s["replica_count"] == 1 and s["data_locality"] == "strict-local"
    r = manager.api("PATCH", "/v1/volumes/s", json={"replicas": 2})
    assert r.status_code == 409 and "strict-local" in r.json()["detail"], r.text
    manager.ok("POST", "/v1/volumes", json={"name": "b", "size": "16M", "replicas": 2})
    r = manager.api("PATCH", "/v1/volumes/b", json={"data_locality": "strict-local"})
    assert r.status_code == 409 and "has 2 replicas" in r.json()["detail"], r.text
    r = manager.api("PATCH", "/v1/volumes/b", json={"data_locality": "strict-local",
                                                    "replicas": 3})
    assert r.status_code == 422, r.text
    r = manager.api("PATCH", "/v1/volumes/b", json={"data_locality": "bogus"})
    assert r.status_code == 422 and "strict-local" in r.json()["detail"]
    assert manager.volume("b")["data_locality"] == "best-effort"
    assert len(manager.volume("b")["replicas"]) == 2
    # Both at once is fine: one replica, strict-local.
    one = manager.ok("PATCH", "/v1/volumes/b", json={"data_locality": "strict-local",
                                                     "replicas": 1})
    assert one["data_locality"] == "strict-local" and len(one["replicas"]) == 1

    # The default is a setting (the CLI sets it as text).
    manager.cli("settings", "set", "default_data_locality", "disabled")
    d = manager.ok("POST", "/v1/volumes", json={"name": "d", "size": "16M", "replicas": 1})
    assert d["data_locality"] == "disabled"
    # A document stored before the setting existed reads as the default.
    from drove.manager.store import SqliteStore

    store = SqliteStore(manager.data_dir / "drove.db")
    try:
        old = store.get("volumes", "d")
        del old["data_locality"]
        store.put("volumes", "d", old)
    finally:
        store.close()
    assert manager.volume("d")["data_locality"] == "disabled"
    manager.cli("settings", "set", "default_data_locality", "best-effort")
    assert manager.volume("d")["data_locality"] == "best-effort"

    # strict-local attached: its one replica is served by the engine, no process.
    att = manager.ok("POST", "/v1/volumes/s/attach", json={})
    assert att["health"] == "healthy"
    (rep,) = att["replicas"]
    assert rep["local"] and rep["pid"] is None and rep["mode"] == "RW"
    _qemu_io(att["nbd_uri"], "write -P 0x51 0 2M")
    _qemu_io(att["nbd_uri"], "read -P 0x51 0 2M")
    # disabled: every replica is a process.
    manager.ok("POST", "/v1/volumes", json={"name": "p", "size": "16M", "replicas": 2,
                                            "data_locality": "disabled"})
    att = manager.ok("POST", "/v1/volumes/p/attach", json={})
    assert not _local(att) and all(r["pid"] for r in att["replicas"])

    # A strict-local volume whose replica is on another node is not attached here.
    _foreign_disk(manager, tmp_path / "b0", "b0", "node-b", ["b"])
    far = manager.ok("POST", "/v1/volumes", json={"name": "far", "size": "16M", "pool": "b",
                                                  "data_locality": "strict-local"})
    assert far["replicas"][0]["node"] == "node-b"
    r = manager.api("POST", "/v1/volumes/far/attach", json={})
    assert r.status_code == 409, r.text
    assert "strict-local" in r.json()["detail"] and "node-b" in r.json()["detail"]
    assert manager.volume("far")["state"] == "detached"


def test_local_replica_heals_and_the_engine_restarts_with_it(manager, tmp_path):
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "d1")})
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 2})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    (local,) = _local(att)
    _qemu_io(att["nbd_uri"], "write -P 0x61 0 8M")

    # The engine drops its local replica (as after an I/O error): the healer rebuilds it,
    # in place and local again.
    r = httpx.delete(f"{att['engine']['control_url']}/v1/replicas/{local['name']}", timeout=30,
                     headers=engine_headers(att["engine"]["pid"]))
    assert r.status_code == 200, r.text
    _qemu_io(att["nbd_uri"], "write -P 0x62 1M 1M")  # written while it is out
    v = manager.wait_volume("v", lambda v: _settled(v) and any(
        e["kind"] == "rebuild-finished" for e in manager.events("v")), 60, "local rebuilt")
    assert [r["name"] for r in _local(v)] == [local["name"]]
    assert _engine_replicas(v)[local["name"]]["local"] is True
    kinds = [e["kind"] for e in manager.events("v")]
    assert "replica-failed" in kinds and "rebuild-started" in kinds
    # Reads prefer the local replica: the data written while it was out is there.
    _qemu_io(v["nbd_uri"], "read -P 0x62 1M 1M")
    _qemu_io(v["nbd_uri"], "read -P 0x61 2M 6M")

    # A killed engine takes its local replica with it; the healer restarts both.
    os.kill(v["engine"]["pid"], signal.SIGKILL)
    v = manager.wait_volume("v", lambda x: x["engine"] and x["engine"]["pid"] !=
                            v["engine"]["pid"] and _settled(x), 60, "engine restarted")
    (again,) = _local(v)
    assert again["name"] == local["name"] and again["pid"] is None
    assert _engine_replicas(v)[local["name"]]["local"] is True
    _qemu_io(v["nbd_uri"], "read -P 0x62 1M 1M")
    _qemu_io(v["nbd_uri"], "read -P 0x61 2M 6M")


@pytest.mark.slow
def test_live_locality_changes_under_io(manager, tmp_path):
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "d1")})
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 2})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    (local,) = _local(att)
    log = tmp_path / "writes.log"
    writer = _start_writer(att["nbd_uri"], log)
    steps = [("disabled", 0), ("best-effort", 1)]
    for where, locals_ in steps:
        v = manager.ok("PATCH", "/v1/volumes/v", json={"data_locality": where})
        assert v["data_locality"] == where
        v = manager.wait_volume("v", lambda x, n=locals_: _settled(x) and len(_local(x)) == n,
                                60, f"{where} applied")
        assert all(bool(r["pid"]) != r["local"] for r in v["replicas"])
        engine = _engine_replicas(v)
        assert {n for n, r in engine.items() if r.get("local")} == {
            r["name"] for r in _local(v)}
    # The replica that went out and came back is the same (delta rebuilds in place).
    assert [r["name"] for r in _local(v)] == [local["name"]]
    assert v["engine"]["pid"] == att["engine"]["pid"]  # never detached
    _stop_writer(writer)
    acked, issued = parse_log(log)
    assert len(acked) > 100
    check_blocks(read_volume(v["nbd_uri"], tmp_path / "vol.img"), acked, issued, BLOCKS)
    msgs = [e["message"] for e in manager.events("v") if e["kind"] == "data-locality"]
    assert any("leaves the engine" in m for m in msgs), msgs
    assert any("becomes local" in m for m in msgs), msgs

    # Detached, a change is only stored; it applies at the next attach.
    manager.ok("POST", "/v1/volumes/v/detach", json={})
    v = manager.ok("PATCH", "/v1/volumes/v", json={"data_locality": "disabled"})
    assert v["data_locality"] == "disabled" and v["state"] == "detached"
    v = manager.ok("POST", "/v1/volumes/v/attach", json={})
    assert not _local(v) and all(r["pid"] for r in v["replicas"])
    check_blocks(read_volume(v["nbd_uri"], tmp_path / "vol2.img"), acked, issued, BLOCKS)


def test_a_lone_replica_changes_at_the_next_attach(manager, tmp_path):
    manager.ok("POST", "/v1/volumes", json={"name": "one", "size": "16M", "replicas": 1,
                                            "data_locality": "disabled"})
    att = manager.ok("POST", "/v1/volumes/one/attach", json={})
    _qemu_io(att["nbd_uri"], "write -P 0x19 0 1M")
    # Its only replica cannot leave the engine's mirror while it serves: the change waits
    # for the next attach, and an event says so.
    v = manager.ok("PATCH", "/v1/volumes/one", json={"data_locality": "strict-local"})
    assert v["data_locality"] == "strict-local" and not _local(v)
    assert v["replicas"][0]["pid"] == att["replicas"][0]["pid"]
    unmet = [e["message"] for e in manager.events("one") if e["kind"] == "data-locality-unmet"]
    assert unmet and "next attach" in unmet[0], unmet
    manager.ok("POST", "/v1/volumes/one/detach", json={})
    v = manager.ok("POST", "/v1/volumes/one/attach", json={})
    (rep,) = v["replicas"]
    assert rep["local"] and rep["pid"] is None and v["health"] == "healthy"
    _qemu_io(v["nbd_uri"], "read -P 0x19 0 1M")


@pytest.mark.slow
def test_local_replica_on_a_lost_disk_is_replaced_by_a_local_one(manager, tmp_path):
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "d1"), "name": "d1"})
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 2})
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "d2"), "name": "d2"})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    _qemu_io(att["nbd_uri"], "write -P 0x2d 0 8M")
    (local,) = _local(att)
    # Its disk goes away, and the engine drops it.
    disk = {d["name"]: d for d in manager.ok("GET", "/v1/disks")}[local["disk"]]
    marker = Path(disk["path"]) / ".drove-disk"
    marker.rename(marker.with_suffix(".away"))
    try:
        r = httpx.delete(f"{att['engine']['control_url']}/v1/replicas/{local['name']}",
                         timeout=30, headers=engine_headers(att["engine"]["pid"]))
        assert r.status_code == 200, r.text
        v = manager.wait_volume("v", lambda x: _settled(x) and local["name"] not in
                                {r["name"] for r in x["replicas"]}, 60, "replaced")
    finally:
        marker.with_suffix(".away").rename(marker)
    (new,) = _local(v)
    assert new["name"] != local["name"] and new["disk"] not in (local["disk"],)
    assert new["pid"] is None and _engine_replicas(v)[new["name"]]["local"] is True
    assert "replica-replaced" in [e["kind"] for e in manager.events("v")]
    _qemu_io(v["nbd_uri"], "read -P 0x2d 0 8M")


@pytest.mark.slow
def test_best_effort_builds_a_local_replica_on_a_node_without_one(manager, tmp_path):
    # Two disks of "node-b" in pool t; the volume lands there, then this node gets a
    # disk in pool t too.
    _foreign_disk(manager, tmp_path / "b0", "b0", "node-b", ["t"])
    _foreign_disk(manager, tmp_path / "b1", "b1", "node-b", ["t"])
    created = manager.ok("POST", "/v1/volumes", json={"name": "m", "size": "64M",
                                                      "replicas": 2, "pool": "t"})
    assert {r["disk"] for r in created["replicas"]} == {"b0", "b1"}
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "a1"), "tags": ["t"],
                                          "name": "a1"})
    # The attach succeeds at once, with the two remote replicas.
    att = manager.ok("POST", "/v1/volumes/m/attach", json={})
    assert att["state"] == "attached" and not _local(att)
    _qemu_io(att["nbd_uri"], "write -P 0x7e 0 16M")
    v = manager.wait_volume("m", lambda x: _settled(x) and len(_local(x)) == 1, 120,
                            "a local replica instead of a remote one")
    (local,) = _local(v)
    assert local["disk"] == "a1" and local["node"] == att["node"] and local["pid"] is None
    assert len([r for r in v["replicas"] if r["node"] == "node-b"]) == 1
    msgs = [e["message"] for e in manager.events("m") if e["kind"] == "data-locality"]
    assert any("holds none of its replicas" in m for m in msgs), msgs
    assert any("goes" in m for m in msgs), msgs
    _qemu_io(v["nbd_uri"], "read -P 0x7e 0 16M")
