"""The manager's REST API against a real `drove serve`: auth, volumes, placement, healing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from accesstools import engine_headers, replica_headers
from drove.manager.roles import PUBLIC, needed
from replicatools import nbdinfo_json


def _disks(manager, tmp_path: Path, n: int, **kwargs) -> list[dict]:
    return [manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / f"disk{i}"), **kwargs})
            for i in range(n)]


def test_every_endpoint_but_health_needs_the_token(manager):
    assert manager.api("GET", "/v1/health", token="").status_code == 200
    spec = manager.api("GET", "/openapi.json", token="").json()
    for path, ops in spec["paths"].items():
        concrete = path.replace("{name}", "x").replace("{snapshot}", "y")
        for method in ops:
            if needed(method.upper(), path) == PUBLIC:  # /v1/health, logging in
                continue
            for token in ("", "wrong-token"):
                r = manager.api(method.upper(), concrete, token=token)
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert "token" in r.json()["detail"]
    assert (manager.data_dir / "token").stat().st_mode & 0o777 == 0o600


def test_volume_lifecycle_and_bad_input(manager, tmp_path):
    _disks(manager, tmp_path, 2)
    v = manager.ok("POST", "/v1/volumes", json={"name": "db", "size": "256M", "replicas": 3,
                                                 "labels": {"app": "pg"}})
    assert v["size"] == 256 << 20 and v["state"] == "detached" and len(v["replicas"]) == 3
    assert len({r["disk"] for r in v["replicas"]}) == 3
    # Bad requests: 4xx with a message, nothing changes.
    for body, status in [({"name": "Bad Name", "size": "1G"}, 422),
                         ({"name": "x", "size": "-1"}, 422),
                         ({"name": "x", "size": 4097}, 422),
                         ({"name": "x", "size": "1G", "replicas": 0}, 422),
                         ({"name": "x", "size": "1G", "bogus": 1}, 422),
                         ({"name": "db", "size": "1G"}, 409),
                         ({"name": "x", "size": "1G", "replicas": 4}, 409),
                         ({"name": "x", "size": "1G", "pool": "fast"}, 409)]:
        r = manager.api("POST", "/v1/volumes", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["detail"]
    r = manager.api("POST", "/v1/volumes", json={"name": "x", "size": "1G", "replicas": 4})
    assert "cannot place" in r.json()["detail"] and "drove disk add" in r.json()["detail"]
    assert [x["name"] for x in manager.ok("GET", "/v1/volumes")] == ["db"]
    assert manager.api("GET", "/v1/volumes/nope").status_code == 404

    att = manager.ok("POST", "/v1/volumes/db/attach", json={})
    assert att["state"] == "attached" and att["health"] == "healthy"
    # best-effort by default: one replica is served by the engine (no process), the rest
    # each by its own process.
    assert all(r["mode"] == "RW" and bool(r["pid"]) != r["local"] for r in att["replicas"])
    assert att["data_locality"] == "best-effort" and sum(r["local"] for r in att["replicas"]) == 1
    assert nbdinfo_json(att["nbd_uri"])["exports"][0]["export-size"] == 256 << 20
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 3M", att["nbd_uri"]],
                   check=True, capture_output=True)
    assert manager.api("DELETE", "/v1/volumes/db").status_code == 409
    snap = manager.ok("POST", "/v1/volumes/db/snapshots", json={"name": "s1",
                                                                "labels": {"k": "v"}})
    assert snap["name"] == "s1" and snap["labels"] == {"k": "v"}
    tree = {s["name"]: s for s in manager.ok("GET", "/v1/volumes/db/snapshots")}
    assert tree["volume-head"]["parent"] == "s1" and tree["s1"]["children"] == ["volume-head"]
    exp = manager.ok("POST", "/v1/volumes/db/snapshots/s1/export")
    subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x33 1M 3M", exp["nbd_uri"]],
                   check=True, capture_output=True)
    assert manager.api("POST", "/v1/volumes/db/snapshots/nope/export").status_code == 404
    grown = manager.ok("POST", "/v1/volumes/db/expand", json={"size": "512M"})
    assert grown["size"] == 512 << 20
    assert nbdinfo_json(att["nbd_uri"])["exports"][0]["export-size"] == 512 << 20
    assert manager.api("POST", "/v1/volumes/db/expand", json={"size": "128M"}).status_code == 422

    det = manager.ok("POST", "/v1/volumes/db/detach", json={})
    assert det["state"] == "detached" and det["nbd_uri"] is None
    pids = [r["pid"] for r in att["replicas"] if r["pid"]] + [att["engine"]["pid"]]
    time.sleep(0.2)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]
    # Offline: the snapshot list still answers (read from a replica's files).
    assert "s1" in {s["name"] for s in manager.ok("GET", "/v1/volumes/db/snapshots")}
    manager.ok("DELETE", "/v1/volumes/db")
    assert all(not Path(r["path"]).exists() for r in att["replicas"])
    kinds = [e["kind"] for e in manager.events("db")]
    for kind in ("volume-created", "volume-attached", "snapshot-created", "volume-expanded",
                 "volume-detached", "volume-deleted"):
        assert kind in kinds


@pytest.mark.slow
def test_replica_killed_heals_by_itself_and_restart_keeps_everything(manager, tmp_path):
    _disks(manager, tmp_path, 2)
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "128M", "replicas": 3})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    uri = att["nbd_uri"]
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 32M", uri], check=True,
                   capture_output=True)
    victim = next(r for r in att["replicas"] if not r["local"])
    os.kill(victim["pid"], signal.SIGKILL)
    manager.wait_volume("v", lambda v: v["health"] == "degraded", 30, "degraded")
    healed = manager.wait_volume("v", lambda v: v["health"] == "healthy", 60, "healthy again")
    again = {r["name"]: r for r in healed["replicas"]}[victim["name"]]
    assert again["pid"] != victim["pid"] and again["mode"] == "RW"
    kinds = [e["kind"] for e in manager.events("v")]
    assert {"replica-failed", "rebuild-started", "rebuild-finished"} <= set(kinds), \
        manager.events("v")

    # A clean restart detaches and re-attaches; a crash (SIGKILL) leaves processes to adopt.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        manager.stop(sig)
        manager.start()
        v = manager.wait_volume("v", lambda v: v["health"] == "healthy", 60, "back")
        assert v["state"] == "attached"
        subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 32M", v["nbd_uri"]],
                       check=True, capture_output=True)


@pytest.mark.slow
def test_disk_gone_replica_replaced_elsewhere(manager, tmp_path):
    disks = _disks(manager, tmp_path, 3)
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 2})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 8M", att["nbd_uri"]],
                   check=True, capture_output=True)
    # Take away a disk holding a replica: its marker goes, then its process dies.
    victim = next(r for r in att["replicas"] if r["disk"] != "default" and not r["local"])
    disk = next(d for d in disks if d["name"] == victim["disk"])
    (Path(disk["path"]) / ".drove-disk").rename(Path(disk["path"]) / ".gone")
    os.kill(victim["pid"], signal.SIGKILL)
    v = manager.wait_volume("v", lambda v: v["health"] == "healthy"
                            and victim["name"] not in {r["name"] for r in v["replicas"]},
                            60, "replaced")
    assert len(v["replicas"]) == 2 and victim["disk"] not in {r["disk"] for r in v["replicas"]}
    assert "replica-replaced" in [e["kind"] for e in manager.events("v")]
    # The disk comes back: the replaced replica's stale data is removed.
    (Path(disk["path"]) / ".gone").rename(Path(disk["path"]) / ".drove-disk")
    deadline = time.monotonic() + 30
    while Path(victim["path"]).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(victim["path"]).exists()
    subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 0 8M", v["nbd_uri"]],
                   check=True, capture_output=True)


@pytest.mark.slow
def test_replica_count_changes_live_and_settings(manager, tmp_path):
    _disks(manager, tmp_path, 2)
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 1})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4M", att["nbd_uri"]],
                   check=True, capture_output=True)
    manager.ok("PATCH", "/v1/volumes/v", json={"replicas": 3})
    v = manager.wait_volume("v", lambda v: v["health"] == "healthy"
                            and sum(r["mode"] == "RW" for r in v["replicas"]) == 3, 90, "3 RW")
    manager.ok("PATCH", "/v1/volumes/v", json={"replicas": 2})
    v = manager.volume("v")
    assert len(v["replicas"]) == 2 and v["health"] == "healthy"
    subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x77 0 4M", v["nbd_uri"]],
                   check=True, capture_output=True)
    s = manager.ok("PATCH", "/v1/settings", json={"over_provisioning_percent": 200})
    assert s["over_provisioning_percent"] == 200
    assert manager.api("PATCH", "/v1/settings", json={"default_replicas": 0}).status_code == 422
    assert manager.api("PATCH", "/v1/settings", json={"nope": 1}).status_code == 422


def test_metrics(manager, tmp_path):
    manager.ok("POST", "/v1/volumes", json={"name": "m", "size": "64M", "replicas": 1})
    att = manager.ok("POST", "/v1/volumes/m/attach", json={})
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 1M", att["nbd_uri"]], check=True,
                   capture_output=True)
    text = manager.api("GET", "/metrics").text
    for needle in ('drove_volume_health{health="healthy",volume="m"} 1.0',
                   'drove_volume_replicas{mode="RW",volume="m"} 1.0',
                   'drove_volume_bytes_total{op="write",volume="m"}',
                   'drove_volume_latency_seconds_bucket{le="+Inf",op="write",volume="m"}',
                   'drove_volume_iops{op="write",volume="m"}',
                   'drove_disk_capacity_bytes{disk="default"}'):
        assert needle in text, needle


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_second_manager_on_same_data_dir_refused(manager, sig):
    r = subprocess.run([sys.executable, "-m", "drove", "serve", "--data-dir", str(manager.data_dir),
                        "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "another drove manager" in r.stderr


@pytest.mark.slow
def test_disk_back_after_outage_gets_a_delta_rebuild_in_place(manager, tmp_path):
    (disk,) = _disks(manager, tmp_path, 1)
    # Both replicas as processes: with one local to the engine, the local one alone would
    # acknowledge no write while the other waits for its disk (write quorum).
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 2,
                                            "data_locality": "disabled"})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x21 0 16M", att["nbd_uri"]],
                   check=True, capture_output=True)
    victim = next(r for r in att["replicas"] if r["disk"] == disk["name"])
    assert not victim["local"]
    marker = Path(disk["path"]) / ".drove-disk"
    marker.rename(marker.with_suffix(".away"))
    os.kill(victim["pid"], signal.SIGKILL)
    # No other disk to go to: the replica waits for its disk; writes go on meanwhile.
    manager.wait_volume("v", lambda v: v["health"] == "degraded", 30, "degraded")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 4M 1M", att["nbd_uri"]],
                   check=True, capture_output=True)
    time.sleep(2)
    assert manager.volume("v")["health"] == "degraded"
    marker.with_suffix(".away").rename(marker)
    v = manager.wait_volume("v", lambda v: v["health"] == "healthy", 60, "healthy")
    back = {r["name"]: r for r in v["replicas"]}[victim["name"]]
    assert back["path"] == victim["path"] and back["disk"] == disk["name"]
    msgs = [e["message"] for e in manager.events("v") if e["kind"] == "rebuild-started"]
    assert any("delta" in m for m in msgs)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x22 4M 1M", v["nbd_uri"]],
                   check=True, capture_output=True)


@pytest.mark.slow
def test_engine_killed_is_restarted(manager, tmp_path):
    _disks(manager, tmp_path, 1)
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 2})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x31 0 8M", att["nbd_uri"]],
                   check=True, capture_output=True)
    os.kill(att["engine"]["pid"], signal.SIGKILL)
    v = manager.wait_volume("v", lambda v: v["engine"] and v["engine"]["pid"] !=
                            att["engine"]["pid"] and v["health"] == "healthy", 60, "new engine")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x31 0 8M", v["nbd_uri"]],
                   check=True, capture_output=True)
    assert "engine-failed" in [e["kind"] for e in manager.events("v")]
    # Every engine start got a new epoch, and the replicas now refuse anything older.
    assert v["engine"]["epoch"] == att["engine"]["epoch"] + 1
    info = httpx.get(v["engine"]["control_url"] + "/v1/info",
                     headers=engine_headers(v["engine"]["pid"])).json()
    assert info["epoch"] == v["engine"]["epoch"]
    # The replicas' control APIs want the volume's access key (drove.replica.access).
    key = replica_headers(v["engine"]["pid"])
    for r in info["replicas"]:
        assert httpx.get(r["url"] + "/v1/info").status_code == 401
        assert httpx.get(r["url"] + "/v1/info", headers=key
                         ).json()["epoch"] == v["engine"]["epoch"]
        stale = httpx.post(r["url"] + "/v1/snapshots", json={"name": "x"},
                           headers={"Drove-Epoch": str(att["engine"]["epoch"]), **key})
        assert stale.status_code == 409 and "stale" in stale.json()["detail"]
