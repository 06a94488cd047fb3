"""Backups from the manager's side: the target setting, reading snapshots, restoring.

The block store itself (format, dedup, locks, gc) is :mod:`drove.backup`; this
module feeds it.  A backup reads the snapshot from a healthy replica's NBD
exports: ``snapshot/NAME`` for the data and, for an incremental backup,
``layer/FILE`` block status for what changed — the layers between the last
backed-up snapshot and this one hold exactly the blocks written since (a
zeroed range over older data is written as real zeros, so it shows too).  A
restore creates the volume, attaches it without a host device and writes
through its engine, so every replica gets the data through the normal path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Any, Protocol

import httpx

from drove.backup import errors as berr
from drove.backup.blocks import CODECS
from drove.backup.store import BackupStore
from drove.backup.target import open_target
from drove.engine.crypt import Sectors
from drove.manager import datakeys
from drove.manager.datakeys import DataKeys
from drove.manager.errors import ApiError
from drove.manager.instantrestore import InstantRestores, depending_on
from drove.manager.labels import snapshot_id
from drove.manager.standbystate import check_not_standby
from drove.manager.store import Store
from drove.manager.tasks import TaskContext, TaskFailed, Tasks
from drove.nbd.client import NbdClient, connect_uri, extents
from drove.tokenbucket import Pacer

log = logging.getLogger("drove.manager")

TARGET_DEFAULTS: dict[str, Any] = {
    "url": "", "endpoint": None, "region": None, "access_key": None, "secret_key": None,
    "compression": "zstd",
}


class Volumes(Protocol):
    """What backups and restores need of the manager's volumes (drove.manager.core.Manager)."""

    store: Store
    keys: DataKeys  # unwraps the data keys of encrypted backups

    @property
    def http(self) -> httpx.AsyncClient:
        """The client for the replicas' control APIs."""

    def event(self, kind: str, message: str, volume: str | None = None,
              level: str = "info") -> None:
        """Record what the system did and why."""

    def record(self, name: str) -> dict[str, Any]:
        """A volume's stored document (ApiError 404)."""

    def settings(self) -> dict[str, Any]:
        """Every setting with its value."""

    def save(self, doc: dict[str, Any]) -> None:
        """Store a volume's document."""

    async def refresh(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """What the volume's engine reports now (None when it does not answer)."""

    async def replica_endpoints(self, doc: dict[str, Any],
                                rep: dict[str, Any]) -> dict[str, Any] | None:
        """Where a replica is served now: ``nbd`` base URI and ``control`` URL (or None)."""

    def volume(self, name: str) -> dict[str, Any]:
        """A volume as the API shows it."""

    def create_volume(self, name: str, size: int | str, replicas: int | None = None,
                      pool: str | None = None,
                      labels: dict[str, str] | None = None,
                      encryption: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create a volume (``encryption``: with that wrapped data key)."""

    async def delete_volume(self, name: str, force: bool = False,
                            _internal: bool = False) -> dict[str, Any]:
        """Delete a volume and its data."""

    async def attach(self, name: str, mount: str | None = None, fs: str = "ext4",
                     _internal: bool = False) -> dict[str, Any]:
        """Start a volume's processes."""

    async def detach(self, name: str, force: bool = False,
                     _internal: bool = False) -> dict[str, Any]:
        """Stop a volume's processes."""

    async def snapshots(self, name: str) -> list[dict[str, Any]]:
        """A volume's snapshot tree."""

    async def create_snapshot(self, name: str, snapshot: str | None = None,
                              labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Snapshot a volume."""


class BackupActivity:
    """Which backup tasks hold a volume now: what the manager asks before detaching it."""

    def __init__(self, tasks: Tasks) -> None:
        self.tasks = tasks

    def task_on(self, volume: str, kind: str) -> str | None:
        """The id of a running ``kind`` task on ``volume`` (None when there is none)."""
        running = self.tasks.running(kind, volume)
        return running[0]["id"] if running else None

    def restore_task(self, volume: str) -> str | None:
        """The id of the task restoring a backup into ``volume`` (None when there is none)."""
        return self.task_on(volume, "backup-restore")

    def busy(self, volume: str) -> str | None:
        """Why ``volume`` must not be detached or lose snapshots now (None: it may)."""
        reading = self.task_on(volume, "backup-create")
        if reading:
            return f"backup task {reading} is reading it"
        writing = self.task_on(volume, "backup-restore")
        if writing:
            return f"restore task {writing} is writing it"
        return None


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, coalesced (offset, length) ranges."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], off + length)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((off, length))
    return out


async def allocated(client: NbdClient) -> list[tuple[int, int]]:
    """Data ranges of an export by base:allocation block status."""
    return merge_ranges([(off, n) async for off, n, data in extents(client, 0, client.size)
                         if data])


class NbdSource:
    """A snapshot export read by the block store, at most ``rate`` bytes/s (0: any)."""

    def __init__(self, client: NbdClient, rate: int = 0) -> None:
        self.client = client
        self.pacer = Pacer(rate)  # the rebuild QoS: a backup must not starve the volume

    async def read(self, offset: int, length: int) -> bytearray:
        """Bytes of the snapshot."""
        await self.pacer.take(length)
        return await self.client.read(offset, length)


class DecryptedSink:
    """A restore of an encrypted backup into its volume's engine: the engine encrypts what
    it is given, so the stored ciphertext is decrypted first (it lands the same below)."""

    def __init__(self, sink: NbdSink, sectors: Sectors) -> None:
        self.sink = sink
        self.sectors = sectors

    async def write(self, offset: int, data: Any) -> None:
        """Decrypt and write into the volume."""
        await self.sink.write(offset, self.sectors.decrypt(offset, data))

    async def flush(self) -> None:
        """Make everything written durable on every replica."""
        await self.sink.flush()


class NbdSink:
    """A volume's engine export written by a restore."""

    def __init__(self, client: NbdClient) -> None:
        self.client = client

    async def write(self, offset: int, data: Any) -> None:
        """Write into the volume."""
        await self.client.write(offset, data)

    async def flush(self) -> None:
        """Make everything written durable on every replica."""
        await self.client.flush()


def _api_error(exc: Exception) -> ApiError:
    """A block-store failure as the API's error."""
    if isinstance(exc, berr.NotFoundError):
        return ApiError(404, str(exc))
    if isinstance(exc, ValueError):
        return ApiError(422, str(exc))
    return ApiError(409, str(exc))


class Backups:
    """The backup target, backup/restore/verify/delete tasks, and what they protect."""

    def __init__(self, volumes: Volumes, tasks: Tasks, activity: BackupActivity) -> None:
        self.m = volumes
        self.tasks = tasks
        self.activity = activity
        self._store: BackupStore | None = None
        self._store_key: tuple[Any, ...] | None = None
        self.instant = InstantRestores(volumes, tasks, self.target_config)

    # ------------------------------------------------------------ target

    def target_config(self) -> dict[str, Any]:
        """The stored target setting (secret included: not for the API)."""
        stored = self.m.store.get("config", "backup-target") or {}
        return {k: stored.get(k, v) for k, v in TARGET_DEFAULTS.items()}

    def target_view(self) -> dict[str, Any]:
        """The target setting as the API shows it (never the secret)."""
        cfg = self.target_config()
        view = {k: v for k, v in cfg.items() if k != "secret_key"}
        view["secret_key_set"] = bool(cfg["secret_key"])
        view["available"], view["error"] = (bool(cfg["url"]), None if cfg["url"] else
                                            "no backup target set: `drove backup target set "
                                            "URL`")
        return view

    @staticmethod
    def _open(cfg: dict[str, Any]):
        return open_target(cfg["url"], endpoint=cfg["endpoint"], region=cfg["region"],
                           access_key=cfg["access_key"], secret_key=cfg["secret_key"])

    async def set_target(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Set the target; it is opened first, and a target that cannot be used is refused."""
        cfg = {**TARGET_DEFAULTS, **{k: v for k, v in changes.items() if k in TARGET_DEFAULTS}}
        if cfg["compression"] not in CODECS:
            raise ApiError(422, f"compression must be one of {', '.join(CODECS)}")
        if cfg["url"]:
            try:
                target = await asyncio.to_thread(self._open, cfg)
            except ValueError as exc:
                raise ApiError(422, f"bad backup target: {exc}") from exc
            except berr.BackupError as exc:
                raise ApiError(409, f"backup target cannot be used: {exc}") from exc
            await asyncio.to_thread(target.close)
        self.m.store.put("config", "backup-target", cfg)
        self._close_store()
        self.m.event("backup-target-set", f"backup target set to {cfg['url'] or '(none)'}")
        return self.target_view()

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store.target.close()
            self._store, self._store_key = None, None

    async def store(self) -> BackupStore:
        """The block store on the current target (ApiError when none is set or usable)."""
        cfg = self.target_config()
        if not cfg["url"]:
            raise ApiError(409, "no backup target set: `drove backup target set file:///DIR` "
                                "or `drove backup target set s3://BUCKET/PREFIX --endpoint URL`")
        key = tuple(sorted(cfg.items()))
        if self._store is None or self._store_key != key:
            self._close_store()
            try:
                target = await asyncio.to_thread(self._open, cfg)
            except (ValueError, berr.BackupError) as exc:
                raise ApiError(409, f"backup target {cfg['url']} cannot be used: {exc}") from exc
            owner = f"drove manager on {socket.gethostname()} pid {os.getpid()}"
            self._store = BackupStore(target, owner=owner)
            self._store_key = key
        return self._store

    def close(self) -> None:
        """Release the target's connections and threads."""
        self._close_store()

    # ------------------------------------------------------------ listing

    async def list(self, volume: str | None = None) -> list[dict[str, Any]]:
        """Backups on the target, newest first."""
        store = await self.store()
        try:
            return await store.list(volume)
        except (berr.BackupError, ValueError) as exc:
            raise _api_error(exc) from exc

    async def get(self, name: str) -> dict[str, Any]:
        """One backup."""
        store = await self.store()
        try:
            return await store.info(name)
        except (berr.BackupError, ValueError) as exc:
            raise _api_error(exc) from exc

    # ------------------------------------------------------------ create

    async def create(self, volume: str, snapshot: str | None = None,
                     labels: dict[str, str] | None = None,
                     compression: str | None = None) -> dict[str, Any]:
        """Start a backup of ``volume`` (of ``snapshot``, else of a new one); the Task."""
        doc = self.m.record(volume)
        check_not_standby(doc, "backed up")
        if doc["state"] != "attached":
            raise ApiError(409, f"volume {volume} is {doc['state']}: a backup reads a running "
                                f"replica, attach it first (`drove volume attach {volume}`)")
        running = self.activity.task_on(volume, "backup-create")
        if running:
            raise ApiError(409, f"volume {volume} is being backed up by task {running}; "
                                "wait for it or cancel it")
        codec = compression or self.target_config()["compression"]
        if codec not in CODECS:
            raise ApiError(422, f"compression must be one of {', '.join(CODECS)}")
        store = await self.store()
        if snapshot is not None:
            snaps = await self.m.snapshots(volume)
            if not any(s["name"] == snapshot and not s.get("head") for s in snaps):
                raise ApiError(404, f"volume {volume} has no snapshot {snapshot!r}; "
                                    f"`drove snapshot list {volume}` shows them")
        name = f"backup-{secrets.token_hex(8)}"
        labels = dict(labels or {})

        async def run(ctx: TaskContext) -> dict[str, Any]:
            snap = snapshot
            if snap is None:
                ctx.message("taking a snapshot")
                await self.m.create_snapshot(volume, name, {"drove.backup": name, **labels})
                snap = name
            ctx.set(snapshot=snap)
            # A backup of an encrypted volume names (and carries, wrapped) the key it needs.
            result = await self._backup(ctx, store, volume, snap, name,
                                        {**labels, **datakeys.backup_labels(doc)}, codec)
            self.m.event("backup-created",
                         f"backup {name} of volume {volume} (snapshot {snap}) created: "
                         f"{result['bytes_new']} bytes new, {result['bytes_reused']} reused, "
                         f"{result['bytes_read']} read", volume)
            return result

        async def end(task: dict[str, Any]) -> None:
            if task["state"] != "succeeded":
                self.m.event("backup-failed", f"backup {name} of volume {volume} "
                             f"{task['state']}: {task['error']}", volume, level="warning")

        return self.tasks.start("backup-create", run, volume=volume, backup=name,
                                  on_end=end)

    async def _backup(self, ctx: TaskContext, store: BackupStore, volume: str, snap: str,
                      name: str, labels: dict[str, str], codec: str) -> dict[str, Any]:
        doc = self.m.record(volume)
        rep, ready = await self._healthy_replica(doc)
        layers = await self._layers(ready["control"], ready.get("headers"))
        by_file = {la["file"]: la for la in layers}
        # (A linked clone's base layers are its source's snapshots: one may have this name.)
        target = next((la for la in layers if la["name"] == snap and not la["removed"]
                       and not la.get("base")), None)
        if target is None:
            raise TaskFailed(f"replica {rep['name']} has no snapshot {snap}")
        base, path = await self._base(store, volume, doc["size"], target, by_file)
        async with contextlib.AsyncExitStack() as stack:
            src = await connect_uri(f"{ready['nbd']}/snapshot/{snap}")
            stack.push_async_callback(src.close)
            ctx.message("finding the data to read")
            if base is None:
                ranges = await allocated(src)
            else:
                found: list[tuple[int, int]] = []
                for la in path:
                    client = await connect_uri(f"{ready['nbd']}/layer/{la['file']}")
                    try:
                        found += await allocated(client)
                    finally:
                        await client.close()
                ranges = merge_ranges(found)
            ctx.message(f"incremental from {base}" if base else "full backup")
            try:
                return await store.create(
                    NbdSource(src, self.m.settings()["rebuild_bandwidth_limit"]),
                    volume=volume, size=doc["size"], snapshot=snap,
                    snapshot_id=snapshot_id(target), ranges=ranges, base=base,
                    labels=labels, compression=codec, name=name, progress=ctx.progress,
                    on_wait=ctx.message, replicas=doc.get("replica_count"))
            except (berr.BackupError, ValueError) as exc:
                raise TaskFailed(str(exc)) from exc

    async def _base(self, store: BackupStore, volume: str, size: int,
                    target: dict[str, Any], by_file: dict[str, dict[str, Any]],
                    ) -> tuple[str | None, list[dict[str, Any]]]:
        """The backup to build on and the layers written since its snapshot (or None, [])."""
        cfg = await store.volume_config(volume)
        if not cfg or not cfg.get("last_backup") or not cfg.get("last_snapshot_id"):
            return None, []
        if cfg.get("size") != size:
            return None, []  # expanded since: read it all once
        path: list[dict[str, Any]] = []
        la: dict[str, Any] | None = target
        while la is not None:
            if la is not target and snapshot_id(la) == cfg["last_snapshot_id"]:
                if la["removed"]:
                    return None, []
                try:
                    await store.info(cfg["last_backup"])
                except berr.NotFoundError:
                    return None, []
                return cfg["last_backup"], path
            path.append(la)
            la = by_file.get(la["parent"]) if la.get("parent") else None
        return None, []

    async def _healthy_replica(self, doc: dict[str, Any]
                               ) -> tuple[dict[str, Any], dict[str, str]]:
        """An RW replica to read from, and where it is served (its NBD base and control URL)."""
        info = await self.m.refresh(doc) or {}
        rw = {r["name"] for r in info.get("replicas", []) if r["mode"] == "RW"}
        for r in doc["replicas"]:
            ends = await self.m.replica_endpoints(doc, r) if r["name"] in rw else None
            if ends is not None:
                return r, ends
        raise TaskFailed(f"volume {doc['name']} has no healthy replica to read from")

    async def _layers(self, control: str,
                      headers: dict[str, str] | None) -> list[dict[str, Any]]:
        r = await self.m.http.get(f"{control}/v1/layers", params={"removed": "true"},
                                  headers=headers)
        r.raise_for_status()
        return r.json()

    # ------------------------------------------------------------ restore

    async def restore(self, backup: str, volume: str, replicas: int | None = None,
                      pool: str | None = None, instant: bool = False,
                      fill_rate: int = 0) -> dict[str, Any]:
        """Start restoring ``backup`` into a new volume; the Task.

        Without ``replicas`` the volume gets as many as the backed-up one had (when the
        backup recorded it).  ``instant``: the volume serves at once, its data fetched
        as it is read; the Task follows the background fill (drove.manager.instantrestore).
        """
        existing = self.m.store.get("volumes", volume)
        if existing is not None:
            check_not_standby(existing, "restored into")
        store = await self.store()
        try:
            info = await store.info(backup)
        except (berr.BackupError, ValueError) as exc:
            raise _api_error(exc) from exc
        if replicas is None:
            recorded = info.get("replicas")
            if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
                replicas = recorded
        enc = datakeys.from_backup_labels(info.get("labels"))
        key = self.m.keys.unwrap(enc, volume) if enc else None  # no KEK, wrong KEK: refused
        if instant and enc:
            raise ApiError(422, f"backup {backup} is encrypted (key {enc['key_id']}): an "
                                "instant restore of it is not supported yet; restore it "
                                "without --instant")
        if instant:
            return await self.instant.start(backup, volume, info["size"], replicas, pool,
                                            fill_rate)
        self.m.create_volume(volume, info["size"], replicas, pool,
                             {"drove.restored-from": backup}, encryption=enc)
        doc = self.m.record(volume)
        doc["restoring"] = {"backup": backup}
        self.m.save(doc)

        async def run(ctx: TaskContext) -> dict[str, Any]:
            ctx.message("starting the volume")
            await self.m.attach(volume, _internal=True)
            view = self.m.volume(volume)
            client = await connect_uri(view["nbd_uri"])
            try:
                ctx.message(None)
                sink = NbdSink(client)
                stats = await store.restore(backup, sink if key is None else
                                            DecryptedSink(sink, Sectors(key)),
                                            progress=ctx.progress,
                                            on_wait=ctx.message)
            except (berr.BackupError, ValueError) as exc:
                raise TaskFailed(str(exc)) from exc
            finally:
                await client.close()
            ctx.message("detaching")
            await self.m.detach(volume, _internal=True)
            return {"volume": volume, "bytes_written": stats.get("bytes_written", 0)}

        async def end(task: dict[str, Any]) -> None:
            if task["state"] == "succeeded":
                d = self.m.record(volume)
                d.pop("restoring", None)
                self.m.save(d)
                self.m.event("volume-restored", f"volume {volume} restored from backup "
                             f"{backup}", volume)
                return
            self.m.event("restore-failed", f"restore of backup {backup} into volume {volume} "
                         f"{task['state']}: {task['error']}; the volume is deleted", volume,
                         level="warning")
            await self.m.delete_volume(volume, force=True, _internal=True)

        return self.tasks.start("backup-restore", run, volume=volume, backup=backup,
                                  on_end=end)

    async def abandon_restores(self) -> None:
        """Delete volumes a previous manager was restoring: their data is partial.

        Instant restores are not partial (their replicas fetch what they lack): their
        fill is followed again.
        """
        self.instant.resume()
        for doc in self.m.store.list("volumes"):
            if doc.get("restoring"):
                self.m.event("restore-abandoned", f"volume {doc['name']} was being restored "
                             f"from {doc['restoring'].get('backup')} when the manager stopped;"
                             " it is deleted", doc["name"], level="warning")
                await self.m.delete_volume(doc["name"], force=True, _internal=True)

    # ------------------------------------------------------------ verify, delete

    async def verify(self, backup: str) -> dict[str, Any]:
        """Start re-reading and checking every block of ``backup``; the Task."""
        store = await self.store()
        await self.get(backup)

        async def run(ctx: TaskContext) -> dict[str, Any]:
            try:
                result = await store.verify(backup, progress=ctx.progress, on_wait=ctx.message)
            except (berr.BackupError, ValueError) as exc:
                raise TaskFailed(str(exc)) from exc
            if result["errors"]:
                first = result["errors"][0]
                more = len(result["errors"]) - 1
                raise TaskFailed(f"backup {backup}: {first['error']}"
                                 + (f" (and {more} more bad blocks)" if more else ""), result)
            return result

        async def end(task: dict[str, Any]) -> None:
            ok = task["state"] == "succeeded"
            self.m.event("backup-verified" if ok else "backup-verify-failed",
                         f"backup {backup} verified" if ok else
                         f"verify of backup {backup} {task['state']}: {task['error']}",
                         level="info" if ok else "error")

        return self.tasks.start("backup-verify", run, backup=backup, on_end=end)

    async def delete(self, backup: str) -> dict[str, Any]:
        """Start deleting ``backup`` and the blocks no other backup needs; the Task."""
        store = await self.store()
        info = await self.get(backup)
        users = depending_on(self.m.store, backup)
        if users:
            raise ApiError(409, f"backup {backup} cannot be deleted: volume(s) "
                                f"{', '.join(users)} still read it (an instant restore whose "
                                "fill has not finished); wait for `drove task list` to show "
                                "the fill done, or delete the volume(s)")

        async def run(ctx: TaskContext) -> dict[str, Any]:
            try:
                result = await store.delete(backup, progress=ctx.progress, on_wait=ctx.message)
            except (berr.BackupError, ValueError) as exc:
                raise TaskFailed(str(exc)) from exc
            self.m.event("backup-deleted", f"backup {backup} deleted: "
                         f"{result.get('blocks_removed', 0)} blocks "
                         f"({result.get('bytes_removed', 0)} bytes) removed", info["volume"])
            return result

        return self.tasks.start("backup-delete", run, volume=info["volume"], backup=backup)
