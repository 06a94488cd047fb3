"""How fast an agent acts on a change recorded in the store: heartbeat answer vs long-poll.

    .venv/bin/python bench/agent_watch.py [--rounds 10] [--before COMMIT]

Runs the same scenario for the code at ``--before`` (default: the commit before the
agents' long-poll, unpacked with `git archive`; its agents learn what to stop from the
answer to their heartbeat, sent every second) and for this tree (the long-poll), in one
invocation, on one single-member etcd: one `drove serve --store etcd://... --no-agent` and
one `drove agent` (node n2). Each round attaches a one-replica volume on n2, then records
in etcd what a takeover records for the old engine (the volume's epoch raised, as a
manager writes it) and times how long until n2's agent starts to stop that engine (the
time of its log line) and until the process is gone (the stop itself, SIGTERM to exit,
is in both variants alike). Prints the median, p95 and max per variant and the ratio of
the medians of the first.

Also prints etcd's committed proposals (writes) and ranges (reads) per second over
``--idle`` seconds with the volume attached and nothing else happening (one manager, one
node, one engine): what heartbeats and the manager's own liveness cost the store.

On SQLite (this tree only: a manager of its own, no agent process) it times how long a
waiting long-poll takes to answer after a change recorded through the API (a volume
created while the poll names an engine of it: one of a detached volume must stop).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from drove.cluster.etcdstore import EtcdStore
from drove.manager.store import ConflictError
from etcd import EtcdServer  # tests/etcd.py: a real single-member etcd

BEFORE = "0b447e7"
"""The last commit whose agents learn what to stop only from their heartbeat's answer."""


def wait(predicate, timeout: float, what: str, every: float = 0.005):
    """Poll ``predicate`` until it is true (its value) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)  # poll interval of the measurement


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Variant:
    """One manager and one agent running the code of ``src`` (None: this tree)."""

    def __init__(self, name: str, root: Path, etcd: EtcdServer, src: Path | None) -> None:
        self.name = name
        self.env = {**os.environ}
        if src is not None:
            self.env["PYTHONPATH"] = str(src)
        self.prefix = f"/bench-{name}"
        self.procs: list[subprocess.Popen[bytes]] = []
        mdir = root / f"{name}-manager"
        self._spawn(root / f"{name}-manager.log", "serve", "--data-dir", str(mdir),
                    "--listen", "127.0.0.1:0", "--store", etcd.url + self.prefix,
                    "--no-agent", "--log-level", "warning")
        wait(lambda: (mdir / "manager.json").exists(), 60, f"{name}'s manager", 0.05)
        self.url = json.loads((mdir / "manager.json").read_text())["url"]
        token = (mdir / "token").read_text().strip()
        self.api = httpx.Client(base_url=self.url, timeout=120,
                                headers={"Authorization": f"Bearer {token}"})
        wait(lambda: self.api.get("/v1/cluster").json().get("leader"), 30, "a leader", 0.05)
        self.agent_log = root / f"{name}-agent.log"
        self._spawn(self.agent_log, "agent", "--manager", self.url, "--node", "n2",
                    "--listen", "127.0.0.2:0", "--data-dir", str(root / f"{name}-n2"),
                    "--token-file", str(mdir / "cluster-token"), "--log-level", "warning")
        wait(self._disk_ready, 60, f"{name}'s node n2", 0.05)
        self.store = EtcdStore(etcd.endpoints, self.prefix)

    def _spawn(self, log: Path, *args: str) -> None:
        with open(log, "ab") as out:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "drove", *args],
                                               stdout=out, stderr=out, env=self.env,
                                               stdin=subprocess.DEVNULL))

    def _disk_ready(self) -> bool:
        nodes = {n["name"]: n for n in self.api.get("/v1/nodes").json()}
        return any(d["state"] == "ready" for d in nodes.get("n2", {}).get("disks", []))

    def ok(self, method: str, path: str, **kwargs) -> dict:
        """An API call that must succeed; its JSON."""
        r = self.api.request(method, path, **kwargs)
        if r.status_code >= 300:
            raise RuntimeError(f"{self.name}: {method} {path}: {r.status_code} {r.text}")
        return r.json()

    def round(self) -> tuple[float, float]:
        """Attach on n2, raise the epoch in etcd; seconds until n2's agent started to stop
        the engine (its log line), and until the engine was gone."""
        a = self.ok("POST", "/v1/volumes/v/attach", json={"node": "n2"})
        pid = a["engine"]["pid"]
        while True:
            doc = self.store.get("volumes", "v")
            assert doc is not None
            version = doc.pop("_version")
            doc["epoch"] = int(doc["epoch"]) + 1
            try:
                self.store.put("volumes", "v", doc, expect_version=version)
                break
            except ConflictError:
                continue  # the manager wrote it meanwhile: raise the epoch it wrote
        t0, wall = time.perf_counter(), time.time()
        wait(lambda: not alive(pid), 30, f"{self.name}: the agent to stop the engine")
        took = time.perf_counter() - t0
        self.ok("POST", "/v1/volumes/v/detach", json={"force": True})
        return self._stop_logged(pid) - wall, took

    def _stop_logged(self, pid: int) -> float:
        """When the agent logged that it stops engine ``pid`` (its log's wall-clock time)."""
        for line in reversed(self.agent_log.read_text().splitlines()):
            if "stopping the engine of volume v" in line and f"pid {pid})" in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp()
        raise RuntimeError(f"{self.name}: the agent did not log the stop of {pid}")

    def stop(self) -> None:
        """Detach the volume (an engine outlives its agent, by design: left attached it
        would run on after the bench), then stop the agent and the manager."""
        with contextlib.suppress(httpx.HTTPError):
            self.api.post("/v1/volumes/v/detach", json={"force": True})
        self.api.close()
        self.store.close()
        for p in reversed(self.procs):
            p.terminate()
            p.wait(60)


def sqlite_poll_latency(root: Path, rounds: int) -> list[float]:
    """Seconds from a volume's creation (the API's answer) to the answer of a long-poll
    naming an engine of it, on a SQLite manager."""
    data = root / "sqlite-manager"
    proc = subprocess.Popen([sys.executable, "-m", "drove", "serve", "--data-dir", str(data),
                             "--listen", "127.0.0.1:0", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        wait(lambda: (data / "manager.json").exists(), 60, "the SQLite manager", 0.05)
        url = json.loads((data / "manager.json").read_text())["url"]
        api = httpx.Client(base_url=url, timeout=60, headers={
            "Authorization": f"Bearer {(data / 'token').read_text().strip()}"})
        agents = httpx.Client(base_url=url, timeout=60, headers={
            "Authorization": f"Bearer {(data / 'cluster-token').read_text().strip()}"})
        agents.post("/v1/cluster/heartbeat", json={
            "id": "bench", "name": "n2", "address": "127.0.0.2",
            "agent_url": "http://127.0.0.2:1"}).raise_for_status()
        out = []
        with ThreadPoolExecutor(1) as pool:
            for i in range(rounds):
                since = agents.get("/v1/agents/n2/changes").json()["revision"]
                answered: list[float] = []

                def long_poll(name: str = f"v{i}", since: int = since,
                              answered: list[float] = answered) -> None:
                    r = agents.get("/v1/agents/n2/changes", params={
                        "since": since, "timeout": 30, "engines": f"{name}@1"})
                    answered.append(time.perf_counter())
                    if not r.json()["stop_engines"]:
                        raise RuntimeError(f"the long-poll named nothing: {r.text}")

                waiting = pool.submit(long_poll)
                time.sleep(0.2)  # the poll is waiting by now (it answers only on a change)
                api.post("/v1/volumes", json={"name": f"v{i}", "size": "1M",
                                              "replicas": 1}).raise_for_status()
                created = time.perf_counter()
                waiting.result(60)
                out.append(max(0.0, answered[0] - created))
        api.close()
        agents.close()
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def etcd_counters(etcd: EtcdServer) -> tuple[float, float]:
    """(committed proposals, ranges) etcd counted so far."""
    text = httpx.get(f"http://127.0.0.1:{etcd.client_port}/metrics", timeout=10).text
    found = {}
    for name in ("etcd_server_proposals_committed_total", "etcd_mvcc_range_total"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        found[name] = float(m.group(1)) if m else 0.0
    return found["etcd_server_proposals_committed_total"], found["etcd_mvcc_range_total"]


def summary(samples: list[float]) -> str:
    """Median, p95 and max in milliseconds."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"median {statistics.median(ordered) * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms  "
            f"max {ordered[-1] * 1000:7.1f} ms")


def main() -> None:
    """Run the bench and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--before", default=BEFORE)
    ap.add_argument("--sqlite-only", action="store_true", help="only the SQLite figure")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="drove-agent-watch-") as tmp:
        root = Path(tmp)
        old = root / "before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(repo), "archive", args.before, "src"],
                                 check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(old, filter="data")
        if args.sqlite_only:
            samples = sqlite_poll_latency(root, args.rounds)
            print(f"sqlite: volume created (API answer) -> waiting long-poll answered: "
                  f"{summary(samples)} over {len(samples)} rounds")
            return
        etcd = EtcdServer(root / "etcd").start()
        medians = {}
        try:
            for name, src in (("before", old / "src"), ("after", None)):
                v = Variant(name, root, etcd, src)
                try:
                    v.ok("POST", "/v1/volumes", json={"name": "v", "size": "16M",
                                                      "replicas": 1})
                    rounds = [v.round() for _ in range(args.rounds)]
                    learned, gone = [r[0] for r in rounds], [r[1] for r in rounds]
                    medians[name] = statistics.median(learned)
                    print(f"{name:6}: change recorded -> the agent stops the engine: "
                          f"{summary(learned)}", flush=True)
                    print(f"{name:6}: change recorded -> the engine is gone:         "
                          f"{summary(gone)} over {len(rounds)} rounds", flush=True)
                    v.ok("POST", "/v1/volumes/v/attach", json={"node": "n2"})
                    w0, r0 = etcd_counters(etcd)
                    time.sleep(args.idle)  # the measurement window
                    w1, r1 = etcd_counters(etcd)
                    print(f"{name:6}: idle, 1 node with 1 engine, 1 manager: etcd writes "
                          f"{(w1 - w0) / args.idle:.2f}/s, reads {(r1 - r0) / args.idle:.2f}/s",
                          flush=True)
                finally:
                    v.stop()
            print(f"ratio before/after (median): {medians['before'] / medians['after']:.1f}")
            samples = sqlite_poll_latency(root, args.rounds)
            print(f"sqlite: volume created (API answer) -> waiting long-poll answered: "
                  f"{summary(samples)} over {len(samples)} rounds")
        finally:
            etcd.stop()


if __name__ == "__main__":
    main()
