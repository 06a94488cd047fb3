"""Online rebuild through the engine: add a fresh replica to a volume, time it to RW.

    .venv/bin/python bench/rebuild.py [--size 10G] [--patterns full,alternating] [--dir DIR]

For each pattern, a source replica holds one snapshot layer of SIZE (fully
written with random data, or 4 KiB data / 4 KiB hole alternating, written
straight into the layer file), an engine serves the volume from it, and
`POST /v1/replicas` adds an empty replica process.  The figure is MiB/s of
volume size from the request to the replica being RW (pause, snapshot,
prepare, pull, verify, generation bump).  Issue 3's targets: >= 300 MiB/s
fully written, >= 100 MiB/s alternating (Longhorn: 364 and 4.6 MiB/s).
The baseline is nbdcopy copying the same layer export to a file (--flush).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from drove.units import parse_size
from rebuild_sync import FILE, build_source  # also puts tests/ on sys.path

MiB = 1 << 20


def main() -> None:
    """Run each pattern and print MiB/s beside nbdcopy's."""
    from enginetools import start_engine
    from replicatools import kill_all, start_replica

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="10G")
    ap.add_argument("--patterns", default="full,alternating")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = parse_size(args.size)
    scratch = Path(tempfile.mkdtemp(prefix="drove-rebuild-", dir=args.dir))
    print(f"{'pattern':12} {'rebuild s':>9} {'MiB/s':>7} {'pause ms':>8} "
          f"{'nbdcopy s':>9} {'MiB/s':>7} {'ratio':>5}")
    try:
        for pattern in args.patterns.split(","):
            procs = []
            try:
                src_dir = scratch / f"{pattern}-src"
                build_source(src_dir, size, pattern)
                src = start_replica(src_dir, None)
                procs.append(src)
                eng = start_engine(scratch / f"{pattern}-engine", "vol", [src],
                                   "--log-level", "warning")
                procs.append(eng)
                t0 = time.perf_counter()
                nbdcopy_out = scratch / "copy.img"
                subprocess.run(["nbdcopy", "--flush", src.unix_uri(f"layer/{FILE}"),
                                str(nbdcopy_out)], check=True)
                base_s = time.perf_counter() - t0
                nbdcopy_out.unlink()
                tgt = start_replica(scratch / f"{pattern}-tgt", size)
                procs.append(tgt)
                t0 = time.perf_counter()
                eng.ok("POST", "/v1/replicas", json={"name": "new", "url": tgt.control})
                rb = eng.wait_rebuilt(timeout=3600)
                secs = time.perf_counter() - t0
                mib = size / MiB
                print(f"{pattern:12} {secs:9.1f} {mib / secs:7.0f} {rb['pause_ms']:8.1f} "
                      f"{base_s:9.1f} {mib / base_s:7.0f} {base_s / secs:5.2f}", flush=True)
            finally:
                for p in reversed(procs):
                    p.stop()
                kill_all(procs)
                for d in scratch.iterdir():
                    shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
