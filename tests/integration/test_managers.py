"""Several managers on one real etcd: one leads, the others forward to it and take over.

Real `drove serve --store etcd://... --no-agent` processes and real `drove agent`s on
loopback addresses of their own (127.0.0.x stands in for another host's address; the
cluster end-to-end test puts them in network namespaces), a real etcd, and nbdsh doing
I/O through a volume's engine while the leader is killed.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_agent import AgentProc

from backuptools import wait_for
from etcd import EtcdServer
from managertools import ManagerProc
from nbdtools import have, tool_env

pytestmark = pytest.mark.skipif(not have("nbdsh"), reason="needs nbdsh")


class ClusterManager:
    """One `drove serve --store etcd://...` process (``--no-agent`` unless ``args`` given)."""

    def __init__(self, root: Path, name: str, store: str,
                 args: tuple[str, ...] = ("--no-agent",)) -> None:
        self.data_dir = root / name
        self.log = root / f"{name}.log"
        self.store = store
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 60) -> ClusterManager:
        """Start it on a free port; wait until it serves."""
        return self.launch().ready(timeout)

    def launch(self) -> ClusterManager:
        """Start the process (``ready`` waits for it)."""
        (self.data_dir / "manager.json").unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "drove", "serve", "--data-dir", str(self.data_dir),
                 "--listen", "127.0.0.1:0", "--store", self.store, *self.args],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        return self

    def ready(self, timeout: float = 60) -> ClusterManager:
        """Wait until it serves."""
        assert self.proc is not None
        info = self.data_dir / "manager.json"
        wait_for(lambda: info.exists() or self.proc.poll() is not None, timeout,
                 f"{self.data_dir.name} to serve")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        self.url = json.loads(info.read_text())["url"]
        return self

    @property
    def token(self) -> str:
        """The API token in its data directory."""
        return (self.data_dir / "token").read_text().strip()

    @property
    def cluster_token(self) -> str:
        """The cluster token in its data directory."""
        return (self.data_dir / "cluster-token").read_text().strip()

    def api(self, method: str, path: str, *, token: str | None = None,
            **kwargs: Any) -> httpx.Response:
        """One API call (with the API token unless ``token`` is given)."""
        return httpx.request(method, self.url + path, timeout=120,
                             headers={"Authorization": f"Bearer {token or self.token}"},
                             **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        """An API call that must succeed; its JSON."""
        r = self.api(method, path, **kwargs)
        assert r.status_code < 300, f"{method} {path} on {self.url}: {r.status_code} {r.text}"
        return r.json()

    def cluster(self) -> dict[str, Any]:
        """GET /v1/cluster."""
        return self.ok("GET", "/v1/cluster")

    def kill(self) -> None:
        """SIGKILL it: no goodbye, no lease revoked."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def cleanup(tmp_path: Path):
    """Every process whose command line names a path under tmp_path is killed at the end."""
    yield
    ManagerProc(tmp_path / "none", tmp_path / "none.log", root=tmp_path).kill_everything()


def leader_of(m: ClusterManager) -> str | None:
    """The leader as ``m`` says."""
    return m.cluster()["leader"]


WRITER = """
import os, time
h.connect_uri({uri!r})
stop, out = {stop!r}, {out!r}
size = h.get_size()
block = 65536
n = 0
last = time.monotonic()
worst = 0.0
while not os.path.exists(stop):
    off = (n * block) % size
    data = (b"%08d" % n) * (block // 8)
    h.pwrite(data, off)
    h.flush()
    assert h.pread(block, off) == data, f"block {{n}} read back wrong"
    now = time.monotonic()
    worst, last = max(worst, now - last), now
    n += 1
    with open(out + ".tmp", "w") as f:
        f.write(f"{{n}} {{worst:.3f}}")
    os.replace(out + ".tmp", out)  # whole for the reader, never half written
"""


class Writer:
    """nbdsh writing, flushing and reading back 64 KiB blocks until told to stop."""

    def __init__(self, uri: str, root: Path) -> None:
        self.stop_file, self.progress = root / "writer.stop", root / "writer.progress"
        script = WRITER.format(uri=uri, stop=str(self.stop_file), out=str(self.progress))
        self.proc = subprocess.Popen(["nbdsh", "-c", script], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=tool_env())

    def count(self) -> int:
        """Blocks written and verified so far."""
        text = self.progress.read_text() if self.progress.exists() else ""
        return int(text.split()[0]) if text else 0

    def finish(self) -> tuple[int, float]:
        """Stop it; (blocks written and verified, the longest wait for one) — it must not
        have failed."""
        self.stop_file.touch()
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, f"nbdsh writer failed: {out.decode()[-2000:]}"
        n, worst = self.progress.read_text().split()
        return int(n), float(worst)


def test_two_managers_one_leads_the_follower_forwards_and_takes_over(
        tmp_path: Path, etcd_server: EtcdServer, cleanup: None) -> None:
    store = etcd_server.url + "/managers-test"
    m1 = ClusterManager(tmp_path, "m1", store).start()
    m2 = ClusterManager(tmp_path, "m2", store).start()
    managers = {m1.url: m1, m2.url: m2}
    wait_for(lambda: leader_of(m1) is not None, 15, "a leader")
    status = m2.cluster()
    leader, follower = managers[status["leader"]], managers[
        next(u for u in managers if u != status["leader"])]
    assert status["store"] == "etcd" and status["self"] == m2.url and status["since"]
    assert {m["url"]: (m["state"], m["leader"]) for m in status["managers"]} == {
        leader.url: ("up", True), follower.url: ("up", False)}
    assert leader_of(follower) == leader.url  # both see the same one

    # Agents heartbeat to either manager: n1 to the follower first, n2 to the leader first.
    token_file = follower.data_dir / "cluster-token"
    n1 = AgentProc([follower, leader], "n1", tmp_path / "n1", "127.0.0.2",
                   token_file=token_file)
    n2 = AgentProc([leader, follower], "n2", tmp_path / "n2", "127.0.0.3",
                   token_file=token_file)
    assert n1.info["registered"] and n1.info["manager"] == follower.url
    assert n2.info["registered"] and n2.info["manager"] == leader.url

    def nodes_up(m: ClusterManager) -> bool:
        nodes = {n["name"]: n for n in m.ok("GET", "/v1/nodes")}
        return all(nodes.get(x, {}).get("state") == "up" and
                   any(d["state"] == "ready" for d in nodes[x]["disks"]) for x in ("n1", "n2"))

    wait_for(lambda: nodes_up(follower) and nodes_up(leader), 20, "n1 and n2 up and ready")

    # A write through the follower: forwarded to the leader, which does it.
    r = follower.api("POST", "/v1/volumes", json={"name": "v1", "size": "64M", "replicas": 2})
    assert r.status_code == 201, r.text
    assert r.headers["x-drove-leader"] == leader.url
    assert {x["node"] for x in r.json()["replicas"]} == {"n1", "n2"}
    r = follower.api("POST", "/v1/volumes/v1/attach", json={"node": "n1"})
    assert r.status_code == 200 and r.json()["state"] == "attached", r.text
    assert r.headers["x-drove-leader"] == leader.url
    # A read of the leader's own state (the engine's report) is forwarded too.
    v = wait_for(lambda: (lambda v: v if v["health"] == "healthy" else None)(
        follower.ok("GET", "/v1/volumes/v1")), 30, "v1 healthy")
    assert v["nbd_uri"]
    # A request another manager forwarded is not forwarded again (no ping-pong while two
    # managers disagree on the leader for a moment).
    r = httpx.post(follower.url + "/v1/volumes", json={"name": "vx", "size": "1M"},
                   headers={"Authorization": f"Bearer {follower.token}",
                            "X-Drove-Forwarded-By": leader.url}, timeout=30)
    assert r.status_code == 503 and "does not lead" in r.json()["detail"]
    assert r.headers["retry-after"] == "1"  # nothing was done: the CLI sends it again
    # A follower refuses nothing it should forward: errors come back as the leader said.
    r = follower.api("POST", "/v1/volumes", json={"name": "v1", "size": "64M"})
    assert r.status_code == 409 and "exists" in r.json()["detail"]

    writer = Writer(v["nbd_uri"], tmp_path)
    wait_for(lambda: writer.count() > 20, 30, "the writer to get going")

    # kill -9 the leader: the follower leads within 10 s, the volume keeps serving.
    leader.kill()
    t0 = time.monotonic()
    before = writer.count()
    wait_for(lambda: leader_of(follower) == follower.url, 15, "the follower to lead")
    took = time.monotonic() - t0
    print(f"\ntakeover after kill -9 of the leader: {took:.2f} s")
    assert took < 10
    assert writer.count() > before  # I/O went on while nobody led

    # The new leader answers the API: the volume is attached and healthy, adopted as it ran.
    v = wait_for(lambda: (lambda v: v if v["health"] == "healthy" else None)(
        follower.ok("GET", "/v1/volumes/v1")), 30, "v1 healthy under the new leader")
    assert v["state"] == "attached" and v["node"] == "n1"
    events = follower.ok("GET", "/v1/events", params={"limit": 1000})
    kinds = [e["kind"] for e in events]
    assert any(e["kind"] == "manager-leads" and f"after {leader.url}" in e["message"]
               and follower.url in e["message"] for e in events)
    adopted = [e for e in events if e["kind"] == "volume-adopted"]
    assert len(adopted) >= 1, kinds
    assert "engine-failed" not in kinds and "attach-failed" not in kinds
    status = follower.cluster()
    assert status["leader"] == follower.url and status["since"]
    # The CLI, given both managers (the dead one first), finds the one that answers.
    env = {**os.environ, "DROVE_URL": f"{leader.url},{follower.url}",
           "DROVE_TOKEN": follower.token}
    env.pop("DROVE_DATA_DIR", None)
    cli = [sys.executable, "-m", "drove", "cluster", "status"]
    shown = json.loads(subprocess.run([*cli, "--json"], env=env, capture_output=True,
                                      text=True, timeout=60, check=True).stdout)
    assert shown["leader"] == follower.url
    assert {m["url"]: m["leader"] for m in shown["managers"]} == {
        leader.url: False, follower.url: True}
    text = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout
    assert f"leader: {follower.url} since {shown['since']}" in " ".join(text.split())
    # Work goes on: a new volume, and n2 (whose leader died) heartbeats to the survivor.
    follower.ok("POST", "/v1/volumes", json={"name": "v2", "size": "16M", "replicas": 1})
    wait_for(lambda: nodes_up(follower), 10, "n1 and n2 still up")
    assert "node-down" not in [e["kind"] for e in follower.ok("GET", "/v1/events",
                                                              params={"limit": 1000})]
    mid = writer.count()
    wait_for(lambda: writer.count() > mid + 20, 30, "I/O after the handover")
    n, worst = writer.finish()
    print(f"I/O through the handover: {n} blocks written and verified, longest wait "
          f"{worst:.3f} s")
    # The dead manager is listed down once its document is older than 10 s.
    wait_for(lambda: {m["url"]: m["state"] for m in follower.cluster()["managers"]} == {
        leader.url: "down", follower.url: "up"}, 20, "the dead manager listed down")


def test_tokens_are_shared_through_etcd_and_each_opens_only_its_door(
        tmp_path: Path, etcd_server: EtcdServer, cleanup: None) -> None:
    store = etcd_server.url
    # Two managers starting at once agree on both tokens.
    m1, m2 = ClusterManager(tmp_path, "m1", store), ClusterManager(tmp_path, "m2", store)
    for m in (m1, m2):
        m.launch()
    for m in (m1, m2):
        m.ready()
    assert m1.token == m2.token and m1.cluster_token == m2.cluster_token
    assert m1.token != m1.cluster_token and len(m1.cluster_token) >= 32
    for m in (m1, m2):
        for name in ("token", "cluster-token"):
            assert stat.S_IMODE((m.data_dir / name).stat().st_mode) == 0o600
    agent = AgentProc(m2, "n1", tmp_path / "n1", "127.0.0.2")
    assert agent.info["registered"]

    # The cluster token does not open the user API (on the leader or a follower). A
    # follower forwards what it does not serve, so wait for the election to be over first.
    wait_for(lambda: leader_of(m1) is not None and leader_of(m2) == leader_of(m1), 20,
             "a leader both managers know")
    for m in (m1, m2):
        r = m.api("GET", "/v1/volumes", token=m.cluster_token)
        assert r.status_code == 403 and "cluster token" in r.json()["detail"]
        r = m.api("POST", "/v1/volumes", token=m.cluster_token,
                  json={"name": "x", "size": "1M"})
        assert r.status_code == 403
    # The API token does not open the cluster endpoints, nor the agent's API.
    beat = {"id": "x", "name": "intruder", "address": "127.0.0.9",
            "agent_url": "http://127.0.0.9:1"}
    r = m1.api("POST", "/v1/cluster/heartbeat", token=m1.token, json=beat)
    assert r.status_code == 403 and "cluster token" in r.json()["detail"]
    r = m1.api("POST", "/v1/cluster/heartbeat", token="nonsense", json=beat)
    assert r.status_code == 401
    r = httpx.post(agent.info["agent_url"] + "/v1/processes/alive", json={"proc": None},
                   headers={"Authorization": f"Bearer {m1.token}"})
    assert r.status_code == 401 and "cluster token" in r.text
    r = httpx.post(agent.info["agent_url"] + "/v1/processes/alive", json={"proc": None},
                   headers={"Authorization": f"Bearer {m1.cluster_token}"})
    assert r.status_code == 200
    assert "intruder" not in {n["name"] for n in m1.ok("GET", "/v1/nodes")}

    # A leader stopped cleanly hands over at once (its lease revoked, not left to expire);
    # restarted, it keeps the tokens.
    leader, other = (m1, m2) if leader_of(m1) == m1.url else (m2, m1)
    leader.proc.terminate()
    leader.proc.wait(60)
    t0 = time.monotonic()
    wait_for(lambda: leader_of(other) == other.url, 10, "the other manager to lead")
    took = time.monotonic() - t0
    print(f"\ntakeover after a clean stop of the leader: {took:.2f} s")
    assert took < 3  # one campaign round (ttl / 3), no lease to wait out
    leader.start()
    assert leader.token == other.token and leader.cluster_token == other.cluster_token
    r = subprocess.run([sys.executable, "-m", "drove", "serve", "--data-dir",
                        str(tmp_path / "lone"), "--listen", "127.0.0.1:0", "--no-agent"],
                       capture_output=True, text=True, timeout=60)
    said = " ".join((r.stderr + r.stdout).split())
    assert r.returncode != 0 and "--no-agent is for a manager in a cluster" in said
    assert not (tmp_path / "lone").exists()  # refused before anything was made
    for args, says in [(("--listen", "0.0.0.0:0"), "--listen 0.0.0.0 is every address"),
                       (("--node", "Bad Name"), "give another --node"),
                       (("--agent-listen", "0.0.0.0:0"), "--agent-listen 0.0.0.0 is every")]:
        r = subprocess.run([sys.executable, "-m", "drove", "serve", "--data-dir",
                            str(tmp_path / "lone"), "--listen", "127.0.0.1:0", "--store", store,
                            *args], capture_output=True, text=True, timeout=60)
        said = " ".join((r.stderr + r.stdout).split())
        assert r.returncode != 0 and says in said, (args, said)
        assert not (tmp_path / "lone").exists()


def test_managers_with_their_own_nodes_stop_and_die_without_touching_volumes(
        tmp_path: Path, etcd_server: EtcdServer, cleanup: None) -> None:
    """Without --no-agent each manager serves its node's agent like `drove agent`: every
    manager reaches every node, and a manager stopped or killed leaves volumes serving."""
    store = etcd_server.url
    m1 = ClusterManager(tmp_path, "m1", store, ("--node", "h1", "--agent-listen",
                                                "127.0.0.2:0")).start()
    m2 = ClusterManager(tmp_path, "m2", store, ("--node", "h2", "--agent-listen",
                                                "127.0.0.3:0")).start()
    wait_for(lambda: leader_of(m1) is not None, 15, "a leader")
    leader, follower = (m1, m2) if leader_of(m2) == m1.url else (m2, m1)
    own = {m1.url: "h1", m2.url: "h2"}

    def node_states(m: ClusterManager) -> dict[str, str]:
        return {n["name"]: n["state"] for n in m.ok("GET", "/v1/nodes")
                if any(d["state"] == "ready" for d in n["disks"]) or n["state"] == "down"}

    wait_for(lambda: node_states(m1) == node_states(m2) == {"h1": "up", "h2": "up"}, 20,
             "h1 and h2 up with their disks")
    disks = {d["node"]: d["name"] for d in follower.ok("GET", "/v1/disks")}
    assert disks == {"h1": "h1-default", "h2": "h2-default"}
    # A third manager claiming h1 from another data directory (another host) is refused.
    m3 = ClusterManager(tmp_path, "m3", store, ("--node", "h1", "--agent-listen",
                                                "127.0.0.4:0")).launch()
    assert m3.proc is not None and m3.proc.wait(60) != 0
    said = " ".join(m3.log.read_text().split())
    assert "give another --node" in said and "is another host" in said, said[-2000:]
    assert node_states(m1) == {"h1": "up", "h2": "up"}

    # Attach without a node: the leader's own node (whichever manager was asked).
    follower.ok("POST", "/v1/volumes", json={"name": "v0", "size": "16M", "replicas": 2})
    v0 = follower.ok("POST", "/v1/volumes/v0/attach")
    assert v0["node"] == own[leader.url]
    follower.ok("POST", "/v1/volumes/v0/detach")

    # v1 lives on the follower's node only (the leader's is cordoned while it is placed);
    # I/O runs while managers die and stop.
    follower.ok("POST", f"/v1/nodes/{own[leader.url]}/cordon")
    follower.ok("POST", "/v1/volumes", json={"name": "v1", "size": "64M", "replicas": 1,
                                             "data_locality": "strict-local"})
    follower.ok("POST", f"/v1/nodes/{own[leader.url]}/uncordon")
    v1 = follower.ok("POST", "/v1/volumes/v1/attach", json={"node": own[follower.url]})
    assert v1["state"] == "attached" and v1["replicas"][0]["node"] == own[follower.url]
    writer = Writer(v1["nbd_uri"], tmp_path)
    wait_for(lambda: writer.count() > 20, 30, "the writer to get going")

    leader.kill()  # its node's agent dies with it: that node is down for the others
    t0 = time.monotonic()
    wait_for(lambda: leader_of(follower) == follower.url, 15, "the follower to lead")
    took = time.monotonic() - t0
    print(f"\ntakeover after kill -9 of the leader (with its node): {took:.2f} s")
    assert took < 10
    wait_for(lambda: node_states(follower) == {own[leader.url]: "down",
                                               own[follower.url]: "up"}, 15,
             "the dead manager's node down")
    wait_for(lambda: follower.ok("GET", "/v1/volumes/v1")["health"] == "healthy", 30,
             "v1 healthy under the new leader")

    # The last manager stops cleanly: v1 stays attached and serving with no manager at all.
    follower.proc.terminate()
    follower.proc.wait(60)
    mid = writer.count()
    wait_for(lambda: writer.count() > mid + 20, 30, "I/O with every manager down")
    # It comes back, leads again and adopts v1 as it runs.
    follower.start()
    wait_for(lambda: leader_of(follower) == follower.url, 15, "the restarted manager to lead")
    # Leading is announced before the adoption ends: wait for this start's adoption.
    events = wait_for(lambda: [e for e in follower.ok("GET", "/v1/events",
                                                      params={"volume": "v1"})
                               if e["kind"] == "volume-adopted"][1:], 30, "v1 adopted")
    assert len(events) == 1  # once per takeover (this is the second), never restarted
    kinds = {e["kind"] for e in follower.ok("GET", "/v1/events", params={"volume": "v1"})}
    assert not kinds & {"engine-failed", "attach-failed", "volume-detached"}, kinds
    mid = writer.count()
    wait_for(lambda: writer.count() > mid + 20, 30, "I/O after the restart")
    n, worst = writer.finish()
    print(f"I/O through a kill, a stop and a restart: {n} blocks, longest wait {worst:.3f} s")


def health(m: ClusterManager) -> dict[str, Any]:
    """GET /v1/health (served by the manager itself, no store call)."""
    return httpx.get(m.url + "/v1/health", timeout=10).json()


def test_etcd_away_the_leader_steps_down_and_volumes_serve_on(
        tmp_path: Path, etcd_server: EtcdServer, cleanup: None) -> None:
    m = ClusterManager(tmp_path, "m1", etcd_server.url, ("--node", "h1", "--agent-listen",
                                                         "127.0.0.2:0")).start()
    wait_for(lambda: health(m)["leading"], 15, "m1 to lead")
    m.ok("POST", "/v1/volumes", json={"name": "v", "size": "32M", "replicas": 1})
    v = m.ok("POST", "/v1/volumes/v/attach")
    writer = Writer(v["nbd_uri"], tmp_path)
    wait_for(lambda: writer.count() > 20, 30, "the writer to get going")

    etcd_server.stop()  # every manager loses the store: nobody may lead
    t0 = time.monotonic()
    wait_for(lambda: not health(m)["leading"], 10, "the leader to step down")
    took = time.monotonic() - t0
    print(f"\nstepped down {took:.2f} s after etcd died")
    assert took < 5  # before its lease could expire in etcd (ttl 5 s)
    for path, says in [("/v1/nodes", "store does not answer"),
                       ("/v1/volumes", "no manager leads")]:
        r = m.api("GET", path)
        assert r.status_code == 503 and says in r.json()["detail"], (path, r.text)
    mid = writer.count()
    wait_for(lambda: writer.count() > mid + 20, 30, "I/O while etcd is away")

    etcd_server.start()
    wait_for(lambda: health(m)["leading"], 30, "m1 to lead again")
    vol = wait_for(lambda: (lambda x: x if x["health"] == "healthy" else None)(
        m.ok("GET", "/v1/volumes/v")), 30, "v healthy")
    assert vol["state"] == "attached"
    wait_for(lambda: [e for e in m.ok("GET", "/v1/events", params={"volume": "v"})
                      if e["kind"] == "volume-adopted"], 30, "v adopted by the new lead")
    kinds = [e["kind"] for e in m.ok("GET", "/v1/events", params={"volume": "v"})]
    assert kinds.count("volume-adopted") == 1, kinds
    assert not set(kinds) & {"engine-failed", "attach-failed", "recover-failed"}, kinds
    mid = writer.count()
    wait_for(lambda: writer.count() > mid + 20, 30, "I/O after etcd returned")
    n, worst = writer.finish()
    print(f"I/O through an etcd outage: {n} blocks, longest wait {worst:.3f} s")


def test_a_task_the_dead_leader_ran_is_failed_by_the_next(
        tmp_path: Path, etcd_server: EtcdServer, cleanup: None) -> None:
    store = etcd_server.url
    m1, m2 = ClusterManager(tmp_path, "m1", store).start(), \
        ClusterManager(tmp_path, "m2", store).start()
    wait_for(lambda: leader_of(m1) is not None, 15, "a leader")
    leader, follower = (m1, m2) if leader_of(m2) == m1.url else (m2, m1)
    AgentProc([follower, leader], "n1", tmp_path / "n1", "127.0.0.2")
    wait_for(lambda: any(n["name"] == "n1" and n["state"] == "up"
                         for n in follower.ok("GET", "/v1/nodes")), 20, "n1 up")
    (tmp_path / "backups").mkdir()
    follower.ok("PUT", "/v1/backup-target", json={"url": f"file://{tmp_path / 'backups'}"})
    follower.ok("POST", "/v1/volumes", json={"name": "v", "size": "256M", "replicas": 1})
    v = follower.ok("POST", "/v1/volumes/v/attach", json={"node": "n1"})
    # Incompressible data, so that the backup still runs when its manager dies.
    fill = subprocess.run(["nbdsh", "-u", v["nbd_uri"], "-c",
                           "import os\nfor i in range(64):\n"
                           "    h.pwrite(os.urandom(1 << 22), i << 22)\nh.flush()"],
                          capture_output=True, text=True, timeout=120, env=tool_env())
    assert fill.returncode == 0, fill.stderr
    task = follower.ok("POST", "/v1/volumes/v/backups", json={})
    assert task["state"] == "running"
    leader.kill()
    wait_for(lambda: leader_of(follower) == follower.url, 15, "the follower to lead")
    done = wait_for(lambda: (lambda t: t if t["state"] != "running" else None)(
        follower.ok("GET", f"/v1/tasks/{task['id']}")), 30, "the task settled")
    assert done["state"] == "failed" and "manager stopped" in done["error"], done
    # The new leader runs tasks of its own.
    again = follower.ok("POST", "/v1/volumes/v/backups", json={})
    finished = wait_for(lambda: (lambda t: t if t["state"] != "running" else None)(
        follower.ok("GET", f"/v1/tasks/{again['id']}")), 120, "a backup by the new leader")
    assert finished["state"] == "succeeded", finished
    # Deleted through a follower-turned-leader: its node's agent deletes the replica's data.
    path = Path(follower.ok("GET", "/v1/volumes/v")["replicas"][0]["path"])
    assert path.is_dir() and path.is_relative_to(tmp_path / "n1")
    follower.ok("POST", "/v1/volumes/v/detach")
    follower.ok("DELETE", "/v1/volumes/v")
    assert not path.exists()
    kinds = [e["kind"] for e in follower.ok("GET", "/v1/events", params={"volume": "v"})]
    assert "volume-deleted" in kinds and "replica-data-left" not in kinds


def test_one_manager_on_sqlite_has_its_own_cluster_token_too(manager, tmp_path: Path) -> None:
    api = manager.token
    cluster = (manager.data_dir / "cluster-token").read_text().strip()
    assert cluster != api and len(cluster) >= 32
    assert stat.S_IMODE((manager.data_dir / "cluster-token").stat().st_mode) == 0o600
    r = manager.api("GET", "/v1/volumes", token=cluster)
    assert r.status_code == 403 and "cluster token" in r.json()["detail"]
    beat = {"id": "x", "name": "n9", "address": "127.0.0.9", "agent_url": "http://127.0.0.9:1"}
    r = manager.api("POST", "/v1/cluster/heartbeat", token=api, json=beat)
    assert r.status_code == 403 and "cluster token" in r.json()["detail"]
    r = manager.api("POST", "/v1/cluster/heartbeat", token=cluster, json=beat)
    assert r.status_code == 200
    assert manager.ok("GET", "/v1/cluster") == {"store": "sqlite", "leader": None,
                                                "since": None, "self": None, "managers": []}
    # Restarted, it keeps both.
    manager.stop()
    manager.start()
    assert manager.token == api
    assert (manager.data_dir / "cluster-token").read_text().strip() == cluster
