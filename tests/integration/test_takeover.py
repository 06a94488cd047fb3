"""A dead engine host: `drove volume attach V --node OTHER --force`, and the host's return.

A real `drove serve` and two real `drove agent` processes on loopback addresses of their
own (tests/integration/test_agent.py's fixtures).  Host n2, where the volume's engine
runs, is "cut off" by freezing its agent and engine (SIGSTOP) after a write left the
engine for every replica: its local replica took it, the others are killed before
they read it (a replica host's crash).  The volume is taken over on n3; when n2
wakes, its agent stops the old engine, and n2's replica is rebuilt in place by delta.
"""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest
from test_agent import AgentProc, node

from accesstools import engine_headers
from backuptools import wait_for
from replicatools import NBDSH, nbdsh, qemu_io

MiB = 1 << 20
pytestmark = pytest.mark.timeout(600)


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def no_pattern(uri: str, size: int, pattern: bytes) -> None:
    """Read the whole volume through ``uri``: no 4 KiB block holds ``pattern`` only."""
    script = (f"block = {pattern!r} * 4096\n"
              f"for off in range(0, {size}, 1 << 20):\n"
              "    data = h.pread(1 << 20, off)\n"
              "    for i in range(0, 1 << 20, 4096):\n"
              "        assert data[i:i + 4096] != block, off + i\n")
    nbdsh(uri, script)


@pytest.fixture
def hosts(manager, tmp_path):
    """Agents n2 (127.0.0.2) and n3 (127.0.0.3); stopped at teardown (SIGCONT first)."""
    started = [AgentProc(manager, n, tmp_path / n, address=f"127.0.0.{n[1]}")
               for n in ("n2", "n3")]
    yield started
    for a in started:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGCONT)
            a.proc.terminate()
            a.proc.wait(30)


@pytest.mark.parametrize("back", ["wakes", "restarts"])
def test_a_dead_engine_host_is_taken_over_and_its_old_engine_never_writes(manager, hosts,
                                                                          tmp_path, back):
    """``back``: n2's agent wakes up, or a new agent starts there (adopting what runs)."""
    n2, n3 = hosts
    for name in ("n2", "n3"):
        wait_for(lambda n=name: any(d["state"] == "ready" for d in node(manager, n)["disks"]),
                 15, f"{name}'s disk")
    manager.ok("PATCH", "/v1/settings", json={
        "replica_replenish_wait": 600, "failed_replica_retry_seconds": 1,
        "replica_timeout": 30})
    manager.ok("POST", "/v1/volumes", json={"name": "v", "size": "32M", "replicas": 3})
    a = manager.cli_json("volume", "attach", "v", "--node", "n2")
    (own,) = {r["node"] for r in a["replicas"]} - {"n2", "n3"}  # the manager's node
    (on_n2,) = [r for r in a["replicas"] if r["node"] == "n2"]
    assert on_n2["local"] and a["node"] == "n2"
    qemu_io(a["nbd_uri"], "write -P 0x11 0 32M", "flush")

    # Moving it elsewhere while n2 is up: refused, detach first.
    r = manager.cli("volume", "attach", "v", "--node", "n3", "--force", check=False)
    assert r.returncode != 0 and "which is up" in r.stderr and "detach" in r.stderr, r.stderr

    engine_pid, epoch = a["engine"]["pid"], a["engine"]["epoch"]
    remote_pids = [r["pid"] for r in a["replicas"] if r["node"] != "n2"]
    assert len(remote_pids) == 2 and all(remote_pids)
    stopped = [*remote_pids, engine_pid, n2.proc.pid]
    client = None
    try:
        # A write leaves engine A for every replica: n2's local replica takes it at once,
        # the others are frozen and die before they read it.  A never acknowledges it.
        for pid in remote_pids:
            os.kill(pid, signal.SIGSTOP)
        client = subprocess.Popen(
            [*NBDSH, "-c", f"h.connect_uri({a['nbd_uri']!r})\n"
             "buf = nbd.Buffer.from_bytearray(bytearray(b'\\xee' * (1 << 20)))\n"
             "cmd = h.aio_pwrite(buf, 8 << 20)\n"
             "while not h.aio_command_completed(cmd):\n"
             "    h.poll(100)\n"
             "print('acknowledged', flush=True)\n"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Reads are served by A's local replica: there the write is.
        wait_for(lambda: nbdsh(a["nbd_uri"], "assert h.pread(4096, 8 << 20) == b'\\xee' * 4096",
                               check=False).returncode == 0, 30, "the write on n2's replica")
        os.kill(engine_pid, signal.SIGSTOP)  # host n2 freezes, cut off from everything
        os.kill(n2.proc.pid, signal.SIGSTOP)
        for pid in remote_pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: node(manager, "n2")["state"] == "down", 30, "n2 down")
        wait_for(lambda: [e for e in manager.events("v") if e["kind"] == "engine-node-down"],
                 30, "an engine-node-down event")

        # Elsewhere without --force: refused, saying why and what to do.
        r = manager.cli("volume", "attach", "v", "--node", "n3", check=False)
        assert r.returncode != 0 and "down" in r.stderr and "--force" in r.stderr, r.stderr
        # Nor while another replica's node is down too: the old engine might still reach it.
        os.kill(n3.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: node(manager, "n3")["state"] == "down", 30, "n3 down")
            r = manager.cli("volume", "attach", "v", "--node", own, "--force", check=False)
            assert r.returncode != 0 and "partition" in r.stderr, r.stderr
        finally:
            os.kill(n3.proc.pid, signal.SIGCONT)
        wait_for(lambda: node(manager, "n3")["state"] == "up", 30, "n3 up")
        b = manager.cli_json("volume", "attach", "v", "--node", "n3", "--force")
        assert b["node"] == "n3" and b["engine"]["epoch"] > epoch
        (took,) = [e for e in manager.events("v") if e["kind"] == "volume-takeover"]
        assert "n2" in took["message"] and on_n2["name"] in took["message"]
        (failed,) = [r for r in b["replicas"] if r["node"] == "n2"]
        assert failed["state"] == "failed" and "taken over" in failed["error"]
        # Every flushed write is there; the one A never acknowledged is not.
        qemu_io(b["nbd_uri"], "read -P 0x11 0 32M", read_only=True)
        qemu_io(b["nbd_uri"], "write -P 0x22 16M 1M", "flush")
    finally:
        if client is not None:
            client.kill()
            out, _ = client.communicate()
            assert b"acknowledged" not in out
        if back == "restarts":
            n2.kill()  # its engine lives on; a new agent finds it
        for pid in stopped:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
    if back == "restarts":
        hosts.append(AgentProc(manager, "n2", tmp_path / "n2", address="127.0.0.2"))

    # n2 returns: its agent stops the old engine, whose replicas refuse it anyway.
    wait_for(lambda: not alive(engine_pid), 60, "the old engine stopped by n2's agent")
    stale = [e for e in manager.events("v") if e["kind"] == "engine-stale"]
    assert stale and "n3" in stale[0]["message"], stale
    # n2's replica is rebuilt in place, by delta: only what differs is copied.
    v = manager.wait_volume("v", lambda x: x["health"] == "healthy" and all(
        r["state"] == "running" for r in x["replicas"]), 180, "healthy with n2's replica")
    assert on_n2["name"] in {r["name"] for r in v["replicas"] if r["node"] == "n2"}
    assert not [e for e in manager.events("v") if e["kind"] == "replica-replaced"]
    assert [e for e in manager.events("v") if e["kind"] == "rebuild-started"
            and on_n2["name"] in e["message"] and "delta rebuild" in e["message"]]
    rebuild = httpx.get(v["engine"]["control_url"] + "/v1/rebuild", timeout=30,
                        headers=engine_headers(v["engine"]["pid"])).json()
    assert rebuild["replica"] == on_n2["name"] and rebuild["state"] == "done", rebuild
    # Its data was kept: the old engine's write, and the 1 MiB the new one wrote meanwhile
    # (compared in 1 MiB ranges), are all that was copied.
    assert rebuild["bytes_copied"] <= 4 * MiB, rebuild["layers"]
    qemu_io(v["nbd_uri"], "read -P 0x11 0 16M", "read -P 0x22 16M 1M",
            "read -P 0x11 17M 15M", read_only=True)
    no_pattern(v["nbd_uri"], 32 * MiB, b"\xee")

    # Served by n2's replica itself (attached there again, it is the local one and serves
    # the reads): the old engine's write is gone from it too.
    manager.ok("POST", "/v1/volumes/v/detach", json={})
    again = manager.cli_json("volume", "attach", "v", "--node", "n2")
    (mine,) = [r for r in again["replicas"] if r["node"] == "n2"]
    assert mine["local"] and mine["mode"] == "RW", again
    qemu_io(again["nbd_uri"], "read -P 0x11 0 16M", "read -P 0x22 16M 1M",
            "read -P 0x11 17M 15M", read_only=True)
    no_pattern(again["nbd_uri"], 32 * MiB, b"\xee")
