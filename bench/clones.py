"""Linked clones: how long a clone takes and how much disk it costs, beside a full copy.

    .venv/bin/python bench/clones.py [--size 4G] [--data 2G] [--counts 1,10,50]

One `drove serve` in a temporary directory (its data directory is the only disk).
Volume src (--size, one replica) gets --data bytes written (qemu-io, 64 MiB requests of
varying patterns), then snapshot ``base``.  Baseline, in the same run: a full copy of
the snapshot with `qemu-img convert` from its NBD export to a raw file on the same
filesystem (time, and the space `du` finds).  Then src is detached and clones of
``base`` are made one after another through the API until each count in --counts is
reached; for each count: the time of each clone call (mean, max), and the disk's extra
space (`du` over the disk directory, each inode once) against the data written.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from drove.units import format_size, parse_size
from managertools import ManagerProc  # tests/managertools.py: a real `drove serve`

CHUNK = 64 << 20


def du(path: Path) -> int:
    """Bytes allocated under ``path`` (each inode once, as `du` counts)."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def fill(uri: str, data: int) -> None:
    """Write ``data`` bytes from offset 0 in CHUNK requests, a different pattern each."""
    cmds = []
    for i, off in enumerate(range(0, data, CHUNK)):
        n = min(CHUNK, data - off)
        cmds += ["-c", f"write -P {1 + i % 250} {off} {n}"]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, uri], check=True, capture_output=True)


def main() -> None:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--data", default="2G")
    ap.add_argument("--counts", default="1,10,50")
    args = ap.parse_args()
    size, data = parse_size(args.size), parse_size(args.data)
    counts = sorted(int(c) for c in args.counts.split(","))
    with tempfile.TemporaryDirectory(prefix="drove-bench-clones-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        m = ManagerProc(root / "data", root / "manager.log", root=root)
        m.start()
        try:
            run(m, root, size, data, counts)
        finally:
            m.kill_everything()


def run(m: ManagerProc, root: Path, size: int, data: int, counts: list[int]) -> None:
    """The measurements (see the module docstring)."""
    m.ok("POST", "/v1/volumes", json={"name": "src", "size": size, "replicas": 1})
    uri = m.ok("POST", "/v1/volumes/src/attach", json={})["nbd_uri"]
    t0 = time.monotonic()
    fill(uri, data)
    print(f"wrote {format_size(data)} into a {format_size(size)} volume in "
          f"{time.monotonic() - t0:.1f} s")
    m.ok("POST", "/v1/volumes/src/snapshots", json={"name": "base"})
    export = m.ok("POST", "/v1/volumes/src/snapshots/base/export")["nbd_uri"]
    copy = root / "full-copy.raw"
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", export, str(copy)],
                   check=True, capture_output=True)
    full_s, full_bytes = time.monotonic() - t0, du(copy)
    copy.unlink()
    m.ok("POST", "/v1/volumes/src/detach", json={})
    disk = Path(m.volume("src")["replicas"][0]["path"]).parent
    before = du(disk)
    times: list[float] = []
    rows = []
    for target in counts:
        while len(times) < target:
            t0 = time.monotonic()
            m.ok("POST", "/v1/volumes/src/clone",
                 json={"name": f"c{len(times)}", "snapshot": "base"})
            times.append(time.monotonic() - t0)
        extra = du(disk) - before
        rows.append((target, sum(times), statistics.mean(times), max(times), extra))
    print(f"\nbaseline: full copy (qemu-img convert of the snapshot's export): "
          f"{full_s:.2f} s, {format_size(full_bytes)} on disk")
    print(f"\n{'clones':>6} {'total s':>8} {'mean s':>8} {'max s':>8} {'extra space':>12} "
          f"{'% of data':>9} {'mean vs full copy':>18}")
    for n, total, mean, worst, extra in rows:
        print(f"{n:>6} {total:>8.2f} {mean:>8.3f} {worst:>8.3f} {format_size(extra):>12} "
              f"{100 * extra / data:>8.3f}% {mean / full_s:>17.4f}x")
    print(f"\nper clone: {format_size(rows[-1][4] // rows[-1][0])} of disk; a full copy: "
          f"{format_size(full_bytes)}")


if __name__ == "__main__":
    main()
