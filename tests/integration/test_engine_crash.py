"""SIGKILL the engine and every replica under a flushing write load; restart; check the data.

With a local replica the engine's SIGKILL is that replica's crash too: its chain
must reopen consistent in the restarted engine.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from crashlog import check_blocks, parse_log, read_volume
from replicatools import start_replica

BS = 4096
BLOCKS = 2048
WRITER = Path(__file__).parent.parent / "crash_writer.py"
pytestmark = pytest.mark.timeout(300)


def flushed_writes(log: Path) -> dict[int, int]:
    """Per block, the last write acknowledged before the last completed flush."""
    acked: dict[int, int] = {}
    flushed: dict[int, int] = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["A"] and len(parts) == 3:
            acked[int(parts[1])] = int(parts[2])
        elif parts[:1] == ["F"]:
            flushed = dict(acked)
    return flushed


def restart(cluster) -> None:
    """Start every replica process again on its old directory, then the engine.

    The local replica, if any, has no process: the engine reopens its directory.
    """
    cluster.replicas = [r if getattr(r, "local", False) else start_replica(r.dir, None)
                        for r in cluster.replicas]
    for r in cluster.remote:
        cluster.track(r)
    cluster.start_engine()


@pytest.mark.parametrize("scenario, local", [
    ("all-at-once", False), ("one-first", False),
    ("all-at-once", True), ("one-first", True), ("local-first", True)],
    ids=["all-at-once-remote", "one-first-remote", "all-at-once-local", "one-first-local",
         "local-first"])
@pytest.mark.slow
def test_sigkill_everything_under_flushing_writes(cluster, tmp_path, scenario, local):
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rnd = random.Random(seed)
    eng = cluster.start(3, str(BLOCKS * BS), local=local)
    log = tmp_path / "writes.log"
    writer = subprocess.Popen(
        ["/usr/bin/python3", str(WRITER), eng.unix_uri("vol"), str(log), str(BLOCKS), str(seed),
         "4"], stderr=subprocess.PIPE)
    time.sleep(1.0 + rnd.random())
    if scenario == "one-first":
        # A replica dies first: the engine drops it and keeps acknowledging writes, so
        # after the crash that replica is stale and must be rebuilt, never served.
        first = cluster.remote[0]
        first.kill()
        eng.wait_for(lambda i: i["health"] == "degraded", what="degraded")
        time.sleep(0.5 + rnd.random())
    elif scenario == "local-first":
        # The local replica leaves first (taken out, its chain closed in the directory):
        # the remote ones go on acknowledging writes, so at restart the local one is
        # stale and must be rebuilt from them, never served.
        first = cluster.local
        eng.ok("DELETE", f"/v1/replicas/{first.name}")
        time.sleep(0.5 + rnd.random())
    victims = [eng, *cluster.remote]
    rnd.shuffle(victims)
    for v in victims:
        v.proc.send_signal(signal.SIGKILL)
    for v in victims:
        v.proc.wait(30)
    writer.wait(60)
    assert log.exists() and log.stat().st_size > 0, writer.stderr.read()
    acked, issued = parse_log(log)
    flushed = flushed_writes(log)
    assert len(flushed) > 50, "the kill should land after some flushes"

    restart(cluster)
    eng = cluster.engine
    info = eng.wait_for(lambda i: i["health"] == "healthy", timeout=120, what="healthy")
    events = eng.ok("GET", "/v1/events")
    if scenario != "all-at-once":
        stale = [e for e in events
                 if e["kind"] == "replica-excluded" and e["replica"] == first.dir.name]
        assert stale and "stale" in stale[0]["message"], events
    data = read_volume(eng.uri(), tmp_path / "volume.img")
    check_blocks(data, acked, issued, BLOCKS)
    for block, seq in flushed.items():
        got = int.from_bytes(data[block * BS + 8:block * BS + 16], "little")
        assert got >= seq, f"flushed write {seq} to block {block} lost (holds {got})"
    # Every replica agrees with the volume once the reconcile/rebuild is done.
    for r in cluster.replicas:
        assert read_volume(r.uri("head"), tmp_path / f"{r.dir.name}.img") == data
    if local:
        assert {r["name"]: r.get("local", False) for r in info["replicas"]}[
            cluster.local.name] is True
    print("generation", info["generation"], "events", [e["kind"] for e in events])
