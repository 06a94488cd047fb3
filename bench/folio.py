"""Why the replica writes big requests in 64 KiB pieces: 4 KiB overwrites vs folio size.

    .venv/bin/python bench/folio.py [--size 1G] [--dir DIR] [--pieces 1024,256,64,16]

For each piece size, a file on DIR's file system is written whole in pieces of
that size (as the replica head is by a restore, a copy-in or a fill), synced,
then overwritten at random 4 KiB offsets.  The kernel caches the file in folios
as large as the writes that created them; since Linux 6.16 ext4 uses large
folios, and a small write into a large folio costs CPU in proportion to the
folio's size.  Printed: CPU for the bulk write and per 4 KiB overwrite and
read, and the ratio against writing whole 1 MiB requests (what nbdkit's file
plugin and a replica without pieces do).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from drove.units import parse_size

MIB = 1 << 20


def measure(path: Path, size: int, piece: int, samples: int) -> tuple[float, float, float]:
    """(bulk write CPU s/GiB, 4 KiB overwrite CPU us, 4 KiB read CPU us) for ``piece``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, size)
        block = memoryview(os.urandom(MIB))
        t = time.process_time()
        for off in range(0, size, MIB):
            for p in range(0, MIB, piece):
                os.pwrite(fd, block[p:p + piece], off + p)
        bulk = (time.process_time() - t) / (size / (1 << 30))
        os.fsync(fd)
        os.sync()
        small = os.urandom(4096)
        offsets = [random.randrange(size // 4096) * 4096 for _ in range(samples)]
        t = time.process_time()
        for off in offsets:
            os.pwrite(fd, small, off)
        write_us = (time.process_time() - t) / samples * 1e6
        t = time.process_time()
        for off in offsets:
            os.pread(fd, 4096, off)
        read_us = (time.process_time() - t) / samples * 1e6
        return bulk, write_us, read_us
    finally:
        os.close(fd)
        path.unlink()


def main() -> None:
    """Print one row per piece size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=None, help="directory on the file system to measure")
    ap.add_argument("--pieces", default="1024,256,64,16", help="piece sizes in KiB")
    ap.add_argument("--samples", type=int, default=100_000)
    args = ap.parse_args()
    size = parse_size(args.size)
    print(f"kernel {os.uname().release}; {args.size} file in {args.dir or tempfile.gettempdir()}")
    print(f"{'piece':>7} {'bulk CPU s/GiB':>15} {'4k overwrite us':>16} {'4k read us':>11} "
          f"{'overwrite ratio':>16}")
    base = None
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for kib in (int(x) for x in args.pieces.split(",")):
            bulk, w, r = measure(Path(d) / "f", size, kib * 1024, args.samples)
            base = base or w
            print(f"{kib:>6}K {bulk:15.2f} {w:16.2f} {r:11.2f} {w / base:16.2f}")


if __name__ == "__main__":
    main()
