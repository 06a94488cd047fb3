"""Resident memory (VmRSS) of idle replica and engine processes, before and after some I/O.

    .venv/bin/python bench/rss.py [--size 1G] [--replicas 1,3] [--writes 300] [--burst MIB]

Starts replicas and an engine over them (one volume per replica count), the
way the node agent does (``python -m drove ...``), and prints each process's
VmRSS (and its anonymous part) when idle after start, then after a few hundred
4 KiB writes, a 1 MiB write, reads, a flush and control API calls (/v1/info,
/v1/layers, /v1/stats, a snapshot), and again a few seconds later, once idle
memory has been handed back (``--burst N`` adds N MiB written and read in
1 MiB requests at qd16, as fio would).  The target is 40 MiB per idle process.
``--argv lean`` spawns ``python -m drove.replica`` / ``python -m drove.engine``
instead of ``python -m drove replica|engine serve``.

    .venv/bin/python bench/rss.py --burst 256     # after fio-like 1 MiB I/O too
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from drove.units import parse_size

MiB = 1 << 20


def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (KiB) of ``pid``."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def launch(argv: list[str], log: Path) -> tuple[subprocess.Popen, dict]:
    """Start ``argv`` and read its ready line."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"{argv[3:5]} did not start: {log.read_text()[-2000:]}")
    return proc, json.loads(line)


def replica_argv(mode: str, directory: Path, size: int) -> list[str]:
    """How to start a replica."""
    head = ([sys.executable, "-m", "drove.replica"] if mode == "lean"
            else [sys.executable, "-m", "drove", "replica", "serve"])
    return [*head, str(directory), "--size", str(size), "--nbd", "127.0.0.1:0",
            "--nbd-unix", str(directory.parent / f"{directory.name}.sock"),
            "--control", "127.0.0.1:0", "--log-level", "warning"]


def engine_argv(mode: str, tmp: Path, replicas: list[tuple[str, str]]) -> list[str]:
    """How to start an engine."""
    head = ([sys.executable, "-m", "drove.engine"] if mode == "lean"
            else [sys.executable, "-m", "drove", "engine", "serve"])
    argv = [*head, "vol", "--nbd", "127.0.0.1:0", "--nbd-unix", str(tmp / "vol.sock"),
            "--control", "127.0.0.1:0", "--state-file", str(tmp / "vol.state"),
            "--log-level", "warning"]
    for name, url in replicas:
        argv += ["--replica", f"{name}={url}"]
    return argv


def api(url: str, method: str = "GET", body: dict | None = None) -> object:
    """One control call."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


async def do_io(uri: str, size: int, writes: int, burst: int) -> None:
    """Small writes, a big one, reads, a flush; then ``burst`` MiB written and read at qd16."""
    from drove.nbd.client import connect_uri

    client = await connect_uri(uri)
    try:
        rnd = random.Random(1)
        block = os.urandom(4096)
        blocks = size // 4096
        sem = asyncio.Semaphore(16)

        async def one(off: int) -> None:
            async with sem:
                await client.write(off, block)

        await asyncio.gather(*(one(rnd.randrange(blocks) * 4096) for _ in range(writes)))
        big = os.urandom(MiB)
        await client.write(0, big)
        await client.read(0, MiB)
        for _ in range(64):
            await client.read(rnd.randrange(blocks) * 4096, 4096)
        await client.flush()

        async def big_io(off: int, write: bool) -> None:
            async with sem:
                if write:
                    await client.write(off, big)
                else:
                    await client.read(off, MiB)

        for write in (True, False):
            await asyncio.gather(*(big_io((i * MiB) % size, write) for i in range(burst)))
        await client.flush()
    finally:
        await client.close()


def calls(url: str, engine: bool) -> None:
    """A few control API calls of the kinds an operator or the manager makes."""
    for _ in range(5):
        api(url + "/v1/info")
    api(url + ("/v1/snapshots" if engine else "/v1/layers"))
    if engine:
        api(url + "/v1/stats")
        api(url + "/v1/events")
        api(url + "/v1/replicas")


def fmt(st: dict[str, int]) -> str:
    """'VmRSS (anon)' in MiB."""
    return f"{st['VmRSS'] / 1024:6.1f} ({st['RssAnon'] / 1024:5.1f})"


def main() -> None:
    """Start, measure, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--replicas", default="1,3")
    ap.add_argument("--writes", type=int, default=300, help="4 KiB writes")
    ap.add_argument("--burst", type=int, default=0,
                    help="then MiB written and read in 1 MiB requests at qd16 (like fio)")
    ap.add_argument("--argv", choices=("cli", "lean"), default="cli",
                    help="cli: python -m drove replica|engine serve; "
                         "lean: python -m drove.replica|drove.engine")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds idle before measuring")
    ap.add_argument("--later", type=float, default=6.0,
                    help="seconds after the I/O for the last measure (idle memory is trimmed "
                         "within ~4 s)")
    ap.add_argument("--dir", default=None, help="scratch directory")
    args = ap.parse_args()
    size = parse_size(args.size)
    scratch = Path(tempfile.mkdtemp(prefix="drove-rss-", dir=args.dir))
    limit = 40 * 1024
    worst = 0
    print(f"# VmRSS (RssAnon) MiB, argv={args.argv}, volume {args.size}, "
          f"{args.writes} x 4 KiB writes + 1 MiB write"
          + (f" + {args.burst} MiB written and read at qd16" if args.burst else "")
          + "; target < 40 MiB")
    print(f"{'process':<16} {'idle':>14} {'after I/O':>14} {f'{args.later:g} s later':>14} "
          f"{'peak (HWM)':>11}")
    try:
        for n in (int(x) for x in args.replicas.split(",")):
            procs: list[tuple[str, subprocess.Popen, dict]] = []
            tmp = scratch / f"v{n}"
            tmp.mkdir()
            try:
                for i in range(n):
                    p, ready = launch(replica_argv(args.argv, tmp / f"r{i}", size),
                                      tmp / f"r{i}.log")
                    procs.append((f"replica {i + 1}/{n}", p, ready))
                reps = [(f"r{i}", ready["control"]) for i, (_, _, ready) in enumerate(procs)]
                p, ready = launch(engine_argv(args.argv, tmp, reps), tmp / "engine.log")
                procs.append((f"engine ({n} rep)", p, ready))
                time.sleep(args.settle)
                idle = {name: status(p.pid) for name, p, _ in procs}
                asyncio.run(do_io(f"nbd+unix:///vol?socket={ready['nbd_unix']}", size,
                                  args.writes, args.burst))
                eng_url = ready["control"]
                calls(eng_url, True)
                api(eng_url + "/v1/snapshots", "POST", {"name": "s1"})
                for _, _, r in procs[:-1]:
                    calls(r["control"], False)
                after = {name: status(p.pid) for name, p, _ in procs}
                time.sleep(args.later)
                later = {name: status(p.pid) for name, p, _ in procs}
                for name, _, _ in procs:
                    # The target is for idle processes: at start and once the I/O is over.
                    worst = max(worst, idle[name]["VmRSS"], later[name]["VmRSS"])
                    print(f"{name:<16} {fmt(idle[name]):>14} {fmt(after[name]):>14} "
                          f"{fmt(later[name]):>14} {later[name]['VmHWM'] / 1024:>11.1f}")
            finally:
                for _, p, _ in reversed(procs):
                    p.terminate()
                for _, p, _ in procs:
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"# worst idle {worst / 1024:.1f} MiB: {'OK' if worst < limit else 'OVER'} the 40 MiB "
          "target ('after I/O' is measured at once, before idle memory is trimmed)")


if __name__ == "__main__":
    main()
