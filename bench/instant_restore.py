"""Instant restore beside a plain restore of the same backup, through a real `drove serve`.

    .venv/bin/python bench/instant_restore.py [--size 4G] [--replicas 1]

Makes a volume of ``--size`` filled with random data (incompressible: every byte
is fetched), backs it up to a directory target, then, with the page cache dropped
before each:

* a plain restore (``drove backup restore``: create, attach, write every block
  through the engine, detach) — the time until the volume can be used;
* an instant restore (``--instant``): the time until the API call returns, the
  time to the first byte (a 1 MiB read of the volume's last MiB, which the
  background fill reaches last), and the fill's time and throughput until the
  task ends; then `qemu-img compare` of the two restored volumes.

The figures that matter: time to first byte (target: under 2 s from the restore
request), and the fill's throughput as a ratio of the plain restore's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from drove.units import parse_size
from managertools import ManagerProc

MiB = 1 << 20


def wait_task(m: ManagerProc, tid: str) -> dict:
    """Poll a task until it ends; its record."""
    while True:
        t = m.ok("GET", f"/v1/tasks/{tid}")
        if t["state"] != "running":
            assert t["state"] == "succeeded", t
            return t
        time.sleep(0.02)


def drop_caches() -> None:
    """Sync and drop the page cache so every run starts cold (as root)."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_last_mib(uri: str, size: int) -> None:
    """One 1 MiB read of the volume's last MiB (qemu-io, a real client)."""
    r = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", f"read {size - MiB} {MiB}", uri],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "failed" not in r.stdout, r.stdout + r.stderr


def main() -> None:
    """Run the benchmark and print figures and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--dir", default="/var/tmp", help="where volumes and the target live")
    args = ap.parse_args()
    size = parse_size(args.size)
    mib = size / MiB

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
                                                   "compression": "zstd"})
            m.ok("POST", "/v1/volumes", json={"name": "src", "size": size,
                                              "replicas": args.replicas})
            uri = m.ok("POST", "/v1/volumes/src/attach", json={})["nbd_uri"]
            subprocess.run(["nbdcopy", "--flush", "--", "[", "nbdkit", "random",
                            f"size={size}", "]", uri], check=True, timeout=3600)
            backup = wait_task(m, m.ok("POST", "/v1/volumes/src/backups", json={})["id"])
            name = backup["result"]["name"]
            m.ok("POST", "/v1/volumes/src/detach", json={})

            drop_caches()
            t0 = time.perf_counter()
            task = m.ok("POST", f"/v1/backups/{name}/restore", json={"volume": "plain"})
            wait_task(m, task["id"])
            t_plain = time.perf_counter() - t0

            drop_caches()
            t0 = time.perf_counter()
            task = m.ok("POST", f"/v1/backups/{name}/restore",
                        json={"volume": "instant", "instant": True})
            t_call = time.perf_counter() - t0
            iuri = m.volume("instant")["nbd_uri"]
            t1 = time.perf_counter()
            read_last_mib(iuri, size)
            t_first = time.perf_counter() - t1
            t_ttfb = time.perf_counter() - t0
            wait_task(m, task["id"])
            t_fill = time.perf_counter() - t0

            puri = m.ok("POST", "/v1/volumes/plain/attach", json={})["nbd_uri"]
            cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", iuri, puri],
                                 capture_output=True, text=True, timeout=3600)
            same = cmp.returncode == 0
        finally:
            m.kill_everything()
            m.stop(sig=9)

    print(f"volume {mib:.0f} MiB of random data, {args.replicas} replica(s), directory "
          "target, zstd")
    print(f"plain restore          {t_plain:7.2f} s {mib / t_plain:8.0f} MiB/s   "
          "(until the volume can be used: create, write all, detach)")
    print(f"instant restore call   {t_call:7.2f} s   (create, attach, install the backup)")
    print(f"  first read, last MiB {t_first:7.3f} s   from the request: {t_ttfb:.2f} s "
          "(target < 2 s)")
    print(f"  fill until done      {t_fill:7.2f} s {mib / t_fill:8.0f} MiB/s   "
          f"ratio fill/plain throughput {t_plain / t_fill:.2f}")
    print(f"  usable after {t_ttfb:.2f} s instead of {t_plain:.2f} s "
          f"({t_plain / t_ttfb:.0f}x sooner); equal to the plain restore: {same}")


if __name__ == "__main__":
    main()
