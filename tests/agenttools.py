"""A second drove node on this machine: a `drove agent` of its own beside a test's manager."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def agent_node(manager, root: Path, name: str = "other") -> Iterator[str]:
    """Run a node agent called ``name`` (its data under ``root``) registered with
    ``manager``; yields the node's name, stops the agent after."""
    log = root / f"{name}-agent.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "drove", "agent", "--manager", manager.url, "--node", name,
             "--listen", "127.0.0.1:0", "--data-dir", str(root / name),
             "--token-file", str(manager.data_dir / "cluster-token"), "--log-level",
             "warning"], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()  # its ready line, or EOF when it failed
        assert line and json.loads(line)["registered"], log.read_text()
        yield name
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()
