"""Parts of the engine handoff (drove.engine.handoff) that need no engine."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from drove.engine.handoff import bind_handoff, peer_credentials, stop_successor


def test_a_frozen_successor_is_killed_and_waited_for() -> None:
    """A successor stopped (SIGSTOP: it can neither exit nor write) is SIGKILLed once its
    grace is over, and the call returns only once it is gone."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        pidfd = os.pidfd_open(proc.pid)
        started = time.monotonic()
        try:
            asyncio.run(stop_successor(pidfd, proc.pid, grace=0.2))
        finally:
            os.close(pidfd)
        assert time.monotonic() - started >= 0.2
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def test_a_successor_that_exits_in_its_grace_is_not_killed() -> None:
    proc = subprocess.Popen(["sleep", "0.1"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        asyncio.run(stop_successor(pidfd, proc.pid, grace=30))
    finally:
        os.close(pidfd)
    assert proc.wait(timeout=5) == 0


def test_the_handoff_socket_is_private_and_never_stolen(tmp_path: Path) -> None:
    path = str(tmp_path / "h.sock")
    sock = bind_handoff(path)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(OSError, match="another engine listens there"):
            bind_handoff(path)
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(path)
        conn, _ = sock.accept()
        assert peer_credentials(conn) == (os.getpid(), os.geteuid())
        conn.close()
        peer.close()
    finally:
        sock.close()
    # A socket file nobody listens on (an engine that died) is replaced.
    bind_handoff(path).close()
