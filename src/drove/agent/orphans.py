"""A volume's engine and replica processes that an agent runs, found in /proc, and stopping
those its manager's record does not name (left by a manager killed while it started them).

An agent knows its own processes by how it started them: an engine serves NBD on the
socket (``RUN_DIR/VOLUME.nbd.sock``: :func:`drove.agent.processes.engine_socket`; its
argv says so), and a replica process serves its
replica's directory (argv) with its standard output on ``RUN_DIR/REPLICA.ready`` (its
ready line, :func:`drove.agent.processes.spawn`).  A process another agent (another data
directory) or a person started has neither, and is never stopped here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from drove.agent import processes
from drove.agent.processes import Proc

log = logging.getLogger(__name__)

_DELETED = " (deleted)"


@dataclass
class Found:
    """One process of a volume: ``kind`` "engine" or "replica", ``name`` the volume's or
    the replica's."""

    kind: str
    name: str
    proc: Proc

    def to_json(self) -> dict[str, object]:
        """As the agent reports it: kind, name, pid."""
        return {"kind": self.kind, "name": self.name, "pid": self.proc.pid}


def drove_processes(command: str) -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every ``python -m drove COMMAND serve`` process on this host."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if len(argv) >= 6 and argv[1:5] == ["-m", "drove", command, "serve"]:
            yield int(entry.name), argv


def option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` in ``argv``."""
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def stdout_path(pid: int) -> str | None:
    """Where ``pid``'s standard output goes (a file unlinked since: its old path)."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return None
    return target.removesuffix(_DELETED)


def _proc(pid: int, argv: list[str]) -> Proc | None:
    started = processes.start_time(pid)
    return None if started is None else Proc(pid, started, argv, "")


def find(run_dir: Path, volume: str, replicas: dict[str, str],
         engines: bool = True) -> list[Found]:
    """The engines of ``volume`` (unless not ``engines``) and the processes of its
    ``replicas`` (name -> directory) that the agent of ``run_dir`` runs; the engines first."""
    found, reps = [], []
    sock = str(processes.engine_socket(run_dir, volume))
    for pid, argv in drove_processes("engine") if engines else ():
        if (argv[5] == volume and option(argv, "--nbd-unix") == sock
                and (proc := _proc(pid, argv)) is not None):
            found.append(Found("engine", volume, proc))
    by_dir = {str(Path(d)): n for n, d in replicas.items()}
    for pid, argv in drove_processes("replica"):
        name = by_dir.get(str(Path(argv[5])))
        # Its ready line goes to this agent's run directory: not a replica served by hand.
        if name is None or stdout_path(pid) != str(run_dir / f"{name}.ready"):
            continue
        if (proc := _proc(pid, argv)) is not None:
            reps.append(Found("replica", name, proc))
    return found + reps


def stop_unrecorded(run_dir: Path, volume: str, replicas: dict[str, str], keep: set[int],
                    reason: str, engines: bool = True,
                    engine_timeout: float = 30.0) -> list[Found]:
    """Stop every process :func:`find` lists but those in ``keep`` (pids): the engines
    first (SIGTERM: each flushes to its replicas), then the replica processes, at once;
    those stopped."""
    found = [f for f in find(run_dir, volume, replicas, engines) if f.proc.pid not in keep]
    for f in found:
        log.warning("volume %s: stopping %s process %s (pid %d), which no record names: %s",
                    volume, f.kind, f.name, f.proc.pid, reason)
    for f in found:
        if f.kind == "engine":
            processes.stop(f.proc, engine_timeout)
    reps = [f.proc for f in found if f.kind == "replica"]
    if reps:
        with ThreadPoolExecutor(len(reps)) as pool:
            list(pool.map(processes.stop, reps))
    return found
