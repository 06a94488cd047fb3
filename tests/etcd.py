"""A real single-member etcd on 127.0.0.1 for tests (free ports, its own data directory).

Usage::

    from etcd import etcd_server   # noqa: F401 (a pytest fixture: yields an EtcdServer)

    def test_x(etcd_server):
        store = EtcdStore(etcd_server.endpoints)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdServer:
    """One etcd process; ``start`` waits until it answers, ``stop`` kills it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port, self.peer_port = free_ports(2)
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """[(host, port)] of its client URL."""
        return [("127.0.0.1", self.client_port)]

    @property
    def url(self) -> str:
        """The ``--store`` form: etcd://127.0.0.1:PORT."""
        return f"etcd://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 30) -> EtcdServer:
        """Start etcd and wait (with a deadline) until /health says so."""
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["etcd", "--name", "test", "--data-dir", str(self.data_dir),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}"],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}")
            try:
                if requests.get(client + "/health", timeout=1).json().get("health") == "true":
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.05)  # poll interval while waiting for the condition
        raise RuntimeError(f"etcd did not become healthy within {timeout} s")

    def stop(self) -> None:
        """Kill etcd (SIGKILL to its process group) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh etcd for one test, killed at teardown."""
    server = EtcdServer(tmp_path / "etcd").start()
    try:
        yield server
    finally:
        server.stop()
