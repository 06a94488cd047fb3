"""QoS through a real engine: fio's nbd engine against limits set over the control API."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from drove.replica.rebuild import WINDOW
from enginetools import EngineProc, start_engine
from replicatools import kill_all, start_replica

pytestmark = [pytest.mark.slow, pytest.mark.exclusive]  # rates measured

MIB = 1 << 20


@pytest.fixture
def engine(tmp_path):
    """An engine over one replica process, 256 MiB."""
    rep = start_replica(tmp_path / "r0", "256M")
    eng = start_engine(tmp_path / "e", "vol", [rep], size="256M")
    yield eng
    eng.stop()
    rep.stop()
    kill_all([eng, rep])


def fio(eng: EngineProc, *args: str, runtime: int = 5) -> dict:
    """fio over NBD with a ramp (the burst is spent in it); the (grouped) jobs' JSON result."""
    cmd = ["fio", "--ioengine=nbd", f"--uri={eng.unix_uri('vol')}", "--group_reporting",
           "--output-format=json", "--size=256M", "--time_based", f"--runtime={runtime}",
           "--ramp_time=2", "--randrepeat=0", "--norandommap",
           *(args if any(a.startswith("--name=") for a in args) else ("--name=job", *args))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60)
    assert out.returncode == 0, out.stderr or out.stdout
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


def set_qos(eng: EngineProc, **limits: float) -> dict:
    """PUT /v1/qos with ``limits`` (the others keep their value)."""
    return eng.ok("PUT", "/v1/qos", json={"limits": limits})


def test_fio_iops_limit_within_5_percent(engine):
    set_qos(engine, iops=500)
    job = fio(engine, "--rw=randrw", "--rwmixread=50", "--bs=4k", "--iodepth=16")
    iops = job["read"]["iops"] + job["write"]["iops"]
    print(f"fio 4k randrw at iops=500: {iops:.1f} IOPS")
    assert abs(iops - 500) <= 25, iops
    assert engine.ok("GET", "/v1/qos")["throttled"]["write"] > 0


def test_fio_bandwidth_limit_within_5_percent(engine):
    set_qos(engine, bandwidth=20 * MIB)
    job = fio(engine, "--rw=write", "--bs=1M", "--iodepth=8")
    bw = job["write"]["bw_bytes"]
    print(f"fio 1M write at bandwidth=20 MiB/s: {bw / MIB:.2f} MiB/s")
    assert abs(bw - 20 * MIB) <= 0.05 * 20 * MIB, bw / MIB


def test_read_and_write_limits_apart(engine):
    set_qos(engine, read_iops=300, write_iops=150)
    # Two jobs at once, one reading, one writing: each held to its own limit, and the
    # throttled writes do not hold the reads back.
    job = fio(engine, "--bs=4k", "--iodepth=16", "--name=r", "--rw=randread",
              "--name=w", "--rw=randwrite")
    print(f"fio read_iops=300, write_iops=150: {job['read']['iops']:.1f} read, "
          f"{job['write']['iops']:.1f} write IOPS")
    assert abs(job["read"]["iops"] - 300) <= 0.05 * 300, job["read"]["iops"]
    assert abs(job["write"]["iops"] - 150) <= 0.05 * 150, job["write"]["iops"]


def reads_done(eng: EngineProc) -> int:
    """Reads completed so far (the stats layer's count)."""
    return eng.ok("GET", "/v1/stats")["ops"]["read"]["count"]


def test_live_change_takes_effect_within_a_second(engine):
    set_qos(engine, read_iops=200, burst=0.1)
    proc = subprocess.Popen(
        ["fio", "--name=job", "--ioengine=nbd", f"--uri={engine.unix_uri('vol')}",
         "--output-format=json", "--size=256M", "--time_based", "--runtime=8",
         "--rw=randread", "--bs=4k", "--iodepth=16", "--randrepeat=0", "--norandommap"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while reads_done(engine) < 300:  # fio is running at the limit
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.05)
        set_qos(engine, read_iops=2000)
        t0, n0 = time.monotonic(), reads_done(engine)
        # The rate over the second after the change: 2000/s from the start of it.
        while time.monotonic() < t0 + 1.0:
            time.sleep(0.05)
        t1, n1 = time.monotonic(), reads_done(engine)
        rate = (n1 - n0) / (t1 - t0)
        print(f"read IOPS in the second after raising the limit 200 -> 2000: {rate:.0f}")
        assert 1700 <= rate <= 2300, rate
        set_qos(engine, read_iops=100)
        t0, n0 = time.monotonic(), reads_done(engine)
        while time.monotonic() < t0 + 1.0:
            time.sleep(0.05)
        rate = (reads_done(engine) - n0) / (time.monotonic() - t0)
        assert rate <= 140, rate  # the burst bucket (0.1 s) holds 10 at most
        set_qos(engine, read_iops=0)  # no limit: whatever waited goes now
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0


@pytest.mark.parametrize("limits, message", [
    ({"iops": -5}, "iops must be a number >= 0"),
    ({"bandwidth": "lots"}, "bandwidth must be a number"),
    ({"burst": 1000}, "burst is at most"),
    ({"write_iopz": 3}, "unknown QoS field"),
])
def test_bad_limits_are_refused_and_change_nothing(engine, limits, message):
    set_qos(engine, iops=700)
    r = engine.api("PUT", "/v1/qos", json={"limits": limits})
    assert r.status_code == 400 and message in r.json()["detail"], r.text
    assert engine.ok("GET", "/v1/qos")["limits"]["iops"] == 700


def test_rebuild_limit_holds_a_rebuild_to_its_rate(engine, tmp_path):
    # 48 MiB of data for the rebuild to copy (random: nothing to skip).
    data = tmp_path / "data.raw"
    data.write_bytes(os.urandom(48 * MIB))
    subprocess.run(["nbdcopy", "--flush", str(data), engine.unix_uri("vol")], check=True)
    limit = 16 * MIB
    assert engine.ok("PUT", "/v1/qos", json={"rebuild_bandwidth": limit})[
        "rebuild_bandwidth"] == limit
    fresh = start_replica(tmp_path / "r1", "256M")
    try:
        engine.ok("POST", "/v1/replicas", json={"name": "r1", "url": fresh.control})
        rb = engine.wait_rebuilt(timeout=60)
        copied = sum(la["bytes_copied"] for la in rb["layers"])
        seconds = sum(la["seconds"] for la in rb["layers"] if la["bytes_copied"])
        assert copied >= 48 * MIB, rb
        rate = copied / seconds
        print(f"rebuild: {copied / MIB:.1f} MiB in {seconds:.2f} s = {rate / MIB:.2f} MiB/s "
              f"at a limit of {limit / MIB:.0f} MiB/s")
        # The copy's own work adds to the paced reads' time: a little under the limit.
        assert 0.8 * limit <= rate, (rate / MIB, rb)
        # A token bucket lets its capacity (0.1 s of the rate) and one request (a 4 MiB
        # read window, which passes when the bucket is full) go before the clock runs: all
        # else took at least its time at the limit.
        head_start = 0.1 * limit + WINDOW
        assert seconds >= 0.98 * (copied - head_start) / limit, (rate / MIB, rb)
        assert engine.modes() == {"r0": "RW", "r1": "RW"}
    finally:
        fresh.stop()
        kill_all([fresh])


def test_bad_rebuild_limit_is_refused(engine):
    r = engine.api("PUT", "/v1/qos", json={"rebuild_bandwidth": -1})
    assert r.status_code == 400 and "rebuild_bandwidth" in r.json()["detail"], r.text
    assert engine.ok("GET", "/v1/qos")["rebuild_bandwidth"] == 0
