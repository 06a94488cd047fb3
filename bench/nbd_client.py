"""drove's NBD client against libnbd, on one ``nbdkit memory`` server.

Runs each workload for N seconds with drove.nbd.client (under uvloop, as in
the engine), then with libnbd's Python bindings (aio_pread / aio_pwrite with
nbd.Buffer and a poll loop) in a subprocess of the system python, since the
venv has no libnbd module.  Both sides keep exactly ``qd`` requests in
flight at random block-aligned offsets and read into / write from
preallocated buffers.  Prints IOPS, MiB/s and client CPU per request (the
client process only; nbdkit runs in its own process) and drove/libnbd ratios.

    .venv/bin/python bench/nbd_client.py [--seconds 3] [--repeat 2] [--tcp] [--only 4k]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from drove.nbd.client import NbdClient, connect_uri
from drove.service import new_event_loop

SIZE = 1 << 30
WORKLOADS = [  # (name, op, block size, queue depth)
    ("4k randread qd1", "read", 4096, 1),
    ("4k randread qd16", "read", 4096, 16),
    ("4k randwrite qd1", "write", 4096, 1),
    ("4k randwrite qd16", "write", 4096, 16),
    ("1m randread qd4", "read", 1 << 20, 4),
    ("1m randwrite qd4", "write", 1 << 20, 4),
]

LIBNBD_SCRIPT = r"""
import json, random, sys, time
import nbd

uri, op, bs, qd, secs, size = sys.argv[1:7]
bs, qd, secs, size = int(bs), int(qd), float(secs), int(size)
h = nbd.NBD()
h.connect_uri(uri)
rng = random.Random(1)
blocks = size // bs
bufs = [
    nbd.Buffer.from_bytearray(bytearray(rng.randbytes(bs))) if op == "write" else nbd.Buffer(bs)
    for _ in range(qd)
]
done = []

def callback(i):
    def completed(*args):
        done.append(i)  # no libnbd call may be made from a callback
        return 1  # auto-retire the command
    return completed

callbacks = [callback(i) for i in range(qd)]
issue = h.aio_pread if op == "read" else h.aio_pwrite

def start(i):
    issue(bufs[i], rng.randrange(blocks) * bs, completion=callbacks[i])

count = 0
t0 = time.perf_counter()
c0 = time.process_time()
end = t0 + secs
for i in range(qd):
    start(i)
while True:
    h.poll(-1)
    now = time.perf_counter()
    while done:
        i = done.pop()
        count += 1
        if now < end:
            start(i)
    if now >= end and h.aio_in_flight() == 0:
        break
elapsed = time.perf_counter() - t0
cpu = time.process_time() - c0
h.shutdown()
print(json.dumps({"count": count, "elapsed": elapsed, "cpu": cpu}))
"""


async def drove_run(uri: str, op: str, bs: int, qd: int, secs: float) -> dict[str, float]:
    """``qd`` workers, each keeping one request in flight, for ``secs`` seconds."""
    client: NbdClient = await connect_uri(uri)
    rng = random.Random(1)
    blocks = SIZE // bs
    count = 0

    async def worker() -> None:
        nonlocal count
        buf = bytearray(rng.randbytes(bs)) if op == "write" else bytearray(bs)
        call = client.write if op == "write" else client.readinto
        while time.perf_counter() < end:
            await call(rng.randrange(blocks) * bs, buf)
            count += 1

    t0 = time.perf_counter()
    c0 = time.process_time()
    end = t0 + secs
    await asyncio.gather(*(worker() for _ in range(qd)))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await client.close()
    return {"count": count, "elapsed": elapsed, "cpu": cpu}


def libnbd_run(uri: str, op: str, bs: int, qd: int, secs: float) -> dict[str, float]:
    """The same workload with libnbd, in the system python."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        ["/usr/bin/python3", "-c", LIBNBD_SCRIPT, uri, op, str(bs), str(qd), str(secs),
         str(SIZE)],
        capture_output=True, text=True, check=True, env=env, timeout=secs + 60,
    )
    return json.loads(out.stdout)


async def prefill(uri: str) -> None:
    """Allocate the whole export so reads find data, as on a used replica."""
    client = await connect_uri(uri)
    chunk = os.urandom(1 << 20)
    sem = asyncio.Semaphore(16)

    async def one(offset: int) -> None:
        async with sem:
            await client.write(offset, chunk)

    await asyncio.gather(*(one(o) for o in range(0, SIZE, 1 << 20)))
    await client.close()


def start_nbdkit(directory: Path, tcp: bool) -> tuple[subprocess.Popen[bytes], str]:
    """``nbdkit memory 1G``; returns the process and its URI."""
    pidfile = directory / "nbdkit.pid"
    if tcp:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        where = ["-p", str(port), "-i", "127.0.0.1"]
        uri = f"nbd://127.0.0.1:{port}/"
    else:
        sock = directory / "nbdkit.sock"
        where = ["-U", str(sock)]
        uri = f"nbd+unix:///?socket={sock}"
    proc = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", *where, "-P", str(pidfile), "memory", str(SIZE)]
    )
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("nbdkit did not start")
        time.sleep(0.01)
    return proc, uri


def main() -> None:
    """Run every workload on both clients and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per workload and client")
    parser.add_argument("--tcp", action="store_true", help="TCP on 127.0.0.1 (default: unix)")
    parser.add_argument("--only", default="", help="run workloads whose name contains this")
    parser.add_argument("--repeat", type=int, default=2,
                        help="alternate the clients this often, keep each one's best run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="nbd-client-bench-") as tmp:
        proc, uri = start_nbdkit(Path(tmp), args.tcp)
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(prefill(uri))
                print(f"nbdkit memory 1G at {uri}, {args.seconds:g} s per run")
                header = (f"{'workload':<20}{'drove IOPS':>11}{'MiB/s':>8}{'us cpu':>8}"
                          f"{'libnbd IOPS':>13}{'MiB/s':>8}{'us cpu':>8}"
                          f"{'IOPS ratio':>12}{'cpu ratio':>11}")
                print(header)
                print("-" * len(header))
                for name, op, bs, qd in WORKLOADS:
                    if args.only not in name:
                        continue
                    # Alternating runs and keeping the best of each damps the noise
                    # of a shared machine (it only ever makes a run slower).
                    best: list[tuple[float, float, float]] = [(0, 0, 0), (0, 0, 0)]
                    for _ in range(args.repeat):
                        ours = runner.run(drove_run(uri, op, bs, qd, args.seconds))
                        theirs = libnbd_run(uri, op, bs, qd, args.seconds)
                        for side, r in enumerate((ours, theirs)):
                            iops = r["count"] / r["elapsed"]
                            row = (iops, iops * bs / (1 << 20), r["cpu"] / r["count"] * 1e6)
                            best[side] = max(best[side], row)
                    rows = best
                    print(
                        f"{name:<20}{rows[0][0]:>11.0f}{rows[0][1]:>8.1f}{rows[0][2]:>8.1f}"
                        f"{rows[1][0]:>13.0f}{rows[1][1]:>8.1f}{rows[1][2]:>8.1f}"
                        f"{rows[0][0] / rows[1][0]:>12.2f}{rows[0][2] / rows[1][2]:>11.2f}",
                        flush=True,
                    )
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
