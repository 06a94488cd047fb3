"""A forced takeover across a partial partition: `drove volume attach V --node B --force`
while host b, where the new engine would run, cannot reach host c, which holds a replica
and still heartbeats to the manager.

Hosts (tests/hosts.py): m runs `drove serve` (SQLite; its own node cordoned), a, b and c
an agent each; the volume's replicas are on a, b and c, its engine on a.  a is cut off
(its engine may live on behind the cut and, with c's replica, meet its write quorum), then
the link between b and c alone is cut: the takeover on b cannot fence c's replica, so it
is refused and undone, the volume still recorded on a with none of its replicas failed and
nothing left running for it on b; when a returns its engine (still the volume's) serves on.
Once the link heals the same takeover succeeds and every flushed write is there.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from cluster import AgentOnHost, Cli, ManagerOnHost, poll
from enginetools import start_engine
from hosts import Host
from replicatools import kill_all, start_replica

pytestmark = pytest.mark.timeout(600)

STORAGE = ("a", "b", "c")


def qemu_io_on(host: Host, uri: str, *commands: str) -> str:
    """Run qemu-io on ``host`` against ``uri``; fail on any failed command or pattern."""
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    r = host.call([*argv, uri], timeout=120)
    text = r.stdout + r.stderr
    assert r.returncode == 0 and "failed" not in text and "Pattern verification" not in text, \
        text
    return text


def engine_pids(host: Host) -> list[int]:
    """Processes on ``host`` that are drove engines."""
    found = []
    for pid in host.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"engine" in argv and b"serve" in argv:
            found.append(pid)
    return found


def test_an_engine_told_to_fence_all_claims_nothing_unless_every_replica_answers(tmp_path):
    """`drove engine serve --fence-all` (what a takeover starts) with one replica that
    does not answer: it exits saying which, and the other replica never saw its epoch."""
    a, b = (start_replica(tmp_path / n, "16M") for n in ("a", "b"))
    procs = [a, b]
    try:
        b.proc.send_signal(signal.SIGSTOP)  # alive, holding its port, answering nothing
        with pytest.raises(RuntimeError, match=r"replica\(s\) b \(.*nothing was claimed"):
            start_engine(tmp_path / "e1", "vol", [a, b], "--fence-all", "--timeout", "2",
                         names=["a", "b"])
        assert a.ok("GET", "/v1/info").get("epoch", 0) == 0
        b.proc.send_signal(signal.SIGCONT)
        engine = start_engine(tmp_path / "e2", "vol", [a, b], "--fence-all",
                              names=["a", "b"])
        procs.append(engine)
        epoch = engine.info()["epoch"]
        assert epoch >= 1 and engine.modes() == {"a": "RW", "b": "RW"}
        assert a.ok("GET", "/v1/info")["epoch"] == b.ok("GET", "/v1/info")["epoch"] == epoch
    finally:
        b.proc.send_signal(signal.SIGCONT)
        kill_all(procs)


@pytest.mark.slow
def test_takeover_is_refused_while_the_new_engine_cannot_fence_a_replica(hosts):
    h = {n: hosts.add(n) for n in ("m", *STORAGE)}
    mgr = ManagerOnHost(h["m"], "sqlite").start()
    cli = Cli(h["m"], [mgr.url], mgr.token)
    agents = [AgentOnHost(h[n], [mgr.url], mgr.cluster_token_file).start(wait=False)
              for n in STORAGE]
    for agent in agents:
        agent.wait_ready()

    def storage_up() -> bool:
        nodes = {n["name"]: n for n in cli.json("node", "list")}
        return all(n in nodes and nodes[n]["state"] == "up"
                   and any(d["state"] == "ready" for d in nodes[n]["disks"]) for n in STORAGE)

    poll(storage_up, 60, "a, b and c up with a ready disk")
    for n in cli.json("node", "list"):
        if n["name"] not in STORAGE:
            cli.run("node", "cordon", n["name"])  # the manager's own node holds no replica
    for key, value in (("replica_timeout", "3"), ("replica_replenish_wait", "600"),
                       ("failed_replica_retry_seconds", "1")):
        cli.run("settings", "set", key, value)
    cli.run("volume", "create", "v", "--size", "32M", "--replicas", "3")
    v = cli.json("volume", "attach", "v", "--node", "a")
    nodes = {r["node"]: r["name"] for r in v["replicas"]}
    assert sorted(nodes) == list(STORAGE), v["replicas"]
    qemu_io_on(h["a"], v["nbd_uri"], "write -P 0x5a 0 32M", "flush")
    old_engine, old_epoch = v["engine"]["pid"], v["engine"]["epoch"]

    h["a"].cut()  # its engine lives on behind the cut
    poll(lambda: cli.node("a")["state"] == "down", 30, "a down")
    h["b"].block(h["c"])  # b and c both still reach the manager
    poll(lambda: cli.node("c")["state"] == "up" and cli.node("b")["state"] == "up", 30,
         "b and c up")

    r = cli.run("volume", "attach", "v", "--node", "b", "--force", check=False)
    assert r.returncode != 0, r.stdout
    message = " ".join(r.stderr.split())
    assert f"{nodes['c']} (node c) could not be fenced" in message, message
    assert "stays attached on node a" in message, message
    # Undone: recorded as it was, attached on a with the same engine; no replica failed;
    # nothing of the refused engine runs on b.
    after = cli.volume("v")
    assert after["node"] == "a" and after["state"] == "attached", after
    assert after["engine"]["pid"] == old_engine
    # No replica saw the refused engine's epoch: the old engine's stays the volume's (were
    # it stale, its agent would stop it when a returns).
    assert after["engine"]["epoch"] == old_epoch, after["engine"]
    assert {r["name"]: r["state"] for r in after["replicas"]} == {
        name: "running" for name in nodes.values()}, after["replicas"]
    assert engine_pids(h["b"]) == []
    # The replica processes the takeover had stopped on b and c run again (new ones).
    assert all(Path(f"/proc/{r['pid']}").exists() for r in after["replicas"]
               if r["node"] != "a"), after["replicas"]
    events = cli.json("event", "list", "--volume", "v")
    assert [e for e in events if e["kind"] == "volume-takeover-refused"], events
    assert not [e for e in events if e["kind"] in ("volume-takeover", "replica-failed")], events

    # a returns: its engine, still the volume's, is not stopped as stale; the healer gives
    # it back its replicas and it takes writes again.
    h["a"].restore()
    back = cli.wait_volume("v", lambda x: x["health"] == "healthy" and all(
        r["mode"] == "RW" for r in x["replicas"]), 120, "healthy again on a")
    assert back["node"] == "a" and back["engine"]["pid"] == old_engine, back
    assert Path(f"/proc/{old_engine}").exists()
    # Nor was it ever named stale, not even while the takeover was under way. (The refused
    # engine on b may be: b's agent can list it before the undo has stopped it, and it must
    # stop then.)
    stale = [e["message"] for e in cli.json("event", "list", "--volume", "v")
             if e["kind"] == "engine-stale"]
    assert not [m for m in stale if "node a runs" in m or f"epoch {old_epoch})" in m], stale
    # Its replicas on b and c rebuilt from its local one (served on a's address).
    qemu_io_on(h["a"], back["nbd_uri"], "read -P 0x5a 0 32M", "write -P 0x6b 0 1M", "flush")

    # Cut again, the b-c link healed: the same takeover goes through.
    h["a"].cut()
    poll(lambda: cli.node("a")["state"] == "down", 30, "a down again")
    h["b"].unblock(h["c"])
    took = cli.json("volume", "attach", "v", "--node", "b", "--force")
    assert took["node"] == "b" and took["engine"]["epoch"] > old_epoch, took
    states = {r["node"]: r["state"] for r in took["replicas"]}
    assert states == {"a": "failed", "b": "running", "c": "running"}, took["replicas"]
    qemu_io_on(h["b"], took["nbd_uri"], "read -P 0x6b 0 1M", "read -P 0x5a 1M 31M")
