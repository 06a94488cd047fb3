"""Every volume name a user may give gets an engine socket that fits a unix address."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from drove.agent import orphans, processes
from drove.agent.node import NodeAgent


def test_a_long_name_under_a_long_data_dir_still_binds(tmp_path: Path) -> None:
    data = tmp_path / ("d" * max(1, 70 - len(str(tmp_path))))
    agent = NodeAgent(data)
    short, long = "v", "x" * 63  # the longest name drove accepts
    assert agent.engine_socket(short) == agent.run_dir / "v.nbd.sock"
    path = agent.engine_socket(long)
    assert len(os.fsencode(path)) <= processes.SOCKET_PATH_MAX
    assert path.parent == agent.run_dir and path != agent.engine_socket("x" * 62)
    assert agent.engine_socket(long) == path  # the same every time: agents find it again
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    # The agent's /proc scan looks for the same path (no process: nothing found).
    assert orphans.find(agent.run_dir, long, {}) == []
