"""The manager's handle on the agent of another host: NodeAgent's calls over its HTTP API.

Blocking, like :class:`drove.agent.node.NodeAgent` (the manager calls both from
worker threads), and raising the same exceptions: a process that does not start
is a :class:`ProcessStartError`, a failed host attach a :class:`HostAttachError`.
An agent that does not answer is an :class:`AgentUnreachableError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from drove.agent.hostattach import HostAttachError
from drove.agent.processes import EngineUpgradeError, Proc, ProcessStartError
from drove.replica.clone import CloneError

# Process starts wait for the process's ready line (an engine may open a big chain).
_START_TIMEOUT = 150.0
_CALL_TIMEOUT = 10.0
# Stopping a volume's leftover processes: an engine's flush, then its replica processes.
_STOP_TIMEOUT = 60.0


class AgentUnreachableError(Exception):
    """The node's agent did not answer (host down, cut off, or the agent stopped)."""


class AgentError(Exception):
    """The agent answered with an error it has no better exception for."""


_RAISE: dict[str, type[Exception]] = {"ProcessStartError": ProcessStartError,
                                      "EngineUpgradeError": EngineUpgradeError,
                                      "HostAttachError": HostAttachError,
                                      "CloneError": CloneError}


class RemoteAgent:
    """The agent of node ``name``, reached at ``url`` with the cluster ``token``."""

    def __init__(self, name: str, url: str, address: str, token: str) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.address = address
        self._http = httpx.Client(headers={"Authorization": f"Bearer {token}"},
                                  timeout=_CALL_TIMEOUT)

    def close(self) -> None:
        """Release the HTTP connections."""
        self._http.close()

    def _post(self, path: str, body: dict[str, Any],
              timeout: float | httpx.Timeout = _CALL_TIMEOUT) -> Any:
        try:
            resp = self._http.post(self.url + path, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise AgentUnreachableError(f"the agent of node {self.name} ({self.url}) does not "
                                        f"answer: {exc}") from exc
        if resp.status_code < 300:
            return resp.json()
        try:
            doc = resp.json()
        except ValueError:
            doc = {"detail": resp.text}
        exc_type = _RAISE.get(doc.get("error", ""), AgentError)
        raise exc_type(f"node {self.name}: {doc.get('detail')}")

    def start_replica(self, volume: str, replica: dict[str, Any], size: int,
                      key: str | None = None) -> Proc:
        """Start the process serving ``replica`` on that node (see NodeAgent.start_replica)."""
        return Proc.from_json(self._post("/v1/replicas", {
            "volume": volume, "replica": replica, "size": size, "key": key}, _START_TIMEOUT))

    def start_engine(self, volume: str, replicas: list[tuple[str, str]], *, timeout: float,
                     state_file: Path, epoch: int, local: tuple[str, str] | None = None,
                     size: int | None = None, key: str | None = None,
                     fence_all: bool = False, nbd_remote: bool = False,
                     data_key: bytes | None = None) -> Proc:
        """Start the engine of ``volume`` on that node (see NodeAgent.start_engine)."""
        return Proc.from_json(self._post("/v1/engines", {
            "volume": volume, "replicas": [{"name": n, "url": u} for n, u in replicas],
            "timeout_ms": max(1, int(timeout * 1000)), "state_file": str(state_file),
            "epoch": epoch, "size": size, "key": key, "fence_all": fence_all,
            "nbd_remote": nbd_remote, "data_key": data_key.hex() if data_key else None,
            "local": None if local is None else {"name": local[0], "directory": local[1]},
        }, _START_TIMEOUT))

    def upgrade_engine(self, volume: str, old: Proc | dict[str, Any],
                       replicas: list[tuple[str, str]], *, timeout: float, state_file: Path,
                       epoch: int, local: tuple[str, str] | None = None,
                       key: str | None = None, data_key: bytes | None = None) -> Proc:
        """Replace the running engine ``old`` of ``volume`` on that node live (see
        NodeAgent.upgrade_engine)."""
        return Proc.from_json(self._post("/v1/engines/upgrade", {
            "volume": volume, "old": old.to_json() if isinstance(old, Proc) else old,
            "replicas": [{"name": n, "url": u} for n, u in replicas],
            "timeout_ms": max(1, int(timeout * 1000)), "state_file": str(state_file),
            "epoch": epoch, "key": key, "data_key": data_key.hex() if data_key else None,
            "local": None if local is None else {"name": local[0], "directory": local[1]},
        }, _START_TIMEOUT))

    def find_engine(self, volume: str, epoch: int) -> Proc | None:
        """The engine of ``volume`` started with ``epoch`` on that node, if it runs (see
        NodeAgent.find_engine)."""
        doc = self._post("/v1/engines/find", {"volume": volume, "epoch": epoch},
                         _START_TIMEOUT)
        return None if doc.get("proc") is None else Proc.from_json(doc["proc"])

    def stop(self, proc: Proc | dict[str, Any] | None, timeout: float = 30.0) -> None:
        """Stop a process on that node cleanly (SIGTERM, then SIGKILL)."""
        if proc is None:
            return
        doc = proc.to_json() if isinstance(proc, Proc) else proc
        self._post("/v1/processes/stop", {"proc": doc, "timeout_ms": int(timeout * 1000)},
                   timeout + 10)

    def alive(self, proc: Proc | dict[str, Any] | None) -> bool:
        """True while the process runs; False also when its node does not answer."""
        if proc is None:
            return False
        doc = proc.to_json() if isinstance(proc, Proc) else proc
        try:
            return bool(self._post("/v1/processes/alive", {"proc": doc})["alive"])
        except AgentUnreachableError:
            return False

    def stop_unrecorded(self, volume: str, replicas: dict[str, str], keep: list[int],
                        reason: str, engines: bool = True) -> list[dict[str, Any]]:
        """Stop the processes of ``volume`` on that node its manager's record does not name
        (see NodeAgent.stop_unrecorded); those stopped."""
        return self._post("/v1/volumes/stop-unrecorded", {
            "volume": volume, "replicas": replicas, "keep": [{"pid": p} for p in keep],
            "reason": reason, "engines": engines}, httpx.Timeout(_STOP_TIMEOUT, connect=5.0))

    def attach_host(self, volume: str, mount: str | None, fs: str) -> dict[str, Any]:
        """Give that host a block device for ``volume`` (and mount it)."""
        return self._post("/v1/host/attach", {"volume": volume, "mount": mount, "fs": fs},
                          _START_TIMEOUT)

    def detach_host(self, volume: str, attachment: dict[str, Any] | None, *,
                    force: bool = False) -> None:
        """Release ``volume``'s host attachment on that host."""
        self._post("/v1/host/detach", {"volume": volume, "attachment": attachment,
                                       "force": force}, _START_TIMEOUT)

    def grow_host(self, attachment: dict[str, Any], size: int | None = None) -> dict[str, Any]:
        """Grow a host attachment on that host online (see NodeAgent.grow_host)."""
        return self._post("/v1/host/grow", {"attachment": attachment, "size": size},
                          _START_TIMEOUT)

    def remove_replica_data(self, path: str) -> None:
        """Delete a replaced replica's directory on that node."""
        self._post("/v1/replicas/remove-data", {"path": path})

    def clone_replica(self, src: str, dst: str, snapshot: str, base: dict[str, str],
                      within: dict[str, str] | None = None) -> dict[str, Any]:
        """Make a linked clone replica directory on that node (see NodeAgent)."""
        return self._post("/v1/replicas/clone", {"src": src, "dst": dst, "snapshot": snapshot,
                                                 "base": base, "within": within})

    def replica_usage(self, path: str) -> dict[str, int]:
        """Bytes of a replica directory on that node shared with others and its own."""
        return self._post("/v1/replicas/usage", {"path": path})

    def replica_space(self, path: str) -> dict[str, Any]:
        """The space report of a replica directory on that node (see NodeAgent)."""
        # A down node must not hold `volume get` for long; a big replica's scan may take a while.
        return self._post("/v1/replicas/space", {"path": path}, httpx.Timeout(30.0, connect=3.0))

    def trim_host(self, attachment: dict[str, Any]) -> dict[str, Any]:
        """fstrim a mounted volume's filesystem on that host (see NodeAgent.trim_host)."""
        from drove.agent.space import FSTRIM_TIMEOUT

        return self._post("/v1/host/trim", {"attachment": attachment}, FSTRIM_TIMEOUT + 30)

    def disk_status(self, disks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """State, capacity and free space of that node's ``disks`` ({path, id})."""
        return self._post("/v1/disks/status", {"disks": [
            {"path": d["path"], "id": d["id"]} for d in disks]})
