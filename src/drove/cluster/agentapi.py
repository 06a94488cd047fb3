"""The node agent's HTTP API: the manager starts, watches and stops this host's processes.

Every route maps to one :class:`drove.agent.node.NodeAgent` call, run in a
worker thread (they wait for processes and mount tools).  Every route but
``/v1/health`` needs the cluster token.  Failures answer with
``{"error": <exception name>, "detail": <message>}`` so the manager's
:class:`drove.cluster.remoteagent.RemoteAgent` raises the same exception the
in-process agent would.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from drove import __version__
from drove.agent import disks as disklib
from drove.agent.hostattach import HostAttachError
from drove.agent.node import NodeAgent
from drove.agent.processes import EngineUpgradeError, ProcessStartError
from drove.replica.clone import CloneError
from drove.web import App, Body, Field, HTTPError, Request, Response, json_response

START_REPLICA = Body("StartReplica", {
    "volume": Field("str"),
    "replica": Field("dict", description="the replica's record: name, path"),
    "size": Field("int", gt=0),
    "key": Field("str", nullable=True, default=None,
                 description="the volume's NBD access key (drove.replica.access)"),
}, "Start the process serving one replica.")

START_ENGINE = Body("StartEngine", {
    "volume": Field("str"),
    "replicas": Field("list[dict]", description="[{name, url}] of the replica processes"),
    "timeout_ms": Field("int", gt=0),
    "state_file": Field("str"),
    "epoch": Field("int"),
    "local": Field("dict", nullable=True, default=None,
                   description="{name, directory} of the replica the engine serves itself"),
    "size": Field("int", nullable=True, default=None),
    "key": Field("str", nullable=True, default=None,
                 description="the volume's NBD access key (drove.replica.access)"),
    "fence_all": Field("bool", default=False,
                       description="start only once every replica took the epoch (takeover)"),
    "nbd_remote": Field("bool", default=False,
                        description="serve NBD on the node's address, not loopback only"),
    "data_key": Field("str", nullable=True, default=None, pattern="^[0-9a-f]{128}$",
                      description="an encrypted volume's data key, hex (drove.engine.crypt)"),
}, "Start a volume's engine.")

UPGRADE_ENGINE = Body("UpgradeEngine", {
    "volume": Field("str"),
    "old": Field("dict", description="the running engine, as POST /v1/engines returned it"),
    "replicas": Field("list[dict]", description="[{name, url}] of the replica processes"),
    "timeout_ms": Field("int", gt=0),
    "state_file": Field("str"),
    "epoch": Field("int", description="the new engine's epoch (stored by the manager)"),
    "local": Field("dict", nullable=True, default=None,
                   description="{name, directory} of the replica the engine serves itself"),
    "key": Field("str", nullable=True, default=None,
                 description="the volume's NBD access key (drove.replica.access)"),
    "data_key": Field("str", nullable=True, default=None, pattern="^[0-9a-f]{128}$",
                      description="an encrypted volume's data key, hex (drove.engine.crypt)"),
}, "Replace a volume's running engine by one of this agent's drove, live (it takes over "
   "the old one's NBD sockets and connections).")

FIND_ENGINE = Body("FindEngine", {
    "volume": Field("str"),
    "epoch": Field("int", description="the epoch it was started with"),
}, "A volume's engine this agent runs, started with an epoch (a live upgrade's new engine "
   "its manager did not record).")

PROC = Body("Process", {
    "proc": Field("dict", nullable=True, description="a process as start_* returned it"),
    "timeout_ms": Field("int", default=30_000),
}, "One supervised process.")

STOP_UNRECORDED = Body("StopUnrecorded", {
    "volume": Field("str"),
    "replicas": Field("dict[str,str]",
                      description="{name: directory} of the volume's replicas on this node"),
    "keep": Field("list[dict]", description="[{pid}] of the processes the manager's record "
                                            "names: left running"),
    "reason": Field("str", default="the manager's record does not name it"),
    "engines": Field("bool", default=True, description="the volume's engines too"),
}, "Stop a volume's engines and replica processes here that the manager's record does not "
   "name (left by a manager killed while it started them), engines first.")

ATTACH = Body("HostAttach", {
    "volume": Field("str"),
    "mount": Field("str", nullable=True, default=None),
    "fs": Field("str", default="ext4"),
}, "Give this host a block device (and a mount) for a volume.")

DETACH = Body("HostDetach", {
    "volume": Field("str"),
    "attachment": Field("dict", nullable=True, default=None),
    "force": Field("bool", default=False),
}, "Release a volume's host attachment.")

GROW = Body("HostGrow", {
    "attachment": Field("dict", description="the attachment as /v1/host/attach returned it"),
    "size": Field("int", nullable=True, default=None,
                  description="bytes; null: all the volume's engine serves now"),
}, "Grow a host attachment's device and its mounted filesystem, online.")

DISKS = Body("DiskStatus", {
    "disks": Field("list[dict]", description="[{path, id}] of this node's disks"),
}, "Capacity, free space and state of disks on this host.")

REMOVE = Body("RemoveReplicaData", {
    "path": Field("str", description="DISK/replicas/NAME"),
}, "Delete the directory of a replaced replica.")

CLONE = Body("CloneReplica", {
    "src": Field("str", description="DISK/replicas/NAME of the replica holding the snapshot"),
    "dst": Field("str", description="DISK/replicas/NAME of the new clone replica"),
    "snapshot": Field("str"),
    "base": Field("dict", description="{volume, snapshot} the clone is made from"),
    "within": Field("dict", nullable=True, default=None,
                    description="take src's base layer with this marker (a sibling clone)"),
}, "Make a linked clone replica directory (hard links to the snapshot's layers).")

SPACE = Body("ReplicaSpace", {"path": Field("str", description="DISK/replicas/NAME")},
             "The space report of a replica directory no process serves.")

TRIM = Body("HostTrim", {
    "attachment": Field("dict", description="the attachment as /v1/host/attach returned it"),
}, "fstrim the filesystem a host attachment mounted.")

USAGE = Body("ReplicaUsage", {"path": Field("str", description="DISK/replicas/NAME")},
             "Bytes of a replica directory shared with others and its own.")

_ERRORS: dict[type[Exception], int] = {ProcessStartError: 502, EngineUpgradeError: 409,
                                       HostAttachError: 409,
                                       CloneError: 409, ValueError: 422, OSError: 500}


def build_app(agent: NodeAgent, token: str) -> App:
    """The agent's API over ``agent``, guarded by the cluster ``token``."""
    app = App(title="drove agent", version=__version__,
              description="The node agent of one drove host.")

    @app.guard
    async def _auth(request: Request) -> None:
        if request.path == "/v1/health":
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPError(401, "missing or wrong cluster token: send 'Authorization: "
                                 "Bearer TOKEN' with the cluster token (a manager's "
                                 "DATA_DIR/cluster-token); the API token does not open an "
                                 "agent")

    for exc_type, status in _ERRORS.items():
        app.exception_handler(exc_type)(_answer(status))

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness; needs no token."""
        return {"status": "ok", "node": agent.name, "version": __version__}

    @app.post("/v1/replicas", status=201, body=START_REPLICA)
    async def start_replica(body: Any) -> dict[str, Any]:
        """Start a replica process; the process record."""
        proc = await asyncio.to_thread(agent.start_replica, body.volume, body.replica,
                                       body.size, body.key)
        return proc.to_json()

    @app.post("/v1/engines", status=201, body=START_ENGINE)
    async def start_engine(body: Any) -> dict[str, Any]:
        """Start an engine; the process record."""
        local = None if body.local is None else (body.local["name"], body.local["directory"])
        # A relative state file lives under this agent's data directory.
        state_file = agent.data_dir / body.state_file
        proc = await asyncio.to_thread(
            agent.start_engine, body.volume, [(r["name"], r["url"]) for r in body.replicas],
            timeout=body.timeout_ms / 1000, state_file=state_file,
            epoch=body.epoch, local=local, size=body.size, key=body.key,
            fence_all=body.fence_all, nbd_remote=body.nbd_remote,
            data_key=bytes.fromhex(body.data_key) if body.data_key else None)
        return proc.to_json()

    @app.post("/v1/engines/upgrade", body=UPGRADE_ENGINE)
    async def upgrade_engine(body: Any) -> dict[str, Any]:
        """Replace a running engine live; the new engine's process record."""
        local = None if body.local is None else (body.local["name"], body.local["directory"])
        proc = await asyncio.to_thread(
            agent.upgrade_engine, body.volume, body.old,
            [(r["name"], r["url"]) for r in body.replicas],
            timeout=body.timeout_ms / 1000, state_file=agent.data_dir / body.state_file,
            epoch=body.epoch, local=local, key=body.key,
            data_key=bytes.fromhex(body.data_key) if body.data_key else None)
        return proc.to_json()

    @app.post("/v1/engines/find", body=FIND_ENGINE)
    async def find_engine(body: Any) -> dict[str, Any]:
        """``{"proc": the process record, or null}``."""
        proc = await asyncio.to_thread(agent.find_engine, body.volume, body.epoch)
        return {"proc": None if proc is None else proc.to_json()}

    @app.post("/v1/processes/stop", body=PROC)
    async def stop(body: Any) -> dict[str, Any]:
        """Stop a process (SIGTERM, then SIGKILL)."""
        await asyncio.to_thread(agent.stop, body.proc, body.timeout_ms / 1000)
        return {"alive": agent.alive(body.proc)}

    @app.post("/v1/processes/alive", body=PROC)
    async def alive(body: Any) -> dict[str, Any]:
        """Whether a process still runs."""
        return {"alive": agent.alive(body.proc)}

    @app.post("/v1/volumes/stop-unrecorded", body=STOP_UNRECORDED)
    async def stop_unrecorded(body: Any) -> list[dict[str, Any]]:
        """Stop the volume's processes here that no record names; [{kind, name, pid}]."""
        keep = [int(p["pid"]) for p in body.keep if isinstance(p.get("pid"), int)]
        return await asyncio.to_thread(agent.stop_unrecorded, body.volume, body.replicas,
                                       keep, body.reason, body.engines)

    @app.post("/v1/host/attach", body=ATTACH)
    async def attach(body: Any) -> dict[str, Any]:
        """Attach a volume to this host; the attachment."""
        return await asyncio.to_thread(agent.attach_host, body.volume, body.mount, body.fs)

    @app.post("/v1/host/detach", body=DETACH)
    async def detach(body: Any) -> dict[str, Any]:
        """Detach a volume from this host."""
        await asyncio.to_thread(agent.detach_host, body.volume, body.attachment,
                                force=body.force)
        return {}

    @app.post("/v1/host/grow", body=GROW)
    async def grow(body: Any) -> dict[str, Any]:
        """Grow a host attachment online; the attachment after."""
        return await asyncio.to_thread(agent.grow_host, body.attachment, body.size)

    @app.post("/v1/replicas/remove-data", body=REMOVE)
    async def remove_data(body: Any) -> dict[str, Any]:
        """Delete a replaced replica's directory."""
        await asyncio.to_thread(agent.remove_replica_data, body.path)
        return {}

    @app.post("/v1/replicas/clone", status=201, body=CLONE)
    async def clone_replica(body: Any) -> dict[str, Any]:
        """Make a linked clone replica directory on this host."""
        return await asyncio.to_thread(agent.clone_replica, body.src, body.dst, body.snapshot,
                                       body.base, body.within)

    @app.post("/v1/replicas/space", body=SPACE)
    async def replica_space(body: Any) -> dict[str, Any]:
        """Actual size, the head's and each layer's data, what deleting each snapshot frees."""
        return await asyncio.to_thread(agent.replica_space, body.path)

    @app.post("/v1/host/trim", body=TRIM)
    async def trim(body: Any) -> dict[str, Any]:
        """fstrim a mounted volume's filesystem; what it trimmed."""
        return await asyncio.to_thread(agent.trim_host, body.attachment)

    @app.post("/v1/replicas/usage", body=USAGE)
    async def replica_usage(body: Any) -> dict[str, int]:
        """Bytes of a replica directory shared with others and its own."""
        return await asyncio.to_thread(agent.replica_usage, body.path)

    @app.post("/v1/disks/status", body=DISKS)
    async def disk_status(body: Any) -> list[dict[str, Any]]:
        """State, capacity and free space of each disk."""
        return [await asyncio.to_thread(disklib.disk_status, d["path"], d["id"])
                for d in body.disks]

    return app


def _answer(status: int) -> Any:
    def handler(request: Request, exc: Exception) -> Response:
        return json_response(status, {"error": type(exc).__name__, "detail": str(exc)})
    return handler
