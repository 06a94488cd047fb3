"""Backup and restore throughput through a real `drove serve`, beside nbdcopy as the baseline.

    .venv/bin/python bench/backup.py [--size 4G] [--replicas 1] [--compression zstd]

Makes a volume of ``--size`` half filled with random data (alternating 64 MiB
of data and 64 MiB of hole), then to a directory target:

* a full backup (a snapshot is taken, only allocated data is read, hashed,
  compressed and written as 2 MiB blocks);
* a restore of it into a new volume;
* an incremental backup after 1% of the volume was rewritten (2 MiB pieces
  spread over the volume).

Baselines in the same run: ``nbdcopy`` of the same snapshot export into a sparse
file on the same disk (a plain sparse copy, no hashing, no compression, no
dedup) and ``nbdcopy`` of that file into a fresh volume.  Throughput is MiB/s
of volume size, as the targets are: backup >= 250, restore >= 300, incremental
<= 5% of the full backup's time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import contextlib

from drove.units import parse_size
from managertools import ManagerProc

MiB = 1 << 20
REGION = 64 * MiB


def make_image(path: Path, size: int) -> int:
    """A sparse file: random data in every other 64 MiB region; bytes of data."""
    data = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * REGION):
            f.seek(off)
            n = min(REGION, size - off)
            for _ in range(n // (8 * MiB)):
                f.write(os.urandom(8 * MiB))
            data += n
    return data


def wait_task(m: ManagerProc, task: dict) -> dict:
    """Poll a task until it ends; its record."""
    while True:
        t = m.ok("GET", f"/v1/tasks/{task['id']}")
        if t["state"] != "running":
            assert t["state"] == "succeeded", t
            return t
        time.sleep(0.02)


def timed(fn):
    """(seconds, result) of fn()."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def nbdcopy(src: str, dst: str) -> None:
    """nbdcopy keeping holes."""
    subprocess.run(["nbdcopy", "--flush", src, dst], check=True, timeout=3600)


def drop_caches() -> None:
    """Sync and drop the page cache so every run starts cold (as root)."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    """Run the benchmark and print figures and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--compression", default="zstd", choices=("zstd", "lz4", "none"))
    ap.add_argument("--dir", default="/var/tmp", help="where volumes and the target live")
    args = ap.parse_args()
    size = parse_size(args.size)
    vol_mib = size / MiB

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="drove-bench-") as tmp:
        root = Path(tmp)
        m = ManagerProc(root / "data", root / "manager.log", root=root)
        m.start()
        try:
            for i in range(2, args.replicas + 1):
                m.cli("disk", "add", str(root / f"disk{i}"))
            target = root / "target"
            target.mkdir()
            m.ok("PUT", "/v1/backup-target", json={"url": f"file://{target}",
                                                   "compression": args.compression})
            image = root / "image.raw"
            data = make_image(image, size)
            m.ok("POST", "/v1/volumes", json={"name": "src", "size": size,
                                              "replicas": args.replicas})
            uri = m.ok("POST", "/v1/volumes/src/attach", json={})["nbd_uri"]
            nbdcopy(str(image), uri)
            image.unlink()
            drop_caches()

            t_full, task = timed(lambda: wait_task(m, m.ok(
                "POST", "/v1/volumes/src/backups", json={})))
            full = task["result"]
            snap = m.ok("POST", f"/v1/volumes/src/snapshots/{full['snapshot']}/export")
            copy = root / "baseline.raw"
            drop_caches()
            t_copy, _ = timed(lambda: nbdcopy(snap["nbd_uri"], str(copy)))

            drop_caches()
            t_restore, _ = timed(lambda: wait_task(m, m.ok(
                "POST", f"/v1/backups/{full['name']}/restore",
                json={"volume": "restored", "replicas": args.replicas})))
            m.ok("POST", "/v1/volumes", json={"name": "plain", "size": size,
                                              "replicas": args.replicas})
            drop_caches()

            def copy_in() -> None:
                dst = m.ok("POST", "/v1/volumes/plain/attach", json={})["nbd_uri"]
                nbdcopy(str(copy), dst)
                m.ok("POST", "/v1/volumes/plain/detach", json={})

            t_copy_in, _ = timed(copy_in)
            copy.unlink()

            # 1% of the volume rewritten in 2 MiB pieces spread evenly.
            pieces = max(1, size // 100 // (2 * MiB))
            step = size // pieces // (2 * MiB) * (2 * MiB)
            piece = root / "piece.raw"
            for i in range(pieces):
                piece.write_bytes(os.urandom(2 * MiB))
                subprocess.run(["qemu-io", "-f", "raw", "-c",
                                f"write -s {piece} {i * step} {2 * MiB}", uri],
                               check=True, capture_output=True)
            drop_caches()
            t_inc, task = timed(lambda: wait_task(m, m.ok(
                "POST", "/v1/volumes/src/backups", json={})))
            inc = task["result"]
        finally:
            m.kill_everything()
            m.stop(sig=9)

    def rate(t: float) -> float:
        return vol_mib / t

    print(f"volume {size / MiB:.0f} MiB, {data / MiB:.0f} MiB of random data, "
          f"{args.replicas} replica(s), {args.compression}")
    print(f"full backup        {t_full:7.2f} s {rate(t_full):8.0f} MiB/s   (target >= 250)   "
          f"read {full['bytes_read'] / MiB:.0f} MiB, new {full['bytes_new'] / MiB:.0f} MiB, "
          f"stored {full['bytes_stored'] / MiB:.0f} MiB")
    print(f"  nbdcopy to file  {t_copy:7.2f} s {rate(t_copy):8.0f} MiB/s   "
          f"ratio drove/nbdcopy {t_copy / t_full:.2f}")
    print(f"restore            {t_restore:7.2f} s {rate(t_restore):8.0f} MiB/s   "
          f"(target >= 300; includes creating, attaching and detaching the volume)")
    print(f"  nbdcopy into vol {t_copy_in:7.2f} s {rate(t_copy_in):8.0f} MiB/s   "
          f"ratio drove/nbdcopy {t_copy_in / t_restore:.2f}   (includes attach and detach)")
    print(f"incremental (1%)   {t_inc:7.2f} s = {100 * t_inc / t_full:.1f}% of the full "
          f"backup's time (target <= 5%)   read {inc['bytes_read'] / MiB:.0f} MiB, "
          f"new {inc['bytes_new'] / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
