"""Recurring jobs and long tasks through a real `drove serve` (directory target)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest

MiB = 1 << 20


def _set_target(manager, tmp_path) -> None:
    root = tmp_path / "backups"
    root.mkdir()
    manager.cli("backup", "target", "set", f"file://{root}")


def _hourly_far_off() -> str:
    """An hourly cron whose next tick is half an hour away, so none falls inside a test
    (a tick during the test would add a second, legitimate run to what it counts)."""
    return f"{(datetime.now(UTC) + timedelta(minutes=30)).minute} * * * *"


def _job_snapshots(manager, volume: str, job: str) -> list[str]:
    return [s["name"] for s in manager.cli_json("snapshot", "list", volume)
            if (s.get("labels") or {}).get("drove.job") == job]


def _write(uri: str, offset: int, pattern: int) -> None:
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} 1M", uri],
                   check=True, capture_output=True, timeout=120)


@pytest.mark.slow
def test_snapshot_job_keeps_the_newest_n(manager):
    manager.cli("volume", "create", "v", "--size", "64M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "v")["nbd_uri"]
    job = manager.cli_json("job", "create", "--name", "hourly", "--kind", "snapshot",
                           "--cron", _hourly_far_off(), "--retain", "2", "--volume", "v")
    assert job["name"] == "hourly" and job["next_run"]
    made = []
    for i in range(4):
        _write(uri, i * MiB, i + 1)
        manager.cli("job", "run", "hourly")
        made.append(_job_snapshots(manager, "v", "hourly"))
    assert len(made[0]) == 1 and len(made[1]) == 2
    assert len(made[3]) == 2 and made[3][0] in made[2] and made[3][1] not in made[2]
    runs = [e for e in manager.events() if e["kind"] == "job-run"]
    assert len(runs) == 4 and "hourly" in runs[0]["message"]
    manager.cli("volume", "detach", "v")


@pytest.mark.slow
def test_backup_job_by_label_with_retention(manager, tmp_path):
    _set_target(manager, tmp_path)
    for v in ("g1", "g2", "other"):
        tier = "gold" if v != "other" else "bronze"
        manager.cli("volume", "create", v, "--size", "64M", "--replicas", "1",
                    "--label", f"tier={tier}")
        manager.cli_json("volume", "attach", v)
    manager.cli_json("job", "create", "--name", "nightly", "--kind", "backup", "--cron",
                     _hourly_far_off(), "--retain", "1", "--label", "tier=gold")
    for _ in range(2):
        for v in ("g1", "g2"):
            _write(manager.volume(v)["nbd_uri"], 0, 7)
        manager.cli("job", "run", "nightly")
    backups = manager.cli_json("backup", "list")
    assert sorted(b["volume"] for b in backups) == ["g1", "g2"]
    assert all(b["labels"].get("drove.job") == "nightly" for b in backups)
    # The newest job snapshot stays as the next incremental's base; older ones go.
    for v in ("g1", "g2"):
        assert len(_job_snapshots(manager, v, "nightly")) == 1
    assert _job_snapshots(manager, "other", "nightly") == []
    job = manager.cli_json("job", "get", "nightly")
    assert job["last_result"]["ok"], job
    for v in ("g1", "g2", "other"):
        manager.cli("volume", "detach", v)


@pytest.mark.slow
def test_missed_run_runs_once_at_start(manager):
    manager.cli("volume", "create", "v", "--size", "64M", "--replicas", "1")
    manager.cli_json("volume", "attach", "v")
    manager.cli_json("job", "create", "--name", "often", "--kind", "snapshot", "--cron",
                     _hourly_far_off(), "--retain", "5", "--volume", "v")
    manager.stop()
    # Pretend the manager was down for three hours: 3 scheduled times were missed.
    past = (datetime.now(UTC) - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    db = sqlite3.connect(manager.data_dir / "drove.db")
    with db:
        n = db.execute("UPDATE objects SET doc=json_set(doc, '$.created', ?) "
                       "WHERE kind='jobs' AND key='often'", (past,)).rowcount
    db.close()
    assert n == 1
    manager.start()
    deadline = time.monotonic() + 60
    while not _job_snapshots(manager, "v", "often"):
        assert time.monotonic() < deadline, "the missed run did not run"
        time.sleep(0.3)
    time.sleep(2)
    assert len(_job_snapshots(manager, "v", "often")) == 1
    assert len([e for e in manager.events() if e["kind"] == "job-run"]) == 1
    job = manager.cli_json("job", "get", "often")
    nxt = datetime.fromisoformat(job["next_run"].replace("Z", "+00:00"))
    assert timedelta(minutes=20) < nxt - datetime.now(UTC) < timedelta(minutes=31)
    manager.cli("volume", "detach", "v")


def test_job_refuses_bad_input(manager):
    r = manager.api("POST", "/v1/jobs", json={"kind": "snapshot", "cron": "every hour",
                                              "volumes": ["v"]})
    assert r.status_code == 422 and "cron" in r.json()["detail"]
    r = manager.api("POST", "/v1/jobs", json={"kind": "backup", "cron": "0 * * * *"})
    assert r.status_code == 422 and "volumes" in r.json()["detail"]
    assert manager.ok("GET", "/v1/jobs") == []


@pytest.mark.slow
def test_restore_cancelled_or_interrupted_leaves_no_volume(manager, tmp_path):
    _set_target(manager, tmp_path)
    manager.cli("volume", "create", "v", "--size", "1G", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "v")["nbd_uri"]
    subprocess.run(["nbdcopy", "--", "[", "nbdkit", "--exit-with-parent", "random",
                    "size=512M", "]", uri],
                   check=True, timeout=300)
    name = manager.cli_json("backup", "create", "v")["name"]

    task = manager.ok("POST", f"/v1/backups/{name}/restore", json={"volume": "r1", "replicas": 1})
    assert manager.volume("r1")["state"] == "restoring"
    r = manager.api("POST", "/v1/volumes/r1/attach", json={})
    assert r.status_code == 409 and "restored" in r.json()["detail"]
    time.sleep(0.5)
    cancelled = manager.ok("POST", f"/v1/tasks/{task['id']}/cancel")
    assert cancelled["state"] == "cancelled"
    assert manager.api("GET", "/v1/volumes/r1").status_code == 404

    # A manager killed mid-restore: the next start deletes the partial volume.
    task = manager.ok("POST", f"/v1/backups/{name}/restore", json={"volume": "r2", "replicas": 1})
    time.sleep(0.5)
    manager.stop(sig=9)
    manager.start()
    assert manager.api("GET", "/v1/volumes/r2").status_code == 404
    after = manager.ok("GET", f"/v1/tasks/{task['id']}")
    assert after["state"] == "failed" and "manager stopped" in after["error"]
    kinds = [e["kind"] for e in manager.events()]
    assert "restore-abandoned" in kinds, json.dumps(kinds)
    manager.cli("volume", "detach", "v")
