"""The engine's HTTP/JSON control API: volume info, stats, snapshots, replicas, rebuild."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from drove import __version__
from drove.engine.generation import NoCurrentReplicaError
from drove.engine.replicas import ReplicaControlError
from drove.engine.volume import Engine, EngineError


class SnapshotRequest(BaseModel):
    """Snapshot the volume (I/O pauses briefly)."""

    name: str = Field(description="snapshot name: letters, digits, '.', '_', '-'")
    labels: dict[str, str] = Field(default_factory=dict)


class RevertRequest(BaseModel):
    """Start a new head on an older snapshot on every replica."""

    snapshot: str
    force: bool = Field(False, description="revert even though NBD clients are connected")


class ExpandRequest(BaseModel):
    """Grow the volume (never shrink)."""

    size: int = Field(gt=0, description="new size in bytes, a multiple of 4096")


class AddReplicaRequest(BaseModel):
    """Add a replica (rebuilt online) or rebuild an existing ERR one."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    url: str | None = Field(None, description="control API URL of a new replica process")


def _error(status: int, exc: BaseException) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": type(exc).__name__, "detail": str(exc)})


def build_app(engine: Engine) -> FastAPI:
    """The FastAPI application of one engine."""
    app = FastAPI(title="drove engine", version=__version__,
                  description="Control API of one drove volume engine.")

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return _error(exc.status, exc)

    @app.exception_handler(ReplicaControlError)
    async def _replica_error(request: Request, exc: ReplicaControlError) -> JSONResponse:
        return _error(502 if exc.status in (0, 500) else exc.status, exc)

    @app.exception_handler(NoCurrentReplicaError)
    async def _no_current(request: Request, exc: NoCurrentReplicaError) -> JSONResponse:
        return _error(409, exc)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        """The volume: size, health, generation, replicas and their modes, rebuild."""
        return engine.info()

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Per-operation counts, bytes, latency histograms and recent rates."""
        return engine.stats.to_json()

    @app.get("/v1/events")
    async def events() -> list[dict[str, Any]]:
        """What the engine did and why, oldest first."""
        return list(engine.events)

    @app.get("/v1/replicas")
    async def replicas() -> list[dict[str, Any]]:
        """Every replica with its mode (RW, WO, ERR) and last error."""
        return [r.to_json() for r in engine.replicas]

    @app.post("/v1/replicas", status_code=202)
    async def add_replica(req: AddReplicaRequest) -> dict[str, Any]:
        """Start rebuilding a replica; poll GET /v1/rebuild for progress."""
        return await engine.add_replica(req.name, req.url)

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

    @app.post("/v1/snapshots", status_code=201)
    async def snapshot(req: SnapshotRequest) -> dict[str, Any]:
        """Snapshot every replica; the answer reports how long I/O was paused."""
        return await engine.snapshot(req.name, req.labels)

    @app.delete("/v1/snapshots/{name}")
    async def delete(name: str) -> dict[str, Any]:
        """Delete a snapshot on every replica."""
        return await engine.delete_snapshot(name)

    @app.post("/v1/revert")
    async def revert(req: RevertRequest) -> dict[str, Any]:
        """Revert every replica to a snapshot (refused while clients are connected)."""
        return await engine.revert(req.snapshot, req.force)

    @app.post("/v1/expand")
    async def expand(req: ExpandRequest) -> dict[str, Any]:
        """Grow every replica, then the size served to new NBD connections."""
        return await engine.expand(req.size)

    return app
