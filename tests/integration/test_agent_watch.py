"""Agents learn what their node must act on through a long-poll, not at their next heartbeat.

Real `drove serve` processes (one on SQLite; two on a real etcd) and real `drove agent`s on
loopback addresses of their own. Node n2's agent is restarted with a heartbeat only every
60 s, so between two heartbeats its node is down and its volume can be taken over
(`attach --force`) while the agent is up and polling: the old engine must be stopped
through the long-poll, while n2 is still down (no heartbeat told it). Before the takeover
the manager the agent polls is killed: restarted on its address (SQLite), or for good
(etcd: the leader; the agent moves to the other manager, which takes over the lead).
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from test_agent import AgentProc, agents, cluster_token, node  # noqa: F401 (agents: a fixture)
from test_managers import ClusterManager, cleanup  # noqa: F401 (cleanup: a fixture)
from test_takeover import alive

from backuptools import wait_for
from drove.cluster.agentwatch import GRACE
from drove.cluster.etcdstore import EtcdStore
from drove.manager.store import ConflictError
from etcd import EtcdServer

SLOW_BEAT = ("--heartbeat-interval", "60")
"""n2's agent after its restart: down between two heartbeats, up and polling meanwhile."""
ACT_WITHIN = 10.0
"""Seconds after the takeover's answer by which the old engine must be gone (the next
heartbeat would come up to 60 s later)."""


def poll(url: str, node_name: str, token: str, **params: Any) -> httpx.Response:
    """One long-poll as an agent sends it (the test waits 10 s at most for its answer)."""
    return httpx.get(f"{url}/v1/agents/{node_name}/changes", params=params, timeout=10,
                     headers={"Authorization": f"Bearer {token}"})


def test_the_long_poll_refuses_what_is_wrong_and_names_stale_engines(manager, agents,  # noqa: F811
                                                                       tmp_path: Path):
    agents("n2", tmp_path / "n2")
    token = cluster_token(manager)
    r = poll(manager.url, "n2", "wrong")
    assert r.status_code == 401 and "cluster token" in r.json()["detail"], r.text
    r = poll(manager.url, "n2", manager.token)
    assert r.status_code == 403 and "API token" in r.json()["detail"], r.text
    r = poll(manager.url, "nope", token)
    assert r.status_code == 404 and "no node 'nope'" in r.json()["detail"], r.text
    for params, word in (({"since": "-1"}, "since"), ({"since": "abc"}, "since"),
                         ({"timeout": "61"}, "timeout"), ({"engines": "v@x"}, "VOLUME@EPOCH"),
                         ({"engines": "Bad Name@1"}, "volume")):
        r = poll(manager.url, "n2", token, **params)
        assert r.status_code == 422 and word in r.json()["detail"], (params, r.text)

    # No since: answered at once, with the revision to send next time.
    first = poll(manager.url, "n2", token, timeout=30).json()
    assert first["stop_engines"] == [] and first["revision"] > 0
    # A known revision with nothing to do: the poll waits out its time, then says so.
    t0 = time.monotonic()
    same = poll(manager.url, "n2", token, since=first["revision"], timeout=1).json()
    assert time.monotonic() - t0 >= 1 and same == first
    # A revision this manager cannot vouch for (from before it started): answered at once.
    assert poll(manager.url, "n2", token, since=1, timeout=30).status_code == 200

    # An engine of a detached volume must stop; one of a volume the manager does not know
    # is left alone. The volume's creation after `since` answers a waiting poll at once.
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "16M", "replicas": 1})
    answer = poll(manager.url, "n2", token, since=first["revision"], engines="v@3,ghost@1",
                  timeout=30).json()
    assert answer["revision"] > first["revision"], answer
    (stale,) = answer["stop_engines"]
    assert stale["volume"] == "v" and stale["epoch"] == 3 and "detached" in stale["reason"]

    # An agent from before the long-poll lists its engines in its heartbeat: the answer
    # still names those that must stop.
    r = manager.api("POST", "/v1/cluster/heartbeat", token=token, json={
        "id": "older-agent", "name": "n9", "address": "127.0.0.9",
        "agent_url": "http://127.0.0.9:1", "engines": [{"volume": "v", "epoch": 3}]})
    assert r.status_code == 200, r.text
    assert [(s["volume"], s["epoch"]) for s in r.json()["stop_engines"]] == [("v", 3)]

    # Agents POST the same poll with their engines in the body: as many as a node runs
    # (a URL holds some hundreds).
    many = [{"volume": f"e{i:04d}", "epoch": 1} for i in range(3000)]
    r = httpx.post(f"{manager.url}/v1/agents/n2/changes", timeout=30,
                   headers={"Authorization": f"Bearer {token}"},
                   json={"timeout": 30, "engines": [*many, {"volume": "v", "epoch": 3}]})
    assert r.status_code == 200, r.text
    assert [(s["volume"], s["epoch"]) for s in r.json()["stop_engines"]] == [("v", 3)]
    for body, word in (({"since": -1}, "since"), ({"engines": "v@1"}, "engines"),
                       ({"engines": [{"volume": "Bad Name"}]}, "volume"),
                       ({"timeout": 61}, "timeout"), ({"sinse": 1}, "sinse")):
        r = httpx.post(f"{manager.url}/v1/agents/n2/changes", json=body, timeout=10,
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 422 and word in r.json()["detail"], (body, r.text)

    # A stopping manager ends the polls waiting on it (503: poll another) rather than
    # hold its shutdown until their time is up (60 s for this one).
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(poll, manager.url, "n2", token, since=answer["revision"],
                              engines="ghost@1", timeout=60)
        wait_for(waiting.running, 10, "the poll sent")
        t0 = time.monotonic()
        manager.stop(signal.SIGTERM)
        stopped = time.monotonic() - t0
        try:
            r = waiting.result(30)
        except httpx.TransportError:  # it came after the manager stopped listening
            r = None
    assert stopped < 10, f"the manager took {stopped:.1f} s to stop"
    assert r is None or (r.status_code == 503 and "stopping" in r.text), r.text


def attach_on_n2(ok) -> dict[str, Any]:
    """A 2-replica volume attached on n2 (with ``ok``, a manager's API call); its view."""
    ok("PATCH", "/v1/settings", json={"replica_replenish_wait": 600})
    ok("POST", "/v1/volumes", json={"name": "v", "size": "16M", "replicas": 2})
    a = ok("POST", "/v1/volumes/v/attach", json={"node": "n2"})
    assert a["node"] == "n2" and a["engine"]["pid"], a
    return a


def take_over_and_time(ok, engine_pid: int) -> tuple[float, float]:
    """Take v over on n3 while n2 is down but its agent polls; (seconds the takeover took,
    seconds from its start until n2's agent stopped the old engine) — while n2 stays down
    (no heartbeat told the agent)."""
    nodes = {n["name"]: n for n in ok("GET", "/v1/nodes")}
    assert nodes["n2"]["state"] == "down", nodes["n2"]
    t0 = time.monotonic()
    b = ok("POST", "/v1/volumes/v/attach", json={"node": "n3", "force": True})
    answered = time.monotonic() - t0
    assert b["node"] == "n3", b
    wait_for(lambda: not alive(engine_pid), ACT_WITHIN, "n2's agent to stop the old engine")
    took = time.monotonic() - t0
    after = {n["name"]: n for n in ok("GET", "/v1/nodes")}["n2"]
    assert after["state"] == "down" and after["last_seen"] == nodes["n2"]["last_seen"], after
    stale = [e for e in ok("GET", "/v1/events", params={"volume": "v"})
             if e["kind"] == "engine-stale"]
    assert stale and "n3" in stale[0]["message"], stale
    return answered, took


@pytest.mark.slow
def test_sqlite_a_taken_over_engine_is_stopped_through_the_long_poll_after_a_manager_restart(
        manager, agents, tmp_path: Path):  # noqa: F811
    agents("n3", tmp_path / "n3", address="127.0.0.3")
    n2 = agents("n2", tmp_path / "n2")
    for name in ("n2", "n3"):
        wait_for(lambda n=name: any(d["state"] == "ready" for d in node(manager, n)["disks"]),
                 15, f"{name}'s disk")
    engine = attach_on_n2(manager.ok)["engine"]["pid"]

    n2.kill()  # its engine goes on; the new agent heartbeats once a minute
    agents("n2", tmp_path / "n2", extra=SLOW_BEAT)
    # The manager crashes and comes back on its address: the poll reconnects to it.
    manager.stop(signal.SIGKILL)
    manager.start(listen=urlsplit(manager.url).netloc)
    wait_for(lambda: node(manager, "n2")["state"] == "down", 30, "n2 down")
    answered, took = take_over_and_time(manager.ok, engine)
    print(f"sqlite: takeover answered in {answered:.2f} s; old engine gone {took:.2f} s "
          "after it started")


@pytest.mark.slow
def test_etcd_a_taken_over_engine_is_stopped_through_the_long_poll_after_the_leader_died(
        tmp_path: Path, etcd_server: EtcdServer, cleanup: None):  # noqa: F811
    store = etcd_server.url + "/watch-test"
    m1 = ClusterManager(tmp_path, "m1", store).start()
    m2 = ClusterManager(tmp_path, "m2", store).start()
    leader_url = wait_for(lambda: m1.cluster()["leader"], 30, "a leader")
    leader, other = (m1, m2) if leader_url == m1.url else (m2, m1)
    # Each agent polls the leader first: killing it moves the poll to the other manager.
    AgentProc([leader, other], "n3", tmp_path / "n3", address="127.0.0.3")
    n2 = AgentProc([leader, other], "n2", tmp_path / "n2")
    for name in ("n2", "n3"):
        wait_for(lambda n=name: any(d["state"] == "ready" for d in
                                    {x["name"]: x for x in other.ok("GET", "/v1/nodes")}[n]
                                    ["disks"]), 15, f"{name}'s disk")
    engine = attach_on_n2(other.ok)["engine"]["pid"]

    n2.kill()
    AgentProc([leader, other], "n2", tmp_path / "n2", extra=SLOW_BEAT)
    leader.kill()
    wait_for(lambda: other.cluster()["leader"] == other.url, 30, "the other manager to lead")
    wait_for(lambda: {x["name"]: x for x in other.ok("GET", "/v1/nodes")}["n2"]["state"]
             == "down", 30, "n2 down")
    answered, took = take_over_and_time(other.ok, engine)
    print(f"etcd: takeover answered in {answered:.2f} s; old engine gone {took:.2f} s "
          "after it started")


def raise_epoch(store: EtcdStore, volume: str) -> None:
    """Record a newer epoch for ``volume`` in etcd, as a manager restarting it elsewhere
    would (compare-and-set: the managers may write it meanwhile)."""
    while True:
        doc = store.get("volumes", volume)
        assert doc is not None
        version = doc.pop("_version")
        doc["epoch"] = int(doc["epoch"]) + 1
        try:
            store.put("volumes", volume, doc, expect_version=version)
            return
        except ConflictError:
            continue


@pytest.mark.slow
def test_etcd_a_frozen_manager_is_left_for_the_other_without_waiting_out_the_poll(
        tmp_path: Path, etcd_server: EtcdServer, cleanup: None):  # noqa: F811
    """A manager that stops answering without closing the connection (frozen, or its host
    cut off): the agent's heartbeat finds it gone in seconds and the long-poll open to it
    moves on then, not when its own time is up."""
    prefix = "/frozen-test"
    m1 = ClusterManager(tmp_path, "m1", etcd_server.url + prefix).start()
    m2 = ClusterManager(tmp_path, "m2", etcd_server.url + prefix).start()
    wait_for(lambda: m1.cluster()["leader"], 30, "a leader")
    AgentProc([m1, m2], "n2", tmp_path / "n2")  # heartbeats and polls m1 first
    wait_for(lambda: any(d["state"] == "ready" for d in
                         {x["name"]: x for x in m2.ok("GET", "/v1/nodes")}["n2"]["disks"]),
             15, "n2's disk")
    m2.ok("POST", "/v1/volumes", json={"name": "v", "size": "16M", "replicas": 1})
    engine = m2.ok("POST", "/v1/volumes/v/attach", json={"node": "n2"})["engine"]["pid"]
    store = EtcdStore(etcd_server.endpoints, prefix)
    assert m1.proc is not None
    m1.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        raise_epoch(store, "v")
        # Left to time out, the poll open to m1 would give up POLL + GRACE s after it
        # began, and a poll begins at least every POLL s: more than GRACE s from now. The
        # heartbeat's 3 s timeout (after at most a second) moves it to m2 sooner.
        wait_for(lambda: not alive(engine), GRACE - 1, "the engine stopped")
        took = time.monotonic() - t0
        print(f"etcd: the engine was gone {took:.2f} s after its epoch was raised, the "
              "polled manager frozen")
    finally:
        m1.proc.send_signal(signal.SIGCONT)
        store.close()
