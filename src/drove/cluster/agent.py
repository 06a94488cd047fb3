"""The node agent process (`drove agent`): this host's processes, served to the managers.

It serves :mod:`drove.cluster.agentapi` on the host's address and heartbeats to
the managers: who it is (a node id kept in its data directory, so a renamed or
re-addressed host stays the same node), where its API is, its zone and role,
and the state of the disks the manager says are on this node.  Heartbeats go to
the first manager that answers; while none does the agent keeps serving (the
engines and replicas it started never depend on a manager).

Each heartbeat also lists the engines running on this host (found in /proc:
those started under this agent's run directory, with their volume and epoch).
The manager answers with those that must stop: their volume was taken over on
another node while this one was down or cut off, or detached, or restarted
with a newer epoch.  The agent stops them (SIGTERM, then SIGKILL) and releases
their host attachment; their replicas refuse them already (the epoch fence),
this only ends them and frees their local replica's directory for its rebuild.
Only engines seen before the heartbeat left are stopped: one started meanwhile
was started by a manager that had recorded it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from drove import __version__
from drove.agent import disks as disklib
from drove.agent import processes
from drove.agent.node import NodeAgent
from drove.agent.processes import Proc
from drove.cluster.agentapi import build_app
from drove.manager.placement import ROLES
from drove.service import ControlServer, armed, default_signals

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
"""Seconds between heartbeats; the manager calls a node down after a few missed ones."""

class AgentConfigError(Exception):
    """The agent cannot start as configured; the message says what to change."""


@dataclass
class AgentConfig:
    """How `drove agent` was started."""

    managers: list[str]
    node: str
    listen: tuple[str, int]
    data_dir: Path
    token: str
    zone: str | None = None
    role: str = "both"


def node_id(data_dir: Path) -> str:
    """This host's stable node id, made at first start."""
    path = data_dir / "node-id"
    with contextlib.suppress(OSError):
        known = path.read_text().strip()
        if known:
            return known
    new = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new + "\n")
    os.replace(tmp, path)
    return new


@dataclass
class RunningEngine:
    """An engine process this agent started (or an earlier agent on this data dir)."""

    volume: str
    epoch: int | None
    proc: Proc


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` in ``argv``."""
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


def running_engines(agent: NodeAgent) -> list[RunningEngine]:
    """The engines running on this host under ``agent``'s run directory (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if len(argv) < 6 or argv[1:5] != ["-m", "drove", "engine", "serve"]:
            continue
        volume = argv[5]
        # Its NBD socket is in this agent's run directory: this agent's engine, not one a
        # person or another agent (another data dir, in a test) runs on this host.
        if _option(argv, "--nbd-unix") != str(agent.engine_socket(volume)):
            continue
        pid = int(entry.name)
        started = processes.start_time(pid)
        if started is None:
            continue
        epoch = _option(argv, "--epoch")
        found.append(RunningEngine(volume, int(epoch) if epoch and epoch.isdigit() else None,
                                   Proc(pid, started, argv, "")))
    return found


def stop_engine(agent: NodeAgent, engine: RunningEngine, reason: str) -> None:
    """Stop a stale engine and release its volume's host attachment here."""
    log.warning("stopping the engine of volume %s (epoch %s, pid %d): %s", engine.volume,
                engine.epoch, engine.proc.pid, reason)
    agent.stop(engine.proc, 10.0)
    try:
        agent.detach_host(engine.volume, None, force=True)
    except Exception as exc:  # its mount may still be busy: say so, the engine is gone
        log.warning("volume %s: releasing the host attachment failed: %s", engine.volume, exc)


class Heartbeat:
    """Tells the managers this node is alive, and learns which of its disks to report."""

    def __init__(self, cfg: AgentConfig, identity: dict[str, Any],
                 agent: NodeAgent | None = None) -> None:
        self._cfg = cfg
        self._identity = identity
        self._agent = agent  # None: no engines are reported nor stopped
        # Stale engines being stopped (by pid), in tasks: the heartbeats go on meanwhile.
        self._stopping: dict[int, asyncio.Task[None]] = {}
        self._disks: list[dict[str, Any]] = []
        self._http = httpx.AsyncClient(headers={"Authorization": f"Bearer {cfg.token}"},
                                       timeout=3.0)
        self.manager: str | None = None  # the manager that answered last

    async def once(self) -> bool:
        """One heartbeat to the first manager that answers; False if none did."""
        statuses = {d["name"]: await asyncio.to_thread(disklib.disk_status, d["path"], d["id"])
                    for d in self._disks}
        engines = ([] if self._agent is None
                   else await asyncio.to_thread(running_engines, self._agent))
        body = {**self._identity, "disks": statuses,
                "engines": [{"volume": e.volume, "epoch": e.epoch} for e in engines]}
        order = ([self.manager] if self.manager else []) + [
            m for m in self._cfg.managers if m != self.manager]
        for url in order:
            try:
                resp = await self._http.post(url.rstrip("/") + "/v1/cluster/heartbeat",
                                             json=body)
            except httpx.HTTPError as exc:
                log.debug("manager %s: %s", url, exc)
                continue
            if resp.status_code == 200:
                self.manager = url
                answer = resp.json()
                self._disks = answer.get("disks", [])
                await self._stop_stale(engines, answer.get("stop_engines") or [])
                return True
            log.warning("manager %s refused the heartbeat: %s %s", url, resp.status_code,
                        resp.text[:200])
        self.manager = None
        return False

    async def _stop_stale(self, seen: list[RunningEngine],
                          stale: list[dict[str, Any]]) -> None:
        """Start stopping the engines the manager named, among those seen before the
        heartbeat (a stop may take seconds; the next heartbeat must not wait for it)."""
        agent = self._agent
        if agent is None:
            return
        for s in stale:
            for e in seen:
                if (e.volume == s.get("volume") and e.epoch == s.get("epoch")
                        and e.proc.pid not in self._stopping):
                    reason = str(s.get("reason") or "the manager says so")
                    task = asyncio.create_task(asyncio.to_thread(stop_engine, agent, e, reason))
                    self._stopping[e.proc.pid] = task
                    task.add_done_callback(lambda _, pid=e.proc.pid: self._stopping.pop(pid))

    async def run(self) -> None:
        """Heartbeat forever."""
        while True:
            await self.once()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def close(self) -> None:
        """Let the engine stops under way end; release the HTTP client."""
        if self._stopping:
            await asyncio.gather(*self._stopping.values(), return_exceptions=True)
        await self._http.aclose()


async def serve(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM/SIGINT; its engines and replicas keep running after it."""
    if cfg.role not in ROLES:
        raise AgentConfigError(f"unknown role {cfg.role!r}: use one of {', '.join(ROLES)}")
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    host = cfg.listen[0]
    agent = NodeAgent(cfg.data_dir, cfg.node, address=host)
    try:
        server = ControlServer(build_app(agent, cfg.token), *cfg.listen)
    except OSError as exc:
        raise AgentConfigError(f"cannot listen on {host}:{cfg.listen[1]}: {exc.strerror}; "
                               "give another --listen HOST:PORT") from exc
    stopping = await armed(default_signals)
    await server.start()
    # The data directory is the node's first disk, as `drove serve`'s is.
    default = f"{cfg.node}-default"
    try:
        disk_id = disklib.init_disk(cfg.data_dir, default)
    except disklib.DiskError as exc:
        raise AgentConfigError(str(exc)) from exc
    identity = {"id": node_id(cfg.data_dir), "name": cfg.node, "address": host,
                "agent_url": server.url, "zone": cfg.zone, "role": cfg.role,
                "version": __version__, "started": time.time(),
                "default_disk": {"name": default, "path": str(cfg.data_dir.resolve()),
                                 "id": disk_id}}
    beat = Heartbeat(cfg, identity, agent)
    registered = await beat.once()
    print(json.dumps({**identity, "manager": beat.manager, "registered": registered}),
          flush=True)
    task = asyncio.create_task(beat.run())
    try:
        await stopping
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await beat.close()
        await server.stop()
