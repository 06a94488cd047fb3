"""fio against a drove volume with 1, 2 and 3 replicas, beside nbdkit's file plugin.

    .venv/bin/python bench/engine.py [--size 1G] [--runtime 10] [--replicas 1,2,3] [--warm]
        [--local 1,2,3] [--layers stats,qos-off,qos-high,crypt,all] [--layer-rounds 3]

Every replica is its own process on this machine, as is the engine; fio talks
to the engine over a unix socket, the engine to its replicas over theirs.
nbdkit serves a file on the same disk in the same run; the table prints the
ratio drove / nbdkit.  Targets (issue 3): 1 replica >= 0.75 of nbdkit's IOPS;
3 replicas >= 0.35 on 4k randrw and >= 0.40 of its sequential bandwidth.

First, unless ``--no-hop``, the same jobs run through a bare byte-forwarding
hop (socat, in C) in front of that nbdkit: what one extra process costs on this
machine before any engine work, the floor for any engine in front of replicas.

``--local N,...`` adds volumes with a local replica (data locality): N
replicas of which one is served inside the engine process and N - 1 are
replica processes (targets, issue 15: 1 local >= 0.90 randread, 0.75 randrw,
randwrite and 1M seq write, 0.90 1M seq read; 3 with 1 local >= 0.90
randread, 0.35 randrw, 0.30 randwrite and 1M seq write, 0.90 1M seq read).
The 1 MiB jobs also run at iodepth 4 there.

After each volume's table, unless ``--no-qemu``, the engine stops and the same
jobs run through qemu-nbd's quorum driver (the field's mirror, in C) over the
same replica processes: the ratio printed there is drove / qemu.

``--layers`` (unless ``''``) runs the engine's layer stack with each layer on and off
(bench/layers.py's variants: stats alone, QoS set and removed again, QoS with limits far
above the load, encryption, QoS and encryption together), one replica each, in rounds
interleaved with nbdkit (``--layer-rounds``): medians, and each one's IOPS and CPU per
I/O against nbdkit and against the stats-only stack.

The ``all`` column is the whole machine's CPU per I/O (fio and every process on
the path) and ``busy`` the share of its CPUs in use.  On two CPUs the IOPS of a
path go roughly as 1 / ``all``: each process added to the path costs its CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from drove.replica.fence import head_export_name
from drove.units import parse_size
from fiobench import (
    SEQ_QD4_JOBS,
    STANDARD_JOBS,
    Job,
    Result,
    fill,
    nbdkit_file,
    print_table,
    qemu_quorum,
    run_fio,
    socat_hop,
)
from layers import (
    LAYER_VARIANTS,
    engine_over_replicas,
    interleaved,
    parse_variants,
    print_medians,
    variant_engine,
)
from replicatools import ReplicaProc, kill_all, start_replica


def hop_floor(scratch: Path, jobs: tuple[Job, ...], size: int, runtime: int, base_uri: str,
              base_pid: int) -> None:
    """fio through a bare socat hop in front of nbdkit and in front of a lone replica."""
    rep = start_replica(scratch / "hop-r", size)
    try:
        fill(rep.unix_uri(), size)
        targets = (scratch / "nbdkit.sock", Path(rep.addresses["nbd_unix"]))
        rows: list[list[tuple[str, Result, Result]]] = [[], []]
        for job in jobs:
            hops = []
            for target in targets:
                with socat_hop(target, scratch / "hop.sock") as (uri, pid):
                    hops.append(run_fio(uri, job, size, runtime, pid, settle=0.5))
            base = run_fio(base_uri, job, size, runtime, base_pid)
            for table, hop in zip(rows, hops, strict=True):
                table.append((job.name, hop, base))
    finally:
        rep.stop()
        kill_all([rep])
    for table, what in zip(rows, ("nbdkit", "a lone drove replica"), strict=True):
        print_table(f"one bare hop, no engine work: fio -> socat -> {what}; cpu is "
                    "socat's", table, "nbdkit", name="hop")


def qemu_mirror(scratch: Path, reps: list[ReplicaProc], jobs: tuple[Job, ...],
                drove_rows: list[tuple[str, Result, Result]], size: int, runtime: int,
                epoch: int) -> None:
    """The same jobs through qemu-nbd's quorum mirror (C) over the same replicas.

    Printed beside drove's figures from the table before; the ratio is drove /
    qemu.  nbdkit's figures of that table give both their ratio to the baseline.
    qemu writes as the next engine would, through ``head@epoch=`` one above the
    stopped engine's ``epoch`` (plain ``head`` is read-only once an engine ran).
    """
    rows, vs_base = [], []
    targets = [Path(r.addresses["nbd_unix"]) for r in reps]
    with qemu_quorum(targets, scratch / "quorum.sock",
                     head_export_name(epoch + 1)) as (uri, pid):
        for job, (_, d, b) in zip(jobs, drove_rows, strict=True):
            q = run_fio(uri, job, size, runtime, pid)
            rows.append((job.name, d, q))
            vs_base.append(f"{job.name}: {q.iops / b.iops:.2f}")
    print_table(f"the same {len(reps)} replica(s) behind qemu-nbd's quorum mirror instead of "
                "the engine (drove figures from the table above)", rows, "qemu quorum")
    print("qemu quorum / nbdkit: " + ", ".join(vs_base))


def bench_volume(scratch: Path, n: int, local: bool, jobs: tuple[Job, ...], args: Any,
                 size: int, base_uri: str, base_pid: int) -> None:
    """One volume of ``n`` replicas (one of them local when ``local``) against nbdkit."""
    tag = f"v{n}{'l' if local else ''}"
    with engine_over_replicas(scratch, tag, n - local, size, local=local) as (eng, reps):
        uri = eng.unix_uri("vol")
        fill(uri, size)
        rows = []
        for job in jobs:
            if args.warm:
                run_fio(uri, job, size, args.runtime)
                run_fio(base_uri, job, size, args.runtime)
            d = run_fio(uri, job, size, args.runtime, eng.proc.pid)
            b = run_fio(base_uri, job, size, args.runtime, base_pid)
            rows.append((job.name, d, b))
        what = (f"{n} replica(s), 1 local in the engine + {n - 1} process(es)" if local
                else f"{n} replica(s)")
        print_table(f"drove volume, {what}, {args.size}; cpu is the engine's alone", rows,
                    "nbdkit")
        if not args.no_qemu and reps and not local:
            epoch = eng.info()["epoch"]
            eng.stop()
            qemu_mirror(scratch, reps, jobs, rows, size, args.runtime, epoch)


def bench_layers(scratch: Path, names: str, jobs: tuple[Job, ...], args: Any, size: int,
                 base_uri: str, base_pid: int) -> None:
    """The layer stack's variants (bench/layers.py), one replica each, interleaved with
    nbdkit: medians and ratios to nbdkit and to the stats-only stack."""
    variants = parse_variants(names)
    with contextlib.ExitStack() as stack:
        targets = {"nbdkit": (base_uri, base_pid)}
        for v in variants:
            eng = stack.enter_context(variant_engine(scratch, v, size))
            targets[v.name] = (eng.unix_uri("vol"), eng.proc.pid)
        results = interleaved(targets, jobs, size, args.layer_rounds, args.runtime)
    bases = ["nbdkit"] + (["stats"] if "stats" in targets else [])
    print_medians(f"the engine's layers on and off, 1 replica, {args.size}: medians over "
                  f"{args.layer_rounds} interleaved rounds of {args.runtime} s; cpu is the "
                  "engine's (nbdkit's on its row)", results, jobs, list(targets), bases)


def main() -> None:
    """Run the benchmark and print one table per replica count."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--replicas", default="1,2,3",
                    help="replica counts of volumes whose replicas are all processes "
                         "('' for none)")
    ap.add_argument("--local", default="",
                    help="replica counts of volumes with one local replica, e.g. 1,2,3")
    ap.add_argument("--dir", default=None, help="scratch directory (on the disk to measure)")
    ap.add_argument("--jobs", default=None, help="comma-separated job numbers to run (1-5)")
    ap.add_argument("--warm", action="store_true",
                    help="run each job once unmeasured first (first touch of guest memory "
                         "by the page cache is ~10x slower on this VM)")
    ap.add_argument("--no-hop", action="store_true",
                    help="skip the socat hop floor (fio -> socat -> nbdkit)")
    ap.add_argument("--no-qemu", action="store_true",
                    help="skip qemu-nbd's quorum mirror over the same replicas")
    ap.add_argument("--layers", default=",".join(LAYER_VARIANTS),
                    help="layer variants to run beside nbdkit (bench/layers.py; '' for none)")
    ap.add_argument("--layer-rounds", type=int, default=3,
                    help="interleaved rounds of the layer variants (medians)")
    args = ap.parse_args()
    try:  # a typo refused before minutes of other runs
        if any(v.before for v in parse_variants(args.layers)):
            ap.error("--layers: the variant before is bench/layers.py's (--before REV)")
    except ValueError as exc:
        ap.error(f"--layers: {exc}")
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
            if not args.no_hop:
                hop_floor(scratch, jobs, size, args.runtime, base_uri, base_pid)
            volumes = [(int(x), False) for x in args.replicas.split(",") if x]
            volumes += [(int(x), True) for x in args.local.split(",") if x]
            for n, local in volumes:
                vol_jobs = jobs + (SEQ_QD4_JOBS if local and not args.jobs else ())
                bench_volume(scratch, n, local, vol_jobs, args, size, base_uri, base_pid)
            if args.layers:
                bench_layers(scratch, args.layers, jobs, args, size, base_uri, base_pid)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
