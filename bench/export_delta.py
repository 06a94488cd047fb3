"""Incremental export of a snapshot beside a full export of the same snapshot, same run.

    .venv/bin/python bench/export_delta.py [--size 1G] [--change 1]

One replica process holds a volume of ``--size`` half filled with random data (4 MiB
of data every 8 MiB), snapshot ``a``; then ``--change`` percent of the volume is
rewritten in 64 KiB pieces spread over it, snapshot ``b``.  Timed:

* ``diff``: GET /v1/diff?since=a&to=b (the layers' allocation, no data read);
* raw: nbdcopy of snapshot ``b`` whole into a file (the baseline) beside nbdcopy of
  the delta export ``snapshot/b@since=a`` onto a copy of ``a``'s image served by
  ``nbdkit file`` (the recipe of docs/api.md; qemu-nbd as the target takes 2-3 times
  longer for the same 4 KiB writes);
* qcow2: qemu-img convert of ``b`` whole beside the delta over a qcow2 of ``a``
  (``-B a.qcow2`` from ``snapshot/b@since=a@holes=backing``).

Every copy is checked against ``b`` with qemu-img compare.  The ratios are what
matters (these machines are noisy); the delta should cost about ``--change`` /
50 of the full copy, plus a fixed start-up.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from drove.units import parse_size
from replicatools import kill_all, start_replica

MiB = 1 << 20
PIECE = 64 * 1024


def sh(*cmd: str) -> None:
    """Run a command; fail with its output."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {r.returncode}\n{r.stdout}\n{r.stderr}")


def timed(*cmd: str) -> float:
    """Seconds one command takes."""
    t = time.perf_counter()
    sh(*cmd)
    return time.perf_counter() - t


def fill(path: Path, size: int) -> None:
    """A sparse file: 4 MiB of random data every 8 MiB."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 8 * MiB):
            f.seek(off)
            f.write(os.urandom(min(4 * MiB, size - off)))


def change(uri: str, size: int, percent: float) -> int:
    """Rewrite ``percent`` of the volume in 64 KiB pieces at random places; bytes."""
    rnd = random.Random(17)
    n = int(size * percent / 100) // PIECE
    offsets = sorted(rnd.sample(range(size // PIECE), n))
    cmds = []
    for i, p in enumerate(offsets):
        cmds += ["-c", f"write -P {i % 250 + 1} {p * PIECE} {PIECE}"]
    for k in range(0, len(cmds), 2000):  # argv stays short enough
        sh("qemu-io", "-f", "raw", *cmds[k:k + 2000], uri)
    return n * PIECE


def main() -> None:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--change", type=float, default=1.0, help="percent of the volume")
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="drove-bench-delta-", dir="/var/tmp") as tmp:
        d = Path(tmp)
        r = start_replica(d / "r1", size)
        try:
            fill(d / "base.img", size)
            sh("nbdcopy", str(d / "base.img"), r.uri("head"))
            r.ok("POST", "/v1/snapshots", json={"name": "a"})
            changed = change(r.uri("head"), size, args.change)
            r.ok("POST", "/v1/snapshots", json={"name": "b"})

            t = time.perf_counter()
            diff = r.ok("GET", "/v1/diff", params={"since": "a", "to": "b"})
            t_diff = time.perf_counter() - t

            a_img, b_img = d / "a.img", d / "b.img"
            sh("nbdcopy", r.uri("snapshot/a"), str(a_img))
            t_full = timed("nbdcopy", r.uri("snapshot/b"), str(b_img))
            target = d / "target.img"
            shutil.copyfile(a_img, target)
            t_delta = timed("nbdcopy", "--destination-is-zero", "--sparse=0",
                            "--request-size=4096", r.uri("snapshot/b@since=a"),
                            "--", "[", "nbdkit", "file", str(target), "]")
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(target), str(b_img))
            # The fixed cost: the same copy of an empty delta (b since b).
            t_empty = timed("nbdcopy", "--destination-is-zero", "--sparse=0",
                            "--request-size=4096", r.uri("snapshot/b@since=b"),
                            "--", "[", "nbdkit", "file", str(target), "]")

            sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", r.uri("snapshot/a"),
               str(d / "a.qcow2"))
            t_qfull = timed("qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                            r.uri("snapshot/b"), str(d / "b.qcow2"))
            t_qdelta = timed("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B",
                             "a.qcow2", "-F", "qcow2", r.uri("snapshot/b@since=a@holes=backing"),
                             str(d / "b-since-a.qcow2"))
            for q in ("b.qcow2", "b-since-a.qcow2"):
                sh("qemu-img", "compare", "-F", "raw", str(d / q), str(b_img))
            q_full = (d / "b.qcow2").stat().st_size
            q_delta = (d / "b-since-a.qcow2").stat().st_size
        finally:
            kill_all([r])

    print(f"volume {size / MiB:.0f} MiB, half data; rewritten {changed / MiB:.1f} MiB "
          f"({args.change}%); diff: {len(diff['extents'])} extents, "
          f"{diff['bytes'] / MiB:.1f} MiB in {t_diff * 1e3:.1f} ms")
    print(f"raw    full nbdcopy {t_full:7.2f} s   delta nbdcopy {t_delta:7.2f} s   "
          f"ratio {t_delta / t_full:.3f}   (empty delta {t_empty:.2f} s)")
    print(f"qcow2  full convert {t_qfull:7.2f} s   delta -B      {t_qdelta:7.2f} s   "
          f"ratio {t_qdelta / t_qfull:.3f}   files {q_full / MiB:.1f} / {q_delta / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
