"""The manager's REST API (FastAPI); see docs/api.md."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from drove import __version__
from drove.manager.core import ApiError, Manager

Size = Annotated[int | str, Field(description="bytes, or a size like '10G' or '512M'",
                                  examples=["10G"])]
Labels = dict[Annotated[str, Field(min_length=1, max_length=63)],
              Annotated[str, Field(max_length=253)]]


class Strict(BaseModel):
    """Request bodies refuse fields they do not know (a typo is an error, not a no-op)."""

    model_config = ConfigDict(extra="forbid")


class VolumeCreate(Strict):
    """A new volume."""

    name: str = Field(description="a-z 0-9 . _ -, up to 63 characters")
    size: Size
    replicas: int | None = Field(None, ge=1, le=10, description="default: the setting")
    pool: str | None = Field(None, description="place replicas only on disks with this tag")
    labels: Labels = Field(default_factory=dict)


class VolumeUpdate(Strict):
    """Change the replica count (live) or the labels."""

    replicas: int | None = Field(None, ge=1, le=10)
    labels: Labels | None = None


class Expand(Strict):
    """Grow a volume."""

    size: Size


class Attach(Strict):
    """Attach a volume; with ``mount``, give the host a filesystem there."""

    mount: str | None = Field(None, description="absolute mount path")
    fs: Literal["ext4", "xfs"] = "ext4"


class Detach(Strict):
    """Detach a volume."""

    force: bool = False


class SnapshotCreate(Strict):
    """Snapshot a volume."""

    name: str | None = Field(None, description="default: snap-YYYYmmdd-HHMMSS")
    labels: Labels = Field(default_factory=dict)


class Revert(Strict):
    """Revert a volume to a snapshot."""

    snapshot: str


class DiskAdd(Strict):
    """Add a directory as a disk."""

    path: str = Field(description="absolute path of a directory (made if missing)")
    tags: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list)
    reserved: Size = 0
    name: str | None = None


class SettingsUpdate(Strict):
    """Change settings."""

    over_provisioning_percent: int | None = None
    default_replicas: int | None = None
    replica_timeout: float | None = None
    heal_interval: float | None = None
    failed_replica_retry_seconds: float | None = None


_bearer = HTTPBearer(auto_error=False)


def auth(request: Request,
         creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Refuse a request without the API token (401)."""
    token: str = request.app.state.token
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.encode()):
        raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer "
                            "TOKEN' with the token from DATA_DIR/token")


def build_app(manager: Manager, token: str) -> FastAPI:
    """The API over ``manager``; every route but /v1/health needs ``token``."""
    app = FastAPI(title="drove", version=__version__,
                  description="Replicated block storage for containers: the manager's API.")
    app.state.manager = manager
    app.state.token = token
    secured = [Depends(auth)]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "invalid request: " + "; ".join(msgs)}, status_code=422)

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness; needs no token."""
        return {"status": "ok", "version": __version__}

    @app.get("/v1/nodes", dependencies=secured)
    async def nodes() -> list[dict[str, Any]]:
        """Every node with its disks."""
        return manager.nodes()

    @app.get("/v1/disks", dependencies=secured)
    async def disks() -> list[dict[str, Any]]:
        """Every disk: state, capacity, available, scheduled, tags."""
        return manager.disks()

    @app.post("/v1/disks", dependencies=secured, status_code=201)
    async def add_disk(req: DiskAdd) -> dict[str, Any]:
        """Add a directory as a disk of this node."""
        return manager.add_disk(req.path, tags=req.tags, reserved=req.reserved, name=req.name)

    @app.delete("/v1/disks/{name}", dependencies=secured)
    async def remove_disk(name: str, force: bool = False) -> dict[str, Any]:
        """Forget a disk (refused while it holds replicas unless force)."""
        return manager.remove_disk(name, force)

    @app.get("/v1/volumes", dependencies=secured)
    async def volumes() -> list[dict[str, Any]]:
        """Every volume with state, health and replicas."""
        return manager.volumes()

    @app.post("/v1/volumes", dependencies=secured, status_code=201)
    async def create_volume(req: VolumeCreate) -> dict[str, Any]:
        """Create a volume and place its replicas."""
        return manager.create_volume(req.name, req.size, req.replicas, req.pool, req.labels)

    @app.get("/v1/volumes/{name}", dependencies=secured)
    async def volume(name: str) -> dict[str, Any]:
        """One volume."""
        return manager.volume(name)

    @app.patch("/v1/volumes/{name}", dependencies=secured)
    async def update_volume(name: str, req: VolumeUpdate) -> dict[str, Any]:
        """Change the replica count (rebuilt online) or labels."""
        return await manager.update_volume(name, req.replicas, req.labels)

    @app.delete("/v1/volumes/{name}", dependencies=secured)
    async def delete_volume(name: str, force: bool = False) -> dict[str, Any]:
        """Delete a volume and its data (refused while attached unless force)."""
        return await manager.delete_volume(name, force)

    @app.post("/v1/volumes/{name}/expand", dependencies=secured)
    async def expand(name: str, req: Expand) -> dict[str, Any]:
        """Grow a volume."""
        return await manager.expand_volume(name, req.size)

    @app.post("/v1/volumes/{name}/attach", dependencies=secured)
    async def attach(name: str, req: Attach | None = None) -> dict[str, Any]:
        """Start the volume's engine and replicas; optionally mount a filesystem."""
        req = req or Attach()
        return await manager.attach(name, req.mount, req.fs)

    @app.post("/v1/volumes/{name}/detach", dependencies=secured)
    async def detach(name: str, req: Detach | None = None) -> dict[str, Any]:
        """Unmount, release devices, stop the volume's processes."""
        return await manager.detach(name, (req or Detach()).force)

    @app.get("/v1/volumes/{name}/snapshots", dependencies=secured)
    async def snapshots(name: str) -> list[dict[str, Any]]:
        """The snapshot tree."""
        return await manager.snapshots(name)

    @app.post("/v1/volumes/{name}/snapshots", dependencies=secured, status_code=201)
    async def create_snapshot(name: str, req: SnapshotCreate | None = None) -> dict[str, Any]:
        """Snapshot the volume (I/O pauses for milliseconds)."""
        req = req or SnapshotCreate()
        return await manager.create_snapshot(name, req.name, req.labels)

    @app.delete("/v1/volumes/{name}/snapshots/{snapshot}", dependencies=secured)
    async def delete_snapshot(name: str, snapshot: str) -> dict[str, Any]:
        """Delete a snapshot."""
        return await manager.delete_snapshot(name, snapshot)

    @app.post("/v1/volumes/{name}/revert", dependencies=secured)
    async def revert(name: str, req: Revert) -> dict[str, Any]:
        """Revert to a snapshot (no client may be connected)."""
        return await manager.revert(name, req.snapshot)

    @app.post("/v1/volumes/{name}/snapshots/{snapshot}/export", dependencies=secured)
    async def export_snapshot(name: str, snapshot: str) -> dict[str, Any]:
        """A read-only NBD URI serving the snapshot."""
        return await manager.export_snapshot(name, snapshot)

    @app.get("/v1/events", dependencies=secured)
    async def events(volume: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10000)] = 100,
                     after: Annotated[int, Query(ge=0, le=2**62)] = 0) -> list[dict[str, Any]]:
        """What the system did and why, oldest first."""
        return manager.store.events(volume, limit, after)

    @app.get("/v1/settings", dependencies=secured)
    async def settings() -> dict[str, Any]:
        """Every setting."""
        return manager.settings()

    @app.patch("/v1/settings", dependencies=secured)
    async def update_settings(req: SettingsUpdate) -> dict[str, Any]:
        """Change settings."""
        return manager.update_settings(req.model_dump(exclude_none=True))

    @app.get("/metrics", dependencies=secured, response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics: per-volume I/O, health, replicas; per-disk usage."""
        from drove.manager.metrics import render

        body, content_type = await render(manager)
        return PlainTextResponse(body, media_type=content_type)

    return app
