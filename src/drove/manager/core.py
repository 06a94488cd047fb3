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
* :mod:`~drove.manager.rebuild`, :mod:`~drove.manager.localize`,
  :mod:`~drove.manager.healer`: online rebuilds, data locality carried out live,
  and the healing loop;
* :mod:`~drove.manager.views`: a volume as the API shows it.

This module holds the :class:`Manager` facade the API, backups and jobs use,
and the volume operations of its own: create, delete, update, expand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import httpx

from drove.agent.hostattach import HostAttachError
from drove.agent.node import NodeAgent
from drove.cluster.remoteagent import AgentError, AgentUnreachableError
from drove.manager import datakeys, locality, views
from drove.manager.agents import Agents
from drove.manager.attach import Attacher
from drove.manager.clones import Clones
from drove.manager.datakeys import DataKeys
from drove.manager.disks import Disks
from drove.manager.drain import Drainer
from drove.manager.engines import Engines
from drove.manager.errors import ApiError, to_size, validate_name
from drove.manager.events import EventFn
from drove.manager.guard import VolumeGuard, check_not_busy
from drove.manager.healer import Healer
from drove.manager.locality import STRICT_LOCAL
from drove.manager.localize import Localizer, check_change
from drove.manager.placement import PlacementError
from drove.manager.qos import check_qos
from drove.manager.qos import push as push_qos
from drove.manager.rebuild import Rebuilds
from drove.manager.records import Records
from drove.manager.replicas import Replicas
from drove.manager.scrub import Scrubber
from drove.manager.settings import Settings
from drove.manager.snapshots import Snapshots
from drove.manager.space import Space
from drove.manager.standbystate import check_not_standby
from drove.manager.store import Store, now_iso
from drove.manager.upgrade import EngineUpgrades

log = logging.getLogger("drove.manager")

_PUSHES: set[asyncio.Task[None]] = set()  # rebuild limits being sent to engines


class Manager:
    """Volumes, disks and settings of a one-node drove."""

    def __init__(self, store: Store, agent: NodeAgent | None, data_dir: Path, *,
                 event: EventFn, guard: VolumeGuard,
                 cluster_token_file: Path | None = None, node: str | None = None,
                 keys: DataKeys | None = None) -> None:
        self.store = store
        self.keys = keys or DataKeys()  # encrypted volumes' data keys (no KEK: none)
        self.agent = agent  # None: every node runs its own `drove agent` (serve --no-agent)
        self.data_dir = data_dir
        self._event = event
        self._guard = guard
        self._settings = Settings(store, event)
        # This manager's own node: its in-process agent's, or ``node`` (served by an agent).
        own = agent.name if agent is not None else node
        self._records = Records(store, self._settings, own, data_dir)
        self._disks = Disks(store, agent, data_dir, event)
        self._engines = Engines()
        # Remote agents are called with the cluster token (the API token's file on one host).
        self.agents = Agents(store, agent, cluster_token_file or data_dir / "token", own)
        self._replicas = Replicas(records=self._records, disks=self._disks,
                                  engines=self._engines, agents=self.agents,
                                  settings=self._settings, event=event)
        self._attacher = Attacher(records=self._records, replicas=self._replicas,
                                  engines=self._engines, disks=self._disks, agents=self.agents,
                                  settings=self._settings, event=event, guard=guard,
                                  keys=self.keys)
        self._snapshots = Snapshots(records=self._records, engines=self._engines, guard=guard,
                                    event=event)
        self.clones = Clones(records=self._records, replicas=self._replicas, disks=self._disks,
                             engines=self._engines, agents=self.agents,
                             snapshots=self._snapshots, guard=guard, event=event)
        self.space = Space(records=self._records, engines=self._engines, agents=self.agents,
                           clones=self.clones, event=event)
        self.scrubber = Scrubber(records=self._records, engines=self._engines, event=event,
                                 snapshot=self.create_snapshot)
        rebuilds = Rebuilds(records=self._records, replicas=self._replicas,
                            engines=self._engines, disks=self._disks, event=event)
        self._localizer = Localizer(records=self._records, replicas=self._replicas,
                                    rebuilds=rebuilds, engines=self._engines, event=event)
        self.drainer = Drainer(records=self._records, replicas=self._replicas,
                               rebuilds=rebuilds, engines=self._engines, disks=self._disks,
                               attacher=self._attacher, event=event)
        self.upgrades = EngineUpgrades(records=self._records, engines=self._engines,
                                       agents=self.agents, settings=self._settings,
                                       keys=self.keys, guard=guard, event=event)
        self._healer = Healer(records=self._records, attacher=self._attacher,
                              replicas=self._replicas, rebuilds=rebuilds,
                              localizer=self._localizer, engines=self._engines,
                              disks=self._disks, agents=self.agents, settings=self._settings,
                              event=event)

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
        values = self._settings.update(changes)
        if "rebuild_bandwidth_limit" in changes:
            with contextlib.suppress(RuntimeError):  # no loop: engines get it at their start
                task = asyncio.get_running_loop().create_task(
                    self._push_rebuild_limit(values["rebuild_bandwidth_limit"]))
                _PUSHES.add(task)  # kept until done (the loop holds tasks weakly)
                task.add_done_callback(_PUSHES.discard)
        return values

    async def _push_rebuild_limit(self, limit: int) -> None:
        """Tell every attached volume's engine the new rebuild limit (its next layer copy)."""
        for doc in self._records.all():
            if doc["state"] == "attached":
                try:
                    await push_qos(self._engines, doc, limit)
                except ApiError as exc:
                    log.warning("volume %s: rebuild limit not set: %s", doc["name"], exc)

    # ------------------------------------------------------- nodes, disks

    def nodes(self) -> list[dict[str, Any]]:
        """Every node with its disks."""
        return self._disks.nodes()

    def update_node(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Set a node's zone, fault_set, role or cordoned; the node."""
        return self._disks.update_node(name, changes)

    def heartbeat(self, beat: dict[str, Any]) -> dict[str, Any]:
        """An agent's heartbeat (registering its node); the disks it should report on."""
        return self._disks.health.heartbeat(beat)

    async def node_changes(self, node: str, engines: dict[str, int | None], since: int | None,
                           timeout: float) -> dict[str, Any]:
        """An agent's long-poll: which of its engines must stop, as soon as the store says
        so (:meth:`drove.manager.heartbeats.NodeHealth.changes`)."""
        return await self._disks.health.changes(node, engines, since, timeout)

    def end_long_polls(self) -> None:
        """End the agents' long-polls waiting here (the manager stops: they ask another)."""
        self._disks.health.end_polls()

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
        # One read of the default for the whole list: on etcd each read is a round trip,
        # and 1,000 of them held the loop for seconds.
        default = self._settings.get("default_data_locality")
        return [self.view(v, default) for v in self._records.all()]

    def volume(self, name: str) -> dict[str, Any]:
        """One volume as the API shows it."""
        return self.view(self.record(name))

    def locality(self, doc: dict[str, Any]) -> str:
        """The volume's data locality (stored before the setting existed: the default)."""
        return self._records.locality(doc)

    def attach_node(self, doc: dict[str, Any]) -> str:
        """The node ``doc`` is attached on, or would be by default (this manager's own)."""
        return self._records.attach_node(doc)

    def view(self, doc: dict[str, Any], default_locality: str | None = None) -> dict[str, Any]:
        """A stored volume merged with what its engine reported last (``default_locality``:
        the setting, when the caller read it already)."""
        info = self._engines.cached(doc["name"]) if doc["state"] == "attached" else None
        where = (locality.locality_of(doc, default_locality) if default_locality is not None
                 else self.locality(doc))
        return views.view(doc, info, where)

    def create_volume(self, name: str, size: int | str, replicas: int | None = None,
                      pool: str | None = None, labels: dict[str, str] | None = None,
                      data_locality: str | None = None,
                      qos: dict[str, Any] | None = None,
                      encrypted: bool = False,
                      encryption: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create a volume and place its replicas (nothing runs until it is attached);
        ``encrypted``: with a new data key wrapped by the manager's KEK (drove.manager.datakeys);
        ``encryption``: with that existing (wrapped) key instead (a restore of its data).

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
        limits = check_qos(None, qos)
        if self._records.find(name) is not None:
            raise ApiError(409, f"volume {name!r} exists; choose another name or delete it")
        enc = encryption or (self.keys.new_key() if encrypted else None)  # 422 without a KEK
        doc: dict[str, Any] = {
            "name": name, "size": size_bytes, "replica_count": count, "pool": pool,
            "labels": dict(labels or {}), "created": now_iso(), "desired": "detached",
            "state": "detached", "mount": None, "engine": None, "host": None,
            "replicas": [], "next_replica": 0, "initialized": False,
            "data_locality": where, "qos": limits, datakeys.FIELD: enc,
        }
        try:
            doc["replicas"] = self._replicas.place(doc, count)
        except PlacementError as exc:
            raise ApiError(409, str(exc)) from exc
        self._records.add(doc)
        self.event("volume-created", f"volume {name} created: {size_bytes} bytes, {count} "
                   f"replica(s) on {', '.join(r['disk'] for r in doc['replicas'])}, "
                   f"data locality {where}"
                   + (f", encrypted (key {enc['key_id']})" if enc else ""), name)
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
                await self._delete_data(doc, r)
            with contextlib.suppress(OSError):
                shutil.rmtree(self._records.volume_dir(name))
            self._records.delete(name)
            self.event("volume-deleted", f"volume {name} deleted", name)
        self._records.drop_lock(name)
        await self.clones.release(doc)  # a clone's source may purge what it hid for it
        return {"deleted": name}

    async def _delete_data(self, doc: dict[str, Any], rep: dict[str, Any]) -> None:
        """Delete ``rep``'s directory through its node's agent (it may be another host's);
        an event says where data stays when that node cannot."""
        try:
            agent = self.agents.for_replica(rep)
            await asyncio.to_thread(agent.remove_replica_data, rep["path"])
        except (ApiError, AgentUnreachableError, AgentError, ValueError, OSError) as exc:
            self.event("replica-data-left", f"volume {doc['name']}: the data of replica "
                       f"{rep['name']} stays at {rep['path']} on node {rep.get('node')}: "
                       f"{exc}; delete that directory by hand", doc["name"], level="warning")

    async def update_volume(self, name: str, replicas: int | None = None,
                            labels: dict[str, str] | None = None,
                            data_locality: str | None = None,
                            qos: dict[str, Any] | None = None) -> dict[str, Any]:
        """Change labels, the replica count, the data locality or the QoS limits (live)."""
        async with self.lock(name):
            doc = self.record(name)
            if replicas is not None and not 1 <= replicas <= 10:
                raise ApiError(422, f"replicas must be between 1 and 10, not {replicas}")
            limits = check_qos(doc.get("qos"), qos) if qos is not None else None
            before = self.locality(doc)
            after = before if data_locality is None else locality.check_locality(data_locality)
            check_change(doc, self.attach_node(doc), before, after, replicas)
            if labels is not None:
                doc["labels"] = dict(labels)
            if replicas is not None and replicas != doc["replica_count"]:
                await self._set_replica_count(doc, replicas)
            if after != before or data_locality is not None:
                doc["data_locality"] = after
            if limits is not None and limits != doc.get("qos"):
                doc["qos"] = limits
                self.event("volume-qos-changed", f"volume {name}: QoS limits {limits}", name)
            self.save(doc)
            if limits is not None and doc["state"] == "attached":
                await push_qos(self._engines, doc, self.settings()["rebuild_bandwidth_limit"])
            if after != before:
                await self._localizer.changed(doc, before, after)
            if doc["state"] == "attached":
                await self._engines.refresh(doc)
            return self.view(doc)

    async def _set_replica_count(self, doc: dict[str, Any], count: int) -> None:
        """Place the replicas ``count`` asks for more, or remove the least useful ones."""
        live = [r for r in doc["replicas"] if r["state"] != "abandoned"]
        if count > len(live):
            try:
                new = self._replicas.place(doc, count - len(live))
            except PlacementError as exc:
                raise ApiError(409, str(exc)) from exc
            await self.clones.prelink(doc, new)  # a clone's base: linked where it is
            doc["replicas"] += new
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

    async def expand_volume(self, name: str, size: int | str,
                            _internal: bool = False) -> dict[str, Any]:
        """Grow a volume: every replica, then the engine (when attached)."""
        new = to_size(size)
        async with self.lock(name):
            doc = self.record(name)
            if not _internal:  # a standby grows with its source's backups only
                check_not_standby(doc, "expanded")
            if new < doc["size"]:
                raise ApiError(422, f"cannot shrink volume {name} from {doc['size']} to {new}")
            if new == doc["size"]:
                if _host_behind(doc):  # an earlier expand could not grow it: finish that
                    await self._grow_host(doc)
                return self.view(doc)
            if doc["state"] == "attached":
                await self._engines.call(doc, "POST", "/v1/expand", json={"size": new})
            else:
                elsewhere = [r["name"] for r in doc["replicas"] if r["state"] == "stopped"
                             and not (Path(r["path"]) / "volume.meta").exists()]
                if elsewhere:  # their files are on another host: its engine expands them
                    raise ApiError(409, f"volume {name}: replica(s) {', '.join(elsewhere)} "
                                        "are on another host; attach the volume to expand "
                                        "it (online)")
                await asyncio.to_thread(_expand_offline, doc, new)
            old, doc["size"] = doc["size"], new
            self.save(doc)
            if doc["state"] == "attached":
                await self._engines.refresh(doc)
            self.event("volume-expanded", f"volume {name} expanded from {old} to {new} bytes",
                       name)
            if doc["state"] == "attached" and doc.get("host"):
                await self._grow_host(doc)
            return self.view(doc)

    async def _grow_host(self, doc: dict[str, Any]) -> None:
        """Grow the device and mounted filesystem of ``doc``'s host attachment to the
        volume's size, online, on its node (lock held); ApiError 409 if they cannot."""
        name, size, node = doc["name"], doc["size"], doc.get("node")
        try:
            doc["host"] = await asyncio.to_thread(self.agents.for_node(node).grow_host,
                                                  doc["host"], size)
        except (HostAttachError, AgentError, AgentUnreachableError) as exc:
            why = (f"volume {name} has grown to {size} bytes, but not its device or "
                   f"filesystem on node {node}: {exc}; `drove volume expand {name} --size "
                   f"{size}` again finishes it")
            self.event("volume-host-grow-failed", why, name, level="warning")
            raise ApiError(409, why) from exc
        self.save(doc)
        where = doc["host"].get("mountpoint") or doc["host"].get("device")
        self.event("volume-host-grown", f"volume {name}: {where} on node {node} grown to "
                   f"{size} bytes, online", name)

    # ----------------------------------------------------------- attach

    async def attach(self, name: str, mount: str | None = None,
                     fs: str = "ext4", _internal: bool = False,
                     node: str | None = None, force: bool = False) -> dict[str, Any]:
        """Start replicas and engine on ``node`` (default: this manager's) and give the host
        a device, mounted at ``mount``; ``force`` takes it over from a down node."""
        if not _internal:
            check_not_standby(self.record(name), "attached")
        return self.view(await self._attacher.attach(name, mount, fs, _internal, node,
                                                     force=force))

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
                                rep: dict[str, Any]) -> dict[str, Any] | None:
        """Where replica ``rep`` of ``doc`` is served now: ``nbd`` (the base URI of its
        exports) and ``control`` (its API URL); None when it is not served."""
        return await self._engines.replica_endpoints(doc, rep)

    # --------------------------------------------------------- snapshots

    async def snapshots(self, name: str, show_hidden: bool = False) -> list[dict[str, Any]]:
        """The volume's snapshot tree (the head included, marked ``head``); snapshots hidden
        for clones only with ``show_hidden``."""
        return self.clones.mark_tree(name, await self._snapshots.tree(name), show_hidden)

    async def create_snapshot(self, name: str, snapshot: str | None = None,
                              labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Snapshot the volume (it must be attached)."""
        check_not_standby(self.record(name), "snapshotted")
        return await self._snapshots.create(name, snapshot, labels)

    async def delete_snapshot(self, name: str, snapshot: str) -> dict[str, Any]:
        """Delete a snapshot (its data folds into its child); one that linked clones depend
        on is hidden instead, and deleted with the last of them."""
        self.record(name)
        return (await self.clones.hide(name, snapshot)
                or await self._snapshots.delete(name, snapshot))

    async def revert(self, name: str, snapshot: str) -> dict[str, Any]:
        """Revert the volume to a snapshot (attached, with no client connected)."""
        check_not_standby(self.record(name), "reverted")
        return self.view(await self._snapshots.revert(name, snapshot))

    async def export_snapshot(self, name: str, snapshot: str,
                              since: str | None = None) -> dict[str, Any]:
        """A read-only NBD URI serving ``snapshot`` (from a healthy replica); with ``since``,
        only what changed since that older snapshot."""
        if (enc := datakeys.encryption(self.record(name))) is not None:
            # A replica serves it as stored: ciphertext, which no client could read.
            raise ApiError(409, f"volume {name} is encrypted (key {enc['key_id']}): a "
                                "snapshot export would serve ciphertext; clone the snapshot "
                                f"(`drove volume clone {name} NEW --snapshot {snapshot}`) and "
                                "attach the clone to read it")
        return await self._snapshots.export(name, snapshot, since)

    async def snapshot_diff(self, name: str, since: str, to: str | None) -> dict[str, Any]:
        """The extents that may differ between snapshot ``since`` and ``to`` (None: head)."""
        return await self._snapshots.diff(name, since, to)

    # ---------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Register the node, bring back what was attached, start healing."""
        self.register()
        await self.lead()

    def register(self) -> None:
        """Register this manager's own node and its first disk (none without an agent)."""
        self._disks.ensure_node()

    async def lead(self) -> None:
        """The leader's work: adopt or bring back what was attached, then heal."""
        for doc in self._records.all():
            async with self.lock(doc["name"]):
                try:
                    await self._attacher.recover(doc)
                except Exception as exc:  # one volume (its node away) must not stop the rest
                    log.exception("recovering volume %s", doc["name"])
                    self.event("recover-failed", f"volume {doc['name']} could not be adopted "
                               f"or brought back: {exc}; the healer tries again", doc["name"],
                               level="error")
        self._healer.start()
        # Engines adopted from an older drove than their agent's are upgraded live.
        self.upgrades.start()

    async def step_down(self) -> None:
        """Stop healing; every volume stays attached and serving (the next leader adopts it)."""
        await self.upgrades.stop()
        await self._healer.stop()

    async def close(self) -> None:
        """Stop healing and release connections, leaving every volume attached and serving."""
        await self.step_down()
        self.agents.close()
        await self._engines.close()

    async def stop(self) -> None:
        """Stop healing; detach every volume but remember which were attached."""
        await self.upgrades.stop()
        await self._healer.stop()
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


def _host_behind(doc: dict[str, Any]) -> bool:
    """True if ``doc`` is mounted through a growable attachment smaller than the volume."""
    host = doc.get("host") if doc["state"] == "attached" else None
    return bool(host and host.get("fuse_uri") and (host.get("size") or 0) < doc["size"])


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
