"""API latency of `volume list` with many volumes: the manager's state on etcd vs SQLite.

    .venv/bin/python bench/cluster_api.py [--volumes 1000] [--calls 50] [--workers 8]

Starts a single-member etcd on loopback and two `drove serve` processes, one with
``--store etcd://...`` and one with the default SQLite store, creates the same number of
volumes on each through the API (POST /v1/volumes: the smallest size, one replica;
nothing runs until a volume is attached), then times ``GET /v1/volumes`` (the call behind
`drove volume list`) ``--calls`` times on each and prints the median, the p95 and the
etcd/SQLite ratio. Also prints how long the creates took and each manager's RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from drove.agent.processes import rss_bytes
from etcd import EtcdServer  # tests/etcd.py: a real single-member etcd

MiB = 1 << 20


class Serve:
    """One `drove serve` on a loopback port of its own, with its API token."""

    def __init__(self, data_dir: Path, store: str | None) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True)
        argv = [sys.executable, "-m", "drove", "serve", "--data-dir", str(data_dir),
                "--listen", "127.0.0.1:0", "--log-level", "warning"]
        if store:
            argv += ["--store", store]
        with open(data_dir.parent / f"{data_dir.name}.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        info = data_dir / "manager.json"
        deadline = time.monotonic() + 60
        while not info.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"drove serve ({store or 'sqlite'}) did not start; see "
                                   f"{data_dir.parent / f'{data_dir.name}.log'}")
            time.sleep(0.05)  # poll interval while it starts
        self.url = json.loads(info.read_text())["url"]
        token = (data_dir / "token").read_text().strip()
        self.client = httpx.Client(base_url=self.url, timeout=120,
                                   headers={"Authorization": f"Bearer {token}"})

    def create(self, names: list[str], workers: int) -> float:
        """Create volumes ``names`` (1 MiB, one replica) with ``workers`` in parallel;
        seconds taken."""
        def one(name: str) -> None:
            r = self.client.post("/v1/volumes", json={"name": name, "size": MiB,
                                                      "replicas": 1})
            if r.status_code >= 300:
                raise RuntimeError(f"create {name}: {r.status_code} {r.text}")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, names))
        return time.perf_counter() - t0

    def time_list(self, calls: int, expect: int) -> list[float]:
        """Seconds taken by each of ``calls`` GET /v1/volumes (after one warm-up call)."""
        out = []
        for i in range(calls + 1):
            t0 = time.perf_counter()
            r = self.client.get("/v1/volumes")
            took = time.perf_counter() - t0
            r.raise_for_status()
            if len(r.json()) != expect:
                raise RuntimeError(f"listed {len(r.json())} volumes, expected {expect}")
            if i:
                out.append(took)
        return out

    def stop(self) -> None:
        """Stop the manager (SIGTERM, clean)."""
        self.client.close()
        self.proc.terminate()
        self.proc.wait(60)


def summary(samples: list[float]) -> tuple[float, float]:
    """(median, p95) in milliseconds."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p95 * 1000


def main() -> None:
    """Run the bench and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    names = [f"vol-{i:05d}" for i in range(args.volumes)]
    with tempfile.TemporaryDirectory(prefix="drove-cluster-api-") as tmp:
        root = Path(tmp)
        etcd = EtcdServer(root / "etcd").start()
        managers: dict[str, Serve] = {}
        try:
            managers["etcd"] = Serve(root / "m-etcd", etcd.url)
            managers["sqlite"] = Serve(root / "m-sqlite", None)
            results = {}
            for kind, m in managers.items():
                took = m.create(names, args.workers)
                print(f"{kind:6}: created {args.volumes} volumes in {took:.1f} s "
                      f"({args.volumes / took:.0f}/s, {args.workers} clients)")
            # Interleaved rounds, so a noisy moment hits both stores alike.
            samples: dict[str, list[float]] = {k: [] for k in managers}
            for _ in range(5):
                for kind, m in managers.items():
                    samples[kind] += m.time_list(max(1, args.calls // 5), args.volumes)
            for kind, m in managers.items():
                med, p95 = summary(samples[kind])
                results[kind] = med
                rss = (rss_bytes(m.proc.pid) or 0) / MiB
                print(f"{kind:6}: GET /v1/volumes ({args.volumes} volumes) median {med:.1f} ms"
                      f"  p95 {p95:.1f} ms  over {len(samples[kind])} calls;"
                      f"  manager RSS {rss:.0f} MiB")
            print(f"ratio etcd/sqlite (median): {results['etcd'] / results['sqlite']:.2f}")
        finally:
            for m in managers.values():
                m.stop()
            etcd.stop()


if __name__ == "__main__":
    main()
