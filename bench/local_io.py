"""Inline on the event loop or in a worker thread: where the local replica's I/O should run.

    .venv/bin/python bench/local_io.py [--size 1G] [--dir /work/bench-tmp] [--ops 4000]

The engine serves its local replica's head by plain calls (drove.engine.local).
A request run inline blocks the loop for as long as the I/O takes; one sent to
a worker thread costs a hop there and back (and the GIL hand-over) but lets the
loop serve others meanwhile.  For each request size this prints the time one
inline pread / pwrite takes against a warm page cache, the time the same call
takes through ``run_in_executor`` (one at a time, and 16 in flight as the
engine sees them at iodepth 16), and the fdatasync of a head with dirty data.
The line to draw: inline where the I/O costs less than the hop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from drove.replica.chain import Replica
from drove.units import parse_size

SIZES = (4096, 65536, 262144, 1 << 20)


def _offsets(size: int, bs: int, n: int, seed: int = 1) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(size // bs) * bs for _ in range(n)]


def inline(replica: Replica, op: str, bs: int, offsets: list[int]) -> float:
    """Mean microseconds of one inline call."""
    data = memoryview(os.urandom(bs))
    start = time.perf_counter()
    for off in offsets:
        if op == "read":
            replica.read(off, bs)
        else:
            replica.write(off, data)
    return (time.perf_counter() - start) / len(offsets) * 1e6


async def threaded(replica: Replica, op: str, bs: int, offsets: list[int], depth: int) -> float:
    """Mean microseconds per call through run_in_executor with ``depth`` in flight."""
    loop = asyncio.get_running_loop()
    data = memoryview(os.urandom(bs))
    func = (lambda off: replica.read(off, bs)) if op == "read" else (
        lambda off: replica.write(off, data))
    start = time.perf_counter()
    for i in range(0, len(offsets), depth):
        await asyncio.gather(*(loop.run_in_executor(None, func, off)
                               for off in offsets[i:i + depth]))
    return (time.perf_counter() - start) / len(offsets) * 1e6


async def hop(n: int) -> float:
    """Mean microseconds of a no-op through run_in_executor: the price of the thread."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    for _ in range(n):
        await loop.run_in_executor(None, int)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--ops", type=int, default=4000)
    args = ap.parse_args()
    size = parse_size(args.size)
    scratch = Path(tempfile.mkdtemp(prefix="drove-localio-", dir=args.dir))
    try:
        replica = Replica.create(scratch / "r", size)
        chunk = memoryview(os.urandom(1 << 20))
        for off in range(0, size, 1 << 20):  # allocate and warm the page cache
            replica.write(off, chunk)
        replica.flush()
        print(f"thread hop alone (no-op): {asyncio.run(hop(args.ops)):.1f} us")
        print(f"{'op':6} {'size':>8} {'inline us':>10} {'thread us':>10} {'thread qd16 us':>15}")
        for op in ("read", "write"):
            for bs in SIZES:
                n = max(200, args.ops * 4096 // bs)
                offs = _offsets(size, bs, n)
                a = inline(replica, op, bs, offs)
                b = asyncio.run(threaded(replica, op, bs, offs, 1))
                c = asyncio.run(threaded(replica, op, bs, offs, 16))
                print(f"{op:6} {bs:>8} {a:>10.1f} {b:>10.1f} {c:>15.1f}")
        for dirty in (4096 * 16, 1 << 20, 16 << 20):
            data = memoryview(os.urandom(4096))
            for off in _offsets(size, 4096, dirty // 4096, seed=dirty):
                replica.write(off, data)
            start = time.perf_counter()
            replica.flush()
            print(f"fdatasync with {dirty >> 10} KiB dirty: "
                  f"{(time.perf_counter() - start) * 1e3:.2f} ms")
        replica.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
