"""Shared fio benchmark helpers: run the standard jobs and print figures beside a baseline.

Benchmarks are not tests: they print IOPS, bandwidth and latency for drove and
for a baseline started in the same invocation, and the ratio between them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


@dataclass(frozen=True)
class Job:
    """One fio workload."""

    name: str
    rw: str
    bs: str
    iodepth: int = 16
    extra: tuple[str, ...] = ()


STANDARD_JOBS = (
    Job("4k randrw 50/50 qd16", "randrw", "4k", extra=("--rwmixread=50",)),
    Job("4k randread qd16", "randread", "4k"),
    Job("4k randwrite qd16", "randwrite", "4k"),
    Job("1M seq write qd16", "write", "1M"),
    Job("1M seq read qd16", "read", "1M"),
)


@dataclass
class Result:
    """fio's figures for one job, reads and writes summed."""

    iops: float
    mib_s: float
    mean_us: float
    p99_us: float


def run_fio(uri: str, job: Job, size: int, runtime: int) -> Result:
    """Run ``job`` with fio's nbd engine against ``uri`` and parse its JSON."""
    cmd = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
        f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--size={size}", "--time_based",
        f"--runtime={runtime}", "--ramp_time=1", "--output-format=json", "--randrepeat=0",
        "--norandommap", *job.extra,
    ]
    out = subprocess.run(cmd, capture_output=True, check=True, text=True, timeout=runtime + 120)
    data = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    iops = bw = 0.0
    lat_sum = lat_n = 0.0
    p99 = 0.0
    for side in ("read", "write"):
        s = data[side]
        if not s["io_bytes"]:
            continue
        iops += s["iops"]
        bw += s["bw_bytes"]
        lat_sum += s["clat_ns"]["mean"] * s["total_ios"]
        lat_n += s["total_ios"]
        pct = s["clat_ns"].get("percentile", {})
        p99 = max(p99, pct.get("99.000000", 0.0))
    return Result(iops, bw / (1 << 20), lat_sum / max(lat_n, 1) / 1e3, p99 / 1e3)


@contextlib.contextmanager
def nbdkit_file(path: Path, sock: Path) -> Iterator[str]:
    """nbdkit's file plugin serving ``path`` on a unix socket (the baseline)."""
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", str(path)],
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait()


def fill(uri: str, size: int) -> None:
    """Write random data over the whole export with nbdcopy (so reads hit real data)."""
    src = Path(os.environ.get("TMPDIR", "/tmp")) / f"fill-{os.getpid()}.raw"
    with open(src, "wb") as f:
        for _ in range(0, size, 8 << 20):
            f.write(os.urandom(min(8 << 20, size - f.tell())))
    try:
        subprocess.run(["nbdcopy", "--no-extents", str(src), uri], check=True,
                       capture_output=True)
    finally:
        src.unlink()


def qemu_io_script(uri: str, commands: list[str]) -> None:
    """Feed many qemu-io commands through one connection."""
    subprocess.run(["qemu-io", "-f", "raw", uri], input="\n".join(commands) + "\nquit\n",
                   check=True, capture_output=True, text=True)


def print_table(title: str, rows: list[tuple[str, Result, Result]], base_name: str) -> None:
    """Print drove vs baseline for each job with ratios."""
    print(f"\n{title}")
    head = (f"{'job':24} {'drove IOPS':>11} {'MiB/s':>8} {'mean us':>8} {'p99 us':>8} "
            f"{base_name + ' IOPS':>13} {'MiB/s':>8} {'mean us':>8} {'p99 us':>8} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for name, d, b in rows:
        ratio = d.iops / b.iops if b.iops else float("nan")
        print(f"{name:24} {d.iops:11.0f} {d.mib_s:8.1f} {d.mean_us:8.1f} {d.p99_us:8.1f} "
              f"{b.iops:13.0f} {b.mib_s:8.1f} {b.mean_us:8.1f} {b.p99_us:8.1f} {ratio:6.2f}")
    sys.stdout.flush()
