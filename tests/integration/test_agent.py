"""The node agent as its own process (`drove agent`): registration, heartbeats, processes.

A real `drove serve` and real `drove agent` processes on loopback addresses of
their own (127.0.0.x stands in for another host's address here; the cluster
tests put agents in network namespaces).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from accesstools import engine_headers
from backuptools import wait_for
from drove.cluster.remoteagent import AgentUnreachableError, RemoteAgent
from drove.manager.heartbeats import NODE_DOWN_AFTER
from replicatools import qemu_io


class AgentProc:
    """One `drove agent` process and the JSON line it printed when ready."""

    def __init__(self, manager, name: str, data_dir: Path, address: str = "127.0.0.2",
                 extra: tuple[str, ...] = (), *, token_file: Path | None = None) -> None:
        """``manager``: one manager, or a list of them to heartbeat to in that order;
        ``token_file``: the cluster token (default the first manager's)."""
        managers = manager if isinstance(manager, list) else [manager]
        token_file = token_file or managers[0].data_dir / "cluster-token"
        self.out = data_dir.with_suffix(".out")
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "drove", "agent",
                 "--manager", ",".join(m.url for m in managers),
                 "--node", name, "--listen", f"{address}:0", "--data-dir", str(data_dir),
                 "--token-file", str(token_file), "--log-level", "warning",
                 *extra], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.info: dict[str, Any] = wait_for(self._ready, 60, f"agent {name} to serve")

    def _ready(self) -> dict[str, Any] | None:
        text = self.out.read_text()
        for line in text.splitlines():
            if line.startswith("{"):
                return json.loads(line)
        if self.proc.poll() is not None:
            raise AssertionError(f"drove agent exited {self.proc.returncode}: {text[-2000:]}")
        return None

    def kill(self) -> None:
        """SIGKILL the agent (its engines and replicas go on)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


@pytest.fixture
def agents(manager):
    started: list[AgentProc] = []

    def start(*args: Any, **kwargs: Any) -> AgentProc:
        a = AgentProc(manager, *args, **kwargs)
        started.append(a)
        return a

    yield start
    for a in started:
        if a.proc.poll() is None:
            a.proc.terminate()
            a.proc.wait(30)


def cluster_token(manager) -> str:
    """The token agents and the manager call each other with (not the API token)."""
    return (manager.data_dir / "cluster-token").read_text().strip()


def node(manager, name: str) -> dict[str, Any]:
    return next(n for n in manager.cli_json("node", "list") if n["name"] == name)


def test_an_agent_registers_its_node_and_disk_and_goes_down_when_killed(manager, agents,
                                                                          tmp_path):
    a = agents("n2", tmp_path / "n2", extra=("--zone", "z2", "--role", "storage"))
    assert a.info["registered"] is True and a.info["manager"] == manager.url
    assert a.info["agent_url"].startswith("http://127.0.0.2:")

    # The agent reports the disks the manager lists for it: its data directory first.
    def disk_ready() -> dict[str, Any] | None:
        n = node(manager, "n2")
        disks = [d for d in n["disks"] if d["state"] == "ready" and d["capacity"] > 0]
        return n if disks else None

    n = wait_for(disk_ready, 15, "n2's disk to be reported ready")
    assert n["state"] == "up" and n["address"] == "127.0.0.2"
    assert n["agent_url"] == a.info["agent_url"] and n["last_seen"]
    assert [d["name"] for d in n["disks"]] == ["n2-default"]
    assert n["disks"][0]["path"] == str((tmp_path / "n2").resolve())
    doc = manager.ok("GET", "/v1/nodes")
    assert {x["name"] for x in doc} >= {"n2"}
    assert any(e["kind"] == "node-up" and "n2" in e["message"] for e in manager.events())

    a.kill()
    t0 = time.monotonic()
    down = wait_for(lambda: node(manager, "n2")["state"] == "down", NODE_DOWN_AFTER + 10,
                    "n2 to be down")
    assert down and time.monotonic() - t0 <= NODE_DOWN_AFTER + 10
    assert node(manager, "n2")["disks"][0]["state"] == "unavailable"
    # The healer's pass says so once, with the time the node was last seen.
    downs = wait_for(lambda: [e for e in manager.events() if e["kind"] == "node-down"], 15,
                     "a node-down event")
    assert len(downs) == 1 and "n2" in downs[0]["message"] and "since" in downs[0]["message"]

    # Restarted on the same data directory, it is the same node again.
    b = agents("n2", tmp_path / "n2")
    assert b.info["id"] == a.info["id"] and b.info["registered"] is True
    wait_for(lambda: node(manager, "n2")["state"] == "up", 15, "n2 to be up again")
    ups = [e for e in manager.events() if e["kind"] == "node-up" and "n2" in e["message"]]
    assert len(ups) == 2


def test_a_second_host_cannot_take_a_registered_node_name(manager, agents, tmp_path):
    agents("n2", tmp_path / "n2")
    other = agents("n2", tmp_path / "elsewhere", address="127.0.0.3")
    assert other.info["registered"] is False
    assert node(manager, "n2")["address"] == "127.0.0.2"
    r = manager.api("POST", "/v1/cluster/heartbeat", token=cluster_token(manager), json={
        "id": "x", "name": "n3", "address": "127.0.0.3", "agent_url": "http://127.0.0.3:1",
        "role": "bogus"})
    assert r.status_code == 422 and "role" in r.text
    assert "n3" not in {n["name"] for n in manager.cli_json("node", "list")}


def test_the_agent_starts_and_supervises_processes_that_outlive_it(manager, agents, tmp_path):
    a = agents("n2", tmp_path / "n2")
    remote = RemoteAgent("n2", a.info["agent_url"], "127.0.0.2", cluster_token(manager))
    # Without the cluster token the agent refuses.
    r = httpx.post(a.info["agent_url"] + "/v1/processes/alive", json={"proc": None})
    assert r.status_code == 401 and "token" in r.text

    rep = {"name": "vol-r0", "path": str(tmp_path / "n2" / "replicas" / "vol-r0")}
    proc = remote.start_replica("vol", rep, 64 << 20)
    assert proc.ready["nbd"].startswith("nbd://127.0.0.2:")
    info = subprocess.run(["nbdinfo", "--size", proc.ready["nbd"] + "/"],
                          capture_output=True, text=True, timeout=30)
    assert info.returncode == 0 and int(info.stdout) == 64 << 20, info.stderr
    assert remote.alive(proc)

    # The replica keeps serving with its agent dead; a restarted agent adopts it.
    a.kill()
    with pytest.raises(AgentUnreachableError):
        remote.stop(proc)
    assert subprocess.run(["nbdinfo", "--size", proc.ready["nbd"] + "/"],
                          capture_output=True, timeout=30).returncode == 0
    b = agents("n2", tmp_path / "n2")
    again = RemoteAgent("n2", b.info["agent_url"], "127.0.0.2", cluster_token(manager))
    assert again.alive(proc)
    again.stop(proc)
    assert not again.alive(proc)

    # A bad request changes nothing and says what is wrong.
    r = httpx.post(b.info["agent_url"] + "/v1/replicas", json={"volume": "v"},
                   headers={"Authorization": f"Bearer {cluster_token(manager)}"})
    assert r.status_code == 422 and "replica" in r.text


def test_a_volume_across_two_nodes_attaches_on_either(manager, agents, tmp_path):
    agents("n2", tmp_path / "n2")
    wait_for(lambda: any(d["state"] == "ready" for d in node(manager, "n2")["disks"]), 15,
             "n2's disk")
    (own,) = [n["name"] for n in manager.ok("GET", "/v1/nodes") if n["name"] != "n2"]
    v = manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 2})
    assert sorted(r["node"] for r in v["replicas"]) == sorted([own, "n2"])

    # On the manager's node: the n2 replica is a process its agent started, on n2's address.
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    assert att["health"] == "healthy" and att["node"] == own
    (there,) = [r for r in att["replicas"] if r["node"] == "n2"]
    assert not there["local"] and there["pid"]
    engine = httpx.get(att["engine"]["control_url"] + "/v1/replicas", timeout=10,
                       headers=engine_headers(att["engine"]["pid"])).json()
    assert any("127.0.0.2" in str(r) for r in engine)
    qemu_io(att["nbd_uri"], "write -P 0x44 0 8M")
    manager.ok("POST", "/v1/volumes/v/detach", json={})

    # On n2: its agent runs the engine there, which serves n2's replica itself.
    att = manager.cli_json("volume", "attach", "v", "--node", "n2")
    assert att["node"] == "n2" and att["health"] == "healthy"
    # Its control API on n2's address (for the manager), its NBD export on loopback (for
    # clients on its host).
    assert att["engine"]["control_url"].startswith("http://127.0.0.2:")
    assert att["nbd_uri"].startswith("nbd://127.0.0.1:")
    (there,) = [r for r in att["replicas"] if r["node"] == "n2"]
    assert there["local"] and there["mode"] == "RW"
    qemu_io(att["nbd_uri"], "read -P 0x44 0 8M", read_only=True)
    qemu_io(att["nbd_uri"], "write -P 0x55 8M 1M")
    manager.ok("POST", "/v1/volumes/v/detach", json={})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    qemu_io(att["nbd_uri"], "read -P 0x55 8M 1M", read_only=True)
    manager.ok("POST", "/v1/volumes/v/detach", json={})

    # Nowhere the engine cannot run: an unknown node, a storage-only one, a down one.
    r = manager.api("POST", "/v1/volumes/v/attach", json={"node": "nope"})
    assert r.status_code == 404 and "nope" in r.text
    manager.ok("POST", "/v1/cluster/heartbeat", token=cluster_token(manager), json={
        "id": "id3", "name": "n3", "address": "127.0.0.3", "agent_url": "http://127.0.0.3:9",
        "role": "storage"})
    r = manager.api("POST", "/v1/volumes/v/attach", json={"node": "n3"})
    assert r.status_code == 409 and "role is storage" in r.text
    assert manager.volume("v")["state"] == "detached"
    manager.ok("POST", "/v1/cluster/heartbeat", token=cluster_token(manager), json={
        "id": "id4", "name": "n4", "address": "127.0.0.4", "agent_url": "http://127.0.0.4:9"})
    # n4 never heartbeats again: down after NODE_DOWN_AFTER, and attach there is refused.
    wait_for(lambda: node(manager, "n4")["state"] == "down", NODE_DOWN_AFTER + 10, "n4 down")
    r = manager.api("POST", "/v1/volumes/v/attach", json={"node": "n4"})
    assert r.status_code == 409 and "n4" in r.text and "down" in r.text
    assert manager.volume("v")["state"] == "detached"


def test_a_dead_host_is_waited_for_then_replaced(manager, agents, tmp_path):
    import os

    a = agents("n2", tmp_path / "n2")
    wait_for(lambda: any(d["state"] == "ready" for d in node(manager, "n2")["disks"]), 15,
             "n2's disk")
    manager.ok("PATCH", "/v1/settings", json={"replica_replenish_wait": 600})
    # Both replicas as processes: with a local one the engine would not acknowledge writes
    # on it alone once n2 is gone (write quorum, test_write_quorum.py).
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "64M", "replicas": 2,
                                            "data_locality": "disabled"})
    att = manager.ok("POST", "/v1/volumes/v/attach", json={})
    (there,) = [r for r in att["replicas"] if r["node"] == "n2"]
    qemu_io(att["nbd_uri"], "write -P 0x61 0 4M")

    def kill_host() -> None:
        v = manager.volume("v")
        (rep,) = [r for r in v["replicas"] if r["node"] == "n2" and r["state"] != "abandoned"]
        a.kill()
        if rep["pid"]:
            os.kill(rep["pid"], signal.SIGKILL)

    # n2 dies (agent and replica): the volume goes on degraded, and waits for the node.
    kill_host()
    qemu_io(att["nbd_uri"], "write -P 0x62 4M 4M")
    manager.wait_volume("v", lambda x: x["health"] == "degraded", 60, "degraded")
    wait_for(lambda: [e for e in manager.events("v") if e["kind"] == "replica-replenish-wait"],
             30, "a replenish-wait event")
    # Back in time: the same replica is rebuilt in place by delta.
    a = agents("n2", tmp_path / "n2")
    v = manager.wait_volume("v", lambda x: x["health"] == "healthy", 120, "healthy again")
    assert there["name"] in {r["name"] for r in v["replicas"] if r["node"] == "n2"}
    assert not [e for e in manager.events("v") if e["kind"] == "replica-replaced"]

    # Gone for longer than the wait: replaced on another disk, data intact.
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "d1"), "name": "d1"})
    manager.ok("PATCH", "/v1/settings", json={"replica_replenish_wait": 1})
    kill_host()
    v = manager.wait_volume(
        "v", lambda x: x["health"] == "healthy" and any(
            r["disk"] == "d1" and r["state"] == "running" for r in x["replicas"]), 120,
        "a replacement on d1")
    replaced = [e for e in manager.events("v") if e["kind"] == "replica-replaced"]
    assert replaced and there["name"] in replaced[0]["message"]
    qemu_io(v["nbd_uri"], "read -P 0x61 0 4M", read_only=True)
    qemu_io(v["nbd_uri"], "read -P 0x62 4M 4M", read_only=True)
