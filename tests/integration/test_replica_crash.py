"""SIGKILL a replica process at random instants; it must reopen consistent and keep acked data."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from crashlog import check_blocks, parse_log, read_volume
from replicatools import ReplicaProc, nbdsh

BS = 4096
BLOCKS = 2048  # an 8 MiB volume: small enough to read back in full every round
WRITER = Path(__file__).parent.parent / "crash_writer.py"


def snapshot_churn(r: ReplicaProc, stop: threading.Event, hashes: dict[str, str],
                   tmp: Path, rnd: random.Random, counts: dict[str, int]) -> None:
    """Take, read back and delete snapshots until stopped (or the replica dies)."""
    n = 0
    live: list[str] = []
    try:
        while not stop.is_set():
            n += 1
            name = f"s{n}"
            if r.api("POST", "/v1/snapshots", json={"name": name}).status_code != 201:
                return
            live.append(name)
            counts["snapshots"] += 1
            if rnd.random() < 0.5:
                img = tmp / f"{name}.img"
                res = subprocess.run(["nbdcopy", r.uri(f"snapshot/{name}"), str(img)],
                                     capture_output=True, timeout=60)
                if res.returncode == 0:
                    hashes[name] = hashlib.sha256(img.read_bytes()).hexdigest()
                    img.unlink()
            if len(live) > 3:
                victim = live.pop(rnd.randrange(len(live) - 1))
                hashes.pop(victim, None)
                r.api("DELETE", f"/v1/snapshots/{victim}")
                counts["deletes"] += 1
            time.sleep(rnd.random() * 0.05)
    except Exception:
        return  # the replica was killed under us


@pytest.mark.parametrize("round_", range(4))
@pytest.mark.slow
def test_sigkill_under_writes_and_snapshots(replicas, tmp_path, round_):
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rnd = random.Random(seed)
    r = replicas("vol", BLOCKS * BS)
    log = tmp_path / "writes.log"
    writer = subprocess.Popen(
        ["/usr/bin/python3", str(WRITER), r.unix_uri(), str(log), str(BLOCKS), str(seed)],
        stderr=subprocess.PIPE,
    )
    stop = threading.Event()
    hashes: dict[str, str] = {}
    counts = {"snapshots": 0, "deletes": 0}
    churn = threading.Thread(target=snapshot_churn,
                             args=(r, stop, hashes, tmp_path, rnd, counts))
    churn.start()
    time.sleep(0.3 + rnd.random() * 2.0)
    r.kill()
    stop.set()
    churn.join(60)
    writer.wait(60)
    assert log.exists() and log.stat().st_size > 0, writer.stderr.read()

    r2 = replicas("vol", None)
    acked, issued = parse_log(log)
    print("acked blocks", len(acked), "counts", counts, "verified snapshots", len(hashes))
    # The kill landed under real load: many writes acknowledged, snapshots taken.
    assert len(acked) > 100 and counts["snapshots"] > 0
    check_blocks(read_volume(r2.uri(), tmp_path / "head.img"), acked, issued, BLOCKS)
    layers = r2.ok("GET", "/v1/layers")
    for layer in layers:
        name = layer["name"]
        if name is None:
            continue
        img = read_volume(r2.uri(f"snapshot/{name}"), tmp_path / f"after-{name}.img")
        if name in hashes:
            assert hashlib.sha256(img).hexdigest() == hashes[name], f"snapshot {name} changed"
        assert len(r2.ok("GET", f"/v1/snapshots/{name}/checksum")["checksum"]) == 64
    # The reopened replica still takes writes and snapshots.
    nbdsh(r2.uri(), "h.pwrite(b'n' * 4096, 0); h.flush()")
    r2.ok("POST", "/v1/snapshots", json={"name": "after-crash"})


@pytest.mark.slow
def test_sigkill_during_revert(replicas, tmp_path):
    r = replicas("vol", "4M")
    nbdsh(r.uri(), "h.pwrite(b'S' * (1 << 20), 0)")
    r.ok("POST", "/v1/snapshots", json={"name": "base"})
    states = {hashlib.sha256(b"S" * (1 << 20) + bytes(3 << 20)).hexdigest(),
              hashlib.sha256(b"S" * (1 << 19) + b"X" * (1 << 19) + bytes(3 << 20)).hexdigest()}
    rnd = random.Random()
    for _ in range(3):
        stop = threading.Event()

        def churn(proc: ReplicaProc = r, stop: threading.Event = stop) -> None:
            try:
                while not stop.is_set():
                    proc.api("POST", "/v1/revert", json={"snapshot": "base"})
                    nbdsh(proc.uri(), "h.pwrite(b'X' * (1 << 19), 1 << 19)")
            except Exception:
                return

        t = threading.Thread(target=churn)
        t.start()
        time.sleep(0.2 + rnd.random())
        r.kill()
        stop.set()
        t.join(60)
        r = replicas("vol", None)
        data = read_volume(r.uri(), tmp_path / "head.img")
        assert hashlib.sha256(data).hexdigest() in states
        snap = read_volume(r.uri("snapshot/base"), tmp_path / "base.img")
        assert snap == b"S" * (1 << 20) + bytes(3 << 20)


def test_sigkill_under_fio(replicas, tmp_path):
    r = replicas("vol", "64M")
    fio = subprocess.Popen(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={r.unix_uri()}", "--rw=randwrite",
         "--bs=4k", "--iodepth=16", "--size=64M", "--time_based", "--runtime=30",
         "--fsync=32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    r.ok("POST", "/v1/snapshots", json={"name": "mid"})
    time.sleep(0.5)
    r.kill()
    fio.wait(60)
    r2 = replicas("vol", None)
    head = read_volume(r2.uri(), tmp_path / "head.img")
    assert len(head) == 64 << 20
    info = subprocess.run(["nbdinfo", "--map", r2.uri()], capture_output=True, timeout=60)
    assert info.returncode == 0 and b"data" in info.stdout
    assert os.path.getsize(tmp_path / "head.img") == 64 << 20
