"""`drove node drain` and `drove node remove` against a real `drove serve` and real agents.

Two `drove agent` processes on loopback addresses of their own (n2, n3) beside
the manager's own node; fio writes and verifies through the engine while the
replicas move; the replicas' NBD ports refuse clients without the volume's key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_agent import agents, node  # noqa: F401 - agents is a fixture

from accesstools import engine_headers, engine_key
from backuptools import wait_for
from drove.manager.heartbeats import NODE_DOWN_AFTER
from drove.replica.access import keyed_export
from replicatools import qemu_io

FIO_JOB = ["--name=job", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=8",
           "--size=24M", "--verify=crc32c", "--verify_fatal=1", "--randrepeat=1",
           "--verify_state_save=0", "--output-format=json"]


def fio(uri: str, *extra: str) -> subprocess.Popen:
    # The engine's options (--uri) follow --ioengine.
    return subprocess.Popen(["fio", *FIO_JOB, f"--uri={uri}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def fio_ok(job: subprocess.Popen) -> None:
    out, err = job.communicate(timeout=300)
    text = out.decode()
    assert "{" in text, err.decode()[-2000:]
    result = json.loads(text[text.index("{"):])["jobs"][0]
    assert result["error"] == 0, err.decode()[-2000:]


def replica_base(manager, v: dict[str, Any], replica: str) -> str:
    """nbd://HOST:PORT/ of a replica process (from its engine's report)."""
    reps = manager.ok("GET", f"/v1/volumes/{v['name']}")["replicas"]
    assert any(r["name"] == replica for r in reps)
    engine = httpx.get(v["engine"]["control_url"] + "/v1/replicas", timeout=10,
                       headers=engine_headers(v["engine"]["pid"])).json()
    (entry,) = [r for r in engine if r["name"] == replica]
    return entry["nbd"].rsplit("/", 1)[0] + "/"


def on_node(manager, volume: str, name: str) -> list[dict[str, Any]]:
    return [r for r in manager.volume(volume)["replicas"] if r["node"] == name]


@pytest.mark.slow
def test_drain_moves_replicas_off_a_node_under_io_then_remove_forgets_it(
        manager, agents, tmp_path):  # noqa: F811 - agents is the fixture
    n2 = agents("n2", tmp_path / "n2")
    agents("n3", tmp_path / "n3", address="127.0.0.3")
    for n in ("n2", "n3"):
        wait_for(lambda n=n: any(d["state"] == "ready" for d in node(manager, n)["disks"]), 15,
                 f"{n}'s disk")
    (own,) = [n["name"] for n in manager.ok("GET", "/v1/nodes") if n["name"] not in ("n2", "n3")]

    # v: replicas on n2 and n3 (own cordoned meanwhile); w: its only replica on n2.
    manager.cli_json("node", "cordon", own)
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "32M", "replicas": 2,
                                            "data_locality": "disabled"})
    manager.cli_json("node", "cordon", "n3")
    manager.ok("POST", "/v1/volumes", json={"name": "w", "size": "16M", "replicas": 1,
                                            "data_locality": "disabled"})
    manager.cli_json("node", "uncordon", own)
    manager.cli_json("node", "uncordon", "n3")
    assert sorted(r["node"] for r in manager.volume("v")["replicas"]) == ["n2", "n3"]
    assert [r["node"] for r in manager.volume("w")["replicas"]] == ["n2"]
    w = manager.ok("POST", "/v1/volumes/w/attach", json={})
    qemu_io(w["nbd_uri"], "write -P 0x77 1M 4M")
    manager.ok("POST", "/v1/volumes/w/detach", json={})

    # An engine on n2: the drain is refused, naming it; nothing changes.
    x = manager.ok("POST", "/v1/volumes", json={"name": "x", "size": "8M", "replicas": 1})
    manager.cli_json("volume", "attach", "x", "--node", "n2")
    r = manager.cli("node", "drain", "n2", check=False)
    assert r.returncode != 0 and "volume(s) x" in r.stderr + r.stdout, r
    assert not node(manager, "n2")["cordoned"]
    manager.ok("POST", "/v1/volumes/x/detach", json={})
    manager.ok("DELETE", f"/v1/volumes/{x['name']}")

    # Remove is refused while n2 holds replicas, and lists them.
    r = manager.api("DELETE", "/v1/nodes/n2")
    assert r.status_code == 409, r.text
    (v_on_n2,) = on_node(manager, "v", "n2")
    (w_on_n2,) = on_node(manager, "w", "n2")
    assert v_on_n2["name"] in r.json()["detail"] and w_on_n2["name"] in r.json()["detail"]

    # v attached on the manager's node; its replica processes demand the key.
    v = manager.ok("POST", "/v1/volumes/v/attach", json={})
    assert v["health"] == "healthy"
    key = engine_key(v["engine"]["pid"])
    base = replica_base(manager, v, v_on_n2["name"])
    assert base.startswith("nbd://127.0.0.2:")
    refused = subprocess.run(["nbdinfo", base + "head"], capture_output=True, timeout=60)
    assert refused.returncode != 0
    assert subprocess.run(["nbdinfo", base + keyed_export(key, "head")], capture_output=True,
                          timeout=60).returncode == 0
    # The snapshot export the manager hands out works: it names the key.
    manager.ok("POST", "/v1/volumes/v/snapshots", json={"name": "s1"})
    exp = manager.ok("POST", "/v1/volumes/v/snapshots/s1/export")
    assert subprocess.run(["nbdinfo", exp["nbd_uri"]], capture_output=True,
                          timeout=60).returncode == 0

    # Drain n2 while fio writes (and then verifies) through the engine.
    job = fio(v["nbd_uri"], "--rate_iops=600")
    started = manager.cli_json("node", "drain", "n2", "--no-wait")
    assert started["node"] == "n2"
    r = manager.api("POST", "/v1/nodes/n2/drain")
    assert r.status_code == 409 and "being drained already" in r.text, r.text
    task = manager.cli_json("task", "wait", started["task"])
    # The replicas moved while fio still wrote (it writes for some 10 s at this rate).
    assert job.poll() is None
    fio_ok(job)
    assert task["state"] == "succeeded", task
    moved = {m["volume"]: m for m in task["result"]["moved"]}
    assert set(moved) == {"v", "w"} and not task["result"]["failed"]
    assert moved["v"]["replica"] == v_on_n2["name"] and moved["v"]["to_node"] == own
    assert moved["w"]["replica"] == w_on_n2["name"] and moved["w"]["to_node"] in (own, "n3")
    n = node(manager, "n2")
    assert n["cordoned"] and sum(d["replicas"] for d in n["disks"]) == 0
    assert not on_node(manager, "v", "n2") and not on_node(manager, "w", "n2")
    assert not Path(v_on_n2["path"]).exists() and not Path(w_on_n2["path"]).exists()
    kinds = [e["kind"] for e in manager.events()]
    assert "node-drain-started" in kinds and "node-drained" in kinds
    assert kinds.count("replica-drained") == 2

    # The data: fio verifies all it wrote, the replicas are equal, w is as it was.
    v = manager.wait_volume("v", lambda x: x["health"] == "healthy", 60, "v healthy")
    fio_ok(fio(v["nbd_uri"], "--verify_only"))
    a, b = (replica_base(manager, v, r["name"]) for r in v["replicas"])
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                    a + keyed_export(key, "head"), b + keyed_export(key, "head")],
                   check=True, capture_output=True, timeout=120)
    w = manager.volume("w")
    assert w["state"] == "detached" and len(w["replicas"]) == 1
    w = manager.ok("POST", "/v1/volumes/w/attach", json={})
    qemu_io(w["nbd_uri"], "read -P 0x77 1M 4M")
    qemu_io(w["nbd_uri"], "read -P 0 0 1M")
    manager.ok("POST", "/v1/volumes/w/detach", json={})

    # Drained again: nothing to move, said in words.
    again = manager.cli("node", "drain", "n2").stdout
    assert "node n2 drained: 0 replica(s) moved" in again, again

    # Remove: refused for the manager's own node, and while n2's agent runs; once it is
    # down, n2 and its disk are gone.
    r = manager.api("DELETE", f"/v1/nodes/{own}")
    assert r.status_code == 409 and "own" in r.json()["detail"], r.text
    assert manager.api("POST", "/v1/nodes/nope/drain").status_code == 404
    r = manager.api("DELETE", "/v1/nodes/n2")
    assert r.status_code == 409 and "is up" in r.json()["detail"], r.text
    n2.kill()
    wait_for(lambda: node(manager, "n2")["state"] == "down", NODE_DOWN_AFTER + 10, "n2 down")
    out = manager.cli_json("node", "remove", "n2")
    assert out == {"deleted": "n2", "disks": ["n2-default"]}
    assert "n2" not in {n["name"] for n in manager.cli_json("node", "list")}
    assert "n2-default" not in {d["name"] for d in manager.ok("GET", "/v1/disks")}
    assert manager.api("DELETE", "/v1/nodes/n2").status_code == 404
    assert manager.volume("v")["health"] == "healthy"


def test_a_dead_node_is_drained_and_removed(manager, agents, tmp_path):  # noqa: F811
    n2 = agents("n2", tmp_path / "n2")
    agents("n3", tmp_path / "n3", address="127.0.0.3")
    for n in ("n2", "n3"):
        wait_for(lambda n=n: any(d["state"] == "ready" for d in node(manager, n)["disks"]), 15,
                 f"{n}'s disk")
    manager.ok("PATCH", "/v1/settings", json={"replica_replenish_wait": 600})
    manager.cli_json("node", "cordon", "n3")
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "32M", "replicas": 2,
                                            "data_locality": "disabled"})
    manager.cli_json("node", "uncordon", "n3")
    v = manager.ok("POST", "/v1/volumes/v/attach", json={})
    (gone,) = [r for r in v["replicas"] if r["node"] == "n2"]
    qemu_io(v["nbd_uri"], "write -P 0x3c 0 8M")

    # n2 dies with its replica: the volume goes on degraded, waiting for the node.
    n2.kill()
    os.kill(gone["pid"], signal.SIGKILL)
    qemu_io(v["nbd_uri"], "write -P 0x3d 8M 4M")
    manager.wait_volume("v", lambda x: x["health"] == "degraded", 60, "degraded")
    wait_for(lambda: node(manager, "n2")["state"] == "down", NODE_DOWN_AFTER + 10, "n2 down")

    # Drained all the same: the replacement is built on n3, the dead replica forgotten
    # (its data cannot be deleted now: it is recorded as abandoned, not lost track of).
    task = manager.cli_json("node", "drain", "n2")
    assert task["state"] == "succeeded", task
    (m,) = task["result"]["moved"]
    assert m["replica"] == gone["name"] and m["to_node"] == "n3"
    v = manager.wait_volume("v", lambda x: x["health"] == "healthy", 60, "healthy")
    assert sorted(r["node"] for r in v["replicas"]) == sorted([v["node"], "n3"])
    qemu_io(v["nbd_uri"], "read -P 0x3c 0 8M")
    qemu_io(v["nbd_uri"], "read -P 0x3d 8M 4M")

    # n2 is down: remove forgets it, its disk and the abandoned replica's record.
    assert manager.cli_json("node", "remove", "n2")["disks"] == ["n2-default"]
    doc = manager.ok("GET", "/v1/volumes/v")
    assert all(r["node"] != "n2" for r in doc["replicas"])
    assert "n2" not in {n["name"] for n in manager.ok("GET", "/v1/nodes")}
    (removed,) = [e for e in manager.events() if e["kind"] == "node-removed"]
    assert "1 replaced replica(s) left there forgotten" in removed["message"], removed


def test_a_drain_with_nowhere_to_go_fails_and_leaves_the_replica(
        manager, agents, tmp_path):  # noqa: F811 - agents is the fixture
    agents("n2", tmp_path / "n2")
    wait_for(lambda: any(d["state"] == "ready" for d in node(manager, "n2")["disks"]), 15,
             "n2's disk")
    v = manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "16M", "replicas": 2,
                                                "data_locality": "disabled"})
    (there,) = [r for r in v["replicas"] if r["node"] == "n2"]
    v = manager.ok("POST", "/v1/volumes/v/attach", json={})
    qemu_io(v["nbd_uri"], "write -P 0x5e 0 4M")

    # Two nodes, two replicas: the one on n2 has nowhere else to go.
    r = manager.cli("node", "drain", "n2", check=False)
    said = " ".join(r.stderr.split())  # rich wraps long lines
    assert r.returncode == 1, r
    assert "n2 is not drained" in said and "no other node can take replica" in said, said
    v = manager.volume("v")
    assert there["name"] in {x["name"] for x in v["replicas"] if x["node"] == "n2"}
    assert v["health"] == "healthy" and len(v["replicas"]) == 2
    qemu_io(v["nbd_uri"], "read -P 0x5e 0 4M")
    kinds = [e["kind"] for e in manager.events()]
    assert "node-drain-stuck" in kinds and "node-drain-failed" in kinds
    r = manager.api("DELETE", "/v1/nodes/n2")
    assert r.status_code == 409 and there["name"] in r.text
