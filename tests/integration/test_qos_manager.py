"""QoS limits through the manager and the CLI: set at create, applied at attach, changed live."""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest

from drove.replica.access import KEY_ENV, bearer
from enginetools import process_env

pytestmark = [pytest.mark.slow, pytest.mark.exclusive]  # rates measured

MIB = 1 << 20


def engine_qos(manager, name: str) -> dict:
    """The volume's engine's GET /v1/qos (with the volume's key, as the manager calls it)."""
    eng = manager.volume(name)["engine"]
    key = process_env(eng["pid"])[KEY_ENV]
    r = httpx.get(eng["control_url"] + "/v1/qos", headers=bearer(key), timeout=10)
    r.raise_for_status()
    return r.json()


def fio_iops(uri: str) -> float:
    """4k random reads for 3 s after a 2 s ramp (the burst is spent in it): IOPS."""
    out = subprocess.run(
        ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
         "--size=64M", "--time_based", "--runtime=3", "--ramp_time=2", "--rw=randread",
         "--bs=4k", "--iodepth=16", "--randrepeat=0", "--norandommap"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    return job["read"]["iops"]


def test_limits_from_create_to_a_live_update(manager):
    manager.ok("PATCH", "/v1/settings", json={"rebuild_bandwidth_limit": 32 * MIB})
    manager.cli("volume", "create", "q", "--size", "64M", "--replicas", "1",
                "--data-locality", "disabled", "--read-iops-limit", "300",
                "--write-bandwidth-limit", "10M", "--burst", "0.5")
    v = manager.volume("q")
    assert v["qos"]["read_iops"] == 300 and v["qos"]["write_bandwidth"] == 10 * MIB
    shown = manager.cli("volume", "get", "q", env={"COLUMNS": "300"}).stdout
    assert "read iops 300/s, write bandwidth 10 MiB/s, burst 0.5 s" in shown, shown
    manager.cli("volume", "attach", "q")
    uri = manager.volume("q")["nbd_uri"]
    got = engine_qos(manager, "q")
    assert got["limits"]["read_iops"] == 300 and got["limits"]["burst"] == 0.5
    assert got["rebuild_bandwidth"] == 32 * MIB
    iops = fio_iops(uri)
    assert abs(iops - 300) <= 15, iops

    # Bad values: a clear message, nothing changed (record and engine).
    for args, message in ((("--iops-limit", "-3"), "greater than or equal to 0"),
                          (("--bandwidth-limit", "fast"), "not a size"),
                          (("--burst", "600"), "less than or equal to 60")):
        r = manager.cli("volume", "update", "q", *args, check=False, env={"COLUMNS": "300"})
        assert r.returncode != 0 and message in r.stdout + r.stderr, (args, r.stdout, r.stderr)
    r = manager.api("PATCH", "/v1/volumes/q", json={"qos": {"read_iops": -1}})
    assert r.status_code == 422 and "read_iops must be a number >= 0" in r.text, r.text
    r = manager.api("PATCH", "/v1/volumes/q", json={"qos": {"riops": 1}})
    assert r.status_code == 422 and "unknown QoS field" in r.text, r.text
    assert manager.volume("q")["qos"]["read_iops"] == 300
    assert engine_qos(manager, "q")["limits"]["read_iops"] == 300

    # A live change: the running engine takes it at once, the record keeps it.
    t = time.monotonic()
    out = manager.cli("volume", "update", "q", "--read-iops-limit", "600").stdout
    assert "read iops 600/s" in out, out
    assert engine_qos(manager, "q")["limits"]["read_iops"] == 600
    assert time.monotonic() - t < 10
    iops = fio_iops(uri)
    assert abs(iops - 600) <= 30, iops
    assert manager.volume("q")["qos"]["write_bandwidth"] == 10 * MIB  # kept

    # The setting reaches running engines too.
    manager.ok("PATCH", "/v1/settings", json={"rebuild_bandwidth_limit": 0})
    deadline = time.monotonic() + 10
    while engine_qos(manager, "q")["rebuild_bandwidth"] != 0:
        assert time.monotonic() < deadline, "the rebuild limit did not reach the engine"
        time.sleep(0.1)
    assert not [e for e in manager.events("q") if e["kind"] == "volume-qos-failed"]


def test_backup_reads_at_the_rebuild_limit(manager, tmp_path):
    root = tmp_path / "backups"
    root.mkdir()
    manager.cli("backup", "target", "set", f"file://{root}")
    manager.cli("volume", "create", "b", "--size", "64M", "--replicas", "1",
                "--data-locality", "disabled")
    uri = manager.cli_json("volume", "attach", "b")["nbd_uri"]
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(24 * MIB))  # random: no block is stored once for two
    subprocess.run(["nbdcopy", "--flush", str(data), uri], check=True)
    limit = 8 * MIB
    manager.ok("PATCH", "/v1/settings", json={"rebuild_bandwidth_limit": limit})
    t = time.monotonic()
    b = manager.cli_json("backup", "create", "b")
    took = time.monotonic() - t
    assert b["bytes_read"] >= 24 * MIB, b
    # 24 MiB at 8 MiB/s, the first second's worth from a full bucket: at least 2 s.
    rate = (b["bytes_read"] - limit) / took
    print(f"backup: {b['bytes_read'] / MIB:.0f} MiB in {took:.2f} s at a limit of 8 MiB/s")
    assert took >= 2.0 and rate <= 1.05 * limit, (took, b)
