"""What the Docker volume plugin does for each call, through the manager's REST API.

A volume is mounted on this host by attaching it here with a mount (the manager
has this node's agent start its engine, make a filesystem only if it is blank, and
mount it at ``MOUNT_ROOT/NAME``). Containers on this host share that one mount; the
plugin counts them by the ID Docker (or Podman) sends with each Mount, and detaches
the volume when the last one unmounts. A volume attached on another node is never
mounted here too: the mount is refused with the reason, unless the volume's label
``preempt=true`` says to move it here (libStorage's preempt).

Calls on one volume are serialised; calls on different volumes run concurrently.
Every failure is a :class:`DriverError` whose message the container engine shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from drove.cli.client import Manager, ManagerError
from drove.plugins import dockeropts, mountuse
from drove.plugins.mountstate import Mounted, MountState

log = logging.getLogger("drove.plugin.docker")

RESTORE_WAIT = 20.0
"""Seconds a create from a backup (not instant) waits for the restore, so that a container
run right after finds it ready; a longer restore goes on (a mount is refused, saying so,
until it is done). Docker gives a plugin call 30 s."""


class DriverError(Exception):
    """A call the plugin refuses or could not do; the message says why and what to do."""


class DockerDriver:
    """The volume driver of one host (``node``), keeping its mounts in ``state``."""

    def __init__(self, manager: Manager, node: str, state: MountState, mount_root: Path,
                 default_size: int, default_fs: str = "ext4") -> None:
        self.manager = manager
        self.node = node
        self.state = state
        self.mount_root = mount_root
        self.default_size = default_size
        self.default_fs = default_fs
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def mountpoint(self, name: str) -> str:
        """Where volume ``name`` is mounted on this host."""
        return str(self.mount_root / name)

    # ------------------------------------------------------------ manager calls

    async def _call(self, method: str, path: str, body: Any = None,
                    **params: Any) -> Any:
        """One REST call in a worker thread; ManagerError becomes DriverError."""
        try:
            return await asyncio.to_thread(self.manager.request, method, path,
                                           params=params or None, json=body)
        except ManagerError as exc:
            raise DriverError(str(exc)) from exc

    async def _find(self, name: str) -> dict[str, Any] | None:
        """Volume ``name`` as the API shows it, or None when there is none."""
        try:
            return await asyncio.to_thread(self.manager.get, f"/v1/volumes/{name}")
        except ManagerError as exc:
            if exc.status == 404:
                return None
            raise DriverError(str(exc)) from exc

    async def _volume(self, name: str) -> dict[str, Any]:
        v = await self._find(name)
        if v is None:
            raise DriverError(f"no drove volume {name!r} (`drove volume list` shows them)")
        return v

    # ------------------------------------------------------------ the protocol

    async def create(self, name: str, opts: dict[str, Any] | None) -> None:
        """VolumeDriver.Create: a new volume (a clone, a restore) as the options say."""
        try:
            o = dockeropts.parse(opts)
        except dockeropts.OptionsError as exc:
            raise DriverError(f"volume {name}: {exc}") from None
        async with self._lock(name):
            existing = await self._find(name)
            if existing is not None:
                if o.empty:  # `docker run -v NAME:...` of a volume drove has: use it
                    return
                raise DriverError(f"drove volume {name} exists already ({existing['size']} "
                                  "bytes): use it without --opt, or remove it first")
            labels = o.labels()
            if o.snapshot is not None:
                src, snap = o.snapshot
                await self._call("POST", f"/v1/volumes/{src}/clone", {
                    "name": name, "snapshot": snap, "replicas": o.replicas, "labels": labels})
            elif o.backup is not None:
                await self._restore(name, o, labels)
            else:
                await self._call("POST", "/v1/volumes", {
                    "name": name, "size": o.size or self.default_size,
                    "replicas": o.replicas, "pool": o.pool, "labels": labels})

    async def _restore(self, name: str, o: dockeropts.CreateOptions,
                       labels: dict[str, str]) -> None:
        """Restore backup ``o.backup`` into new volume ``name``; wait a while for it."""
        task = await self._call("POST", f"/v1/backups/{o.backup}/restore", {
            "volume": name, "replicas": o.replicas, "pool": o.pool, "instant": o.instant})
        if labels:
            v = await self._volume(name)
            await self._call("PATCH", f"/v1/volumes/{name}",
                             {"labels": {**v["labels"], **labels}})
        if o.instant:
            return  # it serves at once; its data comes as it is read
        deadline = time.monotonic() + RESTORE_WAIT
        while time.monotonic() < deadline:
            t = await self._call("GET", f"/v1/tasks/{task['id']}")
            if t["state"] == "succeeded":
                return
            if t["state"] != "running":
                raise DriverError(f"restoring backup {o.backup} into {name} {t['state']}: "
                                  f"{t.get('error')}")
            await asyncio.sleep(0.25)  # the task has no push channel: poll its state

    async def remove(self, name: str) -> None:
        """VolumeDriver.Remove: delete the volume (refused while containers here use it)."""
        async with self._lock(name):
            m = self.state.get(name)
            if m is not None and m.ids:
                # The engine checked that none of its containers use the volume; IDs it
                # never unmounted (dockerd was killed) are stale once no mount namespace
                # holds the volume.
                users = await asyncio.to_thread(mountuse.other_mounts, m.mountpoint)
                if users:
                    raise DriverError(f"volume {name} is mounted at {m.mountpoint} for "
                                      f"container(s) {', '.join(i[:12] for i in m.ids)} and "
                                      f"in use ({'; '.join(users)}); stop them first")
                log.warning("volume %s: mount ID(s) %s were never unmounted (their engine "
                            "stopped?) and nothing uses the volume: released", name,
                            ", ".join(m.ids))
            if m is not None:
                await self._release(name, m)
            v = await self._find(name)
            if v is None:
                return
            if v["state"] != "detached":
                where = f"node {v.get('node')}" + (f" at {v['mountpoint']}"
                                                   if v.get("mountpoint") else "")
                raise DriverError(f"volume {name} is {v['state']} on {where}; stop what uses "
                                  f"it there (or `drove volume detach {name}`) first")
            await self._call("DELETE", f"/v1/volumes/{name}")

    async def mount(self, name: str, container: str) -> str:
        """VolumeDriver.Mount: attach and mount here (once for all containers); the path."""
        here = self.mountpoint(name)
        async with self._lock(name):
            v = await self._volume(name)
            if not self._ours(v):
                await self._attach_here(v, here)
            self.state.add(name, here, container)
            return here

    async def unmount(self, name: str, container: str) -> None:
        """VolumeDriver.Unmount: ``container`` is done; the last one detaches the volume."""
        async with self._lock(name):
            m = self.state.release(name, container)
            if m is not None and not m.ids:
                await self._release(name, m)

    async def path(self, name: str) -> str:
        """VolumeDriver.Path: where the volume is mounted here ('' when it is not)."""
        m = self.state.get(name)
        return m.mountpoint if m is not None and m.ids else ""

    async def get(self, name: str) -> dict[str, Any]:
        """VolumeDriver.Get: the volume, with its state under Status."""
        v = await self._volume(name)
        return {"Name": name, "Mountpoint": await self.path(name), "Status": _status(v)}

    async def list(self) -> list[dict[str, Any]]:
        """VolumeDriver.List: every drove volume (standbys are not usable: left out)."""
        out = []
        for v in await self._call("GET", "/v1/volumes"):
            if not v.get("standby"):
                out.append({"Name": v["name"], "Mountpoint": await self.path(v["name"])})
        return out

    async def recover(self) -> list[str]:
        """At start: detach what the last run left without containers; what it did."""
        done = []
        for name, m in list(self.state.volumes.items()):
            if m.pending:
                async with self._lock(name):
                    try:
                        await self._release(name, m)
                        done.append(f"detached {name} (no container used it)")
                    except DriverError as exc:
                        done.append(f"{name}: {exc}")
        return done

    # ------------------------------------------------------------ helpers

    def _ours(self, v: dict[str, Any]) -> bool:
        """True if ``v`` is attached on this node, mounted where this plugin mounts it."""
        return (v["state"] == "attached" and v.get("node") == self.node
                and v.get("mountpoint") == self.mountpoint(v["name"]))

    async def _attach_here(self, v: dict[str, Any], here: str) -> None:
        """Attach ``v`` on this node mounted at ``here``; move it here if it may be."""
        name = v["name"]
        force = False
        if v["state"] == "attached" and v.get("node") != self.node:
            where = f"node {v.get('node')}" + (f" (mounted at {v['mountpoint']})"
                                               if v.get("mountpoint") else "")
            if (v.get("labels") or {}).get(dockeropts.PREEMPT_LABEL) != "true":
                raise DriverError(
                    f"volume {name} is attached on {where}: it is never mounted on two hosts "
                    f"at once; stop its containers there, or label it {dockeropts.PREEMPT_LABEL}"
                    f"=true (`drove volume update {name} --label "
                    f"{dockeropts.PREEMPT_LABEL}=true`) to let a mount here take it over")
            try:  # preempt: take it from the other node (its mount there is cut off)
                await self._call("POST", f"/v1/volumes/{name}/detach", {"force": True})
            except DriverError:
                force = True  # that node is down: take its engine over (a new epoch)
        elif v["state"] == "attached":
            how = f"at {v['mountpoint']}" if v.get("mountpoint") else "without a mount"
            raise DriverError(f"volume {name} is attached on this node {how} by someone else "
                              f"(not this plugin, which mounts at {here}); `drove volume "
                              f"detach {name}` first")
        elif v["state"] != "detached":
            raise DriverError(f"volume {name} is {v['state']}; try again once that is done")
        fs = (v.get("labels") or {}).get(dockeropts.FS_LABEL, self.default_fs)
        await self._call("POST", f"/v1/volumes/{name}/attach",
                         {"mount": here, "fs": fs, "node": self.node, "force": force})

    async def _release(self, name: str, m: Mounted) -> None:
        """Detach ``name`` if it is still attached here at our mount; forget it."""
        v = await self._find(name)
        if v is not None and self._ours(v):
            await self._call("POST", f"/v1/volumes/{name}/detach", {})
        self.state.forget(name)
        with contextlib.suppress(OSError):
            os.rmdir(m.mountpoint)  # the manager made it; an empty directory is left


def _status(v: dict[str, Any]) -> dict[str, Any]:
    """What `docker volume inspect` shows under Status."""
    return {k: v.get(k) for k in ("size", "replica_count", "state", "health", "node",
                                  "device", "fs", "labels", "clone_of", "data_locality")}
