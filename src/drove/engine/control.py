"""The engine's HTTP/JSON control API: volume info, stats, snapshots, replicas, rebuild."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drove import __version__
from drove.engine.generation import NoCurrentReplicaError
from drove.engine.replicas import ReplicaControlError
from drove.engine.volume import Engine, EngineError
from drove.replica.access import Gate
from drove.web import App, Body, Field, HTTPError, Request, Response, json_response

SNAPSHOT = Body("SnapshotRequest", {
    "name": Field("str", description="snapshot name: letters, digits, '.', '_', '-'"),
    "labels": Field("dict[str,str]", default_factory=dict),
}, "Snapshot the volume (I/O pauses briefly).")

REVERT = Body("RevertRequest", {
    "snapshot": Field("str"),
    "force": Field("bool", default=False,
                   description="revert even though NBD clients are connected"),
}, "Start a new head on an older snapshot on every replica.")

EXPAND = Body("ExpandRequest", {
    "size": Field("int", gt=0, description="new size in bytes, a multiple of 4096"),
}, "Grow the volume (never shrink).")

QOS = Body("QosRequest", {
    "limits": Field("dict", default_factory=dict,
                    description="any of iops, bandwidth (bytes/s), read_iops, "
                    "write_iops, read_bandwidth, write_bandwidth (0: no limit) and burst "
                    "(seconds a bucket holds at its rate, default 1)"),
    "rebuild_bandwidth": Field("int", nullable=True, default=None,
                               description="bytes/s a rebuild copies at (0: no limit)"),
    "replace": Field("bool", default=False,
                     description="the limits given are the whole limits (others: 0)"),
}, "Change the volume's QoS limits live; limits not given keep their value.")

ADD_REPLICA = Body("AddReplicaRequest", {
    "name": Field("str", pattern=r"^[A-Za-z0-9._-]{1,64}$"),
    "url": Field("str", nullable=True, default=None,
                 description="control API URL of a new replica process"),
    "directory": Field("str", nullable=True, default=None,
                       description="directory of a new replica the engine serves itself "
                                   "(data locality; made when it holds none)"),
}, "Add a replica (rebuilt online) or rebuild an existing ERR one.")


def _error(status: int, exc: BaseException) -> Response:
    return json_response(status, {"error": type(exc).__name__, "detail": str(exc)})


def build_app(engine: Engine, access: Gate | None = None) -> App:
    """The application of one engine's control API (behind ``access``'s key, if any).

    An engine started with its volume's access key (``DROVE_NBD_KEY``: the agent
    starts every engine so) answers only callers that send it, as its replicas do:
    the API listens on the node's address for the manager, and its calls add,
    remove and rebuild replicas, revert and snapshot the volume.
    """
    app = App(title="drove engine", version=__version__,
              description="Control API of one drove volume engine.")

    if access is not None and access.protected:
        @app.guard
        async def _key(request: Request) -> None:
            if not access.admits_header(request.headers.get("authorization")):
                given = "a wrong key" if request.headers.get("authorization") else "no key"
                raise HTTPError(401, f"this engine answers only its volume's manager: the "
                                     f"request carried {given}; send 'Authorization: Bearer "
                                     "KEY' with the volume's access key (DROVE_NBD_KEY for "
                                     "`drove engine ...`)", {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(EngineError)
    def _engine_error(request: Request, exc: EngineError) -> Response:
        return _error(exc.status, exc)

    @app.exception_handler(ReplicaControlError)
    def _replica_error(request: Request, exc: ReplicaControlError) -> Response:
        return _error(502 if exc.status in (0, 500) else exc.status, exc)

    @app.exception_handler(NoCurrentReplicaError)
    def _no_current(request: Request, exc: NoCurrentReplicaError) -> Response:
        return _error(409, exc)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        """The volume: size, health, generation, replicas and their modes, rebuild."""
        return engine.info()

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Per-operation counts, bytes, latency histograms and recent rates."""
        return engine.stats.to_json()

    @app.get("/v1/qos")
    async def qos() -> dict[str, Any]:
        """The QoS limits, and the requests waiting and throttled so far."""
        return engine.qos_json()

    @app.put("/v1/qos", body=QOS)
    async def set_qos(body: Any) -> dict[str, Any]:
        """Change the QoS limits now (no restart; queued requests are judged anew)."""
        return engine.set_qos(body.limits, replace=body.replace,
                              rebuild_bandwidth=body.rebuild_bandwidth)

    @app.get("/v1/events")
    async def events() -> list[dict[str, Any]]:
        """What the engine did and why, oldest first."""
        return list(engine.events)

    @app.get("/v1/replicas")
    async def replicas() -> list[dict[str, Any]]:
        """Every replica with its mode (RW, WO, ERR) and last error."""
        return [r.to_json() for r in engine.replicas]

    @app.post("/v1/replicas", status=202, body=ADD_REPLICA)
    async def add_replica(body: Any) -> dict[str, Any]:
        """Start rebuilding a replica; poll GET /v1/rebuild for progress."""
        directory = None if body.directory is None else Path(body.directory)
        return await engine.add_replica(body.name, body.url, directory=directory)

    @app.delete("/v1/replicas/{name}")
    async def remove_replica(name: str) -> dict[str, Any]:
        """Take a replica out of the volume."""
        return await engine.remove_replica(name)

    @app.get("/v1/rebuild")
    async def rebuild() -> dict[str, Any] | None:
        """Progress of the running (or last) rebuild."""
        return engine.rebuild.to_json() if engine.rebuild is not None else None

    @app.get("/v1/snapshots")
    async def layers() -> list[dict[str, Any]]:
        """The chain (every layer with parent, labels, size) as the replicas hold it."""
        return await engine.layers()

    @app.get("/v1/diff", query={
        "since": Field("str", description="the older snapshot (FROM)"),
        "to": Field("str", nullable=True, default=None,
                    description="the newer snapshot (TO); absent: the head"),
    })
    async def snapshot_diff(since: str, to: str | None) -> dict[str, Any]:
        """The extents that may differ between two snapshots (or one and the head), from a
        RW replica's layers (no data is read; see drove.replica.diff)."""
        rw = engine.mirror.rw_members()
        if not rw:
            raise EngineError(f"volume {engine.name} has no RW replica", 409)
        params = {"since": since} if to is None else {"since": since, "to": to}
        return await rw[0].call("GET", "/v1/diff", slow=True,  # type: ignore[attr-defined]
                                params=params)

    @app.post("/v1/snapshots", status=201, body=SNAPSHOT)
    async def snapshot(body: Any) -> dict[str, Any]:
        """Snapshot every replica; the answer reports how long I/O was paused."""
        return await engine.snapshot(body.name, body.labels)

    @app.delete("/v1/snapshots/{name}")
    async def delete(name: str) -> dict[str, Any]:
        """Delete a snapshot on every replica."""
        return await engine.delete_snapshot(name)

    @app.post("/v1/revert", body=REVERT)
    async def revert(body: Any) -> dict[str, Any]:
        """Revert every replica to a snapshot (refused while clients are connected)."""
        return await engine.revert(body.snapshot, body.force)

    @app.post("/v1/expand", body=EXPAND)
    async def expand(body: Any) -> dict[str, Any]:
        """Grow every replica, then the size served to new NBD connections."""
        return await engine.expand(body.size)

    return app
