"""The engines running on this host under an agent's run directory, and stopping stale ones.

An agent finds its engines in /proc (those started under its run directory, with their
volume and epoch), so an agent that restarts knows them again. The managers name those
that must stop (their volume was taken over on another node while this one was down or
cut off, or detached, or restarted with a newer epoch); :class:`EngineStops` stops them
(SIGTERM, then SIGKILL) and releases their host attachment. Their replicas refuse them
already (the epoch fence): this only ends them and frees their local replica's directory
for its rebuild. Only engines seen before the request that named them left are stopped:
one started meanwhile was started by a manager that had recorded it first.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from drove.agent import orphans, processes
from drove.agent.node import NodeAgent
from drove.agent.processes import Proc

log = logging.getLogger(__name__)


@dataclass
class RunningEngine:
    """An engine process this agent started (or an earlier agent on this data dir)."""

    volume: str
    epoch: int | None
    proc: Proc


def running_engines(agent: NodeAgent) -> list[RunningEngine]:
    """The engines running on this host under ``agent``'s run directory (from /proc)."""
    found = []
    for pid, argv in orphans.drove_processes("engine"):
        volume = argv[5]
        # Its NBD socket is in this agent's run directory: this agent's engine, not one a
        # person or another agent (another data dir, in a test) runs on this host.
        if orphans.option(argv, "--nbd-unix") != str(agent.engine_socket(volume)):
            continue
        started = processes.start_time(pid)
        if started is None:
            continue
        epoch = orphans.option(argv, "--epoch")
        found.append(RunningEngine(volume, int(epoch) if epoch and epoch.isdigit() else None,
                                   Proc(pid, started, argv, "")))
    return found


def stop_engine(agent: NodeAgent, engine: RunningEngine, reason: str) -> None:
    """Stop a stale engine and release its volume's host attachment here."""
    log.warning("stopping the engine of volume %s (epoch %s, pid %d): %s", engine.volume,
                engine.epoch, engine.proc.pid, reason)
    agent.stop(engine.proc, 10.0)
    if any(e.volume == engine.volume and e.proc.pid != engine.proc.pid
           for e in running_engines(agent)):
        return  # the host attachment is the engine's that serves now (a live upgrade's)
    try:
        agent.detach_host(engine.volume, None, force=True)
    except Exception as exc:  # its mount may still be busy: say so, the engine is gone
        log.warning("volume %s: releasing the host attachment failed: %s", engine.volume, exc)


class EngineStops:
    """The stale engines being stopped, each in a task (whoever asked goes on meanwhile)."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self._stopping: dict[int, asyncio.Task[None]] = {}  # by pid

    async def running(self) -> list[RunningEngine]:
        """The engines running here, but those being stopped."""
        engines = await asyncio.to_thread(running_engines, self.agent)
        return [e for e in engines if e.proc.pid not in self._stopping]

    def stop(self, seen: list[RunningEngine], stale: list[dict[str, Any]]) -> int:
        """Start stopping the engines a manager named (``stale``: [{volume, epoch,
        reason}]) among ``seen``, those listed before its answer was asked for; how many."""
        started = 0
        for s in stale:
            for e in seen:
                if (e.volume == s.get("volume") and e.epoch == s.get("epoch")
                        and e.proc.pid not in self._stopping):
                    reason = str(s.get("reason") or "the manager says so")
                    task = asyncio.create_task(
                        asyncio.to_thread(stop_engine, self.agent, e, reason))
                    self._stopping[e.proc.pid] = task
                    task.add_done_callback(lambda _, pid=e.proc.pid: self._stopping.pop(pid))
                    started += 1
        return started

    async def close(self) -> None:
        """Let the stops under way end."""
        if self._stopping:
            await asyncio.gather(*self._stopping.values(), return_exceptions=True)
