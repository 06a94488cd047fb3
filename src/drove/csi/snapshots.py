"""CSI snapshots: drove snapshots by ID ``VOLUME@SNAPSHOT``, their CSI name in a label."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc

from drove.cli.client import Manager, ManagerError
from drove.csi import ids
from drove.csi.common import VolumeLocks, attached, get_or_none, page
from drove.csi.errors import CsiError, invalid, not_found
from drove.csi.proto import pb

# A snapshot drove took itself to clone a volume from: not one of the CO's.
CLONE_LABEL = "drove.io/clone-of"


class Snapshots:
    """CreateSnapshot, DeleteSnapshot and ListSnapshots of the Controller service."""

    def __init__(self, mgr: Manager, locks: VolumeLocks) -> None:
        self._mgr = mgr
        self._locks = locks

    def find(self, volume: str, snapshot: str) -> dict[str, Any] | None:
        """The snapshot's entry, None when the volume or the snapshot does not exist."""
        snaps = get_or_none(self._mgr, f"/v1/volumes/{volume}/snapshots")
        return next((s for s in snaps or [] if s["name"] == snapshot and not s.get("head")),
                    None)

    def every(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(volume view, snapshot) of every snapshot of every volume, by ID."""
        out = []
        for v in self._mgr.get("/v1/volumes"):
            try:
                snaps = self._mgr.get(f"/v1/volumes/{v['name']}/snapshots")
            except ManagerError as exc:
                if exc.status in (404, 409):  # gone meanwhile, or unreadable from here
                    continue
                raise
            out += [(v, s) for s in snaps if listed(s)]
        return sorted(out, key=lambda vs: ids.snapshot_id(vs[0]["name"], vs[1]["name"]))

    def create(self, request: Any) -> Any:
        """Snapshot the source volume under the CSI name (the one there already if it is
        of this volume; ALREADY_EXISTS if of another)."""
        if not request.source_volume_id:
            raise invalid("source_volume_id missing")
        if not request.name:
            raise invalid("name missing")
        vid, snap = request.source_volume_id, ids.drove_name(request.name)
        with self._locks.hold(vid):
            for v, s in self.every():
                if (s.get("labels") or {}).get(ids.LABEL_NAME) == request.name:
                    if v["name"] != vid:
                        raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                                       f"snapshot {request.name!r} exists, of volume "
                                       f"{v['name']}")
                    return pb.CreateSnapshotResponse(snapshot=csi_snapshot(v, s))
            view = get_or_none(self._mgr, f"/v1/volumes/{vid}")
            if view is None:
                raise not_found(f"source volume {vid!r} does not exist")
            with attached(self._mgr, vid):
                s = self._mgr.post(f"/v1/volumes/{vid}/snapshots",
                                   {"name": snap, "labels": {ids.LABEL_NAME: request.name}})
        return pb.CreateSnapshotResponse(snapshot=csi_snapshot(view, s))

    def delete(self, request: Any) -> Any:
        """Delete the snapshot (OK when it is gone); one that linked clones use is hidden
        until the last of them goes."""
        if not request.snapshot_id:
            raise invalid("snapshot_id missing")
        parsed = ids.parse_snapshot_id(request.snapshot_id)
        if parsed is None:
            return pb.DeleteSnapshotResponse()
        vid, snap = parsed
        with self._locks.hold(vid):
            if self.find(vid, snap) is None:
                return pb.DeleteSnapshotResponse()
            with attached(self._mgr, vid):
                try:
                    self._mgr.delete(f"/v1/volumes/{vid}/snapshots/{snap}")
                except ManagerError as exc:
                    if exc.status != 404:
                        raise
        return pb.DeleteSnapshotResponse()

    def listing(self, request: Any) -> Any:
        """Snapshots by ID (of one volume, or the one asked), a page at a time."""
        if request.snapshot_id:
            parsed = ids.parse_snapshot_id(request.snapshot_id)
            found = self.find(*parsed) if parsed else None
            if found is None or (request.source_volume_id
                                 and request.source_volume_id != parsed[0]):
                return pb.ListSnapshotsResponse()
            view = self._mgr.get(f"/v1/volumes/{parsed[0]}")
            pairs = [(view, found)]
        elif request.source_volume_id:
            view = get_or_none(self._mgr, f"/v1/volumes/{request.source_volume_id}")
            snaps = get_or_none(self._mgr, f"/v1/volumes/{request.source_volume_id}/snapshots")
            pairs = sorted(((view, s) for s in snaps or [] if listed(s)),
                           key=lambda vs: vs[1]["name"])
        else:
            pairs = self.every()
        keys = [ids.snapshot_id(v["name"], snap["name"]) for v, snap in pairs]
        chosen, token = page(pairs, keys, request.max_entries, request.starting_token)
        entries = [pb.ListSnapshotsResponse.Entry(snapshot=csi_snapshot(v, s))
                   for v, s in chosen]
        return pb.ListSnapshotsResponse(entries=entries, next_token=token)


def listed(snap: dict[str, Any]) -> bool:
    """Whether ListSnapshots shows a drove snapshot (not the head, not one drove took to
    clone a volume from)."""
    return not snap.get("head") and CLONE_LABEL not in (snap.get("labels") or {})


def csi_snapshot(view: dict[str, Any], snap: dict[str, Any]) -> Any:
    """The CSI Snapshot of a drove snapshot of volume ``view``."""
    from google.protobuf.timestamp_pb2 import Timestamp

    created = Timestamp()
    if snap.get("created"):
        created.FromDatetime(datetime.fromisoformat(snap["created"].replace("Z", "+00:00")))
    return pb.Snapshot(size_bytes=view["size"], snapshot_id=ids.snapshot_id(view["name"],
                                                                          snap["name"]),
                       source_volume_id=view["name"], creation_time=created, ready_to_use=True)
