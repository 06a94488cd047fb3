"""A cluster manager's own node: this host's agent, run inside the manager like `drove agent`.

On one machine (SQLite) the manager calls its in-process agent directly. In a cluster
every manager must reach every node, whoever leads: so a manager that runs an agent
serves it exactly as `drove agent` does (the agent API with the cluster token, heartbeats
with the node id, address and disks) and calls it over HTTP like any other node's. A new
leader thus finds this node at the address its agent last announced, and this node goes
down with its manager like a host with its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from drove import __version__
from drove.agent import disks as disklib
from drove.agent.node import NodeAgent
from drove.cluster.agent import AgentConfig, Heartbeat, node_id
from drove.cluster.agentapi import build_app
from drove.service import ControlServer


class LocalAgentError(Exception):
    """The manager's own agent cannot start; the message says what to change."""


class LocalAgent:
    """The agent of node ``node`` on ``listen`` (HOST:PORT, 0 for any port), in this process."""

    def __init__(self, data_dir: Path, node: str, listen: tuple[str, int], token: str) -> None:
        self.node = node
        self._data_dir = data_dir
        self._listen = listen
        self._token = token
        self.agent = NodeAgent(data_dir, node, address=listen[0])
        self._server: ControlServer | None = None
        self._beat: Heartbeat | None = None
        self._task: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self, manager_url: str) -> None:
        """Serve the agent API and heartbeat to ``manager_url`` (this manager) once before
        returning, so the node's document names this agent's address from now on."""
        try:
            self._server = ControlServer(build_app(self.agent, self._token), *self._listen)
        except OSError as exc:
            raise LocalAgentError(f"cannot listen on {self._listen[0]}:{self._listen[1]} for "
                                  f"this node's agent: {exc.strerror}; give another "
                                  "--agent-listen HOST:PORT") from exc
        await self._server.start()
        self.url = self._server.url
        default = f"{self.node}-default"
        try:
            disk_id = disklib.init_disk(self._data_dir, default)
        except disklib.DiskError as exc:
            raise LocalAgentError(str(exc)) from exc
        identity = {"id": node_id(self._data_dir), "name": self.node,
                    "address": self._listen[0], "agent_url": self.url, "zone": None,
                    "role": "both", "version": __version__, "started": time.time(),
                    "default_disk": {"name": default, "path": str(self._data_dir.resolve()),
                                     "id": disk_id}}
        cfg = AgentConfig(managers=[manager_url], node=self.node,
                          listen=self._server.address, data_dir=self._data_dir,
                          token=self._token)
        # With the agent: it reports this node's engines and stops those the answer names
        # (a volume taken over elsewhere while this manager's host was down).
        self._beat = Heartbeat(cfg, identity, self.agent)
        if not await self._beat.once():
            raise LocalAgentError(f"this manager refused the heartbeat of its own node "
                                  f"{self.node!r} (the log says why: another host registered "
                                  "that name, or the store did not answer); give another "
                                  "--node, or start again")
        self._task = asyncio.create_task(self._beat.run(), name="local-agent-heartbeat")

    async def stop(self) -> None:
        """Stop heartbeating and serving; the engines and replicas it started go on."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._beat is not None:
            await self._beat.close()
        if self._server is not None:
            await self._server.stop()
