"""End to end on a cluster of namespace hosts, through the CLI only (issue 16, "How it is
checked").

Hosts (tests/hosts.py): m1, m2, m3 run the 3-member etcd and the manager(s); ``ops`` is the
operator's machine where the CLI runs; ``a`` is a compute node (the engine's), ``b``..``e``
storage nodes with an agent each. fio runs on ``a`` against the engine's NBD export.

Stages, each passing on what existed when it was committed:

* Stage 1: a 3-replica volume on b, c, d (e cordoned while it is created) attached on a; fio
  verify runs while host c is killed: no fio error, degraded, rebuilt on e after the
  shortened replenish wait, healthy; then host b's link is cut for less than the wait and
  restored: b's replica is rebuilt in place by delta (bytes copied, from the engine's
  rebuild-finished event, far below the volume size, while e's full rebuild copied about
  all of it). Prints the time to detect a dead host and the RSS of managers and agents.
* Stage 2 (part (a): several managers, leader election, ``--no-agent``, DATA_DIR/
  cluster-token): two ``--no-agent`` managers on m1 and m2, the CLI and the agents given
  both URLs; while the volume waits for host c, the leader's host is killed (its etcd
  member with it): the other takes over (time printed), the API answers, fio goes on, and
  the new leader's healer does the replacement on e.
* Stage 3 (part (b): ``drove volume attach V --node OTHER --force``, a returning host's
  agent stopping its fenced engine): a byte pattern written and flushed on a; a's link cut
  while a writer goes on giving its engine another pattern; attach on a down node refused
  without ``--force``, then taken over on b with it (a newer epoch); a restored: its agent
  stops the old engine; read through b's engine, every flushed block is there and not one
  block of the cut-off engine's writes. Cut rather than killed: a killed engine writes
  nothing anyway, a cut-off one goes on taking writes, which fencing must keep out.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from accesstools import engine_key
from cluster import AgentOnHost, Cli, FioLoop, ManagerOnHost, poll, rss_mib
from drove.replica.access import KEY_ENV
from hosts import EtcdCluster, Host

MiB = 1 << 20
SIZE = 64 * MiB
FIO_REGION = "8M"  # fio rounds write here; the rest of the volume is written once at start
STORAGE = ("b", "c", "d", "e")
PATTERN_OFFSET, PATTERN_SIZE = 32 * MiB, 16 * MiB  # stage 3 writes byte patterns here
FLUSHED, STALE = 0x5A, 0xC3  # written and flushed before a's cut / by a's engine after it


def _start_cluster(hosts) -> tuple[dict[str, Host], dict[str, ManagerOnHost], Cli,
                                   list[AgentOnHost]]:
    """Hosts, etcd on m1..m3, managers (no agent) on m1 and m2, agents on a..e."""
    h = {n: hosts.add(n) for n in ("m1", "m2", "m3", "ops", "a", *STORAGE)}
    etcd = EtcdCluster([h["m1"], h["m2"], h["m3"]]).start()
    managers = {n: ManagerOnHost(h[n], etcd.store_url, "--no-agent") for n in ("m1", "m2")}
    for m in managers.values():
        m.start()
    urls = [m.url for m in managers.values()]
    first = managers["m1"]
    assert first.token == managers["m2"].token  # agreed in etcd
    cli = Cli(h["ops"], urls, first.token)
    roles = {"a": "compute", "b": "both"}  # b holds a replica and may run the engine
    agents = [AgentOnHost(h[n], urls, first.cluster_token_file,
                          role=roles.get(n, "storage")).start(wait=False)
              for n in ("a", *STORAGE)]
    for agent in agents:
        agent.wait_ready()

    def all_up() -> bool:
        nodes = {n["name"]: n for n in cli.json("node", "list")}
        return all(n in nodes and nodes[n]["state"] == "up"
                   and any(d["state"] == "ready" for d in nodes[n]["disks"])
                   for n in ("a", *STORAGE))

    poll(all_up, 60, "every agent's node up with a ready disk")
    # No manager runs an agent: the nodes are the five agents' only.
    assert sorted(n["name"] for n in cli.json("node", "list")) == ["a", *STORAGE]
    return h, managers, cli, agents


def _replica_nodes(v: dict) -> dict[str, str]:
    """Replica name -> node of the volume's replicas."""
    return {r["name"]: r["node"] for r in v["replicas"]}


def _healthy_on(nodes: set[str]):
    """A predicate: healthy, every replica RW and running, on exactly ``nodes``."""
    def check(v: dict) -> bool:
        return (v["health"] == "healthy" and {r["node"] for r in v["replicas"]} == nodes
                and all(r["mode"] == "RW" and r["state"] == "running" for r in v["replicas"]))
    return check


def _rebuild_copied(cli: Cli, control_url: str, key: str, replica: str) -> list[int]:
    """Bytes copied by each finished rebuild of ``replica``, from the engine's events (its
    API wants the volume's access ``key``)."""
    events = cli.json("engine", "events", "--url", control_url, env={KEY_ENV: key})
    out = []
    for e in events:
        if e["kind"] == "rebuild-finished" and f"replica {replica} " in e["message"]:
            m = re.search(r"\((\d+) bytes copied\)", e["message"])
            assert m, e
            out.append(int(m.group(1)))
    return out


def _leader(cli: Cli) -> str | None:
    """The URL of the leading manager, as `drove cluster status` says."""
    return cli.json("cluster", "status")["leader"]


@pytest.mark.slow
def test_a_volume_outlives_dead_hosts_a_dead_leader_and_cut_links(hosts, tmp_path):
    h, managers, cli, agents = _start_cluster(hosts)
    a, b, c = h["a"], h["b"], h["c"]

    # Placement: with e cordoned, the three replicas can only go to b, c, d.
    cli.run("node", "cordon", "e")
    v = cli.json("volume", "create", "v", "--size", str(SIZE), "--replicas", "3",
                 "--data-locality", "disabled")
    assert sorted(_replica_nodes(v).values()) == ["b", "c", "d"], v
    cli.run("node", "uncordon", "e")

    att = cli.json("volume", "attach", "v", "--node", "a")
    assert att["node"] == "a" and att["health"] == "healthy", att
    uri, control = att["nbd_uri"], att["engine"]["control_url"]
    key = engine_key(att["engine"]["pid"])
    # The engine's NBD export is for clients on its own host (fio runs on a); its control
    # API, on a's address for the managers, wants the volume's key.
    assert uri.startswith("nbd://127.0.0.1:") and control.startswith(f"http://{a.address}:"), att
    # Every block written once: a rebuild in full copies the whole volume, a delta far less.
    a.check_call(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                  "--bs=1M", "--iodepth=4", f"--size={SIZE}"], timeout=300,
                 capture_output=True)
    print("\nRSS after the fill: " + ", ".join(
        [f"manager {n} {rss_mib(m.proc):.0f} MiB" for n, m in managers.items()]
        + [f"agent {x.name} {rss_mib(x.proc):.0f} MiB" for x in agents]))

    # Host c dies under fio verify; the leader's host dies while the volume waits for c.
    # The wait outlasts detection and takeover, so the replacement is the new leader's work.
    cli.run("settings", "set", "replica_replenish_wait", "30")
    fio = FioLoop(a, uri, FIO_REGION).start()
    fio.wait_rounds(1, 120)
    c_replica = next(n for n, node in _replica_nodes(v).items() if node == "c")
    c.kill()
    killed = time.monotonic()
    poll(lambda: cli.node("c")["state"] == "down", 60, "node c down")
    print(f"time to detect a dead host: {time.monotonic() - killed:.1f} s")
    assert cli.node("c")["last_seen"]
    cli.wait_volume("v", lambda x: x["health"] == "degraded", 60, "degraded")

    old = _leader(cli)
    (gone,) = [m for m in managers.values() if m.url == old]
    (other,) = [m for m in managers.values() if m.url != old]
    gone.host.kill()
    killed = time.monotonic()
    poll(lambda: _leader(cli) == other.url, 60, f"{other.url} to lead")
    print(f"time to take over as leader: {time.monotonic() - killed:.1f} s")
    assert "e" not in _replica_nodes(cli.volume("v")).values()  # nothing replaced yet
    v = cli.wait_volume("v", _healthy_on({"b", "d", "e"}), 180, "rebuilt on e, healthy")
    e_replica = next(n for n, node in _replica_nodes(v).items() if node == "e")
    events = cli.json("event", "list", "--volume", "v")
    kinds = [e["kind"] for e in events]
    assert "replica-replaced" in kinds and "volume-degraded" in kinds, kinds
    assert any(c_replica in e["message"] for e in events if e["kind"] == "replica-replaced")
    fio.wait_rounds(1, 120)  # a whole round after the rebuild too
    fio.stop()
    assert not fio.failures, fio.failures
    (full,) = _rebuild_copied(cli, control, key, e_replica)
    assert full >= SIZE * 0.9, full  # e held nothing: everything was copied

    # Host b's link cut for less than the wait: b's replica is rebuilt in place, by delta.
    cli.run("settings", "set", "replica_replenish_wait", "120")
    b_replica = next(n for n, node in _replica_nodes(v).items() if node == "b")
    fio = FioLoop(a, uri, FIO_REGION).start()
    fio.wait_rounds(1, 120)
    b.cut()
    cli.wait_volume("v", lambda x: x["health"] == "degraded", 60, "degraded with b cut off")
    poll(lambda: cli.node("b")["state"] == "down", 60, "node b down")
    b.restore()
    v = cli.wait_volume("v", _healthy_on({"b", "d", "e"}), 180, "b's replica rebuilt, healthy")
    assert b_replica in _replica_nodes(v), v  # the same replica, not a replacement
    fio.wait_rounds(1, 120)
    fio.stop()
    assert not fio.failures, fio.failures
    copied = _rebuild_copied(cli, control, key, b_replica)
    assert copied, "no finished rebuild of b's replica"
    print(f"delta rebuild of b copied {copied[-1]} bytes (full rebuild of e: {full})")
    # fio wrote only FIO_REGION (8 MiB) since b left; a delta may copy some of it in more
    # than one layer (8 to 11 MiB seen), a full copy is all 64 MiB.
    assert copied[-1] <= SIZE // 3, copied
    assert other.alive()

    _engine_host_lost(cli, a, b, att, tmp_path)


def _write_pattern(host: Host, uri: str, pattern: int, *extra: str) -> list[str]:
    """fio writing byte ``pattern`` over PATTERN_REGION of the export, once, then a flush."""
    return ["fio", "--name=pattern", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
            "--bs=64k", "--iodepth=4", f"--offset={PATTERN_OFFSET}", f"--size={PATTERN_SIZE}",
            f"--buffer_pattern={pattern:#04x}", "--scramble_buffers=0", "--end_fsync=1",
            *extra]


def _engine_host_lost(cli: Cli, a: Host, b: Host, att: dict, tmp_path) -> None:
    """Stage 3: a's link cut under its engine; the volume taken over on b with --force; the
    flushed writes are there and the old engine's later ones never reach the replicas."""
    uri, old_control = att["nbd_uri"], att["engine"]["control_url"]
    old_key = {KEY_ENV: engine_key(att["engine"]["pid"])}
    a.check_call(_write_pattern(a, uri, FLUSHED), timeout=300, capture_output=True)
    a.cut()
    # The old engine takes writes it can no longer mirror; they are queued towards the
    # replicas until it gives up on them.
    stale = a.run(_write_pattern(a, uri, STALE, "--time_based", "--runtime=600"),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poll(lambda: cli.node("a")["state"] == "down", 60, "node a down")
    refused = cli.run("volume", "attach", "v", "--node", "b", check=False)
    assert refused.returncode != 0 and "--force" in refused.stderr, refused
    moved = cli.json("volume", "attach", "v", "--node", "b", "--force")
    assert moved["node"] == "b" and moved["engine"]["epoch"] > att["engine"]["epoch"], moved
    assert moved["nbd_uri"].startswith("nbd://127.0.0.1:"), moved
    assert "volume-takeover" in [e["kind"] for e in cli.json("event", "list", "--volume", "v")]

    a.restore()
    # a's agent heartbeats again and stops the engine no longer wanted there.
    poll(lambda: cli.run("engine", "info", "--url", old_control, check=False,
                         env=old_key).returncode, 60, "the old engine on a stopped")
    stale.kill()
    stale.wait(30)
    assert cli.node("a")["state"] == "up"
    assert "engine-stale" in [e["kind"] for e in cli.json("event", "list", "--volume", "v")]
    v = cli.wait_volume("v", _healthy_on({"b", "d", "e"}), 120, "healthy on b")
    assert v["node"] == "b"

    # Read the whole volume through the new engine: the flushed pattern everywhere it was
    # written, not one block of what the old engine took after the cut.
    image = tmp_path / "after-takeover.raw"
    b.check_call(["nbdcopy", v["nbd_uri"], str(image)], timeout=300)
    data = image.read_bytes()
    assert len(data) == SIZE
    region = data[PATTERN_OFFSET:PATTERN_OFFSET + PATTERN_SIZE]
    blocks = [region[i:i + 4096] for i in range(0, PATTERN_SIZE, 4096)]
    stale_blocks = sum(1 for blk in blocks if blk.count(STALE) > 2048)
    assert stale_blocks == 0, f"{stale_blocks} blocks written by the fenced engine are there"
    lost = sum(1 for blk in blocks if blk != bytes([FLUSHED]) * 4096)
    assert lost == 0, f"{lost} of {len(blocks)} flushed blocks are not there"
