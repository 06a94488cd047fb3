"""The manager: volumes, disks, settings and events, kept in the store and made real by the agent.

Every operation on a volume holds that volume's lock, so an API call and the
healer never act on one volume at once.  Stored documents say what *should*
be (``desired``) and what was last done; the healer's loop closes the gap:
failed replicas are restarted in place (a delta rebuild) or, when their disk is
gone, replaced on another disk (a full rebuild).

With data locality (``drove.manager.locality``) one replica on the attach node
is served by the engine itself: it has no process of its own, so its "process"
is the engine, and its NBD and control addresses are the engine's to tell
(:meth:`Manager.replica_endpoints`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from drove.agent import disks as disklib
from drove.agent.node import NodeAgent
from drove.agent.processes import ProcessStartError
from drove.manager import locality
from drove.manager.errors import ApiError, to_size, validate_name
from drove.manager.labels import SNAPSHOT_ID_LABEL
from drove.manager.locality import DISABLED, STRICT_LOCAL
from drove.manager.placement import PlacementError, place
from drove.manager.store import Store, now_iso
from drove.units import parse_size

log = logging.getLogger("drove.manager")

DEFAULT_SETTINGS: dict[str, Any] = {
    "over_provisioning_percent": 100,
    "default_replicas": 3,
    "replica_timeout": 8.0,
    "heal_interval": 1.0,
    "failed_replica_retry_seconds": 5.0,
    "default_data_locality": locality.DEFAULT_LOCALITY,
}
SETTING_CHOICES: dict[str, tuple[str, ...]] = {
    "default_data_locality": locality.LOCALITIES,
}
SETTING_LIMITS: dict[str, tuple[float, float]] = {
    "over_provisioning_percent": (10, 10000),
    "default_replicas": (1, 10),
    "replica_timeout": (0.5, 600),
    "heal_interval": (0.1, 60),
    "failed_replica_retry_seconds": (0.5, 3600),
}


EventFn = Callable[..., None]
"""Records an event: (kind, message, volume=None, level="info")."""


class VolumeGuard(Protocol):
    """What else holds a volume now: asked before it is attached, detached, deleted or
    loses a snapshot (the backups' tasks, wired in drove.manager.app)."""

    def busy(self, volume: str) -> str | None:
        """Why ``volume`` must not be detached or lose snapshots now (None: it may)."""

    def restore_task(self, volume: str) -> str | None:
        """The id of the task restoring a backup into ``volume`` (None when there is none)."""


class Manager:
    """Volumes, disks and settings of a one-node drove."""

    def __init__(self, store: Store, agent: NodeAgent, data_dir: Path, *, event: EventFn,
                 guard: VolumeGuard) -> None:
        self.store = store
        self.agent = agent
        self.data_dir = data_dir
        self._event = event
        self._guard = guard
        self.engine_info: dict[str, dict[str, Any]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._http = httpx.AsyncClient(timeout=30)
        self._heal_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_health: dict[str, str] = {}
        self._locality_notes: dict[str, str] = {}  # volume -> why its locality is unmet

    # ------------------------------------------------------------ basics

    def lock(self, volume: str) -> asyncio.Lock:
        """The lock every operation on ``volume`` holds."""
        return self._locks.setdefault(volume, asyncio.Lock())

    def event(self, kind: str, message: str, volume: str | None = None,
              level: str = "info") -> None:
        """Record what the system did and why."""
        self._event(kind, message, volume, level)

    @property
    def http(self) -> httpx.AsyncClient:
        """The HTTP client the manager reaches engines and replicas with."""
        return self._http

    def settings(self) -> dict[str, Any]:
        """Every setting with its value."""
        stored = self.store.get("settings", "global") or {}
        return {k: stored.get(k, v) for k, v in DEFAULT_SETTINGS.items()}

    def update_settings(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change settings (ApiError 422 for unknown names or values out of range)."""
        current = self.settings()
        if not changes:
            return current
        for key, value in changes.items():
            if key not in DEFAULT_SETTINGS:
                raise ApiError(422, f"unknown setting {key!r}; settings are: "
                                    + ", ".join(DEFAULT_SETTINGS))
            if key in SETTING_CHOICES:
                if value not in SETTING_CHOICES[key]:
                    raise ApiError(422, f"setting {key} must be one of "
                                        f"{', '.join(SETTING_CHOICES[key])}, not {value!r}")
                current[key] = value
                continue
            lo, hi = SETTING_LIMITS[key]
            kind = type(DEFAULT_SETTINGS[key])
            try:
                num = kind(value)
            except (TypeError, ValueError) as exc:
                raise ApiError(422, f"setting {key} must be a number, not {value!r}") from exc
            if isinstance(value, bool) or not lo <= num <= hi:
                raise ApiError(422, f"setting {key} must be between {lo} and {hi}")
            current[key] = num
        self.store.put("settings", "global", current)
        self.event("settings-changed", f"settings changed: {changes}")
        return current

    # ------------------------------------------------------- nodes, disks

    def ensure_node(self) -> None:
        """Register this node and its default disk (the data directory)."""
        self.store.put("nodes", self.agent.name, {"name": self.agent.name,
                                                  "address": self.agent.address})
        if not self.store.list("disks"):
            self.add_disk(str(self.data_dir), tags=[], reserved=0, name="default")

    def nodes(self) -> list[dict[str, Any]]:
        """Every node with its disks."""
        all_disks = self.disks()
        return [{"name": n["name"], "address": n["address"], "state": "up",
                 "disks": [d for d in all_disks if d["node"] == n["name"]]}
                for n in self.store.list("nodes")]

    def disks(self) -> list[dict[str, Any]]:
        """Every disk with its live state, capacity, free and scheduled space."""
        volumes = self.store.list("volumes")
        out = []
        for d in self.store.list("disks"):
            status = disklib.disk_status(d["path"], d["id"])
            reps = [(v, r) for v in volumes for r in v["replicas"]
                    if r["disk"] == d["name"] and r["state"] != "abandoned"]
            out.append({"name": d["name"], "node": d["node"], "path": d["path"],
                        "tags": d["tags"], "reserved": d["reserved"], **status,
                        "scheduled": sum(v["size"] for v, _ in reps), "replicas": len(reps)})
        return out

    def disk(self, name: str) -> dict[str, Any]:
        """One disk with its live state (ApiError 404)."""
        for d in self.disks():
            if d["name"] == name:
                return d
        raise ApiError(404, f"no disk {name!r}; `drove disk list` shows them")

    def add_disk(self, path: str, *, tags: list[str], reserved: int | str = 0,
                 name: str | None = None) -> dict[str, Any]:
        """Add a directory as a disk of this node."""
        p = Path(path).expanduser()
        if not p.is_absolute():
            raise ApiError(422, f"disk path {path!r} must be absolute")
        p = p.resolve()
        existing = self.store.list("disks")
        for d in existing:
            if Path(d["path"]) == p:
                raise ApiError(409, f"{p} is disk {d['name']} already")
        name = validate_name("disk", name or f"disk{len(existing)}")
        if self.store.get("disks", name):
            raise ApiError(409, f"disk {name!r} exists; choose another --name")
        for t in tags:
            validate_name("tag", t)
        reserved_bytes = parse_size(reserved) if reserved else 0
        try:
            disk_id = disklib.init_disk(p, name)
        except disklib.DiskError as exc:
            raise ApiError(422, str(exc)) from exc
        self.store.put("disks", name, {"name": name, "node": self.agent.name, "path": str(p),
                                       "tags": sorted(set(tags)), "reserved": reserved_bytes,
                                       "id": disk_id})
        self.event("disk-added", f"disk {name} added at {p} (tags: {', '.join(tags) or 'none'})")
        return self.disk(name)

    def remove_disk(self, name: str, force: bool = False) -> dict[str, Any]:
        """Forget a disk (refused while replicas live there unless ``force``)."""
        d = self.disk(name)
        if d["replicas"] and not force:
            raise ApiError(409, f"disk {name} holds {d['replicas']} replica(s); move them first "
                                "(lower and raise the volumes' replica counts) or use --force")
        self.store.delete("disks", name)
        self.event("disk-removed", f"disk {name} ({d['path']}) removed")
        return {"deleted": name}

    # ----------------------------------------------------------- volumes

    def record(self, name: str) -> dict[str, Any]:
        """The stored document of volume ``name`` (ApiError 404)."""
        doc = self.store.get("volumes", name)
        if doc is None:
            raise ApiError(404, f"no volume {name!r}; `drove volume list` shows them")
        return doc

    def save(self, doc: dict[str, Any]) -> None:
        """Store a volume's document."""
        self.store.put("volumes", doc["name"], doc)

    def volumes(self) -> list[dict[str, Any]]:
        """Every volume as the API shows it."""
        return [self.view(v) for v in self.store.list("volumes")]

    def volume(self, name: str) -> dict[str, Any]:
        """One volume as the API shows it."""
        return self.view(self.record(name))

    def locality(self, doc: dict[str, Any]) -> str:
        """The volume's data locality (stored before the setting existed: the default)."""
        return locality.locality_of(doc, self.settings()["default_data_locality"])

    def view(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A stored volume merged with what its engine reports now."""
        info = self.engine_info.get(doc["name"]) if doc["state"] == "attached" else None
        modes = {r["name"]: r for r in (info or {}).get("replicas", [])}
        rebuild = (info or {}).get("rebuild")
        running = rebuild if _rebuild_running(rebuild) else None
        replicas = []
        for r in doc["replicas"]:
            if r["state"] == "abandoned":
                continue
            live = modes.get(r["name"])
            mode = live["mode"] if live else ("ERR" if r["state"] == "failed" else "stopped")
            prog = None
            if running and running.get("replica") == r["name"]:
                prog = {"done": running["bytes_done"], "total": running["bytes_total"]}
            replicas.append({"name": r["name"], "disk": r["disk"], "node": r["node"],
                             "path": r["path"], "mode": mode, "state": r["state"],
                             "local": bool(r.get("local")),
                             "pid": (r.get("proc") or {}).get("pid")
                             if r["state"] == "running" else None,
                             "error": r.get("error") or (live or {}).get("error"),
                             "rebuild": prog})
        host = doc.get("host") or {}
        engine = doc.get("engine")
        return {
            "name": doc["name"], "size": doc["size"], "replica_count": doc["replica_count"],
            "pool": doc["pool"], "labels": doc["labels"], "created": doc["created"],
            "data_locality": self.locality(doc),
            "state": "restoring" if doc.get("restoring") else doc["state"],
            "node": doc.get("node") if doc["state"] == "attached" else None,
            "health": self._health(doc, info),
            "nbd_uri": (engine or {}).get("ready", {}).get("nbd") if engine else None,
            "nbd_unix": (engine or {}).get("ready", {}).get("nbd_unix") if engine else None,
            "device": host.get("device"), "mountpoint": host.get("mountpoint"),
            "fs": host.get("fs"),
            "engine": {"pid": engine["pid"], "control_url": engine["ready"].get("control"),
                       "epoch": doc.get("epoch")}
            if engine else None,
            "rebuild": ({"replica": running["replica"], "done": running["bytes_done"],
                         "total": running["bytes_total"]} if running else None),
            "replicas": replicas,
        }

    @staticmethod
    def _health(doc: dict[str, Any], info: dict[str, Any] | None) -> str:
        live = [r for r in doc["replicas"] if r["state"] != "abandoned"]
        if info is not None:
            rw = sum(1 for r in info.get("replicas", []) if r["mode"] == "RW")
            if info.get("faulted") or rw == 0:
                return "faulted"
            ok = (rw >= doc["replica_count"] and rw == len(live)
                  and all(r["state"] == "running" and not r.get("rebuilding") for r in live))
            return "healthy" if ok else "degraded"
        good = sum(1 for r in live if r["state"] in ("stopped", "running", "pending"))
        if good == 0:
            return "faulted"
        ok = good >= doc["replica_count"] and all(r["state"] != "failed" for r in live)
        return "healthy" if ok else "degraded"

    def _new_replicas(self, doc: dict[str, Any], count: int,
                      only_node: str | None = None) -> list[dict[str, Any]]:
        """Place ``count`` more replicas of ``doc`` (PlacementError says why not).

        With data locality the node the volume is (or will be) attached on is
        preferred; ``only_node`` restricts the choice to that node's disks.
        """
        all_disks = self.disks()
        used_names = {r["disk"] for r in doc["replicas"]
                      if r["state"] not in ("abandoned",)}
        used = [d for d in all_disks if d["name"] in used_names]
        if only_node is not None:
            all_disks = [d for d in all_disks if d["node"] == only_node]
            if not all_disks:
                raise PlacementError(f"node {only_node} has no disk")
        prefer = self.attach_node(doc) if self.locality(doc) != DISABLED else None
        chosen = place(count, doc["size"], all_disks, pool=doc["pool"], used=used,
                       overprovision_percent=self.settings()["over_provisioning_percent"],
                       prefer_node=prefer)
        out = []
        for d in chosen:
            doc["next_replica"] = doc.get("next_replica", 0) + 1
            name = f"{doc['name']}-r{doc['next_replica']}"
            path = Path(d["path"]) / "replicas" / f"{name}-{secrets.token_hex(3)}"
            out.append({"name": name, "disk": d["name"], "node": d["node"], "path": str(path),
                        "state": "pending", "proc": None, "error": None, "retry_at": 0})
        return out

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
        if self.store.get("volumes", name) is not None:
            raise ApiError(409, f"volume {name!r} exists; choose another name or delete it")
        doc: dict[str, Any] = {
            "name": name, "size": size_bytes, "replica_count": count, "pool": pool,
            "labels": dict(labels or {}), "created": now_iso(), "desired": "detached",
            "state": "detached", "mount": None, "engine": None, "host": None,
            "replicas": [], "next_replica": 0, "initialized": False,
            "data_locality": where,
        }
        try:
            doc["replicas"] = self._new_replicas(doc, count)
        except PlacementError as exc:
            raise ApiError(409, str(exc)) from exc
        self.store.put("volumes", name, doc, expect_version=0)
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
                self._check_not_busy(doc, "delete")
            if doc["state"] != "detached":
                if not force:
                    raise ApiError(409, f"volume {name} is {doc['state']}; detach it first "
                                        "(`drove volume detach`) or use --force")
                await self._detach(doc, keep_desired=False)
            for r in doc["replicas"]:
                await asyncio.to_thread(shutil.rmtree, r["path"], True)
            with contextlib.suppress(OSError):
                shutil.rmtree(self._volume_dir(name))
            self.store.delete("volumes", name)
            self.event("volume-deleted", f"volume {name} deleted", name)
        self._locks.pop(name, None)
        return {"deleted": name}

    def _volume_dir(self, name: str) -> Path:
        return self.data_dir / "volumes" / name

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
                await self.refresh(doc)
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

    async def _locality_changed(self, doc: dict[str, Any], before: str, after: str) -> None:
        """Say what a locality change does now; on an attached volume, start doing it."""
        name = doc["name"]
        if doc["state"] != "attached":
            self.event("data-locality", f"volume {name}: data locality {before} -> {after}; "
                       "it applies at the next attach", name)
            return
        self.event("data-locality", f"volume {name}: data locality {before} -> {after}, "
                   "applied online now", name)
        info = await self.refresh(doc)
        if info is None or _rebuild_running(info.get("rebuild")):
            return  # the healer applies it once the engine answers and no rebuild runs
        await self._keep_locality(doc, {r["name"]: r for r in info["replicas"]})

    async def _set_replica_count(self, doc: dict[str, Any], count: int) -> None:
        live = [r for r in doc["replicas"] if r["state"] != "abandoned"]
        if count > len(live):
            try:
                doc["replicas"] += self._new_replicas(doc, count - len(live))
            except PlacementError as exc:
                raise ApiError(409, str(exc)) from exc
        else:
            order = {"failed": 0, "pending": 1, "stopped": 2, "running": 3}
            modes = {r["name"]: r["mode"] for r in
                     (self.engine_info.get(doc["name"]) or {}).get("replicas", [])}
            node = self.attach_node(doc)
            # The local replica (and others on the attach node) go last: data locality.
            victims = sorted(live, key=lambda r: (order.get(r["state"], 0),
                                                  modes.get(r["name"]) == "RW",
                                                  r["node"] == node, bool(r.get("local"))))
            for r in victims[:len(live) - count]:
                await self._remove_replica(doc, r)
        old = doc["replica_count"]
        doc["replica_count"] = count
        self.event("volume-replicas-changed", f"volume {doc['name']}: replica count "
                   f"{old} -> {count}", doc["name"])

    async def _remove_replica(self, doc: dict[str, Any], rep: dict[str, Any]) -> None:
        if doc["state"] == "attached" and doc.get("engine"):
            try:
                await self._engine_call(doc, "DELETE", f"/v1/replicas/{rep['name']}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
        await asyncio.to_thread(self.agent.stop, rep.get("proc"))
        await asyncio.to_thread(shutil.rmtree, rep["path"], True)
        doc["replicas"].remove(rep)
        self.event("replica-removed", f"replica {rep['name']} removed from disk {rep['disk']}",
                   doc["name"])

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
                await self._engine_call(doc, "POST", "/v1/expand", json={"size": new})
            else:
                await asyncio.to_thread(self._expand_offline, doc, new)
            old, doc["size"] = doc["size"], new
            self.save(doc)
            if doc["state"] == "attached":
                await self.refresh(doc)
            self.event("volume-expanded", f"volume {name} expanded from {old} to {new} bytes",
                       name)
            return self.view(doc)

    @staticmethod
    def _expand_offline(doc: dict[str, Any], new: int) -> None:
        from drove.replica.chain import Replica

        for r in doc["replicas"]:
            if (Path(r["path"]) / "volume.meta").exists():
                rep = Replica.open(r["path"])
                try:
                    rep.expand(new)
                finally:
                    rep.close()

    # ----------------------------------------------------------- attach

    def _check_not_restoring(self, doc: dict[str, Any], internal: bool) -> None:
        if doc.get("restoring") and not internal:
            task = self._guard.restore_task(doc["name"]) or "?"
            raise ApiError(409, f"volume {doc['name']} is being restored from backup "
                                f"{doc['restoring'].get('backup')} (task {task}); wait for it "
                                f"(`drove task wait {task}`) or cancel it")

    def _check_not_busy(self, doc: dict[str, Any], what: str) -> None:
        why = self._guard.busy(doc["name"])
        if why:
            raise ApiError(409, f"cannot {what} volume {doc['name']} now: {why}; wait for the "
                                "task or cancel it (`drove task cancel ID`)")

    def attach_node(self, doc: dict[str, Any]) -> str:
        """The node ``doc`` is attached on, or would be by default (this manager's own)."""
        return doc.get("node") or self.agent.name

    def check_attach_node(self, doc: dict[str, Any], node: str | None) -> str:
        """The node to attach ``doc`` on (default: this manager's), or ApiError 409 why not.

        A strict-local volume attaches only where its replica lives; and this
        manager starts engines only on its own node.
        """
        node = node or self.agent.name
        locality.check_attach_node(doc, node, self.locality(doc))
        if node != self.agent.name:
            raise ApiError(409, f"volume {doc['name']}: cannot attach on node {node}: this "
                                f"manager starts engines on its own node ({self.agent.name}) "
                                "only")
        return node

    async def attach(self, name: str, mount: str | None = None,
                     fs: str = "ext4", _internal: bool = False,
                     node: str | None = None) -> dict[str, Any]:
        """Start replicas and engine on ``node`` (default: this manager's) and give the host
        a device, mounted at ``mount``."""
        if fs not in ("ext4", "xfs"):
            raise ApiError(422, f"unsupported filesystem {fs!r}: use ext4 or xfs")
        if mount is not None:
            _check_mount_path(mount)
        async with self.lock(name):
            doc = self.record(name)
            self._check_not_restoring(doc, _internal)
            if doc["state"] == "attached":
                if mount and (doc.get("host") or {}).get("mountpoint") != mount:
                    raise ApiError(409, f"volume {name} is attached already "
                                        f"(mounted at {(doc.get('host') or {}).get('mountpoint')})"
                                        "; detach it first")
                return self.view(doc)
            doc["node"] = self.check_attach_node(doc, node)
            doc["desired"], doc["mount"] = "attached", ({"path": mount, "fs": fs}
                                                        if mount else None)
            doc["state"] = "attaching"
            self.save(doc)
            try:
                await self._attach(doc)
            except BaseException:
                doc["desired"] = "detached"
                await self._detach(doc, keep_desired=False)
                raise
            return self.view(doc)

    async def _attach(self, doc: dict[str, Any]) -> None:
        name = doc["name"]
        node = doc["node"] = self.attach_node(doc)
        self._locality_notes.pop(name, None)  # said again if still true after this attach
        first = not doc.get("initialized")
        usable = {"stopped", "pending"} if first else {"stopped"}
        for r in doc["replicas"]:
            if r["state"] in usable and (why := self._disk_problem(r)):
                self._fail(doc, r, why)
        local = (locality.choose_local(doc, node, usable)
                 if self.locality(doc) != DISABLED else None)
        for r in doc["replicas"]:
            r["local"] = r is local
        started: list[tuple[str, str]] = []
        for r in doc["replicas"]:
            if r["state"] not in usable or r is local or not await self._start_replica(doc, r):
                continue
            started.append((r["name"], (_process_endpoints(r) or {})["control"]))
        if not started and local is None:
            raise ApiError(409, f"volume {name}: no replica could be started ("
                           + "; ".join(f"{r['name']}: {r.get('error')}" for r in doc["replicas"])
                           + "); `drove event list` tells more")
        timeout = self.settings()["replica_timeout"]
        state_file = self._volume_dir(name) / "engine.state"
        # Every engine start gets a new epoch, stored before the engine runs: its replicas
        # then refuse every older engine of this volume (drove.replica.fence).
        doc["epoch"] = int(doc.get("epoch", 0)) + 1
        self.save(doc)
        try:
            proc = await asyncio.to_thread(
                self.agent.start_engine, name, started, timeout=timeout, state_file=state_file,
                epoch=doc["epoch"], local=(local["name"], local["path"]) if local else None,
                size=doc["size"])
        except ProcessStartError as exc:
            raise ApiError(409, f"engine of volume {name} did not start: {exc}") from exc
        if local is not None:
            # Its process is the engine: running while the engine runs (the healer marks it
            # failed if the engine reports it ERR, e.g. when it could not open its chain).
            local.update(state="running", proc=None, error=None)
        doc["engine"] = proc.to_json()
        doc["initialized"] = True
        self.save(doc)
        if doc.get("mount"):
            m = doc.get("mount") or {}
            try:
                doc["host"] = await asyncio.to_thread(self.agent.attach_host, name,
                                                      m.get("path"), m.get("fs", "ext4"))
            except Exception as exc:
                raise ApiError(409, f"volume {name}: host attach failed: {exc}") from exc
        doc["state"] = "attached"
        self.save(doc)
        await self.refresh(doc)
        where = f", mounted at {doc['host']['mountpoint']}" if doc.get("host") else ""
        served = (f"; replica {local['name']} is local (served by the engine)" if local
                  else "")
        self.event("volume-attached", f"volume {name} attached on node {node}: "
                   f"{proc.ready.get('nbd')}{where}{served}", name)

    def _disk_problem(self, rep: dict[str, Any]) -> str | None:
        """Why ``rep``'s disk cannot hold it now (None: it is ready)."""
        disk = self.store.get("disks", rep["disk"])
        status = disklib.disk_status(disk["path"], disk["id"]) if disk else {
            "state": "unavailable", "error": "disk removed"}
        if status["state"] != "ready":
            return f"disk {rep['disk']} unavailable: {status['error']}"
        return None

    async def _start_replica(self, doc: dict[str, Any], rep: dict[str, Any]) -> bool:
        """Start ``rep``'s process; False (recorded as failed) if its disk or process fails."""
        why = self._disk_problem(rep)
        if why:
            self._fail(doc, rep, why)
            return False
        try:
            proc = await asyncio.to_thread(self.agent.start_replica, doc["name"], rep,
                                           doc["size"])
        except ProcessStartError as exc:
            self._fail(doc, rep, f"process did not start: {exc}")
            return False
        rep.update(proc=proc.to_json(), state="running", error=None)
        self.save(doc)
        return True

    def _fail(self, doc: dict[str, Any], rep: dict[str, Any], why: str) -> None:
        # The first retry is immediate; a replica failing again and again backs off.
        failures = rep.get("failures", 0)
        delay = min(300.0, self.settings()["failed_replica_retry_seconds"] * (2 ** failures)
                    if failures else 0.0)
        if rep["state"] != "failed":
            self.event("replica-failed", f"replica {rep['name']} on disk {rep['disk']} "
                       f"failed: {why}", doc["name"], level="warning")
        rep.update(state="failed", error=why, retry_at=time.time() + delay,
                   failures=failures + 1, rebuilding=False)
        self.save(doc)

    async def detach(self, name: str, force: bool = False,
                     _internal: bool = False) -> dict[str, Any]:
        """Unmount, release devices, stop engine and replicas."""
        async with self.lock(name):
            doc = self.record(name)
            if doc["state"] == "detached":
                return self.view(doc)
            if not _internal:
                self._check_not_busy(doc, "detach")
            await self._detach(doc, keep_desired=False, force=force)
            return self.view(doc)

    async def _detach(self, doc: dict[str, Any], *, keep_desired: bool,
                      force: bool = False) -> None:
        name = doc["name"]
        doc["state"] = "detaching"
        self.save(doc)
        try:
            await asyncio.to_thread(self.agent.detach_host, name, doc.get("host"))
        except Exception as exc:
            if not force:
                doc["state"] = "attached"
                self.save(doc)
                raise ApiError(409, f"volume {name}: cannot release the host device: {exc}; "
                                    "stop what uses the mount, or detach with --force") from exc
            self.event("detach-forced", f"volume {name}: host device not released: {exc}",
                       name, level="warning")
        doc["host"] = None
        await self._stop_processes(doc)
        # A replica the engine had dropped holds stale data: it must be rebuilt, never
        # started as a peer of the good ones.
        info = self.engine_info.pop(name, None) or {}
        bad = {r["name"] for r in info.get("replicas", []) if r["mode"] != "RW"}
        for r in doc["replicas"]:
            if r["name"] in bad and r["state"] == "stopped":
                r.update(state="failed", error="was not RW when the volume was detached")
        doc["state"] = "detached"
        if not keep_desired:
            doc["desired"], doc["mount"], doc["node"] = "detached", None, None
        self.save(doc)
        self.event("volume-detached", f"volume {name} detached", name)

    async def _stop_processes(self, doc: dict[str, Any]) -> None:
        """Stop the engine (it flushes to every replica first), then the replicas at once."""
        await asyncio.to_thread(self.agent.stop, doc.get("engine"))
        doc["engine"] = None
        await asyncio.gather(*(asyncio.to_thread(self.agent.stop, r.get("proc"))
                               for r in doc["replicas"]))
        for r in doc["replicas"]:
            r["proc"] = None
            if r["state"] == "running":
                r["state"] = "stopped"

    # -------------------------------------------------------- engine calls

    async def _engine_call(self, doc: dict[str, Any], method: str, path: str,
                           timeout: float = 600, **kwargs: Any) -> Any:
        engine = doc.get("engine")
        if doc["state"] != "attached" or not engine:
            raise ApiError(409, f"volume {doc['name']} is {doc['state']}: attach it first "
                                f"(`drove volume attach {doc['name']}`)")
        url = engine["ready"]["control"] + path
        try:
            r = await self._http.request(method, url, timeout=timeout, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(503, f"engine of volume {doc['name']} does not answer: {exc!r}; "
                                "the healer restarts it") from exc
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code if r.status_code < 500 else 502,
                           f"volume {doc['name']}: {detail}")
        return r.json() if r.content else None

    async def engine_stats(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The I/O statistics of an attached volume's engine (ApiError when unavailable)."""
        stats: dict[str, Any] = await self._engine_call(doc, "GET", "/v1/stats", timeout=2)
        return stats

    async def refresh(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """What the volume's engine reports now (None when it does not answer)."""
        try:
            info = await self._engine_call(doc, "GET", "/v1/info", timeout=5)
        except ApiError:
            return None
        self.engine_info[doc["name"]] = info
        return info

    # --------------------------------------------------------- snapshots

    async def snapshots(self, name: str) -> list[dict[str, Any]]:
        """The volume's snapshot tree (the head included, marked ``head``)."""
        doc = self.record(name)
        if doc["state"] != "attached":
            layers = await asyncio.to_thread(self._layers_offline, doc)
        else:
            layers = await self._engine_call(doc, "GET", "/v1/snapshots")
        return _snapshot_tree(layers)

    @staticmethod
    def _layers_offline(doc: dict[str, Any]) -> list[dict[str, Any]]:
        from drove.replica.chain import Replica
        from drove.replica.control import layer_json
        from drove.replica.errors import ReplicaError

        for r in doc["replicas"]:
            if r["state"] == "stopped" and (Path(r["path"]) / "volume.meta").exists():
                try:
                    rep = Replica.open(r["path"])
                except ReplicaError:
                    continue
                try:
                    return [layer_json(la) for la in rep.layers() if not la.removed]
                finally:
                    rep.close()
        return []

    async def create_snapshot(self, name: str, snapshot: str | None = None,
                              labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Snapshot the volume (it must be attached)."""
        snap = snapshot or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime())
        # An identity all replicas share: what backups recognise their base by.
        labels = {SNAPSHOT_ID_LABEL: secrets.token_hex(8), **(labels or {})}
        async with self.lock(name):
            doc = self.record(name)
            res = await self._engine_call(doc, "POST", "/v1/snapshots",
                                          json={"name": snap, "labels": labels})
        pause = (res or {}).get("pause_ms")
        self.event("snapshot-created", f"snapshot {snap} of volume {name} created"
                   + (f" (I/O paused {pause} ms)" if pause is not None else ""), name)
        for s in await self.snapshots(name):
            if s["name"] == snap:
                return s
        raise ApiError(500, f"snapshot {snap} was created but is not listed")

    async def delete_snapshot(self, name: str, snapshot: str) -> dict[str, Any]:
        """Delete a snapshot (its data folds into its child)."""
        async with self.lock(name):
            doc = self.record(name)
            self._check_not_busy(doc, f"delete snapshot {snapshot} of")
            await self._engine_call(doc, "DELETE", f"/v1/snapshots/{snapshot}")
        self.event("snapshot-deleted", f"snapshot {snapshot} of volume {name} deleted", name)
        return {"deleted": snapshot}

    async def revert(self, name: str, snapshot: str) -> dict[str, Any]:
        """Revert the volume to a snapshot (attached, with no client connected)."""
        async with self.lock(name):
            doc = self.record(name)
            if doc.get("host"):
                raise ApiError(409, f"volume {name} is in use by the host "
                                    f"({doc['host'].get('mountpoint') or doc['host']['device']}); "
                                    f"detach it and attach without --mount, then revert")
            await self._engine_call(doc, "POST", "/v1/revert", json={"snapshot": snapshot})
            self.event("volume-reverted", f"volume {name} reverted to snapshot {snapshot}",
                       name)
            return self.view(doc)

    async def export_snapshot(self, name: str, snapshot: str) -> dict[str, Any]:
        """A read-only NBD URI serving ``snapshot`` (from a healthy replica)."""
        doc = self.record(name)
        if not any(s["name"] == snapshot and not s.get("head")
                   for s in await self.snapshots(name)):
            raise ApiError(404, f"volume {name} has no snapshot {snapshot!r}; "
                                f"`drove snapshot list {name}` shows them")
        info = await self.refresh(doc) or {}
        rw = {r["name"] for r in info.get("replicas", []) if r["mode"] == "RW"}
        for r in doc["replicas"]:
            ends = await self.replica_endpoints(doc, r) if r["name"] in rw else None
            if ends is not None:
                return {"volume": name, "snapshot": snapshot,
                        "nbd_uri": f"{ends['nbd']}/snapshot/{snapshot}", "read_only": True}
        raise ApiError(409, f"volume {name} has no healthy replica to serve {snapshot} from")

    async def replica_endpoints(self, doc: dict[str, Any],
                                rep: dict[str, Any]) -> dict[str, str] | None:
        """Where replica ``rep`` of ``doc`` is served now: ``nbd`` (the base URI of its
        exports: ``/snapshot/NAME``, ``/layer/FILE``) and ``control`` (its API URL).

        A replica process announced both when it started.  The local replica is
        served by the engine, whose info gives its control URL (it changes when
        the engine re-opens it), and that API its NBD address.  None when it is
        not served.
        """
        if not rep.get("local"):
            return _process_endpoints(rep)
        info = await self.refresh(doc) or {}
        entry = next((r for r in info.get("replicas", [])
                      if r["name"] == rep["name"] and r.get("local")), None)
        if entry is None or not entry.get("url"):
            return None
        try:
            r = await self._http.get(f"{entry['url']}/v1/info", timeout=10)
            r.raise_for_status()
            nbd = r.json()["addresses"]["nbd"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        return {"nbd": nbd, "control": entry["url"]}

    # ------------------------------------------------------------- healer

    async def start(self) -> None:
        """Register the node, bring back what was attached, start healing."""
        self.ensure_node()
        for doc in self.store.list("volumes"):
            async with self.lock(doc["name"]):
                await self._recover(doc)
        self._heal_task = asyncio.create_task(self._heal_loop())

    async def _recover(self, doc: dict[str, Any]) -> None:
        """After a (clean or crashed) manager stop: adopt or restart the volume's processes."""
        name = doc["name"]
        engine_ok = self.agent.alive(doc.get("engine"))
        if (doc["desired"] == "attached" and engine_ok and doc["state"] == "attached"
                and await self.refresh(doc) is not None):
            self.event("volume-adopted", f"volume {name}: engine still running, adopted", name)
            return
        # Anything left of an earlier run goes; then attach afresh if it should be.
        await asyncio.to_thread(self.agent.detach_host, name, doc.get("host"), force=True)
        doc["host"] = None
        await self._stop_processes(doc)
        doc["state"] = "detached"
        self.save(doc)
        if doc["desired"] == "attached":
            doc["state"] = "attaching"
            try:
                await self._attach(doc)
            except Exception as exc:
                doc["state"] = "detached"
                self.save(doc)
                self.event("attach-failed", f"volume {name} could not be attached again: {exc}",
                           name, level="error")

    async def stop(self) -> None:
        """Stop healing; detach every volume but remember which were attached."""
        self._stopping = True
        if self._heal_task:
            self._heal_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heal_task
        for doc in self.store.list("volumes"):
            if doc["state"] == "detached":
                continue
            async with self.lock(doc["name"]):
                try:
                    await self._detach(doc, keep_desired=True)
                except ApiError as exc:
                    # Leave it serving (its mount stays usable); the next start adopts it.
                    self.event("stop-left-attached", str(exc), doc["name"], level="warning")
        await self._http.aclose()

    async def _heal_loop(self) -> None:
        while not self._stopping:
            for doc in self.store.list("volumes"):
                lock = self.lock(doc["name"])
                if doc["state"] != "attached" or lock.locked():
                    continue
                async with lock:
                    fresh = self.store.get("volumes", doc["name"])
                    if fresh is None or fresh["state"] != "attached":
                        continue
                    try:
                        await self.heal(fresh)
                    except Exception:
                        log.exception("healing volume %s", doc["name"])
            await asyncio.sleep(self.settings()["heal_interval"])

    async def heal(self, doc: dict[str, Any]) -> None:
        """One pass of self-healing over an attached volume."""
        name = doc["name"]
        if not self.agent.alive(doc.get("engine")):
            self.event("engine-failed", f"engine of volume {name} exited; restarting it",
                       name, level="error")
            await self._recover(doc)
            return
        info = await self.refresh(doc)
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
                    self._fail(doc, r, f"engine set its local replica to ERR: {why}")
                elif live["mode"] == "RW" and r.get("rebuilding"):
                    r.update(rebuilding=False, failures=0)
                    self.save(doc)
                    self.event("rebuild-finished", f"replica {r['name']} rebuilt, now RW "
                               "(local: served by the engine)", name)
                continue
            if not self.agent.alive(r.get("proc")):
                self._fail(doc, r, "process exited")
            elif live is None or live["mode"] == "ERR":
                why = (live or {}).get("error") or "not in the engine"
                await asyncio.to_thread(self.agent.stop, r.get("proc"), 5.0)
                self._fail(doc, r, f"engine set it to ERR: {why}")
            elif live["mode"] == "RW" and r.get("rebuilding"):
                r.update(rebuilding=False, failures=0)
                self.save(doc)
                self.event("rebuild-finished", f"replica {r['name']} rebuilt, now RW", name)
        self._note_health(doc, info)
        if _rebuild_running(info.get("rebuild")):
            return
        if await self._repair_one(doc, modes) or await self._keep_locality(doc, modes):
            await self.refresh(doc)
        await self._drop_abandoned(doc)

    async def _repair_one(self, doc: dict[str, Any], modes: dict[str, Any]) -> bool:
        """Start one rebuild: a failed replica in place, else a replacement, else a pending one.

        True if the engine's membership changed.
        """
        now = time.time()
        live = [r for r in doc["replicas"] if r["state"] != "abandoned"]
        for r in live:
            if r["state"] == "failed" and r.get("retry_at", 0) <= now:
                disk = self.store.get("disks", r["disk"])
                ok = disk and disklib.disk_status(disk["path"], disk["id"])["state"] == "ready"
                if ok:
                    return await self._rebuild(doc, r, modes, why="delta rebuild in place")
                # Its disk is gone: replace it elsewhere if possible; keep it for when the
                # disk returns if not.
                # A strict-local volume's replica may only live on its attach node.
                strict = self.locality(doc) == STRICT_LOCAL
                try:
                    (new,) = self._new_replicas(doc, 1, only_node=self.attach_node(doc)
                                                if strict else None)
                except PlacementError as exc:
                    r["retry_at"] = now + self.settings()["failed_replica_retry_seconds"]
                    self.save(doc)
                    log.info("volume %s: cannot replace %s yet: %s", doc["name"], r["name"], exc)
                    continue
                r["state"] = "abandoned"
                if r["name"] in modes:
                    # Out of the engine too: a local one would hold the engine's one local
                    # place (and its chain) otherwise.
                    with contextlib.suppress(ApiError):
                        await self._forget(doc, r["name"])
                doc["replicas"].append(new)
                self.event("replica-replaced", f"replica {r['name']} (disk {r['disk']} "
                           f"unavailable) replaced by {new['name']} on disk {new['disk']}",
                           doc["name"], level="warning")
                return await self._rebuild(doc, new, modes, why="new replica")
        for r in live:
            if r["state"] == "pending":
                return await self._rebuild(doc, r, modes, why="new replica")
        return False

    async def _rebuild(self, doc: dict[str, Any], rep: dict[str, Any], modes: dict[str, Any],
                       why: str) -> bool:
        """Rebuild ``rep`` online: by its own process, or as the engine's local replica.

        True if the engine's membership changed.
        """
        # Marked before the process starts (and saved with it): between the start and the
        # engine taking it in WO mode, the cached engine info may still list the old process
        # as RW, and the volume must not be reported healthy in that window.
        rep["rebuilding"] = True
        if locality.wants_local(doc, rep, self.attach_node(doc), self.locality(doc)):
            return await self._rebuild_local(doc, rep, modes, why)
        rep["local"] = False
        listed = modes.get(rep["name"])
        forgotten = False
        if listed is not None and listed.get("local"):
            # The engine holds its chain (and its directory's lock): released first.
            try:
                await self._forget(doc, rep["name"])
            except ApiError as exc:
                self._fail(doc, rep, f"rebuild could not start: {exc}")
                return True
            listed, forgotten = None, True
        if not await self._start_replica(doc, rep):
            return forgotten
        ends = _process_endpoints(rep) or {}
        try:
            if listed is not None:
                await self._forget(doc, rep["name"])
            await self._engine_call(doc, "POST", "/v1/replicas", json={
                "name": rep["name"], "url": ends.get("control")})
        except ApiError as exc:
            await asyncio.to_thread(self.agent.stop, rep.get("proc"), 5.0)
            self._fail(doc, rep, f"rebuild could not start: {exc}")
            return True
        self.event("rebuild-started", f"replica {rep['name']} on disk {rep['disk']}: {why}",
                   doc["name"])
        return True

    async def _rebuild_local(self, doc: dict[str, Any], rep: dict[str, Any],
                             modes: dict[str, Any], why: str) -> bool:
        """Rebuild ``rep`` as the replica the engine serves itself, in place (by delta)."""
        problem = self._disk_problem(rep)
        if problem:
            self._fail(doc, rep, problem)
            return False
        listed = modes.get(rep["name"])
        body: dict[str, Any] = {"name": rep["name"], "directory": rep["path"]}
        try:
            if listed is not None and listed.get("local") and listed["mode"] == "ERR":
                body = {"name": rep["name"]}  # the engine re-opens its chain if it must
            elif listed is not None:
                await self._forget(doc, rep["name"])
            # A process that served it must be gone before the engine takes its directory.
            await asyncio.to_thread(self.agent.stop, rep.get("proc"))
            rep.update(local=True, proc=None, state="running", error=None)
            self.save(doc)
            await self._engine_call(doc, "POST", "/v1/replicas", json=body)
        except ApiError as exc:
            self._fail(doc, rep, f"rebuild could not start: {exc}")
            return True
        self.event("rebuild-started", f"replica {rep['name']} on disk {rep['disk']}: {why} "
                   "(local: served by the engine, no process)", doc["name"])
        return True

    async def _forget(self, doc: dict[str, Any], replica: str) -> None:
        """Take ``replica`` out of the engine (a local one: its chain closes, its lock goes)."""
        try:
            await self._engine_call(doc, "DELETE", f"/v1/replicas/{replica}")
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def _keep_locality(self, doc: dict[str, Any], modes: dict[str, Any]) -> bool:
        """One step towards the volume's data locality on its attach node, online.

        Called when no rebuild runs.  True if the engine's membership changed.
        """
        name, node, where = doc["name"], self.attach_node(doc), self.locality(doc)
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
            (new,) = self._new_replicas(doc, 1, only_node=node)
        except PlacementError as exc:
            return self._locality_note(doc, f"node {node} holds none of its replicas and "
                                       f"none can be placed there: {exc}")
        new["replaces_remote"] = True
        doc["replicas"].append(new)
        self.save(doc)
        self.event("data-locality", f"volume {name} is attached on node {node}, which holds "
                   f"none of its replicas: building {new['name']} on disk {new['disk']} as its "
                   "local replica (online rebuild); a remote replica goes once it is RW", name)
        return await self._rebuild(doc, new, modes, why="local replica for data locality")

    async def _drop_remote(self, doc: dict[str, Any], rep: dict[str, Any],
                           modes: dict[str, Any]) -> bool:
        """The local replica ``rep`` built for locality is RW: one remote replica goes."""
        rep.pop("replaces_remote", None)
        live = locality.live(doc)
        victim = locality.remote_victim(doc, self.attach_node(doc), modes)
        if victim is None or len(live) <= doc["replica_count"]:
            self.save(doc)
            return False
        self.event("data-locality", f"volume {doc['name']}: local replica {rep['name']} is "
                   f"RW; remote replica {victim['name']} (node {victim['node']}, disk "
                   f"{victim['disk']}) goes", doc["name"])
        await self._remove_replica(doc, victim)
        self.save(doc)
        return True

    def _locality_note(self, doc: dict[str, Any], message: str) -> bool:
        """An event (once, not every heal pass) saying why the locality is not met; False."""
        name = doc["name"]
        if self._locality_notes.get(name) != message:
            self._locality_notes[name] = message
            self.event("data-locality-unmet", f"volume {name}: {message}", name,
                       level="warning")
        return False

    def _note_health(self, doc: dict[str, Any], info: dict[str, Any]) -> None:
        """An event when the volume's health changes."""
        health = self._health(doc, info)
        before = self._last_health.get(doc["name"])
        self._last_health[doc["name"]] = health
        if before is not None and before != health:
            self.event(f"volume-{health}", f"volume {doc['name']} is {health} (was {before})",
                       doc["name"], level="info" if health == "healthy" else "warning")

    async def _drop_abandoned(self, doc: dict[str, Any]) -> None:
        """Delete the data of replaced replicas whose disk came back."""
        for r in list(doc["replicas"]):
            if r["state"] != "abandoned":
                continue
            disk = self.store.get("disks", r["disk"])
            if disk and disklib.disk_status(disk["path"], disk["id"])["state"] == "ready":
                await asyncio.to_thread(shutil.rmtree, r["path"], True)
                doc["replicas"].remove(r)
                self.save(doc)
                self.event("replica-cleaned", f"disk {r['disk']} is back: data of replaced "
                           f"replica {r['name']} deleted", doc["name"])
            elif disk is None:
                doc["replicas"].remove(r)
                self.save(doc)


def _process_endpoints(rep: dict[str, Any]) -> dict[str, str] | None:
    """The NBD base URI and control URL a replica's process announced (None: no process)."""
    ready = (rep.get("proc") or {}).get("ready") or {}
    if "nbd" not in ready or "control" not in ready:
        return None
    return {"nbd": ready["nbd"], "control": ready["control"]}


def _rebuild_running(rebuild: dict[str, Any] | None) -> bool:
    """Whether the engine's rebuild report is of one still under way."""
    return bool(rebuild) and rebuild.get("state") not in ("done", "failed", "cancelled")


def _check_mount_path(mount: str) -> None:
    """Refuse a mount path that would hide something: it must be new or an empty directory."""
    p = Path(mount)
    if not p.is_absolute() or ".." in p.parts:
        raise ApiError(422, f"mount path {mount!r} must be absolute, without '..'")
    if p.is_mount():
        raise ApiError(409, f"{mount} is a mount point already; choose an empty directory")
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ApiError(409, f"{mount} exists and is not an empty directory; mounting there "
                            "would hide what it holds")


def _snapshot_tree(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers keyed by file -> snapshots keyed by name (the head is ``volume-head``).

    Removed layers (deleted snapshots whose data is not folded yet) are left out:
    their children hang from the nearest ancestor that is still there.
    """
    by_file = {la["file"]: la for la in layers}

    def visible_parent(la: dict[str, Any]) -> dict[str, Any] | None:
        parent = by_file.get(la.get("parent") or "")
        while parent is not None and parent.get("removed"):
            parent = by_file.get(parent.get("parent") or "")
        return parent

    def name(la: dict[str, Any]) -> str:
        return "volume-head" if la.get("head") else la["name"]

    shown = [la for la in layers if not la.get("removed")]
    parents = {la["file"]: visible_parent(la) for la in shown}
    return [{"name": name(la), "head": bool(la.get("head")),
             "parent": name(parents[la["file"]]) if parents[la["file"]] else None,
             "children": [name(c) for c in shown if parents[c["file"]] is la],
             "created": la.get("created"), "size": la.get("allocated", 0),
             "id": (la.get("labels") or {}).get(SNAPSHOT_ID_LABEL),
             "labels": {k: v for k, v in (la.get("labels") or {}).items()
                        if k != SNAPSHOT_ID_LABEL}} for la in shown]
