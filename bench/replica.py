"""fio against one drove replica (empty chain, then a 10-layer chain) beside nbdkit's file plugin.

    .venv/bin/python bench/replica.py [--size 1G] [--runtime 10] [--dir /work/bench-tmp]

Both servers serve a file on the same disk over a unix socket; the drove figures
and nbdkit's are taken in the same run and printed with their ratio.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

from drove.units import parse_size
from fiobench import STANDARD_JOBS, fill, nbdkit_file, print_table, qemu_io_script, run_fio
from replicatools import start_replica


def build_chain(r, size: int, layers: int, seed: int = 7) -> None:
    """Fill the volume, then stack layers holding random 64 KiB chunks of ~15% each.

    With ``layers`` > 1 the head is left empty, so every read goes through the
    read index to one of the older layers.
    """
    fill(r.unix_uri(), size)
    rnd = random.Random(seed)
    chunk = 64 << 10
    for i in range(layers - 1):
        r.ok("POST", "/v1/snapshots", json={"name": f"layer{i}"})
        if i == layers - 2:
            break
        cmds = [f"write -P {i + 1} {off} {chunk}"
                for off in range(0, size, chunk) if rnd.random() < 0.15]
        qemu_io_script(r.unix_uri(), cmds)


def reset(r, layers: int) -> None:
    """Give every job the same chain: a new empty head on the top snapshot.

    Without it the 4 KiB jobs leave the head holding scattered blocks, and the
    1 MiB jobs after them pay for that fragmentation instead of for the chain.
    """
    if layers > 1:
        r.ok("POST", "/v1/revert", json={"snapshot": f"layer{layers - 2}"})


def main() -> None:
    """Run the benchmark and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--dir", default=None, help="scratch directory (on the disk to measure)")
    ap.add_argument("--jobs", default=None, help="comma-separated job numbers to run (1-5)")
    ap.add_argument("--warm", action="store_true",
                    help="run each job once unmeasured first: on a VM, page cache growing into "
                         "guest memory never touched before costs ~10x the CPU of reusing it")
    args = ap.parse_args()
    size = parse_size(args.size)
    jobs = STANDARD_JOBS
    if args.jobs:
        jobs = tuple(STANDARD_JOBS[int(i) - 1] for i in args.jobs.split(","))
    scratch = Path(tempfile.mkdtemp(prefix="drove-bench-", dir=args.dir))
    try:
        base_file = scratch / "nbdkit.img"
        with open(base_file, "wb") as f:
            f.truncate(size)
        with nbdkit_file(base_file, scratch / "nbdkit.sock") as (base_uri, base_pid):
            fill(base_uri, size)
            for label, layers in (("head only", 1), ("10-layer chain", 10)):
                r = start_replica(scratch / f"r{layers}", size)
                try:
                    build_chain(r, size, layers)
                    rows = []
                    for job in jobs:
                        if args.warm:
                            reset(r, layers)
                            run_fio(r.unix_uri(), job, size, args.runtime)
                            run_fio(base_uri, job, size, args.runtime)
                        reset(r, layers)
                        d = run_fio(r.unix_uri(), job, size, args.runtime, r.proc.pid)
                        b = run_fio(base_uri, job, size, args.runtime, base_pid)
                        rows.append((job.name, d, b))
                    print_table(f"drove replica, {label}, {args.size} volume", rows, "nbdkit")
                finally:
                    r.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
