"""Scrub and repair end to end: a real `drove serve`, the CLI, bytes flipped in a replica's
snapshot layer file under the running volume, qemu-io and fio through the engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from drove.replica.access import KEY_ENV, bearer
from enginetools import process_env
from managertools import ManagerProc

pytestmark = pytest.mark.slow

MIB = 1 << 20
FLIP_AT = 5 * MIB + 12345  # inside the data written below, inside the 1 MiB range at 5 MiB


def add_disks(m: ManagerProc, root: Path, count: int) -> None:
    """``count`` more disks: replicas of a volume go on different disks."""
    for i in range(count):
        m.cli("disk", "add", str(root / f"disk-{i}"))


def make_volume(m: ManagerProc, name: str, replicas: int) -> str:
    """An attached volume with 0xab at [4 MiB, 8 MiB) in snapshot s1; its NBD URI."""
    add_disks(m, m.data_dir.parent, replicas - 1)
    m.cli("volume", "create", name, "--size", "32M", "--replicas", str(replicas))
    m.cli("volume", "attach", name)
    uri = m.volume(name)["nbd_uri"]
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 4M 4M", uri], check=True,
                   capture_output=True, timeout=60)
    m.cli("snapshot", "create", name, "s1")
    return uri


def replica_apis(m: ManagerProc, name: str) -> list[tuple[str, dict[str, str]]]:
    """Each replica's control URL (from the engine) and the headers a call carries."""
    v = m.volume(name)
    headers = bearer(process_env(v["engine"]["pid"])[KEY_ENV])
    engine = httpx.get(v["engine"]["control_url"] + "/v1/replicas", headers=headers,
                       timeout=10).json()
    return [(r["url"], headers) for r in engine]


def layer_file(m: ManagerProc, name: str, snapshot: str) -> str:
    """The layer file of ``snapshot`` (the same name on every replica)."""
    url, headers = replica_apis(m, name)[0]
    layers = httpx.get(url + "/v1/layers", headers=headers, timeout=10).json()
    return next(la["file"] for la in layers if la["name"] == snapshot)


def flip(m: ManagerProc, name: str, replica: int, file: str) -> str:
    """Flip 16 bytes at FLIP_AT in one replica's layer file, on disk; that replica's name."""
    rep = m.volume(name)["replicas"][replica]
    with open(Path(rep["path"]) / file, "r+b") as f:
        f.seek(FLIP_AT)
        old = f.read(16)
        f.seek(FLIP_AT)
        f.write(bytes(b ^ 0xFF for b in old))
    return rep["name"]


def digests(m: ManagerProc, name: str, file: str) -> list[list[str]]:
    """Every replica's per-range digests of ``file``, from its control API."""
    out = []
    for url, headers in replica_apis(m, name):
        got = httpx.get(f"{url}/v1/layers/{file}/digests", headers=headers, timeout=60)
        assert got.status_code == 200, got.text
        out.append(got.json()["digests"])
    return out


def read_ok(uri: str) -> None:
    """The data reads right through the engine."""
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 4M 4M", uri],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def scrub(m: ManagerProc, name: str, *args: str) -> tuple[str, dict]:
    """`drove volume scrub NAME ARGS` (its output) and the scrub task's record."""
    out = m.cli("volume", "scrub", name, *args, env={"COLUMNS": "300"}).stdout
    task = next(t for t in m.ok("GET", "/v1/tasks") if t["kind"] == "volume-scrub"
                and t["volume"] == name)
    return out, task


def test_three_replicas_majority_repair_with_io_alongside(manager: ManagerProc, tmp_path: Path):
    m = manager
    uri = make_volume(m, "v", 3)
    file = layer_file(m, "v", "s1")

    # A clean volume: nothing found.
    out, task = scrub(m, "v")
    assert task["state"] == "succeeded" and task["result"]["findings"] == [], task
    assert task["result"]["layers"] >= 1 and "0 range(s) repaired" in out, out

    bad = flip(m, "v", 1, file)
    d = digests(m, "v", file)
    assert len({tuple(x) for x in d}) == 2  # one replica differs, at range 5

    # fio writes and reads through the engine while the scrub runs.
    fio = subprocess.Popen(
        ["fio", "--name=io", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
         "--offset=16M", "--size=16M", "--rw=randrw", "--bs=4k", "--iodepth=4",
         "--time_based", "--runtime=6", "--randrepeat=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, task = scrub(m, "v")
    finally:
        fout, ferr = fio.communicate(timeout=60)
    assert fio.returncode == 0, ferr
    job = json.loads(fout[fout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    # Latency bounded: no request waited behind the scrub for long (a loaded 2-core box).
    assert job["read"]["clat_ns"]["max"] < 2e9 and job["write"]["clat_ns"]["max"] < 2e9, job

    assert task["state"] == "succeeded", task
    (f,) = task["result"]["findings"]
    assert f["replica"] == bad and f["layer"] == file and f["snapshot"] == "s1"
    assert f["offset"] == 5 * MIB and f["repaired"] and f["decided_by"].startswith("majority")
    assert f["blocks"] == [FLIP_AT // 4096 * 4096], f
    assert f"replica {bad}: layer {file}" in out and f"offset {5 * MIB}" in out, out
    assert "repaired" in out
    kinds = {e["kind"]: e["message"] for e in m.events("v")}
    assert bad in kinds["scrub-mismatch"] and file in kinds["scrub-mismatch"]
    assert str(5 * MIB) in kinds["scrub-repaired"], kinds

    d = digests(m, "v", file)
    assert len({tuple(x) for x in d}) == 1  # all replicas equal again
    read_ok(uri)
    # With --snapshot the head (fio's writes) becomes a layer first and is compared too.
    layers = task["result"]["layers"]
    out, task = scrub(m, "v", "--snapshot")
    res = task["result"]
    assert res["findings"] == [] and res["layers"] == layers + 1, task
    snaps = m.ok("GET", "/v1/volumes/v/snapshots")
    assert any(s["name"] == res["snapshot"] and s["labels"].get("drove.scrub") == "true"
               for s in snaps), snaps


def test_two_replicas_decided_by_the_recorded_checksum(manager: ManagerProc):
    m = manager
    uri = make_volume(m, "w", 2)
    file = layer_file(m, "w", "s1")
    _, task = scrub(m, "w")  # clean: records the layer's checksum on both replicas
    assert task["result"]["findings"] == []

    bad = flip(m, "w", 0, file)
    out, task = scrub(m, "w")
    (f,) = task["result"]["findings"]
    assert f["replica"] == bad and f["repaired"] and f["decided_by"].startswith("checksum"), f
    assert f["offset"] == 5 * MIB and f"replica {bad}: layer {file}" in out, out
    d = digests(m, "w", file)
    assert d[0] == d[1]
    read_ok(uri)

    # The recurring job kind: a run scrubs the volume as a task, clean now.
    m.cli("job", "create", "--name", "nightly", "--kind", "scrub", "--cron", "0 3 * * *",
          "--retain", "1",
          "--volume", "w")
    job = m.ok("POST", "/v1/jobs/nightly/run")
    assert job["last_result"]["ok"], job
    assert "w: scrub task-" in job["last_result"]["message"], job
    assert "0 range(s) repaired, snapshot scrub-" in job["last_result"]["message"], job
    snaps = m.ok("GET", "/v1/volumes/w/snapshots")
    assert [s for s in snaps if (s.get("labels") or {}).get("drove.job") == "nightly"]
    tasks = [t for t in m.ok("GET", "/v1/tasks") if t["kind"] == "volume-scrub"]
    assert len(tasks) == 3 and all(t["state"] == "succeeded" for t in tasks)


def test_bad_input(manager: ManagerProc):
    m = manager
    r = m.api("POST", "/v1/volumes/nope/scrub")
    assert r.status_code == 404 and "no volume" in r.text, r.text
    m.cli("volume", "create", "d", "--size", "16M", "--replicas", "1")
    r = m.api("POST", "/v1/volumes/d/scrub")
    assert r.status_code == 409 and "attach it first" in r.text, r.text
    r = m.cli("volume", "scrub", "d", check=False)
    assert r.returncode != 0 and "attach it first" in r.stdout + r.stderr
    m.cli("volume", "attach", "d")
    r = m.api("POST", "/v1/volumes/d/scrub")
    assert r.status_code == 409 and "has one replica" in r.text, r.text
    assert not [t for t in m.ok("GET", "/v1/tasks") if t["kind"] == "volume-scrub"]

    # The replica's repair call: epoch-checked, refuses the head, bad ranges, and a range
    # that is not what the caller compared; nothing changes.
    uri = m.volume("d")["nbd_uri"]
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", uri], check=True,
                   capture_output=True, timeout=60)
    m.cli("snapshot", "create", "d", "s1")
    file = layer_file(m, "d", "s1")
    (url, headers), = replica_apis(m, "d")
    layers = httpx.get(url + "/v1/layers", headers=headers, timeout=10).json()
    head = next(la["file"] for la in layers if la["head"])
    before = digests(m, "d", file)
    body = {"offset": 0, "length": MIB, "source": "nbd://127.0.0.1:1/layer/x",
            "expect": "00" * 16, "expect_source": "00" * 16}
    epoch = {**headers, "Drove-Epoch": str(m.volume("d")["engine"]["epoch"])}
    for hdrs, f, change, status, text in (
            (headers, file, {}, 409, "epoch"),
            (epoch, head, {}, 400, "is the head"),
            (epoch, file, {"offset": 100}, 400, "whole 4096-byte blocks"),
            (epoch, file, {"length": 64 * MIB}, 400, "at most"),
            (epoch, "nope.img", {}, 404, "no layer file"),
            (epoch, file, {}, 409, "changed since the scrub compared it")):
        r = httpx.post(f"{url}/v1/layers/{f}/repair", json={**body, **change}, headers=hdrs,
                       timeout=30)
        assert r.status_code == status and text in r.text, (change, r.status_code, r.text)
    assert digests(m, "d", file) == before
    read = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 0 1M", uri],
                          capture_output=True, text=True, timeout=60)
    assert "Pattern verification failed" not in read.stdout, read.stdout
