"""The node agent process (`drove agent`): this host's processes, served to the managers.

It serves :mod:`drove.cluster.agentapi` on the host's address and heartbeats to
the managers: who it is (a node id kept in its data directory, so a renamed or
re-addressed host stays the same node), where its API is, its zone and role,
and the state of the disks the manager says are on this node.  Heartbeats go to
the first manager that answers; while none does the agent keeps serving (the
engines and replicas it started never depend on a manager).

The agent also keeps a long-poll open to a manager
(:mod:`drove.cluster.agentwatch`): it names the engines running on this host (found
in /proc: :mod:`drove.cluster.hostengines`) and the manager answers as soon as one of
them must stop (its volume was taken over on another node while this one was down or
cut off, or detached, or restarted with a newer epoch), from the store's changes rather
than at the next heartbeat.  The agent stops them (SIGTERM, then SIGKILL) and releases
their host attachment; their replicas refuse them already (the epoch fence).  While the
long-poll does not work (a manager from before it), each heartbeat lists the engines
and its answer names those that must stop, as before.
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
from drove.agent.node import NodeAgent
from drove.cluster.agentapi import build_app
from drove.cluster.agentwatch import ChangeWatch
from drove.cluster.hostengines import EngineStops
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
    heartbeat_interval: float = HEARTBEAT_INTERVAL


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


class Heartbeat:
    """Tells the managers this node is alive and learns which of its disks to report; keeps
    the long-poll (:class:`~drove.cluster.agentwatch.ChangeWatch`) that says which of this
    host's engines must stop."""

    def __init__(self, cfg: AgentConfig, identity: dict[str, Any],
                 agent: NodeAgent | None = None) -> None:
        self._cfg = cfg
        self._identity = identity
        # None (no agent): no engines are reported nor stopped.
        self._stops = None if agent is None else EngineStops(agent)
        self.watch = (None if self._stops is None
                      else ChangeWatch(cfg.managers, cfg.node, cfg.token, self._stops))
        self._disks: list[dict[str, Any]] = []
        self._http = httpx.AsyncClient(headers={"Authorization": f"Bearer {cfg.token}"},
                                       timeout=3.0)
        self.manager: str | None = None  # the manager that answered last

    async def once(self) -> bool:
        """One heartbeat to the first manager that answers; False if none did."""
        statuses = {d["name"]: await asyncio.to_thread(disklib.disk_status, d["path"], d["id"])
                    for d in self._disks}
        # The engines go along only while the long-poll does not work (a manager from
        # before it, say): each listed engine costs the manager a store read per second.
        engines = ([] if self._stops is None or (self.watch and self.watch.healthy)
                   else await self._stops.running())
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
                self._gone(url)
                continue
            if resp.status_code == 200:
                self.manager = url
                answer = resp.json()
                self._disks = answer.get("disks", [])
                if self._stops is not None:
                    self._stops.stop(engines, answer.get("stop_engines") or [])
                return True
            log.warning("manager %s refused the heartbeat: %s %s", url, resp.status_code,
                        resp.text[:200])
        self.manager = None
        return False

    def _gone(self, url: str) -> None:
        """``url`` does not answer: the long-poll open to it, if any, moves on now."""
        if self.watch is not None:
            self.watch.manager_gone(url)

    async def run(self) -> None:
        """Heartbeat (and long-poll) forever."""
        poll = None if self.watch is None else asyncio.create_task(self.watch.run(),
                                                                    name="agent-long-poll")
        try:
            while True:
                await self.once()
                await asyncio.sleep(self._cfg.heartbeat_interval)
        finally:
            if poll is not None:
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll

    async def close(self) -> None:
        """Let the engine stops under way end; release the HTTP clients."""
        if self._stops is not None:
            await self._stops.close()
        if self.watch is not None:
            await self.watch.close()
        await self._http.aclose()


async def serve(cfg: AgentConfig) -> None:
    """Run the agent until SIGTERM/SIGINT; its engines and replicas keep running after it."""
    if cfg.role not in ROLES:
        raise AgentConfigError(f"unknown role {cfg.role!r}: use one of {', '.join(ROLES)}")
    if not 0 < cfg.heartbeat_interval <= 60:
        raise AgentConfigError(f"--heartbeat-interval {cfg.heartbeat_interval} is out of "
                               "range: more than 0, at most 60 s (the managers call a node "
                               "down after 5 s without a heartbeat)")
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
