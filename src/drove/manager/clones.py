"""Linked clones: a new volume whose replicas start on a snapshot's layers, hard-linked where
a replica of the source (or of a sibling clone) holds them on the same disk; hiding the
snapshots clones depend on instead of deleting them; flattening a clone.

A clone's document records ``clone_of``: the source volume, the snapshot, and the
source's own snapshots in that snapshot's chain (the snapshot and its ancestors:
what the clone's base layers are).  Deleting one of those while a clone depends on
it only hides it (``hidden_snapshots`` in the source's document, Ceph's clone v2
trash); the last clone to go (deleted or flattened) purges it.

A clone replica is made by the agent of the node holding the source replica
(:mod:`drove.agent.clones`), whether the source is attached or not.  Replicas that
cannot link (no replica of the source on a disk the clone may use) are placed as
usual and left ``pending``: the rebuild that follows the first attach copies the
base layers there, and later clones on that disk link from that copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import Any

from drove.cluster.remoteagent import AgentError, AgentUnreachableError
from drove.manager.agents import Agents
from drove.manager.disks import Disks
from drove.manager.engines import Engines
from drove.manager.errors import ApiError, validate_name
from drove.manager.events import EventFn
from drove.manager.guard import VolumeGuard, check_not_busy
from drove.manager.labels import SNAPSHOT_ID_LABEL
from drove.manager.placement import PlacementError, node_unfit
from drove.manager.records import Records
from drove.manager.replicas import Replicas
from drove.manager.snapshots import Snapshots
from drove.manager.standbystate import check_not_standby
from drove.manager.store import now_iso
from drove.manager.tasks import TaskContext
from drove.replica.clone import CloneError
from drove.replica.fence import EPOCH_HEADER

CLONE_LABEL = "drove.io/clone-of"
"""Label of a snapshot taken to clone from (its value: the clone's name)."""


class Clones:
    """Makes, tracks and flattens linked clones."""

    def __init__(self, *, records: Records, replicas: Replicas, disks: Disks,
                 engines: Engines, agents: Agents, snapshots: Snapshots, guard: VolumeGuard,
                 event: EventFn) -> None:
        self._records = records
        self._replicas = replicas
        self._disks = disks
        self._engines = engines
        self._agents = agents
        self._snapshots = snapshots
        self._guard = guard
        self._event = event

    # ------------------------------------------------------------ clone

    async def clone(self, src: str, new: str, snapshot: str | None = None,
                    replicas: int | None = None,
                    labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Make volume ``new`` a linked clone of ``src`` at ``snapshot`` (taken now when None);
        its stored document."""
        validate_name("volume", new)
        if replicas is not None and not 1 <= replicas <= 10:
            raise ApiError(422, f"replicas must be between 1 and 10, not {replicas}")
        if self._records.find(new) is not None:
            raise ApiError(409, f"volume {new!r} exists; choose another name or delete it")
        sdoc = self._records.get(src)
        check_not_busy(self._guard, sdoc, "clone")
        check_not_standby(sdoc, "cloned")
        if sdoc.get("restoring"):
            raise ApiError(409, f"volume {src} is being restored; clone it when that is done")
        if snapshot is None:
            snapshot = await self._take_snapshot(src, new)
        async with self._records.lock(src):
            sdoc = self._records.get(src)
            tree = await self._snapshots.tree(src)
            if snapshot in sdoc.get("hidden_snapshots", []) or not any(
                    s["name"] == snapshot and not s["head"] for s in tree):
                raise ApiError(404, f"volume {src} has no snapshot {snapshot!r}; `drove "
                                    f"snapshot list {src}` shows them")
            doc = self._new_doc(sdoc, new, snapshot, tree, replicas, labels)
            sources = await self._sources(sdoc, snapshot)
            if not sources:
                raise ApiError(409, f"volume {src} has no healthy replica to clone from "
                                    "(each is failed or rebuilding)")
            started = time.perf_counter()
            try:
                await self._link_replicas(doc, sources)
                missing = doc["replica_count"] - len(doc["replicas"])
                if missing > 0:
                    try:
                        doc["replicas"] += self._replicas.place(doc, missing)
                    except PlacementError as exc:
                        raise ApiError(409, f"cannot place {missing} more replica(s) of clone "
                                            f"{new}: {exc}") from exc
                if self._records.find(new) is not None:
                    raise ApiError(409, f"volume {new!r} exists; choose another name")
                self._records.add(doc)
            except BaseException:
                await self._remove_made(doc)
                raise
        linked = [r["disk"] for r in doc["replicas"] if r["state"] == "stopped"]
        pending = [r["disk"] for r in doc["replicas"] if r["state"] == "pending"]
        self._event("volume-cloned", f"volume {new} cloned from {src}@{snapshot} in "
                    f"{time.perf_counter() - started:.2f} s: {len(linked)} replica(s) linked "
                    f"on {', '.join(linked)}"
                    + (f"; {len(pending)} to be copied on {', '.join(pending)} at the first "
                       "attach" if pending else ""), new)
        return doc

    def _new_doc(self, sdoc: dict[str, Any], new: str, snapshot: str,
                 tree: list[dict[str, Any]], replicas: int | None,
                 labels: dict[str, str] | None) -> dict[str, Any]:
        """The clone's document, before its replicas are made."""
        by_name = {s["name"]: s for s in tree if not s["head"]}
        chain, cur = [], by_name.get(snapshot)
        while cur is not None:
            chain.append(cur["name"])
            cur = by_name.get(cur["parent"]) if cur["parent"] else None
        return {
            "name": new, "size": sdoc["size"],
            "replica_count": replicas or sdoc["replica_count"], "pool": sdoc["pool"],
            "labels": dict(labels or {}), "created": now_iso(), "desired": "detached",
            "state": "detached", "mount": None, "engine": None, "host": None,
            "replicas": [], "next_replica": 0, "initialized": True,
            "data_locality": self._records.locality(sdoc),
            # An encrypted source's clone reads its layers: it has the source's data key.
            "encryption": sdoc.get("encryption"),
            "clone_of": {"volume": sdoc["name"], "snapshot": snapshot, "chain": chain,
                         "volume_created": sdoc["created"]},
        }

    async def _take_snapshot(self, src: str, new: str) -> str:
        """Snapshot ``src`` to clone from (attached: by its engine; detached: in its files)."""
        name = time.strftime("clone-%Y%m%d-%H%M%S", time.gmtime()) + f"-{secrets.token_hex(2)}"
        labels = {CLONE_LABEL: new}
        if self._records.get(src)["state"] == "attached":
            await self._snapshots.create(src, name, labels)
            return name
        async with self._records.lock(src):
            sdoc = self._records.get(src)
            await asyncio.to_thread(_snapshot_offline, sdoc, name,
                                    {SNAPSHOT_ID_LABEL: secrets.token_hex(8), **labels})
        self._event("snapshot-created", f"snapshot {name} of volume {src} created (detached, "
                                        f"in its files) to clone {new} from", src)
        return name

    async def _sources(self, sdoc: dict[str, Any], snapshot: str) -> list[dict[str, Any]]:
        """Replicas a clone may link from: the source's healthy ones, then those of other
        clones of the same snapshot (with ``within``, the marker their base layers carry)."""
        if sdoc["state"] == "attached":
            info = await self._engines.refresh(sdoc) or {}
            rw = {r["name"] for r in info.get("replicas", []) if r["mode"] == "RW"}
            own = [r for r in sdoc["replicas"] if r["name"] in rw]
        else:
            own = [r for r in sdoc["replicas"] if r["state"] == "stopped"]
        out = [{**r, "within": None} for r in own]
        base = {"volume": sdoc["name"], "snapshot": snapshot}
        for d in self._records.all():
            c = d.get("clone_of") or {}
            if (c.get("volume"), c.get("snapshot")) != (sdoc["name"], snapshot):
                continue
            ok = ({"stopped", "running"} if d["state"] == "attached" else {"stopped"})
            out += [{**r, "within": base} for r in d["replicas"]
                    if r["state"] in ok and not r.get("rebuilding")]
        return out

    async def _link_replicas(self, doc: dict[str, Any], sources: list[dict[str, Any]]) -> None:
        """Make one linked replica on each of up to replica_count disks holding the base
        layers, distinct nodes first (placement's preference), each disk once."""
        src, snapshot = doc["clone_of"]["volume"], doc["clone_of"]["snapshot"]
        base = {"volume": src, "snapshot": snapshot}
        by_disk: dict[str, list[dict[str, Any]]] = {}
        nodes_now = self._disks.node_docs()
        for r in sources:
            # Placement's rules: no new replica on a node that is cordoned, down or holds
            # no replicas by its role, nor on a disk that is not ready.
            node = r.get("node")
            if node is not None and node_unfit(node, nodes_now.get(node)):
                continue
            if not self._disks.problem(r):
                by_disk.setdefault(r["disk"], []).append(r)
        # The source's own disks first, then sibling clones'; one disk per node first.
        order = sorted(by_disk, key=lambda d: by_disk[d][0].get("within") is not None)
        picks: list[str] = []
        nodes: set[str | None] = set()
        for d in order:
            if by_disk[d][0].get("node") not in nodes:
                nodes.add(by_disk[d][0].get("node"))
                picks.append(d)
        picks += [d for d in order if d not in picks]
        errors = []
        for disk in picks:
            if len(doc["replicas"]) >= doc["replica_count"]:
                break
            for r in by_disk[disk]:
                doc["next_replica"] += 1
                name = f"{doc['name']}-r{doc['next_replica']}"
                path = Path(r["path"]).parent / f"{name}-{secrets.token_hex(3)}"
                try:
                    agent = self._agents.for_replica(r)
                    res = await asyncio.to_thread(agent.clone_replica, r["path"], str(path),
                                                  snapshot, base, r["within"])
                except (CloneError, AgentError, AgentUnreachableError, ValueError,
                        OSError) as exc:
                    errors.append(f"{r['name']} on {disk}: {exc}")
                    continue
                doc["size"] = res["size"]
                doc["replicas"].append({
                    "name": name, "disk": disk, "node": r.get("node"), "path": str(path),
                    "state": "stopped", "proc": None, "error": None, "retry_at": 0})
                break
        if not doc["replicas"]:
            raise ApiError(409, f"no replica of {src} could be cloned: " + "; ".join(errors))

    async def prelink(self, doc: dict[str, Any], new: list[dict[str, Any]]) -> None:
        """Make new replicas of clone ``doc`` linked clone directories where their disk holds
        its base layers (a replica of its source or of a sibling clone): they stay pending,
        and the rebuild that brings them in finds the base layers equal, copying nothing."""
        c = doc.get("clone_of")
        sdoc = self._records.find(c["volume"]) if c else None
        if c is None or sdoc is None:
            return
        base = {"volume": c["volume"], "snapshot": c["snapshot"]}
        by_disk: dict[str, list[dict[str, Any]]] = {}
        for r in await self._sources(sdoc, c["snapshot"]):
            by_disk.setdefault(r["disk"], []).append(r)
        for rep in new:
            for r in by_disk.get(rep["disk"], []):
                try:
                    await asyncio.to_thread(self._agents.for_replica(r).clone_replica,
                                            r["path"], rep["path"], c["snapshot"], base,
                                            r["within"])
                except (CloneError, AgentError, AgentUnreachableError, ValueError,
                        OSError) as exc:
                    self._event("clone-link-skipped", f"replica {rep['name']} of {doc['name']} "
                                f"is copied, not linked from {r['name']}: {exc}", doc["name"])
                    continue
                self._event("clone-linked", f"replica {rep['name']} of {doc['name']} links "
                            f"the base layers of {r['name']} on disk {rep['disk']}",
                            doc["name"])
                break

    async def _remove_made(self, doc: dict[str, Any]) -> None:
        """Delete the directories a failed clone made (its document was never stored)."""
        for r in doc["replicas"]:
            if r["state"] == "stopped":
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._agents.for_replica(r).remove_replica_data,
                                            r["path"])

    # ------------------------------------------------------------ dependencies

    def dependants(self, volume: str, snapshot: str | None = None) -> list[str]:
        """Clones (not flattened) whose base includes ``snapshot`` of ``volume`` (any)."""
        sdoc = self._records.find(volume)
        out = []
        for d in self._records.all():
            c = d.get("clone_of")
            if not c or c.get("volume") != volume:
                continue
            if sdoc is not None and c.get("volume_created") not in (None, sdoc["created"]):
                continue  # a clone of an earlier volume of that name
            if snapshot is None or snapshot in c.get("chain", []):
                out.append(d["name"])
        return sorted(out)

    async def hide(self, volume: str, snapshot: str) -> dict[str, Any] | None:
        """Hide ``snapshot`` instead of deleting it when clones depend on it (the answer);
        None when none does (delete it)."""
        deps = self.dependants(volume, snapshot)
        if not deps:
            return None
        async with self._records.lock(volume):  # others save the document under it
            doc = self._records.get(volume)
            hidden = doc.setdefault("hidden_snapshots", [])
            if snapshot in hidden:
                return {"deleted": snapshot, "hidden": True, "dependants": deps}
            hidden.append(snapshot)
            self._records.save(doc)
        self._event("snapshot-hidden", f"snapshot {snapshot} of volume {volume} hidden, "
                    f"not deleted: clone(s) {', '.join(deps)} depend on it; it goes with "
                    "the last of them", volume)
        return {"deleted": snapshot, "hidden": True, "dependants": deps}

    async def release(self, clone: dict[str, Any]) -> None:
        """``clone`` no longer depends on its source (deleted or flattened): delete the
        source's hidden snapshots no other clone needs."""
        c = clone.get("clone_of") or {}
        src = c.get("volume")
        sdoc = self._records.find(src) if src else None
        if sdoc is None or not sdoc.get("hidden_snapshots"):
            return
        if c.get("volume_created") not in (None, sdoc["created"]):
            return
        for snap in list(sdoc["hidden_snapshots"]):
            if [d for d in self.dependants(src, snap) if d != clone["name"]]:
                continue
            try:
                await self.purge_hidden(src, snap)
            except ApiError as exc:
                self._event("snapshot-purge-later", f"hidden snapshot {snap} of volume {src} "
                            f"is no longer needed but stays for now: {exc}", src, "warning")

    async def purge_hidden(self, volume: str, snapshot: str) -> None:
        """Really delete hidden ``snapshot`` of ``volume`` (ApiError when it cannot now)."""
        sdoc = self._records.get(volume)
        if sdoc["state"] == "attached":
            await self._snapshots.delete(volume, snapshot)
        else:
            async with self._records.lock(volume):
                await asyncio.to_thread(_delete_snapshot_offline, sdoc, snapshot)
        async with self._records.lock(volume):
            sdoc = self._records.get(volume)
            sdoc["hidden_snapshots"] = [s for s in sdoc.get("hidden_snapshots", [])
                                        if s != snapshot]
            self._records.save(sdoc)
        self._event("snapshot-deleted", f"hidden snapshot {snapshot} of volume {volume} "
                                        "deleted: no clone depends on it any more", volume)

    def mark_tree(self, volume: str, tree: list[dict[str, Any]],
                  show_hidden: bool) -> list[dict[str, Any]]:
        """The snapshot tree with hidden snapshots left out, or marked with their
        dependants (``show_hidden``)."""
        doc = self._records.get(volume)
        hidden = set(doc.get("hidden_snapshots", []))
        if not hidden:
            return tree
        if not show_hidden:
            out = [dict(s) for s in tree if s["name"] not in hidden or s["head"]]
            for s in out:
                s["children"] = [c for c in s["children"] if c not in hidden]
            return out
        return [{**s, "hidden": True, "dependants": self.dependants(volume, s["name"])}
                if s["name"] in hidden and not s["head"] else s for s in tree]

    # ------------------------------------------------------------ views

    async def info(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """A volume's clone relations: its parent with bytes shared and owned (one replica's
        files), and its dependants; None when it has neither."""
        c = doc.get("clone_of")
        deps = self.dependants(doc["name"])
        if not c and not deps:
            return None
        out: dict[str, Any] = {"dependants": deps}
        if c:
            out.update(parent={"volume": c["volume"], "snapshot": c["snapshot"]},
                       shared_bytes=None, owned_bytes=None)
            for r in doc["replicas"]:
                if r["state"] in ("abandoned", "failed", "pending"):
                    continue
                with contextlib.suppress(AgentError, AgentUnreachableError, ValueError,
                                         OSError):
                    use = await asyncio.to_thread(self._agents.for_replica(r).replica_usage,
                                                  r["path"])
                    out.update(shared_bytes=use["shared"], owned_bytes=use["owned"])
                    break
        return out

    # ------------------------------------------------------------ flatten

    def check_flatten(self, name: str) -> dict[str, Any]:
        """Refuse to flatten what cannot be (ApiError); the clone's document."""
        doc = self._records.get(name)
        if not doc.get("clone_of"):
            raise ApiError(409, f"volume {name} is not a linked clone: nothing to flatten")
        check_not_busy(self._guard, doc, "flatten")
        if doc["state"] not in ("attached", "detached"):
            raise ApiError(409, f"volume {name} is {doc['state']}: flatten it attached or "
                                "detached")
        return doc

    def flatten_task(self, name: str) -> Any:
        """The task that copies what clone ``name`` shares into its own files: by each
        replica's process (its control API) while attached, in the files while detached."""
        async def run(ctx: TaskContext) -> dict[str, Any]:
            async with self._records.lock(name):
                doc = self.check_flatten(name)
                if doc["state"] == "attached":
                    copied = await self._flatten_online(ctx, doc)
                else:
                    copied = await self._flatten_offline(ctx, doc)
                parent = doc.pop("clone_of")
                doc["flattened_from"] = {"volume": parent["volume"],
                                         "snapshot": parent["snapshot"]}
                self._records.save(doc)
            self._event("volume-flattened", f"volume {name} flattened: it no longer shares "
                        f"{parent['volume']}@{parent['snapshot']}'s layers "
                        f"({copied} bytes copied)", name)
            await self.release({"name": name, "clone_of": parent})
            return {"volume": name, "bytes_copied": copied}
        return run

    async def _flatten_offline(self, ctx: TaskContext, doc: dict[str, Any]) -> int:
        """Flatten a detached clone's replicas in their files (this host's)."""
        paths = _local_replicas(doc, "flatten it")
        ctx.progress(0, len(paths))
        copied = 0
        for i, path in enumerate(paths):
            ctx.message(f"replica {i + 1} of {len(paths)}")
            copied += await asyncio.to_thread(_flatten_offline, path)
            ctx.progress(i + 1, len(paths))
        return copied

    async def _flatten_online(self, ctx: TaskContext, doc: dict[str, Any]) -> int:
        """Have each replica of an attached, healthy clone flatten itself (I/O goes on)."""
        info = await self._engines.refresh(doc) or {}
        modes = {r["name"]: r["mode"] for r in info.get("replicas", [])}
        live = [r for r in doc["replicas"] if r["state"] not in ("abandoned",)]
        sick = [r["name"] for r in live if modes.get(r["name"]) != "RW"]
        if sick:
            raise ApiError(409, f"volume {doc['name']}: replica(s) {', '.join(sick)} are not "
                                "RW; flatten it when it is healthy")
        ends = [(r, await self._engines.replica_endpoints(doc, r)) for r in live]
        gone = [r["name"] for r, e in ends if e is None]
        if gone:
            raise ApiError(409, f"volume {doc['name']}: replica(s) {', '.join(gone)} are not "
                                "served; flatten it when it is healthy")
        ctx.progress(0, len(ends))
        copied = 0
        for i, (r, e) in enumerate(ends):
            assert e is not None
            ctx.message(f"replica {r['name']}")
            headers = {**(e.get("headers") or {}), EPOCH_HEADER: str(doc.get("epoch", 0))}
            resp = await self._engines.http.post(f"{e['control']}/v1/flatten",
                                                 headers=headers, timeout=3600)
            if resp.status_code >= 300:
                raise ApiError(409, f"replica {r['name']} of {doc['name']} could not flatten: "
                                    f"{resp.text}")
            copied += resp.json().get("bytes_copied", 0)
            ctx.progress(i + 1, len(ends))
        return copied


def _local_replicas(doc: dict[str, Any], what: str) -> list[str]:
    """Paths of ``doc``'s stopped replicas, all here (ApiError 409 naming one that is not)."""
    out = []
    for r in doc["replicas"]:
        if r["state"] != "stopped":
            continue
        if not (Path(r["path"]) / "volume.meta").exists():
            raise ApiError(409, f"volume {doc['name']} is detached and replica {r['name']} is "
                                f"on another host; attach it to {what}")
        out.append(r["path"])
    if not out:
        raise ApiError(409, f"volume {doc['name']} has no stopped replica to {what}")
    return out


def _snapshot_offline(doc: dict[str, Any], name: str, labels: dict[str, str]) -> None:
    """Snapshot every replica of a detached volume in its files (the same name and id)."""
    from drove.replica.chain import Replica

    for path in _local_replicas(doc, "snapshot it"):
        with Replica.open(path) as rep:
            rep.snapshot(name, labels)


def _delete_snapshot_offline(doc: dict[str, Any], snapshot: str) -> None:
    """Delete and purge a snapshot in every replica of a detached volume."""
    from drove.replica.chain import Replica
    from drove.replica.errors import SnapshotNotFoundError

    for path in _local_replicas(doc, "delete the snapshot"):
        with Replica.open(path) as rep:
            with contextlib.suppress(SnapshotNotFoundError):
                rep.delete_snapshot(snapshot)
            rep.purge()


def _flatten_offline(path: str) -> int:
    """Flatten one replica directory; the bytes of base layers it copied."""
    from drove.replica.chain import Replica

    with Replica.open(path) as rep:
        copied = sum(rep.flatten_layer(f, ino, rep.copy_shared(f, ino))
                     for f, ino in rep.flatten_plan())
        rep.purge()
        return copied
