"""The replica's HTTP/JSON control API: info, snapshots, purge, revert, expand, checksums.

Structural operations are serialised by one lock and run their chain calls
inline on the event loop, so each is atomic with respect to I/O requests.
Operations that replace the head (snapshot, revert) first let running flushes
finish, because a flush holds the head's file descriptor in a worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from drove import __version__
from drove.replica.chain import LayerInfo
from drove.replica.exports import FlushGate

log = logging.getLogger("drove.replica")


class SnapshotRequest(BaseModel):
    """Take a snapshot of the head."""

    name: str = Field(description="snapshot name: letters, digits, '.', '_', '-'")
    labels: dict[str, str] = Field(default_factory=dict)


class RevertRequest(BaseModel):
    """Start a new, empty head on an older snapshot."""

    snapshot: str


class ExpandRequest(BaseModel):
    """Grow the volume (never shrink)."""

    size: int = Field(gt=0, description="new size in bytes")


def layer_json(info: LayerInfo) -> dict[str, Any]:
    """A chain LayerInfo as plain JSON."""
    return dataclasses.asdict(info)


class ReplicaControl:
    """Runs structural operations on one open replica, one at a time."""

    def __init__(self, replica, gate: FlushGate, addresses: dict[str, Any] | None = None):
        self.replica = replica
        self.gate = gate
        self.addresses = addresses if addresses is not None else {}
        self._lock = asyncio.Lock()

    def info(self) -> dict[str, Any]:
        """What this replica is and where it listens."""
        layers = self.replica.layers()
        # The head is the one unnamed layer: snapshots always have names.
        head = next(layer for layer in layers if layer.name is None)
        return {
            "version": __version__,
            "dir": str(self.replica.dir),
            "size": self.replica.size,
            "head": head.file,
            "layers": len(layers),
            "snapshots": sum(1 for layer in layers if layer.name and not layer.removed),
            "addresses": self.addresses,
        }

    async def snapshot(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        """Snapshot the head under ``name``."""
        async with self._lock:
            await self.gate.drain()
            started = time.perf_counter()
            info = self.replica.snapshot(name, labels=labels)
            log.info("snapshot %s created in %.1f ms", name, (time.perf_counter() - started) * 1e3)
            return layer_json(info)

    async def delete(self, name: str, purge: bool) -> dict[str, Any]:
        """Mark snapshot ``name`` removed, then purge removed layers when asked."""
        async with self._lock:
            self.replica.delete_snapshot(name)
            log.info("snapshot %s marked removed", name)
            purged = await self._purge() if purge else 0
        return {"removed": name, "purge_steps": purged}

    async def purge(self) -> dict[str, Any]:
        """Fold or prune every removed snapshot that can be."""
        async with self._lock:
            return {"purge_steps": await self._purge()}

    async def _purge(self) -> int:
        started = time.perf_counter()
        steps = 0
        for _ in self.replica.purge_steps():
            steps += 1
            # Let queued I/O run between bounded purge chunks.
            await asyncio.sleep(0)
        if steps:
            log.info("purge: %d steps in %.1f ms", steps, (time.perf_counter() - started) * 1e3)
        return steps

    async def revert(self, snapshot: str) -> dict[str, Any]:
        """Start a new head on ``snapshot``; unsnapshotted head data is dropped."""
        async with self._lock:
            await self.gate.drain()
            self.replica.revert(snapshot)
            log.info("reverted head to snapshot %s", snapshot)
            return self.info()

    async def expand(self, size: int) -> dict[str, Any]:
        """Grow the volume to ``size`` bytes."""
        async with self._lock:
            await self.gate.drain()
            old = self.replica.size
            self.replica.expand(size)
            log.info("expanded from %d to %d bytes", old, size)
            return self.info()

    async def checksum(self, name: str) -> dict[str, Any]:
        """The snapshot layer's checksum, computed in a thread if not cached."""
        async with self._lock:
            started = time.perf_counter()
            digest = await asyncio.get_running_loop().run_in_executor(
                None, self.replica.checksum, name,
            )
            return {"snapshot": name, "checksum": digest,
                    "seconds": round(time.perf_counter() - started, 3)}


def _error(status: int, exc: BaseException) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": type(exc).__name__,
                                                      "detail": str(exc)})


def build_app(control: ReplicaControl) -> FastAPI:
    """The FastAPI application for one replica's control API."""
    app = FastAPI(title="drove replica", version=__version__,
                  description="Control API of one drove replica process.")

    # Chain errors become 4xx with a message; the data is untouched by a refused call.
    @app.exception_handler(LookupError)
    async def _not_found(request: Request, exc: LookupError) -> JSONResponse:
        return _error(404, exc)

    @app.exception_handler(FileExistsError)
    async def _exists(request: Request, exc: FileExistsError) -> JSONResponse:
        return _error(409, exc)

    @app.exception_handler(ValueError)
    async def _bad(request: Request, exc: ValueError) -> JSONResponse:
        return _error(400, exc)

    @app.exception_handler(OSError)
    async def _os(request: Request, exc: OSError) -> JSONResponse:
        return _error(507 if exc.errno == 28 else 500, exc)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        """Replica identity, size, layers and listening addresses."""
        return control.info()

    @app.get("/v1/layers")
    async def layers(removed: bool = False) -> list[dict[str, Any]]:
        """The chain as a tree: every layer with its parent and children."""
        return [layer_json(layer) for layer in control.replica.layers()
                if removed or not layer.removed]

    @app.post("/v1/snapshots", status_code=201)
    async def snapshot(req: SnapshotRequest) -> dict[str, Any]:
        """Take a snapshot of the head."""
        return await control.snapshot(req.name, req.labels)

    @app.delete("/v1/snapshots/{name}")
    async def delete(name: str, purge: bool = True) -> dict[str, Any]:
        """Remove a snapshot (and purge removed layers unless purge=false)."""
        return await control.delete(name, purge)

    @app.post("/v1/purge")
    async def purge() -> dict[str, Any]:
        """Fold or prune removed snapshots."""
        return await control.purge()

    @app.post("/v1/revert")
    async def revert(req: RevertRequest) -> dict[str, Any]:
        """Start a new head on an older snapshot."""
        return await control.revert(req.snapshot)

    @app.post("/v1/expand")
    async def expand(req: ExpandRequest) -> dict[str, Any]:
        """Grow the volume."""
        return await control.expand(req.size)

    @app.get("/v1/snapshots/{name}/checksum")
    async def checksum(name: str) -> dict[str, Any]:
        """sha256 over the snapshot layer's data extents (cached after the first call)."""
        return await control.checksum(name)

    return app
