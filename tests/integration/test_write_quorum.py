"""Write quorum: an engine with a local replica and others never acknowledges a write on the
local one alone (a host cut off and taken over elsewhere would lose it).

Real engine and replica processes (tests/enginetools.py), real NBD clients (nbdsh,
qemu-io); a replica is cut off by SIGSTOP (it stops answering, as behind a cut
link) or killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from enginetools import start_engine
from replicatools import NBDSH, nbdsh, qemu_io, run

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)


def events(eng, kind: str) -> list[dict]:
    """The engine's events of one kind."""
    return [e for e in eng.ok("GET", "/v1/events") if e["kind"] == kind]


def timed_failure(uri: str, script: str) -> float:
    """Run ``script`` in nbdsh; it must fail (EIO); the seconds it took."""
    t0 = time.monotonic()
    res = nbdsh(uri, script, check=False)
    took = time.monotonic() - t0
    assert res.returncode != 0, f"acknowledged: {res.stdout!r}"
    assert b"Input/output error" in res.stderr, res.stderr.decode()[-2000:]
    return took


def test_a_cut_off_engine_acknowledges_nothing_on_its_local_replica_alone(cluster, tmp_path):
    """Engine A serves r0 itself and mirrors to r1.  r1 stops answering (A's host cut off
    from it): A's writes, zeros and flushes wait --quorum-wait, then fail; none is
    acknowledged.  B then takes the volume over on r1 alone: everything A acknowledged is
    there; of what A failed, only the write already in flight when r1 went silent may have
    reached r1 (unacknowledged, so either content is right there); nothing later did."""
    a = cluster.start(2, "16M", "--timeout", "2", "--quorum-wait", "3", local=True)
    assert a.info()["write_quorum"] == {"required": True, "met": True, "lost_since": None,
                                        "waiting": 0, "wait_seconds": 3.0}
    qemu_io(a.uri(), "write -P 0xaa 0 2M", "flush")
    remote = cluster.replicas[1]
    os.kill(remote.proc.pid, signal.SIGSTOP)
    try:
        # In flight when r1 goes silent: r0 has it at once, r1 times out (2 s), is asked
        # why (2 s) and dropped; the write is not acknowledged, it waits, then fails.
        took = timed_failure(a.uri(), "h.pwrite(b'\\xcc' * 65536, 4 << 20)")
        assert took >= 3, took
        info = a.info()
        assert info["replicas"][0]["mode"] == "ERR" and info["health"] == "degraded", info
        assert info["write_quorum"]["met"] is False and info["write_quorum"]["lost_since"]
        (lost,) = events(a, "write-quorum-lost")
        assert "local replica alone never acknowledges" in lost["message"]
        shown = run([sys.executable, "-m", "drove", "engine", "info", "--url", a.control])
        assert b"writes waiting" in shown.stdout, shown.stdout
        # Later requests wait and fail the same way; reads still work.
        for script in ("h.pwrite(b'\\xcd' * 4096, 1 << 20)", "h.zero(1 << 20, 0)",
                       "h.trim(65536, 65536)", "h.flush()"):
            assert 2.5 <= timed_failure(a.uri(), script) < 30
        # None of them reached even the local replica.
        qemu_io(a.uri(), "read -P 0xaa 0 2M", read_only=True)
        # While they wait, the engine says so.
        waiting = subprocess.Popen([*NBDSH, "-c", f"h.connect_uri({a.uri()!r})\n"
                                    "h.pwrite(b'\\xce' * 4096, 0)"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        a.wait_for(lambda i: i["write_quorum"]["waiting"] == 1, 10, "a waiting write")
        assert waiting.wait(30) != 0
    finally:
        os.kill(remote.proc.pid, signal.SIGCONT)

    # The takeover elsewhere: B on r1 only (A's host, and r0, unreachable to it).
    epoch = a.info()["epoch"]
    b = start_engine(tmp_path / "engine-b", "vol", [remote], "--epoch", str(epoch + 1),
                     names=["r1"])
    cluster.track(b)
    assert b.info()["write_quorum"]["required"] is False  # no local replica: every ack is remote
    qemu_io(b.uri(), "read -P 0xaa 0 2M", read_only=True)
    qemu_io(b.uri(), "write -P 0xbb 0 64k", "flush")
    # A still acknowledges nothing.
    timed_failure(a.uri(), "h.pwrite(b'\\xcf' * 4096, 0)")
    qemu_io(b.uri(), "read -P 0xbb 0 64k", "read -P 0xaa 64k 1984k", read_only=True)


def test_writes_wait_for_an_outside_replica_and_go_on_when_one_joins(cluster):
    """r1 dies: a write waits (not in flight, so a rebuild can pause I/O) until a new remote
    replica joins write-only, then completes; nothing the client wrote is lost."""
    eng = cluster.start(2, "16M", "--timeout", "2", "--quorum-wait", "120", local=True)
    qemu_io(eng.uri(), "write -P 0x11 0 16M", "flush")
    cluster.replicas[1].kill()
    eng.wait_for(lambda i: i["write_quorum"]["met"] is False, 30, "the quorum lost")
    script = f"""
import time
h.connect_uri({eng.uri()!r})
buf = nbd.Buffer.from_bytearray(bytearray(b'\\x22' * (1 << 20)))
cmd = h.aio_pwrite(buf, 3 << 20)
deadline = time.monotonic() + 1.0
while time.monotonic() < deadline:
    h.poll(50)
    assert not h.aio_command_completed(cmd), "acknowledged on the local replica alone"
print("waiting", flush=True)
while not h.aio_command_completed(cmd):
    h.poll(100)
h.flush()
print("written", flush=True)
"""
    client = subprocess.Popen([*NBDSH, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert client.stdout.readline().strip() == b"waiting", client.stderr.read()
        eng.wait_for(lambda i: i["write_quorum"]["waiting"] == 1, 10, "the write waiting")
        r2 = cluster.replica("r2", "16M")
        eng.ok("POST", "/v1/replicas", json={"name": "r2", "url": r2.control})
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0 and out.strip() == b"written", err.decode()
    finally:
        if client.poll() is None:
            client.kill()
    eng.wait_rebuilt()
    info = eng.info()
    assert info["write_quorum"]["met"] is True and info["write_quorum"]["lost_since"] is None
    assert events(eng, "write-quorum-met")
    for uri in (eng.uri(), cluster.local.uri("head"), r2.uri("head")):
        qemu_io(uri, "read -P 0x11 0 3M", "read -P 0x22 3M 1M", "read -P 0x11 4M 12M",
                read_only=True)


def test_the_quorum_needs_a_local_replica_and_others(cluster, tmp_path):
    """Without a local replica every acknowledgement is remote (nothing changes); a lone
    local replica is the whole volume (nothing changes); with a local replica and two
    others, losing one other costs no wait."""
    eng = cluster.start(3, "16M", "--timeout", "2", "--quorum-wait", "60", local=True)
    cluster.replicas[1].kill()
    eng.wait_for(lambda i: i["replicas"][0]["mode"] == "ERR", 30, "r1 dropped")
    t0 = time.monotonic()
    qemu_io(eng.uri(), "write -P 0x33 0 1M", "flush")
    assert time.monotonic() - t0 < 10
    assert eng.info()["write_quorum"]["met"] is True and not events(eng, "write-quorum-lost")
    eng.stop()

    # All remote: one of two killed, the other carries on at once.
    s0, s1 = cluster.replica("s0", "16M"), cluster.replica("s1", "16M")
    eng = cluster.track(start_engine(tmp_path / "remote", "remote", [s0, s1], "--timeout", "2",
                                     "--quorum-wait", "60", names=["s0", "s1"]))
    assert eng.info()["write_quorum"]["required"] is False
    s0.kill()
    eng.wait_for(lambda i: i["health"] == "degraded", 30, "s0 dropped")
    qemu_io(eng.uri(), "write -P 0x44 0 1M", "flush")
    eng.stop()

    # A lone local replica: as ever.
    lone = start_engine(tmp_path / "lone", "lone", [], "--quorum-wait", "60", size="16M",
                        local=("l0", tmp_path / "l0"))
    cluster.track(lone)
    assert lone.info()["write_quorum"]["required"] is False
    qemu_io(lone.uri(), "write -P 0x55 0 1M", "flush", "read -P 0x55 0 1M")


def test_the_manager_says_writes_wait_and_the_healer_ends_the_wait(manager, tmp_path):
    """`drove serve` on one machine, a 2-replica volume (one local to the engine, one a
    process): its process stops answering; the engine drops it and writes wait, the
    manager's events and volume say so; the healer brings the replica back (a rebuild
    in place) and a write issued meanwhile completes."""
    manager.ok("POST", "/v1/disks", json={"path": str(tmp_path / "d1"), "name": "d1"})
    manager.ok("PATCH", "/v1/settings", json={"replica_timeout": 2})
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "16M", "replicas": 2})
    v = manager.ok("POST", "/v1/volumes/v/attach", json={})
    (remote,) = [r for r in v["replicas"] if not r["local"]]
    assert v["write_quorum"]["required"] is True and v["write_quorum"]["met"] is True
    qemu_io(v["nbd_uri"], "write -P 0x55 0 16M", "flush")
    os.kill(remote["pid"], signal.SIGSTOP)
    try:
        manager.wait_volume("v", lambda x: x["write_quorum"]["met"] is False, 60,
                            "writes waiting")
        deadline = time.monotonic() + 30
        while not [e for e in manager.events("v") if e["kind"] == "write-quorum-lost"]:
            assert time.monotonic() < deadline, "no write-quorum-lost event"
            time.sleep(0.1)
        shown = manager.cli("volume", "get", "v").stdout
        assert "waiting" in shown and "no replica outside" in shown, shown
    finally:
        with contextlib.suppress(ProcessLookupError):  # the healer may have killed it
            os.kill(remote["pid"], signal.SIGCONT)  # its SIGTERM then ends it at once
    qemu_io(v["nbd_uri"], "write -P 0x66 4M 1M", "flush")  # waits for the rebuild to start
    v = manager.wait_volume("v", lambda x: x["health"] == "healthy", 120, "healthy again")
    assert v["write_quorum"]["met"] is True
    assert [e for e in manager.events("v") if e["kind"] == "write-quorum-met"]
    qemu_io(v["nbd_uri"], "read -P 0x55 0 4M", "read -P 0x66 4M 1M", "read -P 0x55 5M 11M",
            read_only=True)
