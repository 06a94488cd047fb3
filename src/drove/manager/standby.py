"""DR standby volumes (Longhorn's DR volume): a volume that follows another's backups.

``drove volume create NEW --standby-of VOL`` makes NEW the size of VOL's newest backup on
the backup target (VOL may be another cluster's volume, unknown here) and restores that
backup into it; then, polling the target, each newer backup as it appears,
incrementally: only the 2 MiB blocks whose hash differs from the last restored backup's
(:mod:`drove.backup.delta`), the blocks that became empty zeroed, the volume grown when
the backup is larger.  A standby cannot be attached, snapshotted, backed up or restored
into (:mod:`drove.manager.standbystate`) until ``drove volume activate NEW`` restores the
newest backup once more and makes it an ordinary volume.

Never a half-applied mix: the changed blocks are first fetched from the target, each
verified by its hash, into a staging area on the manager's disk
(:mod:`drove.manager.standbystage`); the volume is touched only once all are there, so a
target going away or a bad block leaves it on its last complete backup (an event says
why, and the follower retries).  The record then names the backup being written
(``applying``) until it is all in; a write cut short (engine or manager gone) is finished
from the staging area before anything else, or, when that is lost (another manager leads
now), the volume is rewritten whole from the newest backup.  With no complete backup to
keep (the first restore, that rewrite) nothing is staged: blocks go from the target
into the volume as they are read, and the standby cannot be activated until one is in.

Each restore is a task (kind ``standby-restore``) with progress; the follower is a
leader's duty, started and stopped with the jobs (:mod:`drove.manager.app`), and its
state lives in the volume's record, so it survives a manager restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from drove.backup import errors as berr
from drove.backup import manifest as mf
from drove.backup.blocks import data_runs
from drove.backup.delta import Delta, plan
from drove.backup.pipeline import bounded
from drove.backup.store import BackupStore
from drove.manager.backups import Backups
from drove.manager.errors import ApiError, validate_name
from drove.manager.standbystage import StagingArea, blocks_from_json, blocks_to_json
from drove.manager.standbystate import KEY, LABEL, standby_of
from drove.manager.store import Store, now_iso
from drove.manager.tasks import TaskContext, TaskFailed, Tasks
from drove.nbd.client import NbdClient, connect_uri

log = logging.getLogger("drove.manager")

KIND = "standby-restore"
"""The kind of the task restoring one backup into a standby."""

POLL = 3.0
"""Seconds between two looks at the target for a new backup."""

MAX_BACKOFF = 30.0
"""Longest wait (seconds) before a failed restore of the same backup is tried again."""

PARALLEL = 4
"""Blocks fetched (and written) at once."""


class Volumes(Protocol):
    """What standbys need of the manager's volumes (drove.manager.core.Manager)."""

    store: Store

    data_dir: Path
    """The manager's data directory (the staging areas live under it)."""

    def event(self, kind: str, message: str, volume: str | None = None,
              level: str = "info") -> None:
        """Record what the system did and why."""

    def record(self, name: str) -> dict[str, Any]:
        """A volume's stored document (ApiError 404)."""

    def save(self, doc: dict[str, Any]) -> None:
        """Store a volume's document."""

    def volume(self, name: str) -> dict[str, Any]:
        """A volume as the API shows it."""

    def create_volume(self, name: str, size: int | str, replicas: int | None = None,
                      pool: str | None = None, labels: dict[str, str] | None = None,
                      data_locality: str | None = None) -> dict[str, Any]:
        """Create a volume."""

    async def attach(self, name: str, mount: str | None = None, fs: str = "ext4",
                     _internal: bool = False) -> dict[str, Any]:
        """Start a volume's processes."""

    async def detach(self, name: str, force: bool = False,
                     _internal: bool = False) -> dict[str, Any]:
        """Stop a volume's processes."""

    async def expand_volume(self, name: str, size: int | str,
                            _internal: bool = False) -> dict[str, Any]:
        """Grow a volume (``_internal``: a standby too)."""


class Standbys:
    """Creates standbys, follows their source's backups (the leader's loop), activates."""

    def __init__(self, volumes: Volumes, backups: Backups, tasks: Tasks) -> None:
        self.m = volumes
        self.backups = backups
        self.tasks = tasks
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._locks: dict[str, asyncio.Lock] = {}
        # name -> (monotonic time before which a failed backup is not tried again, that
        # backup, failures in a row): a bad block is not fetched again every poll.
        self._backoff: dict[str, tuple[float, str, int]] = {}

    def staging(self, name: str) -> StagingArea:
        """Standby ``name``'s staging area."""
        return StagingArea(self.m.data_dir / "standby" / name)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # ------------------------------------------------------------ create, activate

    async def create(self, name: str, of: str, replicas: int | None = None,
                     pool: str | None = None, labels: dict[str, str] | None = None,
                     data_locality: str | None = None) -> dict[str, Any]:
        """Create ``name`` following ``of``'s backups; its first restore starts at once."""
        validate_name("volume", name)
        try:
            mf.check_name("volume", of)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        if self.m.store.get("volumes", name) is not None:
            raise ApiError(409, f"volume {name!r} exists; choose another name or delete it")
        store = await self.backups.store()
        newest = await self._newest_or_api_error(store, of)
        if newest is None:
            raise ApiError(404, f"the backup target {store.target.url} holds no backup of "
                                f"volume {of}: a standby follows a volume's backups (`drove "
                                f"backup list --volume {of}`)")
        if "drove.key-id" in (newest.get("labels") or {}):  # drove.manager.datakeys
            raise ApiError(422, f"the backups of volume {of} are encrypted: a DR standby of an "
                                "encrypted volume is not supported yet (restore its backups "
                                "with `drove backup restore`)")
        if replicas is None:
            recorded = newest.get("replicas")
            if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
                replicas = recorded
        self.m.create_volume(name, newest["size"], replicas, pool,
                             {**(labels or {}), LABEL: of}, data_locality)
        doc = self.m.record(name)
        doc[KEY] = {"of": of, "backup": None, "backup_created": None, "restored_at": None,
                    "applying": None, "newest": _brief(newest), "checked_at": now_iso(),
                    "error": None, "last_restore": None, "bytes_written_total": 0}
        self.m.save(doc)
        self.m.event("standby-created", f"volume {name} is a DR standby of volume {of}: it "
                     f"restores backup {newest['name']} now, then each newer backup as it "
                     "appears on the target", name)
        self._wake.set()
        return self.m.volume(name)

    async def activate(self, name: str, force: bool = False) -> dict[str, Any]:
        """Restore the newest backup (the target is checked once more) and make ``name``
        an ordinary volume; ``force``: on the last backup restored completely when the
        newest cannot be restored."""
        if standby_of(self.m.record(name)) is None:
            raise ApiError(409, f"volume {name} is not a DR standby: nothing to activate")
        async with self._lock(name):
            self._backoff.pop(name, None)
            why = await self._catch_up(name)
            doc = self.m.record(name)
            state = doc.get(KEY)
            if not state:
                raise ApiError(409, f"volume {name} is not a DR standby: nothing to activate")
            if why is not None and (not force or state.get("applying")
                                    or not state.get("backup")):
                hint = (f"; `drove volume activate {name} --force` activates it on backup "
                        f"{state['backup']}, the last one restored completely"
                        if state.get("backup") and not state.get("applying") else "")
                raise ApiError(409, f"cannot activate standby {name}: {why}{hint}")
            doc.pop(KEY)
            doc["labels"].pop(LABEL, None)
            doc["labels"]["drove.restored-from"] = state["backup"]
            self.m.save(doc)
        await asyncio.to_thread(self.staging(name).remove)
        self.m.event("standby-activated", f"standby {name} activated on backup "
                     f"{state['backup']} of volume {state['of']}"
                     + (f" (forced: the newest could not be restored: {why})" if why else "")
                     + "; it is an ordinary volume now", name)
        return self.m.volume(name)

    # ------------------------------------------------------------ the follower

    def start(self) -> None:
        """Start following every standby's source (the leader's duty)."""
        self._task = asyncio.create_task(self._loop(), name="standby")

    async def stop(self) -> None:
        """Stop following (a restore task running is the tasks' to cancel)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            names = set()
            for doc in self.m.store.list("volumes"):
                if standby_of(doc) is None:
                    continue
                names.add(doc["name"])
                try:
                    async with self._lock(doc["name"]):
                        # Activated or deleted while we waited for the lock: skip it.
                        if standby_of(self.m.store.get("volumes", doc["name"]) or {}):
                            await self._catch_up(doc["name"], patient=True)
                except asyncio.CancelledError:
                    raise
                except Exception:  # one standby's trouble must not stop the others
                    log.exception("standby %s", doc["name"])
            await asyncio.to_thread(self._forget_others, names)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=POLL)

    def _forget_others(self, names: set[str]) -> None:
        """Remove the staging areas of volumes that are no standby (deleted, activated)."""
        root = self.m.data_dir / "standby"
        if root.is_dir():
            for path in root.iterdir():
                if path.name not in names:
                    StagingArea(path).remove()

    async def _catch_up(self, name: str, patient: bool = False) -> str | None:
        """Restore the newest backup into standby ``name`` unless it holds it (lock held);
        None when it holds it now, else why not.  ``patient``: a backup that failed lately
        is not tried again before its backoff ends."""
        try:
            store = await self.backups.store()
            state = self.m.record(name)[KEY]
            of = state["of"]
            newest = await self._newest(store, of, state.get("newest"))
        except (ApiError, berr.BackupError, ValueError) as exc:
            return self._failed(name, f"cannot read the backup target: {exc}")
        doc = self.m.record(name)
        state = doc[KEY]
        state["checked_at"] = now_iso()
        if newest is not None:
            state["newest"] = _brief(newest)
        self.m.save(doc)
        target = newest["name"] if newest is not None else None
        staged = await asyncio.to_thread(self.staging(name).sealed)
        if state.get("applying") and staged and staged.get("backup") == state["applying"]:
            target = state["applying"]  # a write cut short: finish it first
        if target is None:
            return None if state.get("backup") else self._failed(
                name, f"the target holds no backup of volume {of}")
        if target == state.get("backup") and not state.get("applying"):
            return None
        if patient and self._waiting(name, target):
            return state.get("error") or "waiting to retry"
        task = self.tasks.start(KIND, lambda ctx: self._restore(ctx, store, name, target),
                                volume=name, backup=target)
        done = await self.tasks.wait(task["id"]) or {}
        if done.get("state") != "succeeded":
            return self._failed(name, f"restore of backup {target} failed: "
                                f"{done.get('error')}", target)
        self._backoff.pop(name, None)
        return await self._catch_up(name, patient) if target != (newest or {}).get("name") \
            else None

    def _waiting(self, name: str, target: str) -> bool:
        """Whether ``target`` failed lately for ``name`` and its backoff has not ended."""
        until, backup, _ = self._backoff.get(name, (0.0, "", 0))
        return backup == target and time.monotonic() < until

    def _failed(self, name: str, why: str, target: str | None = None) -> str:
        """Record why standby ``name`` could not catch up (an event when the reason is new)."""
        if target is not None:
            _, backup, count = self._backoff.get(name, (0.0, "", 0))
            count = count + 1 if backup == target else 1
            delay = min(POLL * 2 ** (count - 1), MAX_BACKOFF)
            self._backoff[name] = (time.monotonic() + delay, target, count)
        try:
            doc = self.m.record(name)
        except ApiError:
            return why
        state = doc.get(KEY)
        if not state:
            return why
        if state.get("error") != why:
            state["error"] = why
            self.m.save(doc)
            held = (f"it stays on backup {state['backup']} (restored completely)"
                    if state.get("backup") and not state.get("applying") else
                    "it holds no complete backup yet")
            self.m.event("standby-restore-failed", f"standby {name} of volume {state['of']}: "
                         f"{why}; {held} and tries again", name, level="warning")
        return why

    async def _newest(self, store: BackupStore, of: str,
                      known: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The newest backup of volume ``of`` on the target (its summary, or ``known``
        when it is that one still), None if there is none."""
        cfg = await store.volume_config(of)
        if cfg and cfg.get("last_backup"):
            # volume.cfg names the newest backup: one read per poll, not a listing of every
            # manifest (a backup not seen before is looked up once).
            if known and known.get("name") == cfg["last_backup"]:
                return known
            with contextlib.suppress(berr.NotFoundError):
                info = await store.info(cfg["last_backup"])
                if info.get("volume") == of:
                    return info
        backups = await store.list(of)
        return backups[0] if backups else None

    async def _newest_or_api_error(self, store: BackupStore,
                                   of: str) -> dict[str, Any] | None:
        try:
            return await self._newest(store, of)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        except berr.BackupError as exc:
            raise ApiError(409, f"cannot read the backup target: {exc}") from None

    # ------------------------------------------------------------ one restore

    async def _restore(self, ctx: TaskContext, store: BackupStore, name: str,
                       backup: str) -> dict[str, Any]:
        """Bring ``backup`` into standby ``name``: staged first when the volume holds a
        complete backup to keep, straight from the target when it holds none."""
        state = self.m.record(name)[KEY]
        resumed = state.get("applying") == backup  # a write of it was cut short
        area = self.staging(name)
        staged = await asyncio.to_thread(area.sealed)

        async def from_area(offset: int, length: int) -> bytes:
            return await asyncio.to_thread(area.read, offset, length)

        if (staged and staged.get("backup") == backup
                and staged.get("from") == state.get("backup")
                and state.get("applying") in (None, backup)):
            counts = await self._apply(ctx, name, staged, from_area)
        elif state.get("backup") and not state.get("applying"):
            staged = await self._stage(ctx, store, name, backup, state, area)
            counts = await self._apply(ctx, name, staged, from_area)
        else:
            # Nothing complete to keep (the first restore, or a write cut short whose
            # staging is lost): no need to stage, write from the target as it is read.
            try:
                async with store.reading(f"standby {name} restoring {backup}", ctx.message):
                    staged, blocks = await self._plan(store, name, backup, state)

                    async def from_target(offset: int, length: int) -> bytes:
                        return await store.fetch_block(blocks[offset], offset, length)

                    counts = await self._apply(ctx, name, staged, from_target)
            except (berr.BackupError, ValueError) as exc:
                raise TaskFailed(str(exc)) from exc
        return await self._restored(name, staged, counts, resumed, area)

    async def _restored(self, name: str, staged: dict[str, Any], counts: dict[str, int],
                        resumed: bool, area: StagingArea) -> dict[str, Any]:
        """Record that the standby holds ``staged``'s backup whole now; the task result."""
        backup = staged["backup"]
        delta = Delta.from_json(staged["delta"])
        await asyncio.to_thread(area.save_restored, backup,
                                blocks_from_json(staged["blocks"]) or {})
        doc = self.m.record(name)
        state = doc[KEY]
        last = {"backup": backup, "base": staged.get("base"), "full": delta.zero_all,
                "resumed": resumed,
                "blocks_written": len(delta.write), "blocks_zeroed": len(delta.zero),
                **counts, "at": now_iso()}
        state.update(backup=backup, backup_created=staged.get("created"),
                     restored_at=last["at"], applying=None, error=None, last_restore=last,
                     bytes_written_total=state.get("bytes_written_total", 0)
                     + counts["bytes_written"])
        self.m.save(doc)
        await asyncio.to_thread(area.clear)
        how = ("in full" if delta.zero_all or not staged.get("base") else
               f"incrementally from backup {staged['base']}")
        self.m.event("standby-restored", f"standby {name} restored backup {backup} of volume "
                     f"{state['of']} {how}: {len(delta.write)} block(s) written "
                     f"({counts['bytes_written']} bytes), {len(delta.zero)} zeroed", name)
        return {"volume": name, **last}

    async def _base_blocks(self, store: BackupStore, name: str,
                           state: dict[str, Any]) -> dict[int, str] | None:
        """The block map the volume holds now: {} when blank, None when unknown (a write
        was cut short, or the last backup's map is neither kept here nor on the target)."""
        if state.get("applying"):
            return None
        base = state.get("backup")
        if base is None:
            return {}
        blocks = await asyncio.to_thread(self.staging(name).restored, base)
        if blocks is not None:
            return blocks
        try:
            return mf.check_manifest(await store.manifest(base), base)
        except berr.NotFoundError:
            return None

    async def _plan(self, store: BackupStore, name: str, backup: str, state: dict[str, Any]
                    ) -> tuple[dict[str, Any], dict[int, str]]:
        """What restoring ``backup`` takes (the JSON a staging is sealed with) and its
        block map; TaskFailed for a backup smaller than the standby."""
        doc = await store.manifest(backup)
        blocks = mf.check_manifest(doc, backup)
        size, size_now = doc["size"], self.m.record(name)["size"]
        if size < size_now:
            raise TaskFailed(f"backup {backup} is of a {size} byte volume, smaller than the "
                             f"standby ({size_now} bytes): a standby does not shrink")
        base = await self._base_blocks(store, name, state)
        delta = plan(base, blocks)
        return {"backup": backup, "from": state.get("backup"),
                "base": None if base is None else state.get("backup"),
                "size": size, "created": doc.get("created"), "delta": delta.to_json(),
                "blocks": blocks_to_json(blocks)}, blocks

    async def _stage(self, ctx: TaskContext, store: BackupStore, name: str, backup: str,
                     state: dict[str, Any], area: StagingArea) -> dict[str, Any]:
        """Fetch and verify every block ``backup`` changes into the staging area; what the
        sealed staging holds.  The volume is not touched (TaskFailed on any trouble)."""
        try:
            async with store.reading(f"standby {name} staging {backup}", ctx.message):
                staged, blocks = await self._plan(store, name, backup, state)
                size, delta = staged["size"], Delta.from_json(staged["delta"])
                await asyncio.to_thread(area.start, size)
                total = sum(mf.block_length(o, size) for o in delta.write)
                done = 0
                ctx.message(f"fetching {len(delta.write)} changed block(s)")

                async def fetch(offset: int) -> None:
                    nonlocal done
                    length = mf.block_length(offset, size)
                    data = await store.fetch_block(blocks[offset], offset, length)
                    await asyncio.to_thread(area.put, offset, data)
                    done += length
                    ctx.progress(done, total)

                ctx.progress(0, total)
                await bounded(delta.write, fetch, PARALLEL)
        except (berr.BackupError, ValueError) as exc:
            raise TaskFailed(str(exc)) from exc
        await asyncio.to_thread(area.seal, staged)
        return staged

    async def _apply(self, ctx: TaskContext, name: str, staged: dict[str, Any],
                     read: Callable[[int, int], Awaitable[bytes]]) -> dict[str, int]:
        """Write ``staged``'s delta into the volume, its blocks' bytes from ``read``; the
        record names the backup being written (``applying``) until it is all in."""
        doc = self.m.record(name)
        doc[KEY]["applying"] = staged["backup"]
        self.m.save(doc)
        return await self._write(ctx, name, staged["size"], Delta.from_json(staged["delta"]),
                                 read)

    async def _write(self, ctx: TaskContext, name: str, size: int, delta: Delta,
                     read: Callable[[int, int], Awaitable[bytes]]) -> dict[str, int]:
        """Write ``delta`` into the volume through its engine (attached internally,
        detached after); the bytes written and zeroed."""
        if size > self.m.record(name)["size"]:
            ctx.message(f"growing the volume to {size} bytes")
            await self.m.expand_volume(name, size, _internal=True)
        ctx.message("starting the volume")
        await self.m.attach(name, _internal=True)
        client = await connect_uri(self.m.volume(name)["nbd_uri"])
        counts = {"bytes_written": 0, "bytes_zeroed": 0}
        try:
            ctx.message(f"writing {len(delta.write)} block(s), zeroing {len(delta.zero)}")
            total = sum(mf.block_length(o, size) for o in delta.write)
            ctx.progress(0, total)
            if delta.zero_all:
                await client.zero(0, size)
                counts["bytes_zeroed"] += size
            for offset in delta.zero:
                length = mf.block_length(offset, size)
                await client.zero(offset, length)
                counts["bytes_zeroed"] += length
            done = 0

            async def put(offset: int) -> None:
                nonlocal done
                length = mf.block_length(offset, size)
                data = await read(offset, length)
                written, zeroed = await _write_block(client, offset, data,
                                                     zero_gaps=not delta.zero_all)
                counts["bytes_written"] += written
                counts["bytes_zeroed"] += zeroed
                done += length
                ctx.progress(done, total)

            await bounded(delta.write, put, PARALLEL)
            await client.flush()
        finally:
            await client.close()
        ctx.message("detaching")
        await self.m.detach(name, _internal=True)
        return counts


async def _write_block(client: NbdClient, offset: int, data: bytes,
                       zero_gaps: bool) -> tuple[int, int]:
    """Write a block's data runs (and zero what lies between, unless the volume reads as
    zeros there already); the bytes written and zeroed."""
    view = memoryview(data)
    written = zeroed = pos = 0
    for start, length in data_runs(data):
        if zero_gaps and start > pos:
            await client.zero(offset + pos, start - pos)
            zeroed += start - pos
        await client.write(offset + start, view[start:start + length])
        written += length
        pos = start + length
    if zero_gaps and pos < len(data):
        await client.zero(offset + pos, len(data) - pos)
        zeroed += len(data) - pos
    return written, zeroed


def _brief(backup: dict[str, Any]) -> dict[str, Any]:
    """What a standby keeps of a backup seen on the target."""
    return {"name": backup.get("name"), "created": backup.get("created"),
            "size": backup.get("size")}
