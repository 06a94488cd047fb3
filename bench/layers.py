"""The engine's layer stack with each layer on and off, interleaved in one run: what each costs.

    .venv/bin/python bench/layers.py [--variants stats,qos-off,qos-high,crypt,all]
        [--before REV] [--rounds 5] [--runtime 5] [--size 512M]
        [--jobs randread-4k,randwrite-4k,seqread-1m]

Each variant is an engine over its own replica process on this machine, fio over
a unix socket:

* ``before``: the engine of git revision REV (its ``src`` extracted with ``git
  archive``, run with PYTHONPATH pointing there, over a replica of this checkout), to
  compare with an older drove; first, unless ``--variants`` places it, when ``--before``
  is given;
* ``stats``: this checkout's engine as a plain volume gets it: the stats layer,
  and the QoS layer with no limit, which the stack wires the request path past
  (drove.engine.stack), so this is the stack with stats alone on;
* ``qos-off``: the same once a limit was set and removed again live: the QoS
  layer unwired again (it must cost what ``stats`` costs);
* ``qos-high``: QoS limits far above what the machine does: the throttle's
  accounting runs on every request and never makes one wait;
* ``crypt``: encrypting (AES-XTS-256, drove.engine.crypt) with a random key
  given in a 0600 --key-file;
* ``all``: ``qos-high`` and ``crypt`` together.

The jobs run round after round, each job on every engine one after the other
(in reverse order every other round), so the machine's load (other people's
tests) falls on all of them alike; the table prints medians over the rounds
and the ratios to the first variant.  ``cpu`` is the engine's CPU time per I/O
(steadier than IOPS on a shared machine).  ``bench/engine.py`` runs the same
variants beside its nbdkit baseline (its ``--layers``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drove.units import parse_size
from fiobench import SEQ_QD4_JOBS, STANDARD_JOBS, Job, Result, fill, run_fio
from replicatools import ReplicaProc, kill_all, start_replica

HIGH_LIMITS = {"iops": 10**9, "bandwidth": 10**13}
"""QoS limits no run on this machine comes near: accounting on every request, no wait."""


@dataclass(frozen=True)
class Variant:
    """One engine configuration: which layers are on."""

    name: str
    limits: dict[str, Any] = field(default_factory=dict)  # QoS limits set once started
    cleared: bool = False  # the limits removed again, live
    crypt: bool = False  # an encrypted volume
    before: bool = False  # the engine of an older revision (--before)


VARIANTS = {v.name: v for v in (
    Variant("before", before=True),
    Variant("stats"),
    Variant("qos-off", limits=HIGH_LIMITS, cleared=True),
    Variant("qos-high", limits=HIGH_LIMITS),
    Variant("crypt", crypt=True),
    Variant("all", limits=HIGH_LIMITS, crypt=True),
)}
LAYER_VARIANTS = ("stats", "qos-off", "qos-high", "crypt", "all")
"""Each layer on and off: the default set (no older revision needed)."""


def parse_variants(text: str) -> list[Variant]:
    """The variants a comma-separated list names (ValueError naming an unknown one)."""
    names = [v for v in text.split(",") if v]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}: use some of "
                         f"{', '.join(VARIANTS)}")
    return [VARIANTS[n] for n in names]


def extract(rev: str, into: Path) -> Path:
    """``src`` of revision ``rev`` under ``into``; the directory to put on PYTHONPATH."""
    archive = subprocess.run(["git", "archive", rev, "src"], check=True, capture_output=True,
                             cwd=Path(__file__).parent.parent).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


@contextlib.contextmanager
def _pythonpath(src: Path | None) -> Iterator[None]:
    """PYTHONPATH set to ``src`` for the processes started in the block (None: unchanged)."""
    old = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = str(src)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@contextlib.contextmanager
def engine_over_replicas(scratch: Path, tag: str, replicas: int, size: int, *extra: str,
                         local: bool = False, src: Path | None = None
                         ) -> Iterator[tuple[Any, list[ReplicaProc]]]:
    """(engine, replica processes): ``replicas`` replica processes and an engine of volume
    ``vol`` over them (plus one replica inside the engine when ``local``; the engine of
    ``src`` when given), all stopped at the end of the block."""
    from enginetools import start_engine  # tests/ is on sys.path once fiobench is imported

    procs: list[ReplicaProc] = []
    try:
        reps = [start_replica(scratch / f"{tag}-r{i}", size) for i in range(replicas)]
        procs += reps
        with _pythonpath(src):  # the engine alone: an older engine over today's replicas
            eng = start_engine(scratch / f"{tag}-e", "vol", reps, "--log-level", "warning",
                               *extra, size=size,
                               local=("loc", scratch / f"{tag}-loc") if local else None)
        procs.append(eng)
        yield eng, reps
    finally:
        for p in reversed(procs):
            p.stop()
        kill_all(procs)


@contextlib.contextmanager
def variant_engine(scratch: Path, variant: Variant, size: int,
                   before_src: Path | None = None) -> Iterator[Any]:
    """An engine of ``variant`` over one replica process, its volume filled."""
    # No "+" in a socket path: drove's URIs take it as a space.
    tag = variant.name.replace("+", "-")
    extra: tuple[str, ...] = ()
    if variant.crypt:
        from drove.engine.crypt import KEY_BYTES, write_key_file

        write_key_file(scratch / f"{tag}.key", os.urandom(KEY_BYTES))
        extra = ("--key-file", str(scratch / f"{tag}.key"))
    with engine_over_replicas(scratch, tag, 1, size, *extra,
                              src=before_src if variant.before else None) as (eng, _):
        if variant.limits:
            eng.ok("PUT", "/v1/qos", json={"limits": variant.limits})
        if variant.cleared:
            eng.ok("PUT", "/v1/qos", json={"limits": {}, "replace": True})
        fill(eng.unix_uri("vol"), size)
        yield eng


def interleaved(targets: dict[str, tuple[str, int]], jobs: Sequence[Job], size: int,
                rounds: int, runtime: int) -> dict[tuple[str, str], list[Result]]:
    """fio's results per (job, target) over ``rounds`` rounds; ``targets``: name -> (uri,
    pid whose CPU counts).  Each round runs each job on every target in turn, in reverse
    order every other round, so the machine's load falls on all alike."""
    results: dict[tuple[str, str], list[Result]] = {}
    names = list(targets)
    for r in range(rounds):
        for job in jobs:
            for name in names if r % 2 == 0 else reversed(names):
                uri, pid = targets[name]
                results.setdefault((job.name, name), []).append(
                    run_fio(uri, job, size, runtime, pid))
    return results


def print_medians(title: str, results: dict[tuple[str, str], list[Result]],
                  jobs: Sequence[Job], names: Sequence[str], bases: Sequence[str]) -> None:
    """Medians per job and target, with the IOPS and CPU ratios to each of ``bases``."""
    print(f"\n{title}")
    ratios = "".join(f" {'IOPS/' + b:>14} {'cpu/' + b:>13}" for b in bases)
    print(f"{'job':22} {'engine':9} {'IOPS':>8} {'MiB/s':>7} {'cpu us/io':>9}{ratios}")

    def median(job: Job, name: str, what: str) -> float:
        return statistics.median(getattr(x, what) for x in results[(job.name, name)])

    for job in jobs:
        for name in names:
            iops, cpu = median(job, name, "iops"), median(job, name, "cpu_us")
            cells = "".join(f" {iops / median(job, b, 'iops'):14.3f} "
                            f"{cpu / median(job, b, 'cpu_us'):13.3f}" for b in bases)
            print(f"{job.name:22} {name:9} {iops:8.0f} {median(job, name, 'mib_s'):7.1f} "
                  f"{cpu:9.1f}{cells}")


def jobs_by_key(text: str) -> list[Job]:
    """The fio jobs a comma-separated list of keys names (KeyError names an unknown one)."""
    by_key = {j.key: j for j in STANDARD_JOBS + SEQ_QD4_JOBS}
    return [by_key[k] for k in text.split(",") if k]


def main() -> None:
    """Run the rounds and print medians."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None,
                    help="git revision of an older engine, run first (the base of the ratios) "
                         "unless --variants places it")
    ap.add_argument("--variants", default=",".join(LAYER_VARIANTS),
                    help=f"which engines, the first the base of the ratios: "
                         f"{', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--jobs", default="randread-4k,randwrite-4k,seqread-1m")
    ap.add_argument("--dir", default=None, help="scratch directory (on the disk to measure)")
    args = ap.parse_args()
    size = parse_size(args.size)
    try:
        jobs = jobs_by_key(args.jobs)
    except KeyError as exc:
        ap.error(f"--jobs: unknown job {exc}")
    try:
        variants = parse_variants(args.variants)
    except ValueError as exc:
        ap.error(f"--variants: {exc}")
    if not variants:
        ap.error("--variants names none")
    if any(v.before for v in variants) and args.before is None:
        ap.error("the variant before needs --before REV")
    if args.before and not any(v.before for v in variants):
        variants.insert(0, VARIANTS["before"])  # what --before is for: the base of the ratios
    scratch = Path(tempfile.mkdtemp(prefix="drove-bench-layers-", dir=args.dir))
    try:
        before_src = extract(args.before, scratch) if args.before else None
        with contextlib.ExitStack() as stack:
            targets = {}
            for v in variants:
                eng = stack.enter_context(variant_engine(scratch, v, size, before_src))
                targets[v.name] = (eng.unix_uri("vol"), eng.proc.pid)
            results = interleaved(targets, jobs, size, args.rounds, args.runtime)
        print_medians(f"medians over {args.rounds} interleaved rounds of {args.runtime} s; "
                      f"before = {args.before}; ratios to {variants[0].name}",
                      results, jobs, list(targets), [variants[0].name])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
