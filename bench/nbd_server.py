"""Benchmark the drove NBD server against ``nbdkit memory`` with fio's nbd engine.

Both servers serve a memory export of the same size; each fio workload runs
against drove and then nbdkit in the same invocation (the machines are noisy,
so only the ratio is meaningful), and the table prints IOPS, MiB/s and the
drove / nbdkit ratio.

    .venv/bin/python bench/nbd_server.py                 # all workloads, 10 s each
    .venv/bin/python bench/nbd_server.py --runtime 5 --only randrw-4k --repeat 3
    .venv/bin/python bench/nbd_server.py --transport unix --suspend
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from drove.units import parse_size
from fiobench import STANDARD_JOBS, Result, run_fio

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    """A running server: its NBD URI and process id."""

    uri: str
    pid: int


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_connectable(host: str, port: int | None, unix: str | None, timeout: float = 10) -> None:
    """Wait until the server answers a handshake (then abort it politely, no error logs)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if unix:
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(2)
                sock.connect(unix)
            else:
                sock = socket.create_connection((host, port), timeout=2)
            with sock:
                greeting = b""
                while len(greeting) < 18:
                    chunk = sock.recv(18 - len(greeting))
                    if not chunk:
                        raise ConnectionError("closed during the greeting")
                    greeting += chunk
                # Client flags (fixed newstyle, no zeroes), then NBD_OPT_ABORT.
                sock.sendall(struct.pack(">IQII", 3, 0x49484156454F5054, 2, 0))
                sock.recv(20)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def drove_server(size: str, transport: str, tmp: Path, extra: list[str]) -> Iterator[Server]:
    """Run ``python -m drove.nbd.memory`` (uvloop) and yield its NBD URI."""
    args = [sys.executable, "-m", "drove.nbd.memory", "--size", size, *extra]
    args += ["--unix", str(tmp / "drove.sock")] if transport == "unix" else ["--port", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        if transport == "unix":
            yield Server(f"nbd+unix:///?socket={info['unix']}", proc.pid)
        else:
            yield Server(f"nbd://{info['host']}:{info['port']}/", proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nbdkit_server(size: str, transport: str, tmp: Path, threads: int | None) -> Iterator[Server]:
    """Run ``nbdkit memory`` and yield its NBD URI."""
    args = ["nbdkit", "--foreground", "--exit-with-parent"]
    if threads:
        args += ["--threads", str(threads)]
    if transport == "unix":
        sock = str(tmp / "nbdkit.sock")
        args += ["--unix", sock]
        port = None
    else:
        sock = None
        port = free_port()
        args += ["--ipaddr", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*args, "memory", f"size={size}"])
    try:
        wait_connectable("127.0.0.1", port, sock)
        yield Server(
            f"nbd+unix:///?socket={sock}" if sock else f"nbd://127.0.0.1:{port}/", proc.pid
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runtime", type=float, default=10, help="seconds per fio run")
    parser.add_argument("--size", default="1G", help="export size")
    parser.add_argument("--iodepth", type=int, default=16)
    parser.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    parser.add_argument("--only", action="append", help="run only these workloads")
    parser.add_argument("--repeat", type=int, default=1, help="runs per workload (median shown)")
    parser.add_argument("--nbdkit-threads", type=int, help="nbdkit --threads (default: its own)")
    parser.add_argument(
        "--suspend",
        action="store_true",
        help="drove export yields once per request (measures the Task path)",
    )
    args = parser.parse_args()

    for tool in ("fio", "nbdkit"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    works = [replace(job, iodepth=args.iodepth) for job in STANDARD_JOBS
             if not args.only or job.key in args.only]
    size = parse_size(args.size)
    extra = ["--suspend"] if args.suspend else []
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    print(
        f"# python {platform.python_version()}, {loop}, {os.cpu_count()} CPUs, "
        f"{args.transport}, iodepth {args.iodepth}, {args.runtime:g} s per run, "
        f"export {args.size}{', suspending export' if args.suspend else ''}"
    )
    header = (
        f"{'workload':<14} {'drove IOPS':>11} {'MiB/s':>8} {'cpu us/IO':>9} "
        f"{'nbdkit IOPS':>12} {'MiB/s':>8} {'cpu us/IO':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="nbd-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with (
            drove_server(args.size, args.transport, tmp, extra) as drove,
            nbdkit_server(args.size, args.transport, tmp, args.nbdkit_threads) as nbdkit,
        ):
            for work in works:
                mine: list[Result] = []
                theirs: list[Result] = []
                for _ in range(args.repeat):
                    # Interleaved, so that drift hits both servers alike.
                    mine.append(run_fio(drove.uri, work, size, args.runtime, drove.pid))
                    theirs.append(run_fio(nbdkit.uri, work, size, args.runtime, nbdkit.pid))
                d = [
                    statistics.median(getattr(r, f) for r in mine)
                    for f in ("iops", "mib_s", "cpu_us")
                ]
                n = [
                    statistics.median(getattr(r, f) for r in theirs)
                    for f in ("iops", "mib_s", "cpu_us")
                ]
                ratio = d[0] / n[0] if n[0] else float("nan")
                print(
                    f"{work.key:<14} {d[0]:>11.0f} {d[1]:>8.1f} {d[2]:>9.1f} "
                    f"{n[0]:>12.0f} {n[1]:>8.1f} {n[2]:>9.1f} {ratio:>6.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
