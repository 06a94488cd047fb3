"""The replica's HTTP/JSON control API: info, snapshots, purge, revert, expand, checksums,
the engine's state, and the target side of a rebuild (prepare, sync, complete).

Structural operations are serialised by one lock and run their chain calls
inline on the event loop, so each is atomic with respect to I/O requests.
Operations that replace the head (snapshot, revert) first let running flushes
finish, because a flush holds the head's file descriptor in a worker thread.

Every call passes the epoch fence first (:mod:`drove.replica.fence`): a caller
whose ``Drove-Epoch`` is stale gets 409.  A mutating call checks the fence
again right before it changes anything, after its waits (the lock, running
flushes), so a newer engine that claimed the replica meanwhile wins.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from typing import Any

from drove import __version__
from drove.replica import diff, scrub, usage
from drove.replica.access import Gate
from drove.replica.backingapi import add_routes as add_backing_routes
from drove.replica.chain import LayerInfo
from drove.replica.errors import (
    ChecksumMismatchError,
    InvalidRequestError,
    LayerNotFoundError,
    RebuildingError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StaleGenerationError,
)
from drove.replica.exports import FlushGate
from drove.replica.fence import EPOCH_HEADER, Fence, StaleEpochError, parse_epoch_header
from drove.replica.meta import ENGINE_STATE_MAX
from drove.replica.rebuild import SyncJob
from drove.web import App, Body, Field, HTTPError, Request, Response, json_response

log = logging.getLogger("drove.replica")


SNAPSHOT = Body("SnapshotRequest", {
    "name": Field("str", description="snapshot name: letters, digits, '.', '_', '-'"),
    "labels": Field("dict[str,str]", default_factory=dict),
}, "Take a snapshot of the head.")

REVERT = Body("RevertRequest", {"snapshot": Field("str")},
              "Start a new, empty head on an older snapshot.")

EXPAND = Body("ExpandRequest", {"size": Field("int", gt=0, description="new size in bytes")},
              "Grow the volume (never shrink).")

PREPARE = Body("PrepareRequest", {
    "layers": Field("list[dict]",
                    description="the source's GET /v1/layers?removed=true, without its head"),
    "head_parent": Field("str", nullable=True,
                         description="layer file the new head sits on (S)"),
    "size": Field("int", gt=0, description="volume size in bytes (the replica grows to it)"),
    "reuse_head_as": Field("str", nullable=True, default=None,
                           description="layer file the current head's data becomes "
                                       "(an older copy)"),
}, "Make this replica's tree the source's, every layer incomplete, under a new empty head.")

COMPLETE = Body("CompleteRequest", {
    "checksum": Field("str", description="sha256 hex of the source's layer"),
}, "Verify a rebuilt layer against the source's checksum.")

SYNC = Body("SyncRequest", {
    "file": Field("str", description="the layer file (the same on source and target)"),
    "source": Field("str", description="nbd://host:port/layer/FILE or "
                                       "nbd+unix:///layer/FILE?socket=PATH"),
    "ranges": Field("list[list[int]]", nullable=True, default=None,
                    description="[[offset, length], ...] to make equal (delta), or null: "
                                "copy every allocated extent"),
    "rate": Field("int", default=0,
                  description="bytes per second to read the source at (0: no limit; the "
                              "rebuild QoS, so that a rebuild cannot starve the volume)"),
}, "Pull one incomplete layer from the source replica's layer export.")

REPAIR = Body("RepairRequest", {
    "offset": Field("int", gt=-1, description="start of the range (4 KiB-aligned)"),
    "length": Field("int", gt=0, description="bytes in the range (4 KiB-aligned)"),
    "source": Field("str", description="the good replica's layer/FILE NBD URI"),
    "expect": Field("str", description="this replica's digest of the range, as compared"),
    "expect_source": Field("str", description="the good replica's digest of the range"),
}, "Repair one range of a snapshot layer from a good replica (a scrub found it differs).")

ENGINE_STATE = Body("EngineState", None, "The engine's opaque state (at most 64 KiB).")

REBUILD_BODY_MAX = 32 << 20
"""Largest prepare or sync body: a layer tree of thousands of snapshots, or the differing
ranges of a large volume (1 TiB in 1 MiB ranges, every other one differing: ~12 MiB)."""
CLAIM = Body("EpochClaim", {
    "epoch": Field("int", gt=0, description="the starting engine's epoch: above the replica's"),
}, "Take this replica for an engine of a new epoch: cuts the head connections of older ones.")

# The epoch the current request carries (None: no Drove-Epoch header), set by the guard.
_request_epoch: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "drove_request_epoch", default=None)


def layer_json(info: LayerInfo) -> dict[str, Any]:
    """A chain LayerInfo as plain JSON."""
    return dataclasses.asdict(info)


class ReplicaControl:
    """Runs structural operations on one open replica, one at a time."""

    def __init__(self, replica, gate: FlushGate, fence: Fence,
                 addresses: dict[str, Any] | None = None):
        self.replica = replica
        self.gate = gate
        self.fence = fence
        self.addresses = addresses if addresses is not None else {}
        self._lock = asyncio.Lock()
        self.sync_job: SyncJob | None = None
        self._background: set[asyncio.Task[Any]] = set()
        fence.on_advance(self._stale_work)

    def _stale_work(self, epoch: int) -> None:
        """A newer engine took over: a sync started by the old one stops."""
        job = self.sync_job
        if job is not None and job.running:
            log.warning("epoch %d: cancelling the sync of %s started by an older engine",
                        epoch, job.file)
            task = asyncio.ensure_future(job.cancel())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def admit(self, method: str, path: str, header: str | None) -> None:
        """The fence for one control call (see the module docstring); remembers its epoch."""
        epoch = None
        if header is not None:
            try:
                epoch = parse_epoch_header(header)
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from None
        _request_epoch.set(epoch)
        if epoch is None and method in ("GET", "HEAD"):
            return  # reading needs no epoch
        self.fence.admit(epoch, f"{method} {path}")

    def _recheck(self, what: str) -> None:
        """Check the fence again right before a change (the request may have waited)."""
        self.fence.admit(_request_epoch.get(), what)

    def claim(self, epoch: int) -> dict[str, Any]:
        """Take the replica for a starting engine of ``epoch`` (above the current one)."""
        self.fence.claim(epoch)
        return self.info()

    def info(self) -> dict[str, Any]:
        """What this replica is and where it listens."""
        layers = self.replica.layers()
        # The head is the one unnamed layer: snapshots always have names.
        head = next(layer for layer in layers if layer.name is None)
        return {
            "version": __version__,
            "epoch": self.replica.epoch,
            "dir": str(self.replica.dir),
            "size": self.replica.size,
            "head": head.file,
            "layers": len(layers),
            "snapshots": sum(1 for layer in layers if layer.name and not layer.removed),
            "addresses": self.addresses,
            "engine_state": self.replica.engine_state,
            "rebuilding": any(layer.incomplete for layer in layers),
            "incomplete": [layer.file for layer in layers if layer.incomplete],
        }

    async def snapshot(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        """Snapshot the head under ``name``."""
        async with self._lock:
            await self.gate.drain()
            self._recheck(f"snapshot {name}")
            started = time.perf_counter()
            info = self.replica.snapshot(name, labels=labels)
            log.info("snapshot %s created in %.1f ms", name, (time.perf_counter() - started) * 1e3)
            return layer_json(info)

    async def delete(self, name: str, purge: bool) -> dict[str, Any]:
        """Mark snapshot ``name`` removed, then purge removed layers when asked."""
        async with self._lock:
            self._recheck(f"delete snapshot {name}")
            self.replica.delete_snapshot(name)
            log.info("snapshot %s marked removed", name)
            purged = await self._purge() if purge else 0
        return {"removed": name, "purge_steps": purged}

    async def purge(self) -> dict[str, Any]:
        """Fold or prune every removed snapshot that can be."""
        async with self._lock:
            self._recheck("purge")
            return {"purge_steps": await self._purge()}

    async def flatten(self) -> dict[str, Any]:
        """Copy every base layer this replica shares with another (a linked clone's) into a
        file of its own, in a worker thread, then purge them: it stands alone."""
        async with self._lock:
            self._recheck("flatten")
            loop = asyncio.get_running_loop()
            copied = 0
            for file, ino in self.replica.flatten_plan():
                copy = await loop.run_in_executor(None, self.replica.copy_shared, file, ino)
                self._recheck("flatten")
                copied += self.replica.flatten_layer(file, ino, copy)
            steps = await self._purge()
        log.info("flattened: %d bytes copied, %d purge steps", copied, steps)
        return {"bytes_copied": copied, "purge_steps": steps}

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
            self._recheck(f"revert to {snapshot}")
            if not any(la.name == snapshot and not la.removed for la in self.replica.layers()):
                raise SnapshotNotFoundError(f"no snapshot {snapshot!r}")
            # Requests queued on any head connection were meant for the old head.
            self.fence.cut_all(f"revert to {snapshot}")
            self.replica.revert(snapshot)
            log.info("reverted head to snapshot %s", snapshot)
            return self.info()

    async def expand(self, size: int) -> dict[str, Any]:
        """Grow the volume to ``size`` bytes."""
        async with self._lock:
            await self.gate.drain()
            self._recheck("expand")
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


    async def layer_checksum(self, file: str) -> dict[str, Any]:
        """Layer ``file``'s checksum (a rebuild source's), computed in a thread if not cached."""
        started = time.perf_counter()
        digest = await asyncio.get_running_loop().run_in_executor(
            None, self.replica.layer_checksum, file,
        )
        return {"file": file, "checksum": digest,
                "seconds": round(time.perf_counter() - started, 3)}

    async def layer_digests(self, file: str, range_size: int,
                            idle: bool = False) -> dict[str, Any]:
        """Per-range digests of layer ``file``'s own content, computed in a thread (``idle``:
        the scrub's, at the lowest CPU priority)."""
        digests = await asyncio.get_running_loop().run_in_executor(
            scrub.idle_executor() if idle else None, self.replica.layer_digests, file,
            range_size,
        )
        return {"file": file, "range_size": range_size, "digests": digests}

    async def rehash(self, file: str) -> dict[str, Any]:
        """Layer ``file``'s recorded checksum and its sha256 now, hashed in a thread."""
        recorded, actual = await asyncio.get_running_loop().run_in_executor(
            scrub.idle_executor(), self.replica.rehash_layer, file)
        return {"file": file, "recorded": recorded, "checksum": actual,
                "matches": recorded is not None and recorded == actual}

    async def repair(self, file: str, req: Any) -> dict[str, Any]:
        """Repair one range of snapshot layer ``file`` from a good replica (a scrub's)."""
        async with self._lock:  # no purge or flatten changes the layer meanwhile
            self._recheck(f"repair layer {file}")
            out = await scrub.repair(self.replica, file, req.offset, req.length, req.source,
                                     req.expect, req.expect_source,
                                     lambda: self._recheck(f"repair layer {file}"))
        log.warning("scrub: layer %s repaired at %d+%d: %d block(s) rewritten", file,
                    req.offset, req.length, len(out["blocks"]))
        return out

    async def diff(self, since: str, to: str | None) -> dict[str, Any]:
        """The extents that differ between snapshot ``since`` and ``to`` (None: the head).

        Under the structural lock, so no purge step runs between the layers' scans;
        the scan itself (SEEK_DATA over the layers) runs in a thread.
        """
        async with self._lock:
            with diff.Delta.open(self.replica, since, to) as delta:
                extents = await asyncio.get_running_loop().run_in_executor(None, delta.scan)
                return diff.to_json(delta.plan, extents)

    async def space(self) -> dict[str, Any]:
        """The replica directory's allocation, the head's data and per layer its data and
        what deleting it frees (drove.replica.usage), scanned in a thread.

        Under the structural lock, so no purge, snapshot or rebuild prepare changes the
        tree while its files are scanned; writes to the head go on.
        """
        async with self._lock:
            layers = self.replica.layers()
            return await asyncio.get_running_loop().run_in_executor(
                None, usage.space_json, self.replica.dir, layers, self.replica.size)

    def set_engine_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Store the engine's state durably (its generation only grows); returns it."""
        self._recheck("store the engine state")
        return self.replica.set_engine_state(state)

    def _refuse_while_syncing(self, what: str, file: str | None = None) -> None:
        job = self.sync_job
        if job is not None and job.running and (file is None or job.file == file):
            raise RebuildingError(f"cannot {what}: a sync of layer {job.file} is running "
                                  "(cancel it with DELETE /v1/rebuild/sync)")

    async def prepare_rebuild(self, req: Any) -> dict[str, Any]:
        """Give this replica the source's layer tree, every layer incomplete."""
        async with self._lock:
            self._refuse_while_syncing("prepare a rebuild")
            await self.gate.drain()
            self._recheck("prepare a rebuild")
            # No request queued before the prepare may land in the new head.
            self.fence.cut_all("rebuild prepare")
            started = time.perf_counter()
            self.replica.prepare_rebuild(req.layers, req.head_parent, req.size,
                                         reuse_head_as=req.reuse_head_as)
            log.info("rebuild prepared in %.1f ms: %d layers",
                     (time.perf_counter() - started) * 1e3, len(req.layers))
            return self.info()

    async def complete_layer(self, file: str, checksum: str) -> dict[str, Any]:
        """Verify layer ``file`` against the source's checksum; it is then complete."""
        self._refuse_while_syncing("verify the layer", file)
        started = time.perf_counter()
        verified = await asyncio.get_running_loop().run_in_executor(
            None, self.replica.verify_layer, file,
        )
        # Back on the loop: a sync started meanwhile would have changed the layer, and
        # complete_layer refuses a layer changed since it was hashed.
        self._recheck(f"complete layer {file}")
        digest = self.replica.complete_layer(file, checksum, verified)
        return {"file": file, "checksum": digest, "incomplete": self.replica.incomplete,
                "seconds": round(time.perf_counter() - started, 3)}

    def start_sync(self, req: Any) -> dict[str, Any]:
        """Start pulling a layer from the source in the background."""
        self._refuse_while_syncing("start another sync")
        self._recheck(f"sync layer {req.file}")
        if req.rate < 0:
            raise InvalidRequestError(f"rate must be 0 (no limit) or more, not {req.rate}")
        job = SyncJob(self.replica, req.file, req.source, req.ranges, rate=req.rate)
        job.start()
        self.sync_job = job
        log.info("sync of %s from %s started (%s)", req.file, req.source,
                 f"{len(job.ranges)} ranges" if job.delta else "all data")
        return job.status()

    def sync_status(self) -> dict[str, Any]:
        """The current or last sync job."""
        if self.sync_job is None:
            return {"state": "idle", "file": None, "bytes_done": 0, "bytes_total": 0,
                    "error": None}
        return self.sync_job.status()

    async def cancel_sync(self) -> dict[str, Any]:
        """Cancel the running sync job, if any."""
        if self.sync_job is not None:
            await self.sync_job.cancel()
        return self.sync_status()

    async def close(self) -> None:
        """Stop background work (the process is stopping)."""
        if self.sync_job is not None:
            await self.sync_job.cancel()


def _error(status: int, exc: BaseException) -> Response:
    return json_response(status, {"error": type(exc).__name__, "detail": str(exc)})


def build_app(control: ReplicaControl, access: Gate | None = None) -> App:
    """The application of one replica's control API (behind ``access``'s key, if any)."""
    app = App(title="drove replica", version=__version__,
              description="Control API of one drove replica process.")

    if access is not None and access.protected:
        @app.guard
        async def _key(request: Request) -> None:
            if not access.admits_header(request.headers.get("authorization")):
                raise HTTPError(401, "this replica answers only its volume's engine and "
                                     "manager: send 'Authorization: Bearer KEY' with the "
                                     "volume's access key", {"WWW-Authenticate": "Bearer"})

    # What the caller got wrong becomes 4xx with a message; the data is untouched by a
    # refused call.  Anything else (a KeyError or ValueError from a bug) is a 500, logged
    # with its traceback by drove.web.
    @app.exception_handler(SnapshotNotFoundError)
    @app.exception_handler(LayerNotFoundError)
    def _not_found(request: Request, exc: LookupError) -> Response:
        return _error(404, exc)

    @app.exception_handler(SnapshotExistsError)
    def _exists(request: Request, exc: SnapshotExistsError) -> Response:
        return _error(409, exc)

    @app.exception_handler(InvalidRequestError)
    def _bad(request: Request, exc: InvalidRequestError) -> Response:
        return _error(400, exc)

    @app.exception_handler(RebuildingError)
    def _rebuilding(request: Request, exc: RebuildingError) -> Response:
        return _error(409, exc)

    @app.exception_handler(StaleGenerationError)
    def _stale_generation(request: Request, exc: StaleGenerationError) -> Response:
        return _error(409, exc)

    @app.exception_handler(StaleEpochError)
    def _stale_epoch(request: Request, exc: StaleEpochError) -> Response:
        return json_response(409, {"error": type(exc).__name__, "detail": str(exc),
                                   "epoch": exc.epoch})

    @app.exception_handler(ChecksumMismatchError)
    def _mismatch(request: Request, exc: ChecksumMismatchError) -> Response:
        return json_response(409, {
            "error": type(exc).__name__, "detail": str(exc), "file": exc.file,
            "expected": exc.expected, "checksum": exc.actual,
        })

    @app.exception_handler(OSError)
    def _os(request: Request, exc: OSError) -> Response:
        if exc.errno == 28:
            return _error(507, exc)
        log.error("%s %s failed", request.method, request.path, exc_info=exc)
        return _error(500, exc)

    @app.guard
    async def _fence(request: Request) -> None:
        if request.path != "/v1/epoch":  # a claim is judged by its own rule
            control.admit(request.method, request.path, request.headers.get(EPOCH_HEADER))

    @app.post("/v1/epoch", body=CLAIM)
    async def claim(body: Any) -> dict[str, Any]:
        """Take the replica for an engine of a newer epoch (409 unless above the current)."""
        return control.claim(body.epoch)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        """Replica identity, size, layers and listening addresses."""
        return control.info()

    @app.get("/v1/layers", query={"removed": Field("bool", default=False)})
    async def layers(removed: bool) -> list[dict[str, Any]]:
        """The chain as a tree: every layer with its parent and children."""
        return [layer_json(layer) for layer in control.replica.layers()
                if removed or not layer.removed]

    @app.post("/v1/snapshots", status=201, body=SNAPSHOT)
    async def snapshot(body: Any) -> dict[str, Any]:
        """Take a snapshot of the head."""
        return await control.snapshot(body.name, body.labels)

    @app.delete("/v1/snapshots/{name}", query={"purge": Field("bool", default=True)})
    async def delete(name: str, purge: bool) -> dict[str, Any]:
        """Remove a snapshot (and purge removed layers unless purge=false)."""
        return await control.delete(name, purge)

    @app.post("/v1/purge")
    async def purge() -> dict[str, Any]:
        """Fold or prune removed snapshots."""
        return await control.purge()

    @app.post("/v1/flatten")
    async def flatten() -> dict[str, Any]:
        """Give a linked clone's shared base layers files of their own, then purge them."""
        return await control.flatten()

    @app.post("/v1/revert", body=REVERT)
    async def revert(body: Any) -> dict[str, Any]:
        """Start a new head on an older snapshot."""
        return await control.revert(body.snapshot)

    @app.post("/v1/expand", body=EXPAND)
    async def expand(body: Any) -> dict[str, Any]:
        """Grow the volume."""
        return await control.expand(body.size)

    @app.get("/v1/snapshots/{name}/checksum")
    async def checksum(name: str) -> dict[str, Any]:
        """sha256 over the snapshot layer's data extents (cached after the first call)."""
        return await control.checksum(name)

    @app.get("/v1/layers/{file}/checksum")
    async def layer_checksum(file: str) -> dict[str, Any]:
        """sha256 over a snapshot layer's own data extents, by file (removed layers too)."""
        return await control.layer_checksum(file)

    @app.get("/v1/layers/{file}/digests", query={
        "range_size": Field("int", default=1 << 20),
        "idle": Field("bool", default=False,
                      description="hash at the lowest CPU priority (a scrub: I/O first)"),
    })
    async def layer_digests(file: str, range_size: int, idle: bool) -> dict[str, Any]:
        """blake2b-128 per range of a layer's own content (which blocks, and their data)."""
        return await control.layer_digests(file, range_size, idle)

    @app.get("/v1/layers/{file}/rehash")
    async def rehash(file: str) -> dict[str, Any]:
        """A snapshot layer's recorded checksum and its sha256 hashed again now (bit-rot)."""
        return await control.rehash(file)

    @app.post("/v1/layers/{file}/repair", body=REPAIR)
    async def repair(file: str, body: Any) -> dict[str, Any]:
        """Rewrite the blocks of one range of a snapshot layer that differ from a good
        replica's (epoch-checked; a shared layer is copied first)."""
        return await control.repair(file, body)

    @app.get("/v1/diff", query={
        "since": Field("str", description="the older snapshot (FROM)"),
        "to": Field("str", nullable=True, default=None,
                    description="the newer snapshot (TO); absent: the head"),
    })
    async def snapshot_diff(since: str, to: str | None) -> dict[str, Any]:
        """The extents (offset, length) whose data may differ between two snapshots, from
        the layers' allocation (no data is read); see drove.replica.diff."""
        return await control.diff(since, to)

    @app.get("/v1/space")
    async def space() -> dict[str, Any]:
        """Bytes the replica directory allocates (own, and shared with linked clones), the
        data the head and each layer hold and what deleting each snapshot frees, from the
        layers' extents (no data is read; see drove.replica.usage)."""
        return await control.space()

    # twice the stored limit: the chain itself refuses a larger state, with a clear message
    @app.put("/v1/engine-state", body=ENGINE_STATE, max_body=2 * ENGINE_STATE_MAX)
    async def put_engine_state(body: dict[str, Any]) -> dict[str, Any]:
        """Store the engine's opaque state (a JSON object, at most 64 KiB) durably."""
        return control.set_engine_state(body)

    @app.post("/v1/rebuild/prepare", body=PREPARE, max_body=REBUILD_BODY_MAX)
    async def prepare_rebuild(body: Any) -> dict[str, Any]:
        """Give this replica the source's layer tree, all incomplete, under a new empty head."""
        return await control.prepare_rebuild(body)

    @app.post("/v1/rebuild/sync", status=202, body=SYNC, max_body=REBUILD_BODY_MAX)
    async def start_sync(body: Any) -> dict[str, Any]:
        """Pull an incomplete layer from the source's layer/FILE export, in the background."""
        return control.start_sync(body)

    @app.get("/v1/rebuild/sync")
    async def sync_status() -> dict[str, Any]:
        """State and progress of the current or last sync."""
        return control.sync_status()

    @app.delete("/v1/rebuild/sync")
    async def cancel_sync() -> dict[str, Any]:
        """Cancel the running sync."""
        return await control.cancel_sync()

    @app.post("/v1/rebuild/layers/{file}/complete", body=COMPLETE)
    async def complete_layer(file: str, body: Any) -> dict[str, Any]:
        """Verify a rebuilt layer against the source's checksum; then it is complete."""
        return await control.complete_layer(file, body.checksum)

    add_backing_routes(app, control)
    return app
