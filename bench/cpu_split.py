"""Where the CPU goes per I/O: the engine, its replicas, and the idle share, for one fio job.

    .venv/bin/python bench/cpu_split.py [--replicas 3] [--job randwrite-4k] [--size 512M]
                                        [--runtime 12] [--dir /dev/shm]

Starts N replica processes and an engine (in --dir: put it on tmpfs to take the
filesystem out of the picture), fills the volume, runs one fio job and prints
IOPS with the CPU microseconds per I/O of the engine process, of all replica
processes together and of the whole machine (fio included), from /proc counters
around the run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from drove.units import parse_size
from fiobench import STANDARD_JOBS, cpu_seconds, fill, run_fio
from layers import engine_over_replicas


def main() -> None:
    """Run the job once and print the split."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--job", default="randwrite-4k",
                    help="one of: " + ", ".join(j.key for j in STANDARD_JOBS))
    ap.add_argument("--size", default="512M")
    ap.add_argument("--runtime", type=int, default=12)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    job = next(j for j in STANDARD_JOBS if j.key == args.job)
    size = parse_size(args.size)
    scratch = Path(tempfile.mkdtemp(prefix="drove-cpu-", dir=args.dir))
    try:
        with engine_over_replicas(scratch, "v", args.replicas, size) as (eng, reps):
            uri = eng.unix_uri("vol")
            fill(uri, size)
            e0 = cpu_seconds(eng.proc.pid)
            r0 = sum(cpu_seconds(r.proc.pid) for r in reps)
            res = run_fio(uri, job, size, args.runtime)
            e1 = cpu_seconds(eng.proc.pid)
            r1 = sum(cpu_seconds(r.proc.pid) for r in reps)
        ios = res.iops * (args.runtime + 1)  # fio's ramp second is not in its IOPS
        print(f"{job.name}, {args.replicas} replica(s), {scratch}: {res.iops:.0f} IOPS, "
              f"engine {(e1 - e0) / ios * 1e6:.1f} us/IO, replicas {(r1 - r0) / ios * 1e6:.1f} "
              f"us/IO, whole machine {res.all_us:.1f} us/IO, idle {1 - res.busy:.0%}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
