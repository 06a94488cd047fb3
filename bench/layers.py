"""The engine's layer stack against an older drove's, interleaved in one run: no loss?

    .venv/bin/python bench/layers.py --before REV [--rounds 5] [--runtime 5] [--size 512M]
        [--jobs randread-4k,randwrite-4k,seqread-1m] [--variants before,after,after+crypt]

Three engines, each over its own replica process on this machine, fio over a
unix socket:

* ``before``: the engine of git revision REV (its ``src`` extracted with ``git
  archive``, run with PYTHONPATH pointing there);
* ``after``: this checkout's engine (stats -> qos, QoS unlimited);
* ``after+qos``: this checkout's engine with QoS limits far above what the
  machine does (the throttle's accounting runs on every request, never waits);
* ``after+crypt``: this checkout's engine encrypting (AES-XTS-256, drove.engine.crypt)
  with a random key given in a 0600 --key-file.

``--variants`` picks some of them (the first is the one ratios are to; without
``before`` no older revision is extracted).

The jobs run round after round, each job on the three engines one after the
other, so the machine's load (other people's tests) falls on all of them
alike; the table prints medians over the rounds and the ratio to ``before``.
``cpu`` is the engine's CPU time per I/O (steadier than IOPS on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from drove.units import parse_size
from fiobench import SEQ_QD4_JOBS, STANDARD_JOBS, Result, fill, run_fio
from replicatools import kill_all, start_replica

VARIANTS = ("before", "after", "after+qos", "after+crypt")
HIGH_LIMITS = {"iops": 10**9, "bandwidth": 10**13}


def extract(rev: str, into: Path) -> Path:
    """``src`` of revision ``rev`` under ``into``; the directory to put on PYTHONPATH."""
    archive = subprocess.run(["git", "archive", rev, "src"], check=True, capture_output=True,
                             cwd=Path(__file__).parent.parent).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def start(scratch: Path, variant: str, size: int, before_src: Path | None) -> tuple:
    """A replica and an engine of ``variant`` over it."""
    from enginetools import start_engine  # tests/ is on sys.path once fiobench is imported

    tag = variant.replace("+", "-")  # no "+" in a socket path: drove's URIs take it as a space
    rep = start_replica(scratch / f"{tag}-r", size)
    old = os.environ.get("PYTHONPATH")
    if variant == "before":
        assert before_src is not None
        os.environ["PYTHONPATH"] = str(before_src)
    try:
        extra: tuple[str, ...] = ()
        if variant == "after+crypt":
            from drove.engine.crypt import KEY_BYTES, write_key_file

            write_key_file(scratch / "data.key", os.urandom(KEY_BYTES))
            extra = ("--key-file", str(scratch / "data.key"))
        eng = start_engine(scratch / f"{tag}-e", "vol", [rep], "--log-level", "warning",
                           *extra, size=size)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    if variant == "after+qos":
        eng.ok("PUT", "/v1/qos", json={"limits": HIGH_LIMITS})
    return rep, eng


def main() -> None:
    """Run the rounds and print medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="git revision of the older engine")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"which engines, the first the base of the ratios: {VARIANTS}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--jobs", default="randread-4k,randwrite-4k,seqread-1m")
    ap.add_argument("--dir", default=None, help="scratch directory (on the disk to measure)")
    args = ap.parse_args()
    size = parse_size(args.size)
    by_key = {j.key: j for j in STANDARD_JOBS + SEQ_QD4_JOBS}
    jobs = [by_key[k] for k in args.jobs.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        ap.error(f"--variants: some of {', '.join(VARIANTS)}")
    if "before" in variants and args.before is None:
        ap.error("the variant before needs --before REV")
    scratch = Path(tempfile.mkdtemp(prefix="drove-bench-layers-", dir=args.dir))
    procs = []
    try:
        before_src = extract(args.before, scratch) if "before" in variants else None
        engines = {}
        for v in variants:
            rep, eng = start(scratch, v, size, before_src)
            procs += [rep, eng]
            engines[v] = eng
            fill(eng.unix_uri("vol"), size)
        results: dict[tuple[str, str], list[Result]] = {}
        for r in range(args.rounds):
            for job in jobs:
                for v in variants if r % 2 == 0 else list(reversed(variants)):
                    eng = engines[v]
                    res = run_fio(eng.unix_uri("vol"), job, size, args.runtime, eng.proc.pid)
                    results.setdefault((job.name, v), []).append(res)
        first = variants[0]
        print(f"\nmedians over {args.rounds} interleaved rounds of {args.runtime} s; "
              f"before = {args.before}; ratios to {first}")
        print(f"{'job':22} {'engine':11} {'IOPS':>9} {'MiB/s':>8} {'cpu us/io':>9} "
              f"{'IOPS ratio':>11} {'cpu ratio':>10}")
        for job in jobs:
            base = results[(job.name, first)]
            b_iops = statistics.median(x.iops for x in base)
            b_cpu = statistics.median(x.cpu_us for x in base)
            for v in variants:
                rs = results[(job.name, v)]
                iops = statistics.median(x.iops for x in rs)
                cpu = statistics.median(x.cpu_us for x in rs)
                print(f"{job.name:22} {v:11} {iops:9.0f} "
                      f"{statistics.median(x.mib_s for x in rs):8.1f} {cpu:9.1f} "
                      f"{iops / b_iops:11.3f} {cpu / b_cpu:10.3f}")
    finally:
        for p in reversed(procs):
            p.stop()
        kill_all(procs)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
