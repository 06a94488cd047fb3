"""Instant restore through a real `drove serve` and a directory target.

A backup is restored with ``--instant``: the volume serves at once while its data is
still in the backup, reads fetch what they touch, writes land above the backup's
layer, a task fills the rest.  Data is written and checked with qemu-io, volumes are
compared with `qemu-img compare` over their NBD exports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cutproxy import CutProxy
from drove.backup.blocks import encode
from replicatools import qemu_io, run

pytestmark = pytest.mark.slow

MiB = 1 << 20
BLOCK = 2 * MiB
SIZE = 256 * MiB


def compare(a: str, b: str) -> None:
    """qemu-img compare of two NBD URIs (identical contents)."""
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def wait_task(manager, tid: str, state: str = "succeeded", timeout: float = 120) -> dict:
    """Poll task ``tid`` until it reaches ``state`` (a test failure if it ends otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        t = manager.ok("GET", f"/v1/tasks/{tid}")
        if t["state"] == state:
            return t
        assert t["state"] == "running", t
        assert time.monotonic() < deadline, f"task not {state} in {timeout} s: {t}"
        time.sleep(0.2)


@pytest.fixture
def source(manager, tmp_path):
    """A 1-replica volume with data spread over it (its last MiB included), backed up to
    a directory target; (backup, target dir, pieces written)."""
    root = tmp_path / "backups"
    root.mkdir()
    manager.cli("backup", "target", "set", f"file://{root}")
    manager.cli("volume", "create", "src", "--size", "256M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "src")["nbd_uri"]
    pieces = [(i * 24 * MiB + i * 4096, 3 * MiB) for i in range(10)] + [(SIZE - MiB, MiB)]
    qemu_io(uri, *(f"write -P {i + 1} {off} {n}" for i, (off, n) in enumerate(pieces)))
    b = manager.cli_json("backup", "create", "src")
    manager.cli("volume", "detach", "src")
    return b["name"], root, pieces


def instant(manager, backup: str, volume: str, rate: str = "8M") -> dict:
    """`drove backup restore BACKUP --to VOLUME --instant --json`: {task, volume}.

    The fill is slowed down (44 MiB of data at 8 MiB/s) so that reads and writes come
    before it, as they would on a large volume.
    """
    return manager.cli_json("backup", "restore", backup, "--to", volume, "--instant",
                            "--fill-rate", rate)


def test_instant_restore_serves_at_once_and_fills(manager, source):
    backup, _, pieces = source
    # Bad input: a clear error, nothing created.
    r = manager.api("POST", "/v1/backups/backup-0123456789abcdef/restore",
                    json={"volume": "nope", "instant": True})
    assert r.status_code == 404 and "does not exist" in r.json()["detail"], r.text
    r = manager.api("POST", f"/v1/backups/{backup}/restore",
                    json={"volume": "nope", "instant": True, "fill_rate": -1})
    assert r.status_code == 422, r.text
    assert manager.api("GET", "/v1/volumes/nope").status_code == 404
    t0 = time.monotonic()
    out = instant(manager, backup, "fast")
    vol = manager.volume("fast")
    assert vol["state"] == "attached", vol
    assert vol["instant_restore"] == {"backup": backup, "snapshot": backup}
    # The backup recorded the source's replica count: one, not the default three.
    assert len(vol["replicas"]) == 1
    uri = vol["nbd_uri"]
    # The last MiB answers at once (fetched from the backup), with the right data.
    t1 = time.monotonic()
    qemu_io(uri, f"read -P {len(pieces)} {SIZE - MiB} {MiB}", read_only=True)
    first = time.monotonic() - t1
    print(f"restore call {t1 - t0:.2f} s, first read of the last MiB {first:.2f} s")
    assert first < 2, first
    t = manager.ok("GET", f"/v1/tasks/{out['task']}")
    assert t["state"] == "running" and t["progress"]["done"] < 40 * MiB, t
    # A write before the fill reaches it (a partial 4 KiB block over backup data too).
    off = pieces[5][0] + 1000
    qemu_io(uri, f"write -P 200 {off} 5000")
    t = wait_task(manager, out["task"])
    assert t["progress"]["done"] == t["progress"]["total"] > 0
    assert manager.volume("fast").get("instant_restore") is None
    # After the fill: the write survived, the rest is the backup's.
    qemu_io(uri, f"read -P 200 {off} 5000", f"read -P 6 {pieces[5][0]} 1000",
            f"read -P 6 {off + 5000} {pieces[5][1] - 6000}", read_only=True)
    manager.cli("backup", "restore", backup, "--to", "plain")
    plain = manager.cli_json("volume", "attach", "plain")["nbd_uri"]
    qemu_io(uri, f"write -P 6 {off} 5000")  # undo the write: then it equals a plain restore
    compare(uri, plain)
    # An ordinary volume now: its snapshot (the backup's layer) can be deleted, the
    # backup too.
    manager.cli("snapshot", "delete", "fast", backup)
    compare(uri, plain)
    manager.cli("backup", "delete", backup, "--yes")


def test_backup_in_use_cannot_be_deleted(manager, source):
    """(With a replica process: the engine gets the EIO over NBD, and keeps the replica.
    test_target_that_stops_answering has the replica in the engine.)"""
    backup, root, pieces = source
    manager.cli("settings", "set", "default_data_locality", "disabled")
    # Take a block away so the fill cannot finish: the restore depends on the backup.
    man = json.loads(next(root.glob(f"volumes/src/backups/{backup}.cfg")).read_text())
    h = man["blocks"][str(pieces[3][0] // BLOCK * BLOCK)]
    blk = next(root.glob(f"blocks/{h[:2]}/{h[2:4]}/{h}.blk"))
    saved = blk.read_bytes()
    # Corrupt: a well-formed block holding other data (its hash no longer matches).
    blk.write_bytes(encode(bytes(BLOCK - 1) + b"x", "none"))
    out = instant(manager, backup, "dep")
    vol = manager.volume("dep")
    assert not vol["replicas"][0]["local"]
    uri = vol["nbd_uri"]
    r = manager.api("DELETE", f"/v1/backups/{backup}")
    assert r.status_code == 409 and "dep" in r.json()["detail"], r.text
    # The corrupt block's range fails with EIO; other ranges read right; the volume stays.
    bad = pieces[3][0]
    res = run(["qemu-io", "-f", "raw", "-r", "-c", f"read {bad} 4096", uri], check=False)
    assert "Input/output error" in (res.stdout + res.stderr).decode(), res
    qemu_io(uri, f"read -P 5 {pieces[4][0]} {pieces[4][1]}", read_only=True)
    # The task keeps trying and says why.
    deadline = time.monotonic() + 60
    while True:
        t = manager.ok("GET", f"/v1/tasks/{out['task']}")
        if t["state"] == "running" and "checksum" in (t.get("message") or ""):
            break
        assert t["state"] == "running" and time.monotonic() < deadline, t
        time.sleep(0.2)
    assert manager.volume("dep")["health"] == "healthy"
    # Repaired on the target, the block is fetched at the next try and the fill ends.
    blk.write_bytes(saved)
    wait_task(manager, out["task"], timeout=60)
    qemu_io(uri, f"read -P 4 {bad} {pieces[3][1]}", read_only=True)
    manager.cli("backup", "delete", backup, "--yes")


def test_fill_resumes_after_manager_restart(manager, source):
    backup, _, pieces = source
    out = instant(manager, backup, "again")
    uri = manager.volume("again")["nbd_uri"]
    manager.stop()
    manager.start()
    # The volume is attached again and its fill followed by a new task.
    manager.wait_volume("again", lambda v: v["state"] == "attached", what="attached")
    deadline = time.monotonic() + 60
    while True:
        tasks = [t for t in manager.ok("GET", "/v1/tasks")
                 if t["kind"] == "instant-restore" and t["volume"] == "again"
                 and t["id"] != out["task"]]
        if tasks:
            break
        assert time.monotonic() < deadline, "no new fill task"
        time.sleep(0.2)
    wait_task(manager, tasks[0]["id"])
    uri = manager.volume("again")["nbd_uri"]
    for i, (off, n) in enumerate(pieces):
        qemu_io(uri, f"read -P {i + 1} {off} {n}", read_only=True)


def test_ext4_on_an_instant_restore_during_its_fill(manager, tmp_path):
    root = tmp_path / "backups"
    root.mkdir()
    manager.cli("backup", "target", "set", f"file://{root}")
    manager.cli("volume", "create", "fs", "--size", "256M", "--replicas", "1")
    src = tmp_path / "src"
    manager.cli("volume", "attach", "fs", "--mount", str(src))
    files = {f"f{i}": os.urandom(3 * MiB + i * 4099) for i in range(12)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    os.sync()
    manager.cli("volume", "detach", "fs")
    manager.cli("volume", "attach", "fs")  # a backup reads a running replica
    b = manager.cli_json("backup", "create", "fs")["name"]
    manager.cli("volume", "detach", "fs")
    out = instant(manager, b, "fs2", rate="4M")
    # Mounted (through the host attach) while the fill goes on: the existing filesystem
    # is found (never formatted over), its files read right, new ones are written.
    manager.cli("volume", "detach", "fs2")
    mnt = tmp_path / "mnt"
    manager.cli("volume", "attach", "fs2", "--mount", str(mnt))
    t = manager.ok("GET", f"/v1/tasks/{out['task']}")
    assert t["state"] == "running", t
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name
    new = {f"n{i}": os.urandom(2 * MiB + i) for i in range(8)}
    for name, data in new.items():
        (mnt / name).write_bytes(data)
    (mnt / "f3").write_bytes(b"changed")
    os.sync()
    wait_task(manager, out["task"])
    manager.cli("volume", "detach", "fs2")
    manager.cli("volume", "attach", "fs2", "--mount", str(mnt))
    for name, data in {**files, **new, "f3": b"changed"}.items():
        assert (mnt / name).read_bytes() == data, name
    manager.cli("volume", "detach", "fs2")


def test_replica_killed_during_the_fill(manager, source, tmp_path):
    backup, _, pieces = source
    manager.cli("disk", "add", str(tmp_path / "d2"))
    out = manager.cli_json("backup", "restore", backup, "--to", "two", "--instant",
                           "--replicas", "2", "--fill-rate", "4M")
    vol = manager.volume("two")
    uri = vol["nbd_uri"]
    procs = [r for r in vol["replicas"] if r.get("pid") and not r.get("local")]
    assert procs, vol["replicas"]
    os.kill(procs[0]["pid"], signal.SIGKILL)
    qemu_io(uri, f"write -P 201 {pieces[7][0] + 512} 4096")
    wait_task(manager, out["task"], timeout=120)
    manager.wait_volume("two", lambda v: v["health"] == "healthy", what="healthy")
    qemu_io(uri, f"read -P 201 {pieces[7][0] + 512} 4096", read_only=True)
    for i, (off, n) in enumerate(pieces):
        if i != 7:
            qemu_io(uri, f"read -P {i + 1} {off} {n}", read_only=True)
    # The killed replica was rebuilt during the fill: the layer the other was still
    # filling it fetched from the backup itself (it adopts the backup), the rest copied.
    kinds = [e["kind"] for e in manager.events("two")]  # oldest first
    assert "rebuild-finished" in kinds, kinds
    assert kinds.index("rebuild-finished") < kinds.index("volume-restored"), kinds
    # Both replicas' copies of the backup's layer are the same.
    files = [Path(r["path"]) / f"volume-snap-{backup}.img"
             for r in manager.volume("two")["replicas"]]
    assert files[0].read_bytes() == files[1].read_bytes()
    manager.cli("volume", "detach", "two")


def test_instant_restore_from_s3(manager, radosgw):
    """The replicas fetch from S3 themselves (the target's keys reach them in a 0600 file)."""
    bucket = f"ir{os.getpid()}-{time.monotonic_ns() % 10**9}"
    radosgw.make_bucket(bucket)
    manager.cli("backup", "target", "set", f"s3://{bucket}/drove", "--endpoint",
                radosgw.endpoint, "--region", radosgw.region, "--access-key",
                radosgw.access_key, "--secret-key", radosgw.secret_key)
    manager.cli("volume", "create", "s3src", "--size", "64M", "--replicas", "1")
    uri = manager.cli_json("volume", "attach", "s3src")["nbd_uri"]
    qemu_io(uri, f"write -P 9 {5 * MiB} {3 * MiB}", f"write -P 10 {63 * MiB} {MiB}")
    b = manager.cli_json("backup", "create", "s3src")["name"]
    out = instant(manager, b, "s3copy", rate="2M")
    vol = manager.volume("s3copy")
    copy = vol["nbd_uri"]
    qemu_io(copy, f"read -P 10 {63 * MiB} {MiB}", read_only=True)
    backing = list(Path(vol["replicas"][0]["path"]).glob("backing.json"))
    assert backing and backing[0].stat().st_mode & 0o777 == 0o600
    assert radosgw.secret_key in backing[0].read_text()
    for pid in manager.pids():  # never on a command line
        with contextlib.suppress(OSError):
            assert radosgw.secret_key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    wait_task(manager, out["task"])
    assert not (Path(vol["replicas"][0]["path"]) / "backing.json").exists()
    compare(copy, uri)  # the source is unchanged since its backup


def test_target_that_stops_answering(manager, radosgw):
    """S3 goes away mid-fill: reads of what is not local yet fail with EIO in seconds (never
    zeros, the replica stays), what was fetched reads on; back, the fill ends."""
    host, port = urlsplit(radosgw.endpoint).hostname, urlsplit(radosgw.endpoint).port
    proxy = CutProxy((host, port))
    try:
        bucket = f"ir{os.getpid()}-{time.monotonic_ns() % 10**9}"
        radosgw.make_bucket(bucket)
        manager.cli("backup", "target", "set", f"s3://{bucket}/drove", "--endpoint",
                    f"http://127.0.0.1:{proxy.port}", "--region", radosgw.region,
                    "--access-key", radosgw.access_key, "--secret-key", radosgw.secret_key)
        manager.cli("volume", "create", "s3src", "--size", "64M", "--replicas", "1")
        uri = manager.cli_json("volume", "attach", "s3src")["nbd_uri"]
        pieces = [(i * 8 * MiB, 2 * MiB) for i in range(8)]
        qemu_io(uri, *(f"write -P {i + 1} {off} {n}" for i, (off, n) in enumerate(pieces)))
        b = manager.cli_json("backup", "create", "s3src")["name"]
        out = instant(manager, b, "gone", rate="1M")
        copy = manager.volume("gone")["nbd_uri"]
        qemu_io(copy, f"read -P 8 {pieces[7][0]} {MiB}", read_only=True)
        proxy.cut()
        t0 = time.monotonic()
        res = run(["qemu-io", "-f", "raw", "-r", "-c", f"read {pieces[5][0]} 4096", copy],
                  check=False)
        took = time.monotonic() - t0
        assert "Input/output error" in (res.stdout + res.stderr).decode(), res
        assert took < 10, took
        qemu_io(copy, f"read -P 8 {pieces[7][0]} {MiB}", read_only=True)
        deadline = time.monotonic() + 60
        while "retrying" not in (manager.ok("GET", f"/v1/tasks/{out['task']}")
                                 .get("message") or ""):
            assert time.monotonic() < deadline, "the task does not say it retries"
            time.sleep(0.2)
        assert manager.volume("gone")["health"] == "healthy"
        proxy.mend()
        wait_task(manager, out["task"], timeout=120)
        for i, (off, n) in enumerate(pieces):
            qemu_io(copy, f"read -P {i + 1} {off} {n}", read_only=True)
    finally:
        proxy.close()


PG_BIN = "/usr/lib/postgresql/15/bin"
"""Debian's PostgreSQL 15 (bookworm): its server tools are not on PATH (tools.tsv)."""


class Postgres:
    """A PostgreSQL server run as the postgres user on a data directory (unix socket only)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.sock = data.parent

    def _as_pg(self, *args: str, timeout: float = 300) -> str:
        r = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, f"{args}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        return r.stdout

    def init(self) -> None:
        """initdb (the data directory's parent must be the postgres user's)."""
        self._as_pg(f"{PG_BIN}/initdb", "-D", str(self.data), "--no-sync")

    def start(self) -> None:
        """Start the server, listening on a unix socket beside the data directory."""
        self._as_pg(f"{PG_BIN}/pg_ctl", "-D", str(self.data), "-w", "-l",
                    str(self.sock / "log"), "-o",
                    f"-k {self.sock} -c listen_addresses='' -c fsync=on", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server."""
        self._as_pg(f"{PG_BIN}/pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")

    def bench(self, *args: str) -> str:
        """pgbench against the server; its output."""
        return self._as_pg(f"{PG_BIN}/pgbench", "-h", str(self.sock), *args, "postgres",
                           timeout=600)

    def sql(self, query: str) -> str:
        """One query's result, unaligned."""
        return self._as_pg(f"{PG_BIN}/psql", "-h", str(self.sock), "-At", "-c", query,
                           "postgres").strip()


def test_postgres_runs_pgbench_during_the_fill(manager, tmp_path):
    root = tmp_path / "backups"
    root.mkdir()
    manager.cli("backup", "target", "set", f"file://{root}")
    manager.cli("volume", "create", "pg", "--size", "512M", "--replicas", "1")
    top = Path(tempfile.mkdtemp(prefix="drove-pg-"))  # postgres must reach the mounts
    top.chmod(0o755)
    mnt, mnt2 = top / "a", top / "b"
    servers: list[Postgres] = []
    try:
        manager.cli("volume", "attach", "pg", "--mount", str(mnt))
        shutil.chown(mnt, "postgres", "postgres")
        pg = Postgres(mnt / "data")
        servers.append(pg)
        pg.init()
        pg.start()
        pg.bench("-i", "-s", "3", "-q")
        pg.stop()
        servers.pop()
        manager.cli("volume", "detach", "pg")
        manager.cli("volume", "attach", "pg")
        b = manager.cli_json("backup", "create", "pg")["name"]
        manager.cli("volume", "detach", "pg")
        out = instant(manager, b, "pg2", rate="5M")
        manager.cli("volume", "detach", "pg2")
        manager.cli("volume", "attach", "pg2", "--mount", str(mnt2))
        pg2 = Postgres(mnt2 / "data")
        servers.append(pg2)
        pg2.start()
        assert manager.ok("GET", f"/v1/tasks/{out['task']}")["state"] == "running"
        res = pg2.bench("-c", "2", "-T", "5", "-n")
        assert "number of failed transactions: 0" in res, res
        done = int(res.split("number of transactions actually processed: ")[1].split()[0])
        progress = manager.ok("GET", f"/v1/tasks/{out['task']}")["progress"]
        print(f"pgbench during the fill: {done} transactions; fill {progress}")
        assert done > 0
        wait_task(manager, out["task"], timeout=180)
        assert pg2.sql("select count(*) from pgbench_accounts") == "300000"
        assert pg2.sql("select count(*) from pgbench_history") == str(done)
        pg2.stop()
        servers.pop()
        manager.cli("volume", "detach", "pg2")
    finally:
        for s in servers:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                s.stop("immediate")
        if not (os.path.ismount(mnt) or os.path.ismount(mnt2)):
            shutil.rmtree(top, ignore_errors=True)


def test_clone_from_backup(manager, source):
    """`drove volume clone --from-backup B NEW` is an instant restore under the clone verb:
    NEW serves the backup's data at once, carries its labels, and the fill ends it."""
    backup, _, pieces = source
    for args, says in [
        (["--from-backup", backup, "a", "b"], "only the new volume's name"),
        (["--from-backup", backup, "c1", "--snapshot", "s"], "leave --snapshot out"),
        (["--from-backup", backup, "c1", "--full"], "leave --full out"),
        (["--from-backup", backup, "c1", "--label", "bad label"], "label"),
        (["--from-backup", "backup-0123456789abcdef", "c1"], "does not exist"),
        (["src"], "new volume's name"),
    ]:
        r = manager.cli("volume", "clone", *args, check=False)
        assert r.returncode != 0 and says in r.stdout + r.stderr, (args, r.stdout, r.stderr)
    assert manager.api("GET", "/v1/volumes/c1").status_code == 404
    out = manager.cli_json("volume", "clone", "--from-backup", backup, "c1", "--label",
                           "env=test")
    assert out["volume"] == "c1" and out["backup"] == backup
    vol = manager.volume("c1")
    assert vol["state"] == "attached" and vol["labels"] == {"env": "test"}, vol
    off, n = pieces[-1]
    qemu_io(vol["nbd_uri"], f"read -P {len(pieces)} {off} {n}", read_only=True)
    wait_task(manager, out["task"])
    assert manager.volume("c1").get("instant_restore") is None
