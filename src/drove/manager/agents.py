"""The agent of each node: this manager's own (in-process) or a remote one over HTTP.

Every call that starts, watches or stops a process, or attaches a host, goes to
the agent of the node it concerns: a replica's node is its disk's; an engine's
is the node the volume is attached on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drove import __version__
from drove.agent.node import NodeAgent
from drove.cluster.remoteagent import RemoteAgent
from drove.manager.errors import ApiError
from drove.manager.store import Store


class Agents:
    """Finds the agent for a node, a replica or a volume's engine."""

    def __init__(self, store: Store, local: NodeAgent | None, token_file: Path,
                 default_node: str | None = None) -> None:
        self._store = store
        self._local = local
        # Where an engine runs when no node is named: this manager's own node, in-process
        # or (in a cluster) served by its own agent over HTTP like any other.
        self._default = local.name if local is not None else default_node
        self._token_file = token_file
        self._remote: dict[str, RemoteAgent] = {}

    @property
    def default_node(self) -> str:
        """The node an engine runs on when none is named (ApiError 409 when there is none)."""
        if self._default is None:
            raise ApiError(409, "this manager runs no node agent of its own (drove serve "
                                "--no-agent): name the node (--node NAME; `drove node list` "
                                "shows them)")
        return self._default

    @property
    def local(self) -> NodeAgent:
        """This manager's in-process agent (ApiError 409 when it has none: in a cluster
        every node, its own too, is reached through its agent's API)."""
        if self._local is None:
            raise ApiError(409, "this manager has no in-process node agent: a node is reached "
                                "through its own agent (`drove agent`), and this one has none "
                                "registered")
        return self._local

    def is_local(self, node: str | None) -> bool:
        """Whether ``node`` (None: the default) is this manager's own, in-process agent's."""
        return self._local is not None and (node is None or node == self._local.name)

    def for_node(self, node: str | None) -> NodeAgent | RemoteAgent:
        """The agent of ``node`` (None: this manager's own); ApiError 409 if it has none."""
        if self.is_local(node):
            return self.local
        if node is None:
            node = self.default_node
        doc = self._store.get("nodes", node)
        if doc is None:
            raise ApiError(409, f"node {node} is unknown; start `drove agent --node {node}` "
                                "on it")
        if not doc.get("agent_url"):
            # A node entered in the store without an agent of its own (the data-locality
            # tests fake a second node so): this machine's agent serves it.
            return self.local
        known = self._remote.get(node)
        if known is None or known.url != doc["agent_url"].rstrip("/"):
            if known is not None:
                known.close()
            known = RemoteAgent(node, doc["agent_url"], doc["address"],
                                self._token_file.read_text().strip())
            self._remote[node] = known
        return known

    def version(self, node: str | None) -> str | None:
        """The drove version the agent of ``node`` runs (this manager's own: this one; another:
        its last heartbeat's; None: unknown)."""
        if self.is_local(node) or (node is None and self._local is not None):
            return __version__
        doc = self._store.get("nodes", node or self.default_node)
        if doc is not None and not doc.get("agent_url") and self._local is not None:
            return __version__  # served by this machine's agent (see for_node)
        return (doc or {}).get("version")

    def node_of_replica(self, rep: dict[str, Any]) -> str | None:
        """The node whose disk holds ``rep`` (None: the disk was removed)."""
        disk = self._store.get("disks", rep["disk"])
        return disk["node"] if disk else None

    def for_replica(self, rep: dict[str, Any]) -> NodeAgent | RemoteAgent:
        """The agent of the node holding ``rep``."""
        return self.for_node(self.node_of_replica(rep))

    def engine_state_file(self, node: str | None, volume_dir: Path, volume: str) -> Path:
        """Where the engine of ``volume`` on ``node`` keeps its state.

        Under this manager's data directory for its own node; for another node a
        path relative to that agent's data directory (the agent resolves it).
        """
        if self.is_local(node):
            return volume_dir / "engine.state"
        return Path("volumes") / volume / "engine.state"

    def close(self) -> None:
        """Release the connections to remote agents."""
        for a in self._remote.values():
            a.close()
        self._remote.clear()
