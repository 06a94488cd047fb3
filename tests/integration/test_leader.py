"""Leader election on a real etcd: one leader, takeover on close, on kill -9, step-down."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from drove.cluster.leader import Leadership
from etcd import EtcdServer

pytestmark = pytest.mark.exclusive  # takeover times measured

# A candidate in its own process, so that the test can kill -9 it (no revoke, no goodbye).
CANDIDATE = """
import sys, threading
from drove.cluster.leader import Leadership
port = int(sys.argv[1])
lead = threading.Event()
Leadership([("127.0.0.1", port)], "proc", ttl=3, on_change=lambda on: on and lead.set()).start()
lead.wait()
print("leading", flush=True)
threading.Event().wait()
"""


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` until true; the seconds it took (AssertionError at the deadline)."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def test_exactly_one_of_several_leads_and_the_next_takes_over(etcd_server: EtcdServer) -> None:
    changes: list[tuple[str, bool]] = []
    cands = [Leadership(etcd_server.endpoints, f"m{i}", ttl=3,
                        on_change=lambda on, i=i: changes.append((f"m{i}", on)))
             for i in range(4)]
    try:
        for c in cands:
            c.start()
        wait_for(lambda: any(c.is_leader for c in cands), 10, "a leader")
        # Several campaign rounds go by: still exactly one, the one etcd names.
        # An observation window, not a synchronisation: the others campaign ~3 times in it.
        time.sleep(2.5)
        leaders = [c for c in cands if c.is_leader]
        assert len(leaders) == 1
        assert changes == [(leaders[0].name, True)]
        assert all(c.leader() == leaders[0].name for c in cands)
        first = leaders[0]
        first.close()
        assert not first.is_leader
        took = wait_for(lambda: any(c.is_leader for c in cands if c is not first), 10,
                        "a new leader")
        print(f"takeover {took:.2f} s after the leader gave the key up")
        assert took < 0.5  # the followers watch the key: its deletion wakes them
        leaders = [c for c in cands if c.is_leader]
        assert len(leaders) == 1 and first.leader() == leaders[0].name
    finally:
        for c in cands:
            c.close()
    assert cands[0].leader() is None  # the last leader gave the key up


def test_a_killed_leader_is_replaced_when_its_lease_expires(etcd_server: EtcdServer) -> None:
    (port,) = [p for _, p in etcd_server.endpoints]
    proc = subprocess.Popen([sys.executable, "-c", CANDIDATE, str(port)],
                            stdout=subprocess.PIPE, text=True)
    other = Leadership(etcd_server.endpoints, "other", ttl=3)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "leading\n"
        other.start()
        assert other.leader() == "proc"
        proc.kill()
        proc.wait()
        took = wait_for(lambda: other.is_leader, 10, "the other to take over")
        print(f"takeover {took:.2f} s after kill -9 (ttl 3 s)")
        # Not at once: it waited for the lease to expire (at most ttl after the last
        # refresh, and etcd checks leases every 0.5 s); then at once: it watches the key.
        assert 1 < took < 10
        assert other.leader() == "other"
    finally:
        proc.kill()
        proc.wait()
        other.close()


def test_a_leader_cut_off_from_etcd_steps_down(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "etcd").start()
    steps: list[bool] = []
    lead = Leadership(server.endpoints, "alone", ttl=3, on_change=steps.append).start()
    try:
        wait_for(lambda: lead.is_leader, 10, "leading")
        server.stop()
        # Before etcd could have expired its lease (ttl), it no longer claims to lead.
        took = wait_for(lambda: not lead.is_leader, 3, "stepping down")
        assert took < 3
        wait_for(lambda: steps == [True, False], 3, "the on_change callback")
    finally:
        lead.close()
        server.stop()


def test_bad_ttl() -> None:
    with pytest.raises(ValueError, match="ttl"):
        Leadership([("127.0.0.1", 1)], "x", ttl=1)
