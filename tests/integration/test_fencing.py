"""One writer per volume: epochs fence every stale engine (real processes, real clients).

The split brain the fencing closes: a second engine started on the replicas of a
running one.  Without fencing, a write sent through the old engine after the new
one took over reached the replicas and overwrote the new engine's data.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from enginetools import Cluster, EngineProc, start_engine
from replicatools import NBDSH, ReplicaProc, nbdsh

MiB = 1 << 20


def write(uri: str, byte: int, length: int, offset: int) -> None:
    """Write ``length`` bytes of ``byte`` and flush, through a real client (libnbd)."""
    nbdsh(uri, f"h.pwrite(bytes([{byte}]) * {length}, {offset})\nh.flush()")


def holds(uri: str, byte: int, length: int, offset: int) -> bool:
    """Whether the export reads ``length`` bytes of ``byte`` at ``offset`` (libnbd)."""
    out = nbdsh(uri, f"""
step = 1 << 22
ok = all(h.pread(min(step, {length} - p), {offset} + p) == bytes([{byte}]) * min(step, {length} - p)
         for p in range(0, {length}, step))
print("same" if ok else "differs")
""")
    return out.stdout.strip() == b"same"


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` until true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def second_engine(tmp: Path, replicas: list[ReplicaProc]) -> EngineProc:
    """Another `drove engine serve` of the same volume over the same replicas."""
    return start_engine(tmp / "engine-b", "vol", replicas,
                        names=[r.dir.name for r in replicas])


def heads_hold(replicas: list[ReplicaProc], byte: int, length: int, offset: int) -> None:
    """Every replica's head (its plain, read-only export) holds ``byte`` there."""
    for r in replicas:
        assert holds(r.unix_uri("head"), byte, length, offset), f"replica {r.dir.name} differs"


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def test_second_engine_fences_the_first(cluster: Cluster, tmp_path: Path) -> None:
    """Engine B takes over: A's writes fail, B reads B's data and every write A acknowledged."""
    a = cluster.start(3, "64M")
    write(a.uri(), 0xAA, MiB, 0)  # acknowledged and flushed by A
    b = second_engine(tmp_path, cluster.replicas)
    cluster.track(b)
    assert b.info()["epoch"] > a.info()["epoch"]

    write(b.uri(), 0xBB, 64 * 1024, 0)
    # The split brain: a write through the old engine after the new one took over.
    res = nbdsh(a.uri(), "h.pwrite(bytes([0xCC]) * 65536, 0)\nh.flush()", check=False)
    assert res.returncode != 0, "the fenced engine acknowledged a write"
    wait_until(lambda: a.info()["health"] == "faulted", 30, "the old engine to fault")
    # It learns why: its replicas say a newer engine owns them.
    wait_until(lambda: a.info()["fenced"], 30, "the old engine to know it was fenced")
    assert f"epoch {b.info()['epoch']})" in a.info()["fenced"], a.info()["fenced"]

    assert holds(b.uri(), 0xBB, 64 * 1024, 0)
    # What A acknowledged before B started is kept.
    assert holds(b.uri(), 0xAA, MiB - 64 * 1024, 64 * 1024)
    heads_hold(cluster.replicas, 0xBB, 64 * 1024, 0)
    assert b.info()["health"] == "healthy"
    kinds = [e["kind"] for e in a.ok("GET", "/v1/events")]
    assert "fenced" in kinds


# A libnbd client that connects, then (on "go") queues writes it never waits for.
_QUEUE_WRITES = r"""
import sys
h.connect_uri(URI)
print("connected", flush=True)
sys.stdin.readline()
buf = bytes([0xEE]) * 65536
cookies = [h.aio_pwrite(buf, i * 65536) for i in range(16)]
for _ in range(50):  # hand everything to the kernel
    h.poll(0)
print("queued", flush=True)
sys.stdin.readline()
ok = 0
for c in cookies:
    try:
        ok += bool(h.aio_command_completed(c))
    except Exception:
        pass
print("acknowledged", ok, flush=True)
"""


def test_writes_queued_behind_a_stopped_engine_never_land(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    """SIGSTOP engine A with writes queued at it; B takes over; SIGCONT A: they never land."""
    a = cluster.start(3, "64M", "--timeout", "2")
    script = _QUEUE_WRITES.replace("URI", repr(a.uri()))
    client = subprocess.Popen([*NBDSH, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "connected"
        a.proc.send_signal(signal.SIGSTOP)
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "queued"

        b = second_engine(tmp_path, cluster.replicas)
        cluster.track(b)
        write(b.uri(), 0xBB, MiB, 0)

        a.proc.send_signal(signal.SIGCONT)
        # A now reads the queued writes and forwards them: every one must fail.
        wait_until(lambda: a.ok("GET", "/v1/stats")["ops"]["write"]["errors"] >= 16, 60,
                   "the old engine to fail the queued writes")
        assert a.ok("GET", "/v1/stats")["ops"]["write"]["count"] == 16
        assert a.ok("GET", "/v1/stats")["ops"]["write"]["errors"] == 16
        client.stdin.write("done\n")
        client.stdin.flush()
        line = client.stdout.readline().split()
        assert line == ["acknowledged", "0"], line
    finally:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGCONT)
        client.kill()
        client.wait()
    assert holds(b.uri(), 0xBB, MiB, 0)
    heads_hold(cluster.replicas, 0xBB, MiB, 0)


def test_stopped_replica_queued_writes_never_land_after_its_rebuild_starts(
        cluster: Cluster) -> None:
    """A SIGSTOPped replica with many writes queued in its socket is dropped, then rebuilt
    while still stopped: after SIGCONT none of them lands in its new head."""
    eng = cluster.start(2, "64M", "--timeout", "1")
    r1 = cluster.replicas[1]
    r1.proc.send_signal(signal.SIGSTOP)
    try:
        # Many MiB queue in r1's socket (more than one read's worth); the engine drops r1
        # after its timeout and acknowledges them with r0 alone.
        write(eng.uri(), 0x11, 32 * MiB, 0)
        eng.wait_for(lambda i: i["replicas"][1]["mode"] == "ERR", 30, "r1 to be dropped")
        write(eng.uri(), 0x22, 32 * MiB, 0)  # newer data, r0 only
        # Rebuild r1 while it is still stopped; it resumes while the rebuild waits on it.
        eng.ok("POST", "/v1/replicas", json={"name": "r1"})
    finally:
        r1.proc.send_signal(signal.SIGCONT)
    eng.wait_rebuilt(120)
    eng.wait_for(lambda i: i["health"] == "healthy", 60, "the volume to be healthy")
    heads_hold(cluster.replicas, 0x22, 32 * MiB, 0)


def test_an_engine_with_an_old_epoch_refuses_to_start(cluster: Cluster, tmp_path: Path) -> None:
    """The manager's epochs: an engine given one not above the replicas' never serves."""
    a = cluster.start(2, "64M", "--epoch", "5")
    assert a.info()["epoch"] == 5
    for epoch in ("5", "4"):
        with pytest.raises(RuntimeError, match="not above the replicas' epoch 5"):
            start_engine(tmp_path / f"engine-{epoch}", "vol", cluster.replicas, "--epoch", epoch,
                         names=[r.dir.name for r in cluster.replicas])
    assert a.info()["health"] == "healthy" and not a.info()["fenced"]
    write(a.uri(), 0x5A, 4096, 0)
