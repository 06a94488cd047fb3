"""The manager's REST API (FastAPI); see docs/api.md."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from drove import __version__
from drove.manager.app import ManagerApp
from drove.manager.authorize import authorize
from drove.manager.errors import ApiError, validate_name
from drove.manager.heartbeats import MAX_POLL, parse_engines
from drove.manager.scrub import KIND as SCRUB_KIND
from drove.manager.sessions import Sessions
from drove.manager.store import ConflictError, StoreError
from drove.manager.ui import mount as mount_ui
from drove.manager.userapi import add_user_routes
from drove.manager.users import Users

Size = Annotated[int | str, Field(description="bytes, or a size like '10G' or '512M'",
                                  examples=["10G"])]
Locality = Annotated[str, Field(description="data locality: disabled, best-effort (one "
                                           "replica on the attach node, served by the "
                                           "engine) or strict-local (exactly one, there)",
                                examples=["best-effort"])]
Labels = dict[Annotated[str, Field(min_length=1, max_length=63)],
              Annotated[str, Field(max_length=253)]]


class Strict(BaseModel):
    """Request bodies refuse fields they do not know (a typo is an error, not a no-op)."""

    model_config = ConfigDict(extra="forbid")


QOS_HELP = ("QoS limits: iops, bandwidth, read_iops, write_iops, read_bandwidth, "
            "write_bandwidth (bandwidths in bytes/s or a size such as \"100M\"; 0: no limit) "
            "and burst (seconds at the limit a bucket holds, default 1)")


class VolumeCreate(Strict):
    """A new volume."""

    name: str = Field(description="a-z 0-9 . _ -, up to 63 characters")
    size: Size | None = Field(None, description="required unless standby_of is given")
    replicas: int | None = Field(None, ge=1, le=10, description="default: the setting")
    pool: str | None = Field(None, description="place replicas only on disks with this tag")
    labels: Labels = Field(default_factory=dict)
    data_locality: Locality | None = Field(None, description="default: the setting "
                                                             "default_data_locality")
    standby_of: str | None = Field(None, description="a DR standby following this volume's "
                                                     "backups on the backup target (its size "
                                                     "and replica count come from them)")
    qos: dict[str, Any] | None = Field(None, description=QOS_HELP)
    encrypted: bool = Field(False, description="encrypt every sector (AES-XTS-256) with a new "
                                               "data key wrapped by the manager's KEK "
                                               "(drove serve --kek-file)")


class Activate(Strict):
    """Make a DR standby an ordinary volume."""

    force: bool = Field(False, description="activate on the last backup restored completely "
                                           "when the newest cannot be restored")


class VolumeUpdate(Strict):
    """Change the replica count or the data locality (live), or the labels."""

    replicas: int | None = Field(None, ge=1, le=10)
    labels: Labels | None = None
    data_locality: Locality | None = None
    qos: dict[str, Any] | None = Field(None, description=QOS_HELP + "; applied live; limits "
                                                         "not given keep their value")


class Heartbeat(BaseModel):
    """An agent's heartbeat: who its node is, where its API is, its disks' state."""

    id: str = Field(min_length=1, max_length=64, description="the node's stable id")
    name: str = Field(description="the node's name (a-z 0-9 . _ -)")
    address: str = Field(description="the host's address its processes listen on")
    agent_url: str = Field(description="the agent's API")
    zone: str | None = None
    role: Literal["storage", "compute", "both"] = "both"
    version: str | None = None
    started: float | None = Field(None, description="when the agent process started")
    default_disk: dict[str, str] | None = Field(None, description="{name, path, id} of the "
                                                                  "agent's data directory")
    disks: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                             description="disk name: its state")
    engines: list[dict[str, Any]] = Field(
        default_factory=list, max_length=10_000,
        description="[{volume, epoch}] of the engines running on the node; the answer's "
                    "stop_engines lists those that must stop")


class RunningEngine(Strict):
    """An engine running on an agent's node."""

    volume: str = Field(min_length=1, max_length=63)
    epoch: int | None = Field(None, ge=0, description="null: not known (an old engine)")


class ChangesPoll(Strict):
    """An agent's long-poll with its engines in the body (no URL length limit)."""

    since: int | None = Field(None, ge=0, description="the revision of its last answer")
    timeout: float = Field(30.0, ge=0, le=MAX_POLL)
    engines: list[RunningEngine] = Field(default_factory=list, max_length=10_000)


class NodeUpdate(Strict):
    """Change a node's placement attributes (absent fields stay; "" or null clears)."""

    zone: str | None = Field(None, max_length=63, description="the node's zone")
    fault_set: str | None = Field(None, max_length=63, description="nodes that fail "
                                  "together; never two replicas of a volume in one")
    role: Literal["storage", "compute", "both"] | None = Field(
        None, description="storage holds replicas, compute attaches volumes, both does both")


class VolumeClone(Strict):
    """A linked clone of a volume's snapshot."""

    name: str = Field(description="the new volume's name")
    snapshot: str | None = Field(None, description="default: take a snapshot now")
    replicas: int | None = Field(None, ge=1, le=10, description="default: the source's count")
    labels: Labels = Field(default_factory=dict)
    full: bool = Field(False, description="then flatten it in the background (a task): a "
                                          "full, independent copy")


class Expand(Strict):
    """Grow a volume."""

    size: Size


class Attach(Strict):
    """Attach a volume; with ``mount``, give the host a filesystem there."""

    mount: str | None = Field(None, description="absolute mount path")
    fs: Literal["ext4", "xfs"] = "ext4"
    node: str | None = Field(None, description="the node to run the engine on (default: the "
                                               "manager's own; another needs its agent up "
                                               "and the compute or both role)")
    force: bool = Field(False, description="take the volume over on ``node`` while the node "
                                           "of its engine is down (no heartbeat): a new "
                                           "epoch fences the old engine")


class Detach(Strict):
    """Detach a volume."""

    force: bool = False


class SnapshotCreate(Strict):
    """Snapshot a volume."""

    name: str | None = Field(None, description="default: snap-YYYYmmdd-HHMMSS")
    labels: Labels = Field(default_factory=dict)


class SnapshotExport(Strict):
    """Export a snapshot over NBD; with ``since``, only what changed since an older one."""

    since: str | None = Field(None, description="an older snapshot: the export's block "
                                                "status shows only what changed since it")


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
    replica_replenish_wait: float | None = Field(
        None, description="seconds a down node's replicas are waited for before they are "
                          "rebuilt elsewhere")
    default_data_locality: str | None = None
    engine_nbd_listen: str | None = Field(
        None, description="loopback (default: NBD clients on the engine's host only) or node "
                          "(also its node's address, open to every host that reaches it); "
                          "applies at the next attach")
    rebuild_bandwidth_limit: int | None = Field(
        None, description="bytes per second a rebuild or a backup of a volume may read "
                          "(0: no limit), so that it cannot starve the volume's I/O")
    engine_auto_upgrade: bool | None = Field(
        None, description="upgrade an engine live when its node's agent runs a newer drove")


Codec = Literal["zstd", "lz4", "none"]


class BackupTargetSet(Strict):
    """Where backups go."""

    url: str = Field(description="file:///abs/dir or s3://bucket/prefix; '' to unset")
    endpoint: str | None = Field(None, description="S3 endpoint URL (default: AWS or env)")
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = Field(None, description="never returned")
    compression: Codec = "zstd"


class BackupCreate(Strict):
    """Back a volume up."""

    snapshot: str | None = Field(None, description="default: take a snapshot now")
    labels: Labels = Field(default_factory=dict)
    compression: Codec | None = None


class BackupRestore(Strict):
    """Restore a backup into a new volume."""

    volume: str = Field(description="the new volume's name")
    replicas: int | None = Field(None, ge=1, le=10,
                                 description="default: the backed-up volume's count")
    pool: str | None = None
    instant: bool = Field(False, description="serve at once, fetching data as it is read; "
                                             "the task follows the background fill")
    fill_rate: int = Field(0, ge=0, description="with instant: bytes per second each "
                                                "replica's fill fetches at most (0: no limit)")


class VolumeScrub(Strict):
    """What a scrub compares."""

    snapshot: bool = Field(False, description="snapshot the head first (labelled "
                                              "drove.scrub), so its data is compared too")


class JobCreate(Strict):
    """A recurring snapshot or backup job."""

    name: str | None = None
    kind: Literal["snapshot", "backup", "scrub", "trim"]
    cron: str = Field(description="five-field cron schedule in UTC, e.g. '0 * * * *'",
                      max_length=200)
    retain: int = Field(1, ge=1, le=1000)
    volumes: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list)
    selector: Labels = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    enabled: bool = True


class ClusterStatus(Protocol):
    """The managers of a cluster and which one leads."""

    @property
    def leading(self) -> bool:
        """True while this manager leads."""

    def status(self) -> dict[str, Any]:
        """The managers, the leader, since when (blocking: called in a thread)."""


def build_app(parts: ManagerApp, token: str, *, cluster_token: str | None = None,
              cluster: ClusterStatus | None = None) -> FastAPI:
    """The API over the manager's ``parts``: each route needs the role drove.manager.roles
    declares for it, the agents' ones ``cluster_token`` (``token`` when none is given);
    ``token`` (DATA_DIR/token) is the first admin's when the store holds no user yet."""
    manager = parts.manager
    # Every request passes authorize, whatever its route says: none can be left open.
    app = FastAPI(title="drove", version=__version__, dependencies=[Depends(authorize)],
                  description="Replicated block storage for containers: the manager's API.")
    app.state.cluster_token = cluster_token or token
    app.state.sessions = Sessions(parts.store)
    app.state.users = Users(parts.store, app.state.sessions, parts.events)
    app.state.users.bootstrap(token)
    # Runs once per request with the app's (FastAPI solves a dependency once); it marks
    # the routes that need a user.
    secured = [Depends(authorize)]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        if isinstance(exc, ConflictError):  # another writer (a manager, the healer) won
            return JSONResponse({"detail": f"changed meanwhile: {exc}; try again"},
                                status_code=409)
        # etcd unreachable or refusing: the manager is fine, its state is not at hand.
        return JSONResponse({"detail": f"the manager's store does not answer: {exc}; try "
                                       "again"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "invalid request: " + "; ".join(msgs)}, status_code=422)

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        """Liveness; needs no token. In a cluster, whether this manager leads (no store
        call: it answers while etcd is away)."""
        if cluster is not None:
            return {"status": "ok", "version": __version__, "leading": cluster.leading}
        return {"status": "ok", "version": __version__}

    @app.get("/v1/nodes", dependencies=secured)
    async def nodes() -> list[dict[str, Any]]:
        """Every node with its disks."""
        return manager.nodes()

    @app.patch("/v1/nodes/{name}", dependencies=secured)
    async def update_node(name: str, req: NodeUpdate) -> dict[str, Any]:
        """Set a node's zone, fault set or role (placement uses them from then on)."""
        return manager.update_node(name, req.model_dump(exclude_unset=True))

    @app.post("/v1/nodes/{name}/cordon", dependencies=secured)
    async def cordon_node(name: str) -> dict[str, Any]:
        """No new replicas on this node (those there stay)."""
        return manager.update_node(name, {"cordoned": True})

    @app.post("/v1/nodes/{name}/uncordon", dependencies=secured)
    async def uncordon_node(name: str) -> dict[str, Any]:
        """New replicas may go to this node again."""
        return manager.update_node(name, {"cordoned": False})

    @app.post("/v1/nodes/{name}/drain", dependencies=secured, status_code=202)
    async def drain_node(name: str) -> dict[str, Any]:
        """Cordon a node and move every replica off it by online rebuild (a task; 409 while
        engines run there, listing them)."""
        manager.drainer.check_drain(name)
        manager.update_node(name, {"cordoned": True})
        return parts.tasks.start("node-drain", manager.drainer.task(name))

    @app.delete("/v1/nodes/{name}", dependencies=secured)
    async def remove_node(name: str) -> dict[str, Any]:
        """Forget a node and its disks (409 listing what it still holds, or while it is up)."""
        return await manager.drainer.remove(name)

    @app.post("/v1/cluster/heartbeat")
    async def heartbeat(req: Heartbeat) -> dict[str, Any]:
        """A node agent's heartbeat (cluster token); registers its node the first time."""
        # A few store calls per node every second: on etcd each is a round trip, which must
        # not hold the loop that drives the engines and the healer.
        return await asyncio.to_thread(manager.heartbeat, req.model_dump())

    @app.get("/v1/agents/{node}/changes")
    async def agent_changes(node: str, since: Annotated[int | None, Query(ge=0)] = None,
                            timeout: Annotated[float, Query(ge=0, le=MAX_POLL)] = 30.0,
                            engines: Annotated[str, Query(max_length=65_536)] = ""
                            ) -> dict[str, Any]:
        """A node agent's long-poll (cluster token): ``{revision, stop_engines}`` as soon as
        one of its ``engines`` (VOLUME@EPOCH,...) must stop, at once without a known
        ``since`` (the revision of its last answer), else after ``timeout`` s."""
        return await manager.node_changes(node, parse_engines(engines), since, timeout)

    @app.post("/v1/agents/{node}/changes")
    async def agent_changes_posted(node: str, req: ChangesPoll) -> dict[str, Any]:
        """The same long-poll with ``{since, timeout, engines: [{volume, epoch}]}`` in the
        body: what agents send (a node may run more engines than a URL holds)."""
        engines = {validate_name("volume", e.volume): e.epoch for e in req.engines}
        return await manager.node_changes(node, engines, req.since, req.timeout)

    @app.get("/v1/cluster", dependencies=secured)
    async def cluster_status() -> dict[str, Any]:
        """The managers, which one leads and since when (one SQLite manager: none listed)."""
        if cluster is None:
            return {"store": "sqlite", "leader": None, "since": None, "self": None,
                    "managers": []}
        try:
            return await asyncio.to_thread(cluster.status)
        except StoreError as exc:
            raise ApiError(503, f"the store does not answer: {exc}") from exc

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
        """Create a volume and place its replicas (with ``standby_of``: a DR standby)."""
        if req.standby_of is not None:
            if req.size is not None:
                raise ApiError(422, "a standby's size is its source's (the newest backup's): "
                                    "give size or standby_of, not both")
            return await parts.standbys.create(req.name, req.standby_of, req.replicas,
                                               req.pool, req.labels, req.data_locality)
        if req.size is None:
            raise ApiError(422, "size is required (or standby_of, for a DR standby)")
        return manager.create_volume(req.name, req.size, req.replicas, req.pool, req.labels,
                                     req.data_locality, qos=req.qos, encrypted=req.encrypted)

    @app.post("/v1/volumes/{name}/activate", dependencies=secured)
    async def activate_volume(name: str, req: Activate | None = None) -> dict[str, Any]:
        """Make a DR standby an ordinary volume, on the newest backup (the target is
        checked once more)."""
        return await parts.standbys.activate(name, (req or Activate()).force)

    @app.get("/v1/volumes/{name}", dependencies=secured)
    async def volume(name: str, space: bool = False) -> dict[str, Any]:
        """One volume (a linked clone's parent and bytes shared and owned under ``clone``);
        with ``space``, under ``space`` its actual size on each replica's disk, the data the
        head and each snapshot hold and what deleting each would free (one call per
        replica; see docs/api.md)."""
        view = manager.volume(name)
        view["clone"] = await manager.clones.info(manager.record(name))
        if space:
            view["space"] = await manager.space.volume(manager.record(name))
        return view

    @app.post("/v1/volumes/{name}/clone", dependencies=secured, status_code=201)
    async def clone_volume(name: str, req: VolumeClone) -> dict[str, Any]:
        """A linked clone of a snapshot (taken now without ``snapshot``): its replicas share
        the snapshot's layers on their disks; with ``full``, a flatten task follows."""
        doc = await manager.clones.clone(name, req.name, req.snapshot, req.replicas,
                                         req.labels)
        view = manager.view(doc)
        view["task"] = (parts.tasks.start("volume-flatten", manager.clones.flatten_task(
            req.name), volume=req.name) if req.full else None)
        return view

    @app.post("/v1/volumes/{name}/flatten", dependencies=secured, status_code=202)
    async def flatten_volume(name: str) -> dict[str, Any]:
        """Copy what a linked clone shares into its own files (a task; attached, I/O goes
        on, or detached)."""
        manager.clones.check_flatten(name)
        return parts.tasks.start("volume-flatten", manager.clones.flatten_task(name),
                                 volume=name)

    @app.post("/v1/volumes/{name}/scrub", dependencies=secured, status_code=202)
    async def scrub_volume(name: str, req: VolumeScrub | None = None) -> dict[str, Any]:
        """Compare the replicas' snapshot layers by per-range digests and repair a bad copy
        from a good one (a task; attached only, I/O goes on); ``snapshot``: snapshot the
        head first, so what it holds is compared too."""
        manager.scrubber.check(name)
        labels = {} if (req or VolumeScrub()).snapshot else None
        return parts.tasks.start(SCRUB_KIND, manager.scrubber.task(name, labels),
                                 volume=name)

    @app.post("/v1/volumes/{name}/trim", dependencies=secured)
    async def trim_volume(name: str) -> dict[str, Any]:
        """fstrim the volume's filesystem where drove mounted it (attach with a mount; on its
        node, by its agent): what fstrim trimmed and how much each replica's actual size fell
        (409 for a volume drove has not mounted)."""
        return await manager.space.trim(name)

    @app.patch("/v1/volumes/{name}", dependencies=secured)
    async def update_volume(name: str, req: VolumeUpdate) -> dict[str, Any]:
        """Change the replica count or data locality (both online) or labels."""
        return await manager.update_volume(name, req.replicas, req.labels, req.data_locality,
                                           qos=req.qos)

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
        return await manager.attach(name, req.mount, req.fs, node=req.node, force=req.force)

    @app.post("/v1/volumes/{name}/upgrade-engine", dependencies=secured)
    async def upgrade_engine(name: str) -> dict[str, Any]:
        """Replace an attached volume's engine by one of its agent's drove, live (clients
        and mounts keep their connections); the volume, with ``upgrade``: from and to
        (pid, version, epoch).  409 when not attached or the new engine failed (the old
        one serves on)."""
        change = await manager.upgrades.upgrade(name)
        return {**manager.volume(name), "upgrade": change}

    @app.post("/v1/volumes/{name}/detach", dependencies=secured)
    async def detach(name: str, req: Detach | None = None) -> dict[str, Any]:
        """Unmount, release devices, stop the volume's processes."""
        return await manager.detach(name, (req or Detach()).force)

    @app.get("/v1/volumes/{name}/snapshots", dependencies=secured)
    async def snapshots(name: str, all: bool = False) -> list[dict[str, Any]]:
        """The snapshot tree (with ``all``, also the snapshots hidden for linked clones), each
        with the data it holds and what deleting it would free (``freed_by_delete``, ``why``;
        null when no replica answers)."""
        return await manager.space.annotate(name, await manager.snapshots(name,
                                                                          show_hidden=all))

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
    async def export_snapshot(name: str, snapshot: str,
                              req: SnapshotExport | None = None) -> dict[str, Any]:
        """A read-only NBD URI serving the snapshot (with ``since``: its changes since an
        older snapshot as data, the rest as holes; see docs/api.md)."""
        return await manager.export_snapshot(name, snapshot, (req or SnapshotExport()).since)

    @app.get("/v1/volumes/{name}/diff", dependencies=secured)
    async def snapshot_diff(name: str, since: str,
                            to: str | None = None) -> dict[str, Any]:
        """The extents (offset, length) that may differ between snapshot ``since`` and ``to``
        (absent: the live head), from the chain's allocation, without reading data."""
        return await manager.snapshot_diff(name, since, to)

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

    @app.get("/v1/backup-target", dependencies=secured)
    async def backup_target() -> dict[str, Any]:
        """The backup target (the secret is never shown)."""
        return parts.backups.target_view()

    @app.put("/v1/backup-target", dependencies=secured)
    async def set_backup_target(req: BackupTargetSet) -> dict[str, Any]:
        """Set the backup target; it is opened first and refused if unusable."""
        return await parts.backups.set_target(req.model_dump())

    @app.get("/v1/backups", dependencies=secured)
    async def backups(volume: str | None = None) -> list[dict[str, Any]]:
        """Backups on the target, newest first."""
        return await parts.backups.list(volume)

    @app.get("/v1/backups/{name}", dependencies=secured)
    async def backup(name: str) -> dict[str, Any]:
        """One backup."""
        return await parts.backups.get(name)

    @app.post("/v1/volumes/{name}/backups", dependencies=secured, status_code=202)
    async def create_backup(name: str, req: BackupCreate | None = None) -> dict[str, Any]:
        """Start a backup (a task); without a snapshot one is taken."""
        req = req or BackupCreate()
        return await parts.backups.create(name, req.snapshot, req.labels, req.compression)

    @app.post("/v1/backups/{name}/restore", dependencies=secured, status_code=202)
    async def restore_backup(name: str, req: BackupRestore) -> dict[str, Any]:
        """Start restoring a backup into a new volume (a task)."""
        return await parts.backups.restore(name, req.volume, req.replicas, req.pool,
                                           req.instant, req.fill_rate)

    @app.post("/v1/backups/{name}/verify", dependencies=secured, status_code=202)
    async def verify_backup(name: str) -> dict[str, Any]:
        """Start re-reading and checking every block of a backup (a task)."""
        return await parts.backups.verify(name)

    @app.delete("/v1/backups/{name}", dependencies=secured, status_code=202)
    async def delete_backup(name: str) -> dict[str, Any]:
        """Start deleting a backup and the blocks only it used (a task)."""
        return await parts.backups.delete(name)

    @app.get("/v1/tasks", dependencies=secured)
    async def tasks(state: Literal["running", "succeeded", "failed", "cancelled"] | None = None
                    ) -> list[dict[str, Any]]:
        """Tasks, newest first."""
        return parts.tasks.list(state)

    @app.get("/v1/tasks/{tid}", dependencies=secured)
    async def task(tid: str) -> dict[str, Any]:
        """One task with its progress."""
        doc = parts.tasks.get(tid)
        if doc is None:
            raise ApiError(404, f"no task {tid!r}; `drove task list` shows them")
        return doc

    @app.post("/v1/tasks/{tid}/cancel", dependencies=secured)
    async def cancel_task(tid: str) -> dict[str, Any]:
        """Cancel a running task (a finished one is returned as it is)."""
        if parts.tasks.get(tid) is None:
            raise ApiError(404, f"no task {tid!r}; `drove task list` shows them")
        await parts.tasks.cancel(tid)
        return parts.tasks.get(tid) or {}

    @app.get("/v1/jobs", dependencies=secured)
    async def jobs() -> list[dict[str, Any]]:
        """Recurring jobs."""
        return parts.jobs.list()

    @app.post("/v1/jobs", dependencies=secured, status_code=201)
    async def create_job(req: JobCreate) -> dict[str, Any]:
        """Add a recurring job."""
        return parts.jobs.create(**req.model_dump())

    @app.get("/v1/jobs/{name}", dependencies=secured)
    async def job(name: str) -> dict[str, Any]:
        """One job."""
        return parts.jobs.get(name)

    @app.delete("/v1/jobs/{name}", dependencies=secured)
    async def delete_job(name: str) -> dict[str, Any]:
        """Remove a job."""
        return await parts.jobs.delete(name)

    @app.post("/v1/jobs/{name}/run", dependencies=secured)
    async def run_job(name: str) -> dict[str, Any]:
        """Run a job once now and wait for it."""
        return await parts.jobs.run_now(name)

    @app.get("/metrics", dependencies=secured, response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics: per-volume I/O, health, replicas; per-disk usage."""
        from drove.manager.metrics import render

        body, content_type = await render(manager)
        return PlainTextResponse(body, media_type=content_type)

    add_user_routes(app, app.state.users, app.state.sessions)
    mount_ui(app)  # the web UI: / and /ui/ (public, outside the API routes)
    return app
