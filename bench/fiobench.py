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
    key: str = ""  # short name for command lines


STANDARD_JOBS = (
    Job("4k randrw 50/50 qd16", "randrw", "4k", extra=("--rwmixread=50",), key="randrw-4k"),
    Job("4k randread qd16", "randread", "4k", key="randread-4k"),
    Job("4k randwrite qd16", "randwrite", "4k", key="randwrite-4k"),
    Job("1M seq write qd16", "write", "1M", key="seqwrite-1m"),
    Job("1M seq read qd16", "read", "1M", key="seqread-1m"),
)

SEQ_QD4_JOBS = (
    Job("1M seq write qd4", "write", "1M", iodepth=4, key="seqwrite-1m-qd4"),
    Job("1M seq read qd4", "read", "1M", iodepth=4, key="seqread-1m-qd4"),
)


@dataclass
class Result:
    """fio's figures for one job, reads and writes summed, and the server's CPU per I/O."""

    iops: float
    mib_s: float
    mean_us: float
    p99_us: float
    cpu_us: float = float("nan")
    all_us: float = float("nan")  # CPU of the whole machine (every process, fio too) per I/O
    busy: float = float("nan")  # share of the machine's CPUs busy during the run, 0..1


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, its threads and its reaped children included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine since boot, all CPUs summed."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, (busy + idle + iowait) / tick


def run_fio(uri: str, job: Job, size: int, runtime: float,
            server_pid: int | None = None, settle: float = 0.0) -> Result:
    """Run ``job`` with fio's nbd engine against ``uri``; with ``server_pid``, its CPU per I/O.

    Server CPU per I/O is steadier than IOPS on a shared two-core machine.
    ``settle``: seconds to wait before reading the CPU time (for a server whose
    per-connection children must exit and be reaped first).
    """
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    busy0, total0 = machine_cpu()
    cmd = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
        f"--bs={job.bs}", f"--iodepth={job.iodepth}", f"--size={size}", "--time_based",
        f"--runtime={runtime}", "--ramp_time=1", "--output-format=json", "--randrepeat=0",
        "--norandommap", *job.extra,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr or out.stdout}")
    busy1, total1 = machine_cpu()
    time.sleep(settle)
    cpu = cpu_seconds(server_pid) - cpu0 if server_pid else float("nan")
    # fio's nbd engine prints a line before the JSON.
    data = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    if data["error"]:
        raise RuntimeError(f"fio job error {data['error']}")
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
    # fio's ramp time is not in total_ios, but the server's CPU counts it: use runtime + ramp.
    ios = iops * (runtime + 1)
    per_io = 1e6 / ios if ios else float("nan")
    return Result(iops, bw / (1 << 20), lat_sum / max(lat_n, 1) / 1e3, p99 / 1e3,
                  cpu * per_io, (busy1 - busy0) * per_io,
                  (busy1 - busy0) / max(total1 - total0, 1e-9))


@contextlib.contextmanager
def serving(argv: list[str], sock: Path) -> Iterator[tuple[str, int]]:
    """Run the server ``argv`` until it listens on the unix socket ``sock``: (uri, pid)."""
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}", proc.pid
    finally:
        proc.terminate()
        proc.wait()
        sock.unlink(missing_ok=True)


def nbdkit_file(path: Path, sock: Path) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """nbdkit's file plugin serving ``path`` on a unix socket (the baseline): (uri, pid)."""
    return serving(["nbdkit", "-f", "-U", str(sock), "file", str(path)], sock)


def socat_hop(target: Path, sock: Path) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """A bare byte-forwarding hop (socat, C) in front of the unix socket ``target``: (uri, pid).

    It parses nothing and copies every byte through one extra process, the
    least any engine in front of a replica process must do.  socat forks a
    child per connection; its CPU time counts in the parent once reaped.
    """
    return serving(["socat", "-b", "262144", f"UNIX-LISTEN:{sock},fork",
                    f"UNIX-CONNECT:{target}"], sock)


def qemu_quorum(targets: list[Path], sock: Path, export: str = ""
                ) -> contextlib.AbstractContextManager[tuple[str, int]]:
    """qemu-nbd mirroring to ``export`` of the NBD servers on the unix sockets ``targets``:
    (uri, pid).

    qemu's quorum driver (C) with vote-threshold=1 and read-pattern=fifo writes
    to every child and reads from the first, which is what drove's mirror does:
    the field's C mirror in the engine's place, over the same replicas.
    """
    opts = ["driver=quorum", "vote-threshold=1", "read-pattern=fifo"]
    for i, target in enumerate(targets):
        opts += [f"children.{i}.driver=raw", f"children.{i}.file.driver=nbd",
                 f"children.{i}.file.server.type=unix", f"children.{i}.file.server.path={target}"]
        if export:
            opts.append(f"children.{i}.file.export={export}")
    return serving(["qemu-nbd", "--image-opts", ",".join(opts), "-k", str(sock), "-t"], sock)


def fill(uri: str, size: int) -> None:
    """Write random data over the whole export with nbdcopy (so reads hit real data), synced."""
    src = Path(os.environ.get("TMPDIR", "/tmp")) / f"fill-{os.getpid()}.raw"
    with open(src, "wb") as f:
        for _ in range(0, size, 8 << 20):
            f.write(os.urandom(min(8 << 20, size - f.tell())))
    try:
        subprocess.run(["nbdcopy", "--no-extents", "--flush", str(src), uri], check=True,
                       capture_output=True)
    finally:
        src.unlink()
    # Let writeback of the fill finish now, not during the first measured job (the
    # baseline's fill is long written back by then, which made drove look slower).
    os.sync()


def qemu_io_script(uri: str, commands: list[str]) -> None:
    """Feed many qemu-io commands through one connection."""
    subprocess.run(["qemu-io", "-f", "raw", uri], input="\n".join(commands) + "\nquit\n",
                   check=True, capture_output=True, text=True)


def print_table(title: str, rows: list[tuple[str, Result, Result]], base_name: str,
                name: str = "drove") -> None:
    """Print ``name`` (drove) vs the baseline for each job with ratios.

    ``cpu`` is the server's CPU per I/O; ``all`` the whole machine's (fio and
    every process on the path); ``busy`` the share of the machine's CPUs in use.
    A side near 100% busy is bound by this machine's CPU count, not by latency.
    """
    print(f"\n{title}")
    side = (f"{'IOPS':>7} {'MiB/s':>6} {'mean us':>7} {'p99 us':>7} {'cpu':>6} {'all':>6} "
            f"{'busy':>4}")
    head = f"{'':22} {name:^{len(side)}} | {base_name:^{len(side)}} |"
    cols = f"{'job':22} {side} | {side} | {'ratio':>5}"
    print(head)
    print(cols)
    print("-" * len(cols))

    def figures(r: Result) -> str:
        return (f"{r.iops:7.0f} {r.mib_s:6.0f} {r.mean_us:7.0f} {r.p99_us:7.0f} {r.cpu_us:6.1f} "
                f"{r.all_us:6.1f} {r.busy:4.0%}")

    for job, d, b in rows:
        ratio = d.iops / b.iops if b.iops else float("nan")
        print(f"{job:22} {figures(d)} | {figures(b)} | {ratio:5.2f}")
    sys.stdout.flush()
