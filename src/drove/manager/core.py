"""The manager: volumes, disks, settings and events, kept in the store and made real by the agent.

Stored documents say what *should* be (``desired``) and what was last done;
the parts of the manager close the gap, each with one job, wired here:

* :mod:`~drove.manager.records`: the volume documents and each volume's lock
  (every operation on a volume holds it, so an API call and the healer never
  act on one volume at once);
* :mod:`~drove.manager.settings`, :mod:`~drove.manager.disks`: settings, this
  node and its disks;
* :mod:`~drove.manager.engines`: calls to the volumes' engines;
* :mod:`~drove.manager.replicas`: placing, starting, failing and removing replicas;
* :mod:`~drove.manager.attach`: attaching and detaching volumes;
* :mod:`~drove.manager.snapshots`: the snapshot operations;
* :mod:`~drove.manager.views`: a volume as the API shows it.

This module holds the :class:`Manager` facade the API, backups and jobs use,
the volume operations of its own (create, delete, update, expand), and the
healer: online rebuilds, data locality carried out live, the healing loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from drove.agent.node import NodeAgent
from drove.manager import locality, views
from drove.manager.attach import Attacher
from drove.manager.disks import Disks
from drove.manager.engines import Engines, process_endpoints, rebuild_running
from drove.manager.errors import ApiError, to_size, validate_name
from drove.manager.events import EventFn
from drove.manager.guard import VolumeGuard, check_not_busy
from drove.manager.locality import DISABLED, STRICT_LOCAL
from drove.manager.placement import PlacementError
from drove.manager.records import Records
from drove.manager.replicas import Replicas
from drove.manager.settings import Settings
from drove.manager.snapshots import Snapshots
from drove.manager.store import Store, now_iso
from drove.manager.views import health

log = logging.getLogger("drove.manager")


class Manager:
    """Volumes, disks and settings of a one-node drove."""

    def __init__(self, store: Store, agent: NodeAgent, data_dir: Path, *, event: EventFn,
                 guard: VolumeGuard) -> None:
        self.store = store
        self.agent = agent
        self.data_dir = data_dir
        self._event = event
        self._guard = guard
        self._settings = Settings(store, event)
        self._records = Records(store, self._settings, agent.name, data_dir)
        self._disks = Disks(store, agent, data_dir, event)
        self._engines = Engines()
        self._replicas = Replicas(records=self._records, disks=self._disks,
                                  engines=self._engines, agent=agent, settings=self._settings,
                                  event=event)
        self._attacher = Attacher(records=self._records, replicas=self._replicas,
                                  engines=self._engines, disks=self._disks, agent=agent,
                                  settings=self._settings, event=event, guard=guard)
        self._snapshots = Snapshots(records=self._records, engines=self._engines, guard=guard,
                                    event=event)
        self._heal_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_health: dict[str, str] = {}
        # volume -> (engine epoch, why its locality is unmet): said once per engine start.
        self._locality_notes: dict[str, tuple[Any, str]] = {}

    # ------------------------------------------------------------ basics

    def lock(self, volume: str) -> asyncio.Lock:
        """The lock every operation on ``volume`` holds."""
        return self._records.lock(volume)

    def event(self, kind: str, message: str, volume: str | None = None,
              level: str = "info") -> None:
        """Record what the system did and why."""
        self._event(kind, message, volume, level)

    @property
    def http(self) -> httpx.AsyncClient:
        """The HTTP client the manager reaches engines and replicas with."""
        return self._engines.http

    def settings(self) -> dict[str, Any]:
        """Every setting with its value."""
        return self._settings.values()

    def update_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change settings (ApiError 422 for unknown names or values out of range)."""
        return self._settings.update(changes)

    # ------------------------------------------------------- nodes, disks

    def nodes(self) -> list[dict[str, Any]]:
        """Every node with its disks."""
        return self._disks.nodes()

    def disks(self) -> list[dict[str, Any]]:
        """Every disk with its live state, capacity, free and scheduled space."""
        return self._disks.all()

    def disk(self, name: str) -> dict[str, Any]:
        """One disk with its live state (ApiError 404)."""
        return self._disks.get(name)

    def add_disk(self, path: str, *, tags: list[str], reserved: int | str = 0,
                 name: str | None = None) -> dict[str, Any]:
        """Add a directory as a disk of this node."""
        return self._disks.add(path, tags=tags, reserved=reserved, name=name)

    def remove_disk(self, name: str, force: bool = False) -> dict[str, Any]:
        """Forget a disk (refused while replicas live there unless ``force``)."""
        return self._disks.remove(name, force)

    # ----------------------------------------------------------- volumes

    def record(self, name: str) -> dict[str, Any]:
        """The stored document of volume ``name`` (ApiError 404)."""
        return self._records.get(name)

    def save(self, doc: dict[str, Any]) -> None:
        """Store a volume's document."""
        self._records.save(doc)

    def volumes(self) -> list[dict[str, Any]]:
        """Every volume as the API shows it."""
        return [self.view(v) for v in self._records.all()]

    def volume(self, name: str) -> dict[str, Any]:
        """One volume as the API shows it."""
        return self.view(self.record(name))

    def locality(self, doc: dict[str, Any]) -> str:
        """The volume's data locality (stored before the setting existed: the default)."""
        return self._records.locality(doc)

    def attach_node(self, doc: dict[str, Any]) -> str:
        """The node ``doc`` is attached on, or would be by default (this manager's own)."""
        return self._records.attach_node(doc)

    def view(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A stored volume merged with what its engine reported last."""
        info = self._engines.cached(doc["name"]) if doc["state"] == "attached" else None
        return views.view(doc, info, self.locality(doc))

    def create_volume(self, name: str, size: int | str, replicas: int | None = None,
                      pool: str | None = None, labels: dict[str, str] | None = None,
                      data_locality: str | None = None) -> dict[str, Any]:
        """Create a volume and place its replicas (nothing runs until it is attached).

        ``data_locality`` defaults to the ``default_data_locality`` setting; a
        strict-local volume has exactly one replica (the default count then).
        """
        validate_name("volume", name)
        size_bytes = to_size(size)
        settings = self.settings()
        where = locality.check_locality(data_locality if data_locality is not None
                                        else settings["default_data_locality"])
        if replicas is None:
            count = 1 if where == STRICT_LOCAL else settings["default_replicas"]
        else:
            count = replicas
        if not isinstance(count, int) or not 1 <= count <= 10:
            raise ApiError(422, f"replicas must be between 1 and 10, not {count!r}")
        locality.check_count(where, count, name)
        if pool is not None:
            validate_name("pool", pool)
        if self._records.find(name) is not None:
            raise ApiError(409, f"volume {name!r} exists; choose another name or delete it")
        doc: dict[str, Any] = {
            "name": name, "size": size_bytes, "replica_count": count, "pool": pool,
            "labels": dict(labels or {}), "created": now_iso(), "desired": "detached",
            "state": "detached", "mount": None, "engine": None, "host": None,
            "replicas": [], "next_replica": 0, "initialized": False,
            "data_locality": where,
        }
        try:
            doc["replicas"] = self._replicas.place(doc, count)
        except PlacementError as exc:
            raise ApiError(409, str(exc)) from exc
        self._records.add(doc)
        self.event("volume-created", f"volume {name} created: {size_bytes} bytes, {count} "
                   f"replica(s) on {', '.join(r['disk'] for r in doc['replicas'])}, "
                   f"data locality {where}", name)
        return self.view(doc)

    async def delete_volume(self, name: str, force: bool = False,
                            _internal: bool = False) -> dict[str, Any]:
        """Delete a volume and its replicas' data (refused while attached unless ``force``)."""
        async with self.lock(name):
            doc = self.record(name)
            if not _internal:
                check_not_busy(self._guard, doc, "delete")
            if doc["state"] != "detached":
                if not force:
                    raise ApiError(409, f"volume {name} is {doc['state']}; detach it first "
                                        "(`drove volume detach`) or use --force")
                await self._attacher.bring_down(doc, keep_desired=False)
            for r in doc["replicas"]:
                await asyncio.to_thread(shutil.rmtree, r["path"], True)
            with contextlib.suppress(OSError):
                shutil.rmtree(self._records.volume_dir(name))
            self._records.delete(name)
            self.event("volume-deleted", f"volume {name} deleted", name)
        self._records.drop_lock(name)
        return {"deleted": name}

    async def update_volume(self, name: str, replicas: int | None = None,
                            labels: dict[str, str] | None = None,
                            data_locality: str | None = None) -> dict[str, Any]:
        """Change labels, the replica count or the data locality (live, online rebuilds)."""
        async with self.lock(name):
            doc = self.record(name)
            if replicas is not None and not 1 <= replicas <= 10:
                raise ApiError(422, f"replicas must be between 1 and 10, not {replicas}")
            before = self.locality(doc)
            after = before if data_locality is None else locality.check_locality(data_locality)
            self._check_locality_change(doc, before, after, replicas)
            if labels is not None:
                doc["labels"] = dict(labels)
            if replicas is not None and replicas != doc["replica_count"]:
                await self._set_replica_count(doc, replicas)
            if after != before or data_locality is not None:
                doc["data_locality"] = after
            self.save(doc)
            if after != before:
                await self._locality_changed(doc, before, after)
            if doc["state"] == "attached":
                await self._engines.refresh(doc)
            return self.view(doc)

    def _check_locality_change(self, doc: dict[str, Any], before: str, after: str,
                               replicas: int | None) -> None:
        """Refuse a change that breaks strict-local's one replica on the attach node."""
        if after != STRICT_LOCAL:
            return
        name = doc["name"]
        live = locality.live(doc)
        node = self.attach_node(doc)
        if replicas is not None:
            # Switching with another count in the same request contradicts itself (422);
            # another count for a volume that is strict-local already conflicts (409).
            locality.check_count(after, replicas, name, status=422 if before != after else 409)
            if doc["state"] == "attached" and not any(r["node"] == node for r in live):
                raise ApiError(409, f"volume {name} is attached on node {node}, which holds "
                                    "none of its replicas: it cannot be strict-local there")
            return
        if before != after and len(live) != 1:
            raise ApiError(409, f"volume {name} has {len(live)} replicas; strict-local keeps "
                                f"exactly one: lower them first (`drove volume update {name} "
                                f"--replicas 1`) or give --replicas 1 with the change")
        if doc["state"] == "attached":
            locality.check_attach_node(doc, node, after)


    async def _set_replica_count(self, doc: dict[str, Any], count: int) -> None:
        """Place the replicas ``count`` asks for more, or remove the least useful ones."""
        live = [r for r in doc["replicas"] if r["state"] != "abandoned"]
        if count > len(live):
            try:
                doc["replicas"] += self._replicas.place(doc, count - len(live))
            except PlacementError as exc:
                raise ApiError(409, str(exc)) from exc
        else:
            order = {"failed": 0, "pending": 1, "stopped": 2, "running": 3}
            modes = {r["name"]: r["mode"] for r in
                     (self._engines.cached(doc["name"]) or {}).get("replicas", [])}
            node = self.attach_node(doc)
            # The local replica (and others on the attach node) go last: data locality.
            victims = sorted(live, key=lambda r: (order.get(r["state"], 0),
                                                  modes.get(r["name"]) == "RW",
                                                  r["node"] == node, bool(r.get("local"))))
            for r in victims[:len(live) - count]:
                await self._replicas.remove(doc, r)
        old = doc["replica_count"]
        doc["replica_count"] = count
        self.event("volume-replicas-changed", f"volume {doc['name']}: replica count "
                   f"{old} -> {count}", doc["name"])

    async def expand_volume(self, name: str, size: int | str) -> dict[str, Any]:
        """Grow a volume: every replica, then the engine (when attached)."""
        new = to_size(size)
        async with self.lock(name):
            doc = self.record(name)
            if new < doc["size"]:
                raise ApiError(422, f"cannot shrink volume {name} from {doc['size']} to {new}")
            if new == doc["size"]:
                return self.view(doc)
            if doc["state"] == "attached":
                await self._engines.call(doc, "POST", "/v1/expand", json={"size": new})
            else:
                await asyncio.to_thread(_expand_offline, doc, new)
            old, doc["size"] = doc["size"], new
            self.save(doc)
            if doc["state"] == "attached":
                await self._engines.refresh(doc)
            self.event("volume-expanded", f"volume {name} expanded from {old} to {new} bytes",
                       name)
            return self.view(doc)

    # ----------------------------------------------------------- attach

    async def attach(self, name: str, mount: str | None = None,
                     fs: str = "ext4", _internal: bool = False,
                     node: str | None = None) -> dict[str, Any]:
        """Start replicas and engine on ``node`` (default: this manager's) and give the host
        a device, mounted at ``mount``."""
        return self.view(await self._attacher.attach(name, mount, fs, _internal, node))

    async def detach(self, name: str, force: bool = False,
                     _internal: bool = False) -> dict[str, Any]:
        """Unmount, release devices, stop engine and replicas."""
        return self.view(await self._attacher.detach(name, force, _internal))

    # -------------------------------------------------------- engine calls

    async def refresh(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """What the volume's engine reports now (None when it does not answer)."""
        return await self._engines.refresh(doc)

    async def engine_stats(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The I/O statistics of an attached volume's engine (ApiError when unavailable)."""
        return await self._engines.stats(doc)

    async def replica_endpoints(self, doc: dict[str, Any],
                                rep: dict[str, Any]) -> dict[str, str] | None:
        """Where replica ``rep`` of ``doc`` is served now: ``nbd`` (the base URI of its
        exports) and ``control`` (its API URL); None when it is not served."""
        return await self._engines.replica_endpoints(doc, rep)

    # --------------------------------------------------------- snapshots

    async def snapshots(self, name: str) -> list[dict[str, Any]]:
        """The volume's snapshot tree (the head included, marked ``head``)."""
        return await self._snapshots.tree(name)

    async def create_snapshot(self, name: str, snapshot: str | None = None,
                              labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Snapshot the volume (it must be attached)."""
        return await self._snapshots.create(name, snapshot, labels)

    async def delete_snapshot(self, name: str, snapshot: str) -> dict[str, Any]:
        """Delete a snapshot (its data folds into its child)."""
        return await self._snapshots.delete(name, snapshot)

    async def revert(self, name: str, snapshot: str) -> dict[str, Any]:
        """Revert the volume to a snapshot (attached, with no client connected)."""
        return self.view(await self._snapshots.revert(name, snapshot))

    async def export_snapshot(self, name: str, snapshot: str) -> dict[str, Any]:
        """A read-only NBD URI serving ``snapshot`` (from a healthy replica)."""
        return await self._snapshots.export(name, snapshot)

    # ---------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Register the node, bring back what was attached, start healing."""
        self._disks.ensure_node()
        for doc in self._records.all():
            async with self.lock(doc["name"]):
                await self._attacher.recover(doc)
        self._heal_task = asyncio.create_task(self._heal_loop())

    async def stop(self) -> None:
        """Stop healing; detach every volume but remember which were attached."""
        self._stopping = True
        if self._heal_task:
            self._heal_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heal_task
        for doc in self._records.all():
            if doc["state"] == "detached":
                continue
            async with self.lock(doc["name"]):
                try:
                    await self._attacher.bring_down(doc, keep_desired=True)
                except ApiError as exc:
                    # Leave it serving (its mount stays usable); the next start adopts it.
                    self.event("stop-left-attached", str(exc), doc["name"], level="warning")
        await self._engines.close()

    # ------------------------------------------------------------- healer

    async def _heal_loop(self) -> None:
        while not self._stopping:
            for doc in self._records.all():
                lock = self._records.lock(doc["name"])
                if doc["state"] != "attached" or lock.locked():
                    continue
                async with lock:
                    fresh = self._records.find(doc["name"])
                    if fresh is None or fresh["state"] != "attached":
                        continue
                    try:
                        await self.heal(fresh)
                    except Exception:
                        log.exception("healing volume %s", doc["name"])
            await asyncio.sleep(self._settings.get("heal_interval"))

    async def heal(self, doc: dict[str, Any]) -> None:
        """One pass of self-healing over an attached volume (its lock held)."""
        name = doc["name"]
        if not self.agent.alive(doc.get("engine")):
            self.event("engine-failed", f"engine of volume {name} exited; restarting it",
                       name, level="error")
            await self._attacher.recover(doc)
            return
        info = await self._engines.refresh(doc)
        if info is None:
            return
        modes = {r["name"]: r for r in info["replicas"]}
        for r in doc["replicas"]:
            if r["state"] != "running":
                continue
            live = modes.get(r["name"])
            if r.get("local"):
                # Its process is the engine, alive (checked above): only its mode counts.
                if live is None or live["mode"] == "ERR":
                    why = (live or {}).get("error") or "not in the engine"
                    self._replicas.fail(doc, r, f"engine set its local replica to ERR: {why}")
                elif live["mode"] == "RW" and r.get("rebuilding"):
                    r.update(rebuilding=False, failures=0)
                    self._records.save(doc)
                    self.event("rebuild-finished", f"replica {r['name']} rebuilt, now RW "
                               "(local: served by the engine)", name)
                continue
            if not self.agent.alive(r.get("proc")):
                self._replicas.fail(doc, r, "process exited")
            elif live is None or live["mode"] == "ERR":
                why = (live or {}).get("error") or "not in the engine"
                await self._replicas.stop(r, 5.0)
                self._replicas.fail(doc, r, f"engine set it to ERR: {why}")
            elif live["mode"] == "RW" and r.get("rebuilding"):
                r.update(rebuilding=False, failures=0)
                self._records.save(doc)
                self.event("rebuild-finished", f"replica {r['name']} rebuilt, now RW", name)
        self._note_health(doc, info)
        if rebuild_running(info.get("rebuild")):
            return
        if (await self._repair_one(doc, modes)
                or await self._keep_locality(doc, modes)):
            await self._engines.refresh(doc)
        await self._drop_abandoned(doc)

    async def _repair_one(self, doc: dict[str, Any], modes: dict[str, Any]) -> bool:
        """Start one rebuild: a failed replica in place, else a replacement, else a pending one.

        True if the engine's membership changed.
        """
        now = time.time()
        live = [r for r in doc["replicas"] if r["state"] != "abandoned"]
        for r in live:
            if r["state"] == "failed" and r.get("retry_at", 0) <= now:
                if self._disks.state(r["disk"]) == "ready":
                    return await self._rebuild(doc, r, modes,
                                                        why="delta rebuild in place")
                # Its disk is gone: replace it elsewhere if possible; keep it for when the
                # disk returns if not.
                # A strict-local volume's replica may only live on its attach node.
                strict = self.locality(doc) == STRICT_LOCAL
                try:
                    (new,) = self._replicas.place(doc, 1, only_node=self.attach_node(doc)
                                                  if strict else None)
                except PlacementError as exc:
                    r["retry_at"] = now + self._settings.get("failed_replica_retry_seconds")
                    self._records.save(doc)
                    log.info("volume %s: cannot replace %s yet: %s", doc["name"], r["name"], exc)
                    continue
                r["state"] = "abandoned"
                if r["name"] in modes:
                    # Out of the engine too: a local one would hold the engine's one local
                    # place (and its chain) otherwise.
                    with contextlib.suppress(ApiError):
                        await self._engines.forget(doc, r["name"])
                doc["replicas"].append(new)
                self.event("replica-replaced", f"replica {r['name']} (disk {r['disk']} "
                           f"unavailable) replaced by {new['name']} on disk {new['disk']}",
                           doc["name"], level="warning")
                return await self._rebuild(doc, new, modes, why="new replica")
        for r in live:
            if r["state"] == "pending":
                return await self._rebuild(doc, r, modes, why="new replica")
        return False

    def _note_health(self, doc: dict[str, Any], info: dict[str, Any]) -> None:
        """An event when the volume's health changes."""
        now = health(doc, info)
        before = self._last_health.get(doc["name"])
        self._last_health[doc["name"]] = now
        if before is not None and before != now:
            self.event(f"volume-{now}", f"volume {doc['name']} is {now} (was {before})",
                       doc["name"], level="info" if now == "healthy" else "warning")

    async def _drop_abandoned(self, doc: dict[str, Any]) -> None:
        """Delete the data of replaced replicas whose disk came back."""
        for r in list(doc["replicas"]):
            if r["state"] != "abandoned":
                continue
            state = self._disks.state(r["disk"])
            if state == "ready":
                await asyncio.to_thread(shutil.rmtree, r["path"], True)
                doc["replicas"].remove(r)
                self._records.save(doc)
                self.event("replica-cleaned", f"disk {r['disk']} is back: data of replaced "
                           f"replica {r['name']} deleted", doc["name"])
            elif state is None:
                doc["replicas"].remove(r)
                self._records.save(doc)

    async def _rebuild(self, doc: dict[str, Any], rep: dict[str, Any], modes: dict[str, Any],
                      why: str) -> bool:
        """Rebuild ``rep`` online: by its own process, or as the engine's local replica.

        ``modes`` is the engine's report of each replica it holds.  True if the
        engine's membership changed.
        """
        # Marked before the process starts (and saved with it): between the start and the
        # engine taking it in WO mode, the cached engine info may still list the old process
        # as RW, and the volume must not be reported healthy in that window.
        rep["rebuilding"] = True
        if locality.wants_local(doc, rep, self.attach_node(doc),
                                self.locality(doc)):
            return await self._rebuild_local(doc, rep, modes, why)
        rep["local"] = False
        listed = modes.get(rep["name"])
        forgotten = False
        if listed is not None and listed.get("local"):
            # The engine holds its chain (and its directory's lock): released first.
            try:
                await self._engines.forget(doc, rep["name"])
            except ApiError as exc:
                self._replicas.fail(doc, rep, f"rebuild could not start: {exc}")
                return True
            listed, forgotten = None, True
        if not await self._replicas.start(doc, rep):
            return forgotten
        ends = process_endpoints(rep) or {}
        try:
            if listed is not None:
                await self._engines.forget(doc, rep["name"])
            await self._engines.call(doc, "POST", "/v1/replicas", json={
                "name": rep["name"], "url": ends.get("control")})
        except ApiError as exc:
            await self._replicas.stop(rep, 5.0)
            self._replicas.fail(doc, rep, f"rebuild could not start: {exc}")
            return True
        self.event("rebuild-started", f"replica {rep['name']} on disk {rep['disk']}: {why}",
                   doc["name"])
        return True

    async def _rebuild_local(self, doc: dict[str, Any], rep: dict[str, Any],
                             modes: dict[str, Any], why: str) -> bool:
        """Rebuild ``rep`` as the replica the engine serves itself, in place (by delta)."""
        problem = self._disks.problem(rep)
        if problem:
            self._replicas.fail(doc, rep, problem)
            return False
        listed = modes.get(rep["name"])
        body: dict[str, Any] = {"name": rep["name"], "directory": rep["path"]}
        try:
            if listed is not None and listed.get("local") and listed["mode"] == "ERR":
                body = {"name": rep["name"]}  # the engine re-opens its chain if it must
            elif listed is not None:
                await self._engines.forget(doc, rep["name"])
            # A process that served it must be gone before the engine takes its directory.
            await self._replicas.stop(rep)
            rep.update(local=True, proc=None, state="running", error=None)
            self._records.save(doc)
            await self._engines.call(doc, "POST", "/v1/replicas", json=body)
        except ApiError as exc:
            self._replicas.fail(doc, rep, f"rebuild could not start: {exc}")
            return True
        self.event("rebuild-started", f"replica {rep['name']} on disk {rep['disk']}: {why} "
                   "(local: served by the engine, no process)", doc["name"])
        return True

    async def _locality_changed(self, doc: dict[str, Any], before: str, after: str) -> None:
        """Say what a locality change does now; on an attached volume, start doing it."""
        name = doc["name"]
        if doc["state"] != "attached":
            self.event("data-locality", f"volume {name}: data locality {before} -> {after}; "
                       "it applies at the next attach", name)
            return
        self.event("data-locality", f"volume {name}: data locality {before} -> {after}, "
                   "applied online now", name)
        info = await self._engines.refresh(doc)
        if info is None or rebuild_running(info.get("rebuild")):
            return  # the healer applies it once the engine answers and no rebuild runs
        await self._keep_locality(doc, {r["name"]: r for r in info["replicas"]})

    async def _keep_locality(self, doc: dict[str, Any], modes: dict[str, Any]) -> bool:
        """One step towards the volume's data locality on its attach node, online.

        Called when no rebuild runs; ``modes`` is the engine's report of each
        replica it holds.  True if the engine's membership changed.
        """
        name, node = doc["name"], self.attach_node(doc)
        where = self.locality(doc)
        live = locality.live(doc)
        rw = {r["name"] for r in live if (modes.get(r["name"]) or {}).get("mode") == "RW"}
        for r in live:
            if (r.get("replaces_remote") and r["name"] in rw and r["state"] == "running"
                    and not r.get("rebuilding")):
                return await self._drop_remote(doc, r, modes)
        if where == DISABLED:
            served = [r for r in live
                      if r.get("local") and r["name"] in rw and r["state"] == "running"]
            if not served:
                return False
            if len(rw) < 2:
                return self._locality_note(doc, f"replica {served[0]['name']} stays in the "
                                  "engine while it is the only RW replica; data "
                                  "locality disabled applies at the next attach")
            r = served[0]
            self.event("data-locality", f"volume {name}: replica {r['name']} leaves the "
                       "engine for its own process (delta rebuild in place)", name)
            return await self._rebuild(doc, r, modes, why="data locality disabled")
        if any(r.get("local") for r in live):
            self._locality_notes.pop(name, None)
            return False  # served already, or failed and the repair rebuilds it locally
        on_node = [r for r in live if r["node"] == node]
        ready = [r for r in on_node if r["name"] in rw and r["state"] == "running"]
        if ready:
            if len(rw) < 2:
                return self._locality_note(doc, f"replica {ready[0]['name']} cannot leave the "
                                  "engine's mirror while it is the only RW replica; "
                                  f"data locality {where} applies at the next attach")
            r = ready[0]
            self.event("data-locality", f"volume {name}: replica {r['name']} on node {node} "
                       "becomes local: its process stops and the engine serves it (delta "
                       "rebuild in place, its data is reused)", name)
            return await self._rebuild(doc, r, modes, why=f"data locality {where}")
        if on_node or where != locality.BEST_EFFORT:
            return False  # one there is still rebuilding: it becomes local when rebuilt
        try:
            (new,) = self._replicas.place(doc, 1, only_node=node)
        except PlacementError as exc:
            return self._locality_note(doc, f"node {node} holds none of its replicas and "
                              f"none can be placed there: {exc}")
        new["replaces_remote"] = True
        doc["replicas"].append(new)
        self._records.save(doc)
        self.event("data-locality", f"volume {name} is attached on node {node}, which holds "
                   f"none of its replicas: building {new['name']} on disk {new['disk']} as "
                   "its local replica (online rebuild); a remote replica goes once it is RW",
                   name)
        return await self._rebuild(doc, new, modes,
                                            why="local replica for data locality")

    async def _drop_remote(self, doc: dict[str, Any], rep: dict[str, Any],
                           modes: dict[str, Any]) -> bool:
        """The local replica ``rep`` built for locality is RW: one remote replica goes."""
        rep.pop("replaces_remote", None)
        live = locality.live(doc)
        victim = locality.remote_victim(doc, self.attach_node(doc), modes)
        if victim is None or len(live) <= doc["replica_count"]:
            self._records.save(doc)
            return False
        self.event("data-locality", f"volume {doc['name']}: local replica {rep['name']} is "
                   f"RW; remote replica {victim['name']} (node {victim['node']}, disk "
                   f"{victim['disk']}) goes", doc["name"])
        await self._replicas.remove(doc, victim)
        self._records.save(doc)
        return True

    def _locality_note(self, doc: dict[str, Any], message: str) -> bool:
        """An event (once per engine start, not every heal pass) saying why the locality is
        not met; False."""
        name = doc["name"]
        # Keyed by the epoch too: each attach starts the engine with a new one, and what
        # still holds after it is said again.
        said = (doc.get("epoch"), message)
        if self._locality_notes.get(name) != said:
            self._locality_notes[name] = said
            self.event("data-locality-unmet", f"volume {name}: {message}", name,
                       level="warning")
        return False


def _expand_offline(doc: dict[str, Any], new: int) -> None:
    """Grow every replica of a detached volume to ``new`` bytes, in its files."""
    from drove.replica.chain import Replica

    for r in doc["replicas"]:
        if (Path(r["path"]) / "volume.meta").exists():
            rep = Replica.open(r["path"])
            try:
                rep.expand(new)
            finally:
                rep.close()
