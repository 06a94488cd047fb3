"""Rebuild pull sync between two replica processes, beside nbdcopy copying the same layer.

    .venv/bin/python bench/rebuild_sync.py [--size 10G] [--patterns full,alternating]
                                           [--dir /work/bench-tmp] [--warm]

For each pattern a source replica gets one snapshot layer of SIZE: fully
written, or alternating 4 KiB of data and 4 KiB of hole (written straight into
the layer file before the source process starts).  A fresh target replica is
prepared and pulls the layer from the source's ``layer/FILE`` export (POST
/v1/rebuild/sync), then verifies it (the source's checksum against its own).
Figures are MiB/s of layer size: "copied" when every byte reached the target's
page cache, "durable" when the job ended (after its fdatasync).  The baseline
is nbdcopy copying the same export to a file on the same disk (with --flush).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from drove.replica import Replica
from drove.units import parse_size
from replicatools import ReplicaProc, start_replica

MiB = 1 << 20
FILE = "volume-snap-s.img"


def build_source(d: Path, size: int, pattern: str) -> None:
    """A replica whose snapshot "s" holds the pattern; its head is empty."""
    Replica.create(d, size).close()
    head = d / "volume-head-001.img"
    fd = os.open(head, os.O_WRONLY)
    try:
        if pattern == "full":
            chunk = bytearray(os.urandom(MiB)) * 64
            for off in range(0, size, len(chunk)):
                n = min(len(chunk), size - off)
                chunk[:8] = off.to_bytes(8, "little")
                os.pwrite(fd, memoryview(chunk)[:n], off)
        else:
            block = bytearray(os.urandom(4096))
            for off in range(0, size, 8192):
                block[:8] = off.to_bytes(8, "little")
                os.pwrite(fd, block, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    with Replica.open(d) as r:
        r.snapshot("s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pull(src: ReplicaProc, tgt: ReplicaProc, size: int) -> dict[str, float]:
    """Prepare the target, sync the layer, verify it; times of each phase."""
    layers = [x for x in src.ok("GET", "/v1/layers", params={"removed": True}) if not x["head"]]
    t0 = time.perf_counter()
    tgt.ok("POST", "/v1/rebuild/prepare", json={
        "layers": layers, "head_parent": FILE, "size": size})
    t1 = time.perf_counter()
    cpu_t, cpu_s = cpu_seconds(tgt.proc.pid), cpu_seconds(src.proc.pid)
    job = tgt.ok("POST", "/v1/rebuild/sync", json={
        "file": FILE, "source": src.unix_uri(f"layer/{FILE}")})
    copied = None
    while job["state"] == "running":
        time.sleep(0.01)
        job = tgt.ok("GET", "/v1/rebuild/sync")
        if copied is None and job["bytes_done"] == job["bytes_total"]:
            copied = time.perf_counter()
    t2 = time.perf_counter()
    if job["state"] != "done":
        raise SystemExit(f"sync failed: {job}")
    cpu_t = cpu_seconds(tgt.proc.pid) - cpu_t
    cpu_s = cpu_seconds(src.proc.pid) - cpu_s
    checksum = src.ok("GET", f"/v1/layers/{FILE}/checksum")["checksum"]
    t3 = time.perf_counter()
    tgt.ok("POST", f"/v1/rebuild/layers/{FILE}/complete", json={"checksum": checksum})
    t4 = time.perf_counter()
    return {"prepare": t1 - t0, "copied": (copied or t2) - t1, "durable": t2 - t1,
            "src_checksum": t3 - t2, "verify": t4 - t3, "cpu_target": cpu_t, "cpu_source": cpu_s}


def nbdcopy(src: ReplicaProc, out: Path) -> float:
    """Seconds nbdcopy takes to copy the layer export to a sparse file (flushed)."""
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    subprocess.run(["nbdcopy", "--flush", src.unix_uri(f"layer/{FILE}"), str(out)], check=True)
    return time.perf_counter() - t


def rate(size: int, seconds: float) -> str:
    return f"{size / MiB / seconds:8.0f} MiB/s"


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="10G")
    ap.add_argument("--patterns", default="full,alternating")
    ap.add_argument("--dir", default=None, help="scratch directory (on the disk to measure)")
    ap.add_argument("--warm", action="store_true",
                    help="pull once unmeasured first: on a VM, page cache growing into guest "
                         "memory never touched before costs ~10x the CPU of reusing it")
    args = ap.parse_args()
    size = parse_size(args.size)
    scratch = Path(tempfile.mkdtemp(prefix="drove-bench-", dir=args.dir))
    try:
        for pattern in args.patterns.split(","):
            t = time.perf_counter()
            build_source(scratch / "src", size, pattern)
            print(f"\n{pattern}: {args.size} layer built in {time.perf_counter() - t:.1f} s",
                  flush=True)
            src = start_replica(scratch / "src")
            try:
                runs = 2 if args.warm else 1
                for i in range(runs):
                    shutil.rmtree(scratch / "tgt", ignore_errors=True)
                    tgt = start_replica(scratch / "tgt", size)
                    try:
                        res = pull(src, tgt, size)
                    finally:
                        tgt.stop()
                    if i + 1 < runs:
                        continue
                    base = nbdcopy(src, scratch / "nbdcopy.img")
                    (scratch / "nbdcopy.img").unlink(missing_ok=True)
                    print(f"  prepare         {res['prepare'] * 1e3:8.1f} ms")
                    print(f"  sync, copied    {rate(size, res['copied'])}  "
                          f"({res['copied']:.1f} s)")
                    print(f"  sync, durable   {rate(size, res['durable'])}  "
                          f"({res['durable']:.1f} s; CPU target {res['cpu_target']:.1f} s, "
                          f"source {res['cpu_source']:.1f} s)")
                    print(f"  nbdcopy --flush {rate(size, base)}  ({base:.1f} s)   "
                          f"drove/nbdcopy {base / res['durable']:.2f}x")
                    print(f"  verify          {res['src_checksum']:.1f} s source checksum, "
                          f"{res['verify']:.1f} s target verify")
            finally:
                src.stop()
            shutil.rmtree(scratch / "src", ignore_errors=True)
            shutil.rmtree(scratch / "tgt", ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
