"""A volume's snapshots: the tree (from the engine, or from a replica's files while
detached), creating, deleting, reverting to and exporting one."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drove.manager.engines import Engines
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.guard import VolumeGuard, check_not_busy
from drove.manager.labels import SNAPSHOT_ID_LABEL
from drove.manager.records import Records

if TYPE_CHECKING:
    from drove.replica.chain import Replica


class Snapshots:
    """The snapshot operations on volumes."""

    def __init__(self, *, records: Records, engines: Engines, guard: VolumeGuard,
                 event: EventFn) -> None:
        self._records = records
        self._engines = engines
        self._guard = guard
        self._event = event

    async def tree(self, name: str) -> list[dict[str, Any]]:
        """The volume's snapshot tree (the head included, marked ``head``)."""
        doc = self._records.get(name)
        if doc["state"] != "attached":
            layers = await asyncio.to_thread(_layers_offline, doc)
            elsewhere = [r["name"] for r in doc["replicas"] if r["state"] == "stopped"
                         and not (Path(r["path"]) / "volume.meta").exists()]
            if not layers and elsewhere:  # their files are on another host: not readable here
                raise ApiError(409, f"volume {name} is detached and its replicas "
                                    f"({', '.join(elsewhere)}) are on another host; attach it "
                                    "to list its snapshots")
        else:
            layers = await self._engines.call(doc, "GET", "/v1/snapshots")
        return snapshot_tree(layers)

    async def create(self, name: str, snapshot: str | None = None,
                     labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Snapshot the volume (it must be attached)."""
        snap = snapshot or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime())
        # An identity all replicas share: what backups recognise their base by.
        labels = {SNAPSHOT_ID_LABEL: secrets.token_hex(8), **(labels or {})}
        async with self._records.lock(name):
            doc = self._records.get(name)
            res = await self._engines.call(doc, "POST", "/v1/snapshots",
                                           json={"name": snap, "labels": labels})
        pause = (res or {}).get("pause_ms")
        self._event("snapshot-created", f"snapshot {snap} of volume {name} created"
                    + (f" (I/O paused {pause} ms)" if pause is not None else ""), name)
        for s in await self.tree(name):
            if s["name"] == snap:
                return s
        raise ApiError(500, f"snapshot {snap} was created but is not listed")

    async def delete(self, name: str, snapshot: str) -> dict[str, Any]:
        """Delete a snapshot (its data folds into its child)."""
        async with self._records.lock(name):
            doc = self._records.get(name)
            check_not_busy(self._guard, doc, f"delete snapshot {snapshot} of")
            await self._engines.call(doc, "DELETE", f"/v1/snapshots/{snapshot}")
        self._event("snapshot-deleted", f"snapshot {snapshot} of volume {name} deleted", name)
        return {"deleted": snapshot}

    async def revert(self, name: str, snapshot: str) -> dict[str, Any]:
        """Revert the volume to a snapshot (attached, with no client connected); the
        volume's stored document after."""
        async with self._records.lock(name):
            doc = self._records.get(name)
            if doc.get("host"):
                raise ApiError(409, f"volume {name} is in use by the host "
                                    f"({doc['host'].get('mountpoint') or doc['host']['device']}); "
                                    f"detach it and attach without --mount, then revert")
            await self._engines.call(doc, "POST", "/v1/revert", json={"snapshot": snapshot})
            self._event("volume-reverted", f"volume {name} reverted to snapshot {snapshot}",
                        name)
            return doc

    async def diff(self, name: str, since: str, to: str | None) -> dict[str, Any]:
        """The extents that may differ between snapshot ``since`` and ``to`` (None: the
        head), from the layers' allocation (drove.replica.diff); attached or not."""
        doc = self._records.get(name)
        if doc["state"] == "attached":
            params = {"since": since} if to is None else {"since": since, "to": to}
            res = await self._engines.call(doc, "GET", "/v1/diff", params=params)
        else:
            res = await asyncio.to_thread(_diff_offline, doc, since, to)
        return {"volume": name, **res}

    async def export(self, name: str, snapshot: str, since: str | None = None
                     ) -> dict[str, Any]:
        """A read-only NBD URI serving ``snapshot`` (from a healthy replica); with ``since``,
        of what changed since that older snapshot (drove.replica.exports.DeltaExport):
        ``nbd_uri`` reports the rest as zero holes, ``backing_nbd_uri`` as plain holes."""
        from drove.replica.diff import check_order
        from drove.replica.errors import InvalidRequestError, SnapshotNotFoundError
        from drove.replica.exports import delta_export_name

        doc = self._records.get(name)
        tree = await self.tree(name)
        parents = {s["name"]: s["parent"] for s in tree if not s.get("head")}
        for snap in (snapshot, since):
            if snap is not None and snap not in parents:
                raise ApiError(404, f"volume {name} has no snapshot {snap!r}; "
                                    f"`drove snapshot list {name}` shows them")
        if since is not None:
            try:
                check_order(parents, since, snapshot)
            except (InvalidRequestError, SnapshotNotFoundError) as exc:
                raise ApiError(400, f"volume {name}: {exc}") from None
        info = await self._engines.refresh(doc) or {}
        rw = {r["name"] for r in info.get("replicas", []) if r["mode"] == "RW"}
        for r in doc["replicas"]:
            ends = await self._engines.replica_endpoints(doc, r) if r["name"] in rw else None
            if ends is None:
                continue
            if since is None:
                return {"volume": name, "snapshot": snapshot,
                        "nbd_uri": f"{ends['nbd']}/snapshot/{snapshot}", "read_only": True}
            return {"volume": name, "snapshot": snapshot, "since": since, "read_only": True,
                    "nbd_uri": f"{ends['nbd']}/{delta_export_name(snapshot, since)}",
                    "backing_nbd_uri":
                        f"{ends['nbd']}/{delta_export_name(snapshot, since, backing=True)}"}
        raise ApiError(409, f"volume {name} has no healthy replica to serve {snapshot} from")


@contextlib.contextmanager
def _first_stopped_replica(doc: dict[str, Any]) -> Iterator[Replica | None]:
    """The first stopped replica of detached ``doc`` that opens on this host (None if none
    does), open for the ``with`` block and closed after it."""
    from drove.replica.chain import Replica
    from drove.replica.errors import ReplicaError

    for r in doc["replicas"]:
        if r["state"] != "stopped" or not (Path(r["path"]) / "volume.meta").exists():
            continue
        try:
            rep = Replica.open(r["path"])
        except ReplicaError:
            continue
        try:
            yield rep
        finally:
            rep.close()
        return
    yield None


def _layers_offline(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The layers of a detached volume, read from the first stopped replica that opens."""
    from drove.replica.control import layer_json

    with _first_stopped_replica(doc) as rep:
        return [] if rep is None else [layer_json(la) for la in rep.layers() if not la.removed]


def _diff_offline(doc: dict[str, Any], since: str, to: str | None) -> dict[str, Any]:
    """:meth:`Snapshots.diff` of a detached volume, from the first stopped replica that
    opens here (ApiError as the replica's control API would answer)."""
    from drove.replica.diff import delta_json
    from drove.replica.errors import InvalidRequestError, RebuildingError, SnapshotNotFoundError

    with _first_stopped_replica(doc) as rep:
        if rep is None:
            raise ApiError(409, f"volume {doc['name']} is detached and none of its replicas "
                                "can be read on this host; attach it to compare its snapshots")
        try:
            return delta_json(rep, since, to)
        except SnapshotNotFoundError as exc:
            raise ApiError(404, f"volume {doc['name']}: {exc}") from None
        except RebuildingError as exc:
            raise ApiError(409, f"volume {doc['name']}: {exc}") from None
        except InvalidRequestError as exc:
            raise ApiError(400, f"volume {doc['name']}: {exc}") from None


def snapshot_tree(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers keyed by file -> snapshots keyed by name (the head is ``volume-head``).

    Removed layers (deleted snapshots whose data is not folded yet) are left out:
    their children hang from the nearest ancestor that is still there.
    """
    by_file = {la["file"]: la for la in layers}

    def visible_parent(la: dict[str, Any]) -> dict[str, Any] | None:
        parent = by_file.get(la.get("parent") or "")
        while parent is not None and (parent.get("removed") or parent.get("base")):
            parent = by_file.get(parent.get("parent") or "")
        return parent

    def name(la: dict[str, Any]) -> str:
        return "volume-head" if la.get("head") else la["name"]

    # A linked clone's base layers are its source's snapshots, not its own.
    shown = [la for la in layers if not la.get("removed") and not la.get("base")]
    parents = {la["file"]: visible_parent(la) for la in shown}
    return [{"name": name(la), "head": bool(la.get("head")),
             "parent": name(parents[la["file"]]) if parents[la["file"]] else None,
             "children": [name(c) for c in shown if parents[c["file"]] is la],
             "created": la.get("created"), "size": la.get("allocated", 0),
             "id": (la.get("labels") or {}).get(SNAPSHOT_ID_LABEL),
             "labels": {k: v for k, v in (la.get("labels") or {}).items()
                        if k != SNAPSHOT_ID_LABEL}} for la in shown]
