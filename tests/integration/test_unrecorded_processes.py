"""A manager killed while it attached a volume, after an agent started the engine or a replica
process but before the manager recorded it: the next manager stops those processes (they
hold the replicas' directories) and attaches the volume again.

No failpoint: the crash's leftovers are made as the killed manager would have left them.
The engine and replica processes are started through the agents' own calls (the argv,
run directory, epoch and key the manager would have given), the volume's record says
"attaching" at the epoch the killed manager had stored and names none of them; then a
manager starts on the same data directory.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from accesstools import engine_key
from agenttools import agent_node
from backuptools import wait_for
from drove.agent import orphans, processes
from drove.agent.node import NodeAgent
from drove.agent.processes import Proc
from drove.cluster.remoteagent import RemoteAgent
from drove.manager.store import SqliteStore
from replicatools import qemu_io

SIZE = 64 << 20
pytestmark = pytest.mark.timeout(120)


def own_node(manager) -> str:
    """The name of the manager's own node (its in-process agent's)."""
    (own,) = [n["name"] for n in manager.ok("GET", "/v1/nodes") if n["agent_url"] is None]
    return own


def attached_once(manager, name: str, locality: str, replicas: int = 1) -> dict[str, Any]:
    """Create volume ``name``, attach it, write a pattern, detach it; its view while it was
    attached (with the engine's key)."""
    manager.ok("POST", "/v1/volumes", json={"name": name, "size": str(SIZE),
                                            "replicas": replicas, "data_locality": locality})
    att = manager.ok("POST", f"/v1/volumes/{name}/attach", json={})
    qemu_io(att["nbd_uri"], "write -P 0x44 0 4M")
    att["key"] = engine_key(att["engine"]["pid"])
    manager.ok("POST", f"/v1/volumes/{name}/detach", json={})
    return att


def leave_orphans(manager, att: dict[str, Any], own: str,
                  agents: dict[str, NodeAgent | RemoteAgent]) -> tuple[list[Proc], int]:
    """With the manager dead: what it would have left had it been killed after its agents
    started the volume's replica processes and engine at the next epoch, before it recorded
    them; (the processes, that epoch)."""
    name, epoch = att["name"], att["engine"]["epoch"] + 1
    left, urls, local = [], [], None
    for r in att["replicas"]:
        if r["local"]:
            local = (r["name"], r["path"])
            continue
        proc = agents[r["node"]].start_replica(name, {"name": r["name"], "path": r["path"]},
                                               SIZE, att["key"])
        left.append(proc)
        urls.append((r["name"], proc.ready["control"]))
    engine = agents[own].start_engine(
        name, urls, timeout=8.0, epoch=epoch, local=local, size=SIZE, key=att["key"],
        state_file=manager.data_dir / "volumes" / name / "engine.state")
    # It serves the volume (it claimed every replica with its epoch).
    qemu_io(engine.ready["nbd"], "read -P 0x44 0 4M", read_only=True)
    left.insert(0, engine)
    # The record: attaching on this node at the stored epoch, naming none of them.
    store = SqliteStore(manager.data_dir / "drove.db")
    try:
        doc = store.get("volumes", name)
        assert doc is not None
        doc.update(state="attaching", desired="attached", node=own, epoch=epoch, engine=None)
        store.put("volumes", name, doc)
    finally:
        store.close()
    return left, epoch


def check_recovered(manager, name: str, left: list[Proc], epoch: int,
                    nodes: dict[int, str]) -> None:
    """The volume is attached again at a newer epoch and serves its data; every process
    left is gone, and an event names each (and its node)."""
    v = manager.wait_volume(name, lambda v: v["state"] == "attached"
                            and v["health"] == "healthy", 60, "attached again")
    assert v["engine"]["epoch"] > epoch
    qemu_io(v["nbd_uri"], "read -P 0x44 0 4M", "write -P 0x55 4M 1M", "read -P 0x55 4M 1M")
    for p in left:
        assert not processes.alive(p), f"pid {p.pid} ({p.argv[3]}) still runs"
    (ev,) = [e for e in manager.events(name) if e["kind"] == "volume-unrecorded-stopped"]
    for p in left:
        assert f"{p.argv[3]} v" in ev["message"], ev
        assert f"(pid {p.pid}, node {nodes[p.pid]})" in ev["message"], ev


@pytest.mark.parametrize("locality", ["best-effort", "disabled"])
def test_one_node_what_a_killed_attach_left_is_stopped_and_the_volume_attaches(
        manager, tmp_path: Path, locality):
    own = own_node(manager)
    att = attached_once(manager, "v", locality)
    manager.stop(signal.SIGKILL)
    agent = NodeAgent(manager.data_dir, own)
    left, epoch = leave_orphans(manager, att, own, {own: agent})
    # best-effort: the engine alone (its replica is local); disabled: a replica process too.
    assert len(left) == (1 if locality == "best-effort" else 2)
    # An engine of a volume called "v" too, which another agent (another data directory)
    # runs on this host: not this agent's, never stopped.
    other_dir = tmp_path / "other"
    other = NodeAgent(other_dir, own).start_engine(
        "v", [], timeout=8.0, epoch=1, size=SIZE, state_file=other_dir / "engine.state",
        local=("v-r1", str(other_dir / "replicas" / "v-r1")))
    try:
        manager.start()
        check_recovered(manager, "v", left, epoch, {p.pid: own for p in left})
        assert processes.alive(other)
    finally:
        processes.stop(other)


@pytest.mark.slow
def test_two_nodes_the_engine_and_a_remote_replica_process_left_are_stopped(
        manager, tmp_path: Path):
    port = manager.url.rsplit(":", 1)[1]
    with agent_node(manager, tmp_path, "n2") as n2:
        wait_for(lambda: any(d["state"] == "ready" for n in manager.ok("GET", "/v1/nodes")
                             if n["name"] == n2 for d in n["disks"]), 30, "n2's disk")
        own = own_node(manager)
        att = attached_once(manager, "v", "best-effort", replicas=2)
        assert sorted(r["node"] for r in att["replicas"]) == sorted([own, n2])
        (url,) = [n["agent_url"] for n in manager.ok("GET", "/v1/nodes") if n["name"] == n2]
        token = (manager.data_dir / "cluster-token").read_text().strip()
        manager.stop(signal.SIGKILL)
        remote = RemoteAgent(n2, url, "127.0.0.1", token)
        try:
            left, epoch = leave_orphans(manager, att, own,
                                        {own: NodeAgent(manager.data_dir, own), n2: remote})
        finally:
            remote.close()
        assert [p.argv[3] for p in left] == ["engine", "replica"]
        manager.start(listen=f"127.0.0.1:{port}")
        check_recovered(manager, "v", left, epoch, {left[0].pid: own, left[1].pid: n2})


def test_an_agent_finds_and_stops_only_its_own_processes_of_the_volume(tmp_path: Path):
    agent = NodeAgent(tmp_path / "a", "n")
    dirs = {f"v-r{i}": str(tmp_path / "disk" / "replicas" / f"v-r{i}") for i in (1, 2, 3)}
    mine = agent.start_replica("v", {"name": "v-r1", "path": dirs["v-r1"]}, SIZE)
    # Another agent's (its own data directory), and one a person started by hand.
    theirs = NodeAgent(tmp_path / "b", "n").start_replica(
        "v", {"name": "v-r2", "path": dirs["v-r2"]}, SIZE)
    hand = processes.spawn(
        [sys.executable, "-m", "drove", "replica", "serve", dirs["v-r3"], "--nbd",
         "127.0.0.1:0", "--control", "127.0.0.1:0", "--size", str(SIZE)],
        tmp_path / "hand.ready", tmp_path / "hand.log")
    try:
        # Its ready file deleted since (a later start of the replica unlinks it): still its.
        (agent.run_dir / "v-r1.ready").unlink()
        found = orphans.find(agent.run_dir, "v", dirs)
        assert [(f.kind, f.name, f.proc.pid) for f in found] == [("replica", "v-r1", mine.pid)]
        assert orphans.find(agent.run_dir, "w", {}) == []
        assert agent.stop_unrecorded("v", dirs, [mine.pid], "kept") == []
        assert processes.alive(mine)
        assert agent.stop_unrecorded("v", dirs, [], "a test") == [
            {"kind": "replica", "name": "v-r1", "pid": mine.pid}]
        assert not processes.alive(mine)
        assert processes.alive(theirs) and processes.alive(hand)
    finally:
        for p in (mine, theirs, hand):
            processes.stop(p)
