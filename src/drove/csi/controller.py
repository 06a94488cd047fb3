"""The CSI Controller service: volumes, snapshots, publish (attach) through the manager's API.

Every call is idempotent as the spec asks: a repeated create answers what exists when it
matches the request (ALREADY_EXISTS when it does not), a delete of what is gone is OK.
"""

from __future__ import annotations

import contextlib
from typing import Any

import grpc

from drove.cli.client import Manager, ManagerError
from drove.csi import ids, params
from drove.csi.common import (
    VolumeLocks,
    attached,
    condition,
    get_or_none,
    page,
    published_on,
)
from drove.csi.errors import CsiError, handler, invalid, not_found, precondition
from drove.csi.proto import TOPOLOGY_NODE, pb, rpc
from drove.csi.snapshots import Snapshots

LABEL_MAX = 253
"""The longest label value the manager takes."""
RPC = pb.ControllerServiceCapability.RPC
CAPABILITIES = (RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES,
                RPC.GET_CAPACITY, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
                RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME, RPC.LIST_VOLUMES_PUBLISHED_NODES,
                RPC.VOLUME_CONDITION, RPC.GET_VOLUME, RPC.MODIFY_VOLUME)


def csi_volume(view: dict[str, Any]) -> Any:
    """The CSI Volume for a drove volume's view."""
    labels = view.get("labels") or {}
    ctx = {}
    fs = params.from_label(labels.get(ids.LABEL_PARAMS)).get("fsType")
    if fs:
        ctx["fsType"] = fs
    source = None
    kind, _, ident = (labels.get(ids.LABEL_SOURCE) or "").partition(":")
    if kind == "snapshot":
        source = pb.VolumeContentSource(
            snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=ident))
    elif kind == "volume":
        source = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=ident))
    topology = []
    if view.get("data_locality") == "strict-local":
        # Its one replica is served by the engine itself: usable on that node only.
        topology = [pb.Topology(segments={TOPOLOGY_NODE: r["node"]})
                    for r in view.get("replicas", []) if r.get("node")][:1]
    return pb.Volume(capacity_bytes=view["size"], volume_id=view["name"], volume_context=ctx,
                     content_source=source, accessible_topology=topology)


class Controller(rpc.ControllerServicer):
    """The Controller service of one driver process, talking to the manager ``mgr``."""

    def __init__(self, mgr: Manager) -> None:
        self._mgr = mgr
        self._locks = VolumeLocks()
        self._snapshots = Snapshots(mgr, self._locks)

    # ------------------------------------------------------------ volumes

    @handler
    def CreateVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Create (or find again) the volume of a CSI name, with the QoS limits and the
        encryption its parameters ask; from a snapshot or a volume: a linked clone, grown to
        the size asked."""
        if not request.name:
            raise invalid("name missing")
        if not request.volume_capabilities:
            raise invalid("volume_capabilities missing")
        fs_types = {ids.check_capability(c, "volume_capabilities") for c in
                    request.volume_capabilities} - {None, ""}
        if len(fs_types) > 1:
            raise invalid(f"volume_capabilities name several filesystems "
                          f"({', '.join(sorted(fs_types))}): a volume has one")
        body = params.create_body(request.parameters, request.mutable_parameters)
        fs = request.parameters.get("fsType") or next(iter(fs_types), "")
        if fs_types and fs not in fs_types:
            raise invalid(f"parameter fsType={fs} differs from the capabilities' fs_type "
                          f"{next(iter(fs_types))}")
        name = ids.drove_name(request.name)
        source = self._source(request)
        # Kept to tell a repeated request from another: the mutable parameters are the ones
        # asked at creation (a later ControllerModifyVolume changes the volume, not these).
        asked = {**request.parameters, **request.mutable_parameters}
        if fs:
            asked["fsType"] = fs
        labels = {ids.LABEL_NAME: request.name, ids.LABEL_SOURCE: source,
                  ids.LABEL_PARAMS: params.label(asked)}
        if max(len(v) for v in labels.values()) > LABEL_MAX:
            # They are kept in the volume's labels, to compare a repeated request with.
            raise invalid(f"name, content source and parameters must each fit in "
                          f"{LABEL_MAX} characters")
        with self._locks.hold(name):
            view = get_or_none(self._mgr, f"/v1/volumes/{name}")
            if view is not None:
                return pb.CreateVolumeResponse(volume=self._existing(view, request, labels))
            if source:
                view = self._clone(name, source, request.capacity_range, body, labels)
            else:
                size = ids.size_for(request.capacity_range)
                try:
                    view = self._mgr.post("/v1/volumes", {"name": name, "size": size,
                                                          "labels": labels, **body})
                except ManagerError as exc:
                    if exc.status == 409 and get_or_none(self._mgr, f"/v1/volumes/{name}"):
                        raise CsiError(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
                    if exc.status == 409:  # cannot be placed
                        raise CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
                    raise
        return pb.CreateVolumeResponse(volume=csi_volume(view))

    def _source(self, request: Any) -> str:
        """``snapshot:ID``, ``volume:ID`` or '' for the request's content source; NOT_FOUND
        when it does not exist."""
        src = request.volume_content_source
        kind = src.WhichOneof("type") if request.HasField("volume_content_source") else None
        if kind == "snapshot":
            parsed = ids.parse_snapshot_id(src.snapshot.snapshot_id)
            if parsed is None or self._snapshots.find(*parsed) is None:
                raise not_found(f"source snapshot {src.snapshot.snapshot_id!r} does not exist")
            return f"snapshot:{src.snapshot.snapshot_id}"
        if kind == "volume":
            vid = src.volume.volume_id
            if not vid or get_or_none(self._mgr, f"/v1/volumes/{vid}") is None:
                raise not_found(f"source volume {vid!r} does not exist")
            return f"volume:{vid}"
        return ""

    def _existing(self, view: dict[str, Any], request: Any, labels: dict[str, str]) -> Any:
        """The CSI volume for an existing drove volume when it is what the request asks for;
        ALREADY_EXISTS saying what differs otherwise."""
        have = view.get("labels") or {}
        if have.get(ids.LABEL_NAME) != labels[ids.LABEL_NAME]:
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"a drove volume {view['name']} exists that was not made for "
                           f"CSI name {request.name!r}")
        if not ids.fits(view["size"], request.capacity_range):
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"volume {request.name!r} exists with {view['size']} bytes, "
                           "outside the capacity range asked")
        for key, what in ((ids.LABEL_SOURCE, "content source"), (ids.LABEL_PARAMS,
                                                                  "parameters")):
            # Parameters compare as JSON: labels written by an older driver spaced it out.
            same = (params.from_label(have.get(key)) == params.from_label(labels[key])
                    if key == ids.LABEL_PARAMS else have.get(key, "") == labels[key])
            if not same:
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"volume {request.name!r} exists with another {what} "
                               f"({have.get(key)!r}, asked {labels[key]!r})")
        return csi_volume(view)

    def _clone(self, name: str, source: str, capacity: Any, body: dict[str, Any],
               labels: dict[str, str]) -> dict[str, Any]:
        """A linked clone of the source (its snapshot, or one taken now), grown to the size
        asked, with the QoS limits asked; OUT_OF_RANGE when that is below the source's size,
        INVALID_ARGUMENT when ``encrypted`` is not what the source is (a clone shares its
        source's key, or its lack of one)."""
        kind, _, ident = source.partition(":")
        if kind == "snapshot":
            src, snap = ids.parse_snapshot_id(ident) or ("", "")
        else:
            src, snap = ident, None
        src_view = self._mgr.get(f"/v1/volumes/{src}")
        size = ids.size_for(capacity, minimum=src_view["size"])
        if body.get("pool"):
            raise invalid("parameter pool cannot apply to a volume made from a source: a "
                          "linked clone lives on its source's disks")
        encrypted = bool(src_view.get("encryption"))
        if body.get("encrypted", encrypted) != encrypted:
            raise invalid(f"parameter encrypted={str(body['encrypted']).lower()}, but source "
                          f"volume {src} is {'' if encrypted else 'not '}encrypted: a clone "
                          "shares its source's key (or its lack of one)")
        # A volume never attached has no data files yet to link: attach it for the clone.
        fresh = any(r.get("state") == "pending" for r in src_view.get("replicas", []))
        with self._locks.hold(src), (attached(self._mgr, src) if fresh and snap is None
                                     else contextlib.nullcontext()):
            view = self._mgr.post(f"/v1/volumes/{src}/clone",
                                  {"name": name, "snapshot": snap,
                                   "replicas": body.get("replicas"), "labels": labels})
        change = {k: body[k] for k in ("data_locality", "qos") if body.get(k)}
        if change:
            view = self._mgr.patch(f"/v1/volumes/{name}", change)
        if size > view["size"]:
            view = self._mgr.post(f"/v1/volumes/{name}/expand", {"size": size})
        return view

    @handler
    def DeleteVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Delete the volume (OK when it is gone already); FAILED_PRECONDITION while
        published."""
        if not request.volume_id:
            raise invalid("volume_id missing")
        with self._locks.hold(request.volume_id):
            try:
                self._mgr.delete(f"/v1/volumes/{request.volume_id}")
            except ManagerError as exc:
                if exc.status not in (404, 422):  # 422: a name drove never gives
                    raise
        return pb.DeleteVolumeResponse()

    @handler
    def ControllerPublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Attach the volume on the node (start its engine there)."""
        if not request.volume_id:
            raise invalid("volume_id missing")
        if not request.node_id:
            raise invalid("node_id missing")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability missing")
        ids.check_capability(request.volume_capability)
        vid, node = request.volume_id, request.node_id
        with self._locks.hold(vid):
            view = get_or_none(self._mgr, f"/v1/volumes/{vid}")
            if view is None:
                raise not_found(f"volume {vid!r} does not exist")
            if node not in {n["name"] for n in self._mgr.get("/v1/nodes")}:
                raise not_found(f"node {node!r} is not a drove node")
            if view.get("state") == "attached" and view.get("node") == node:
                return pb.ControllerPublishVolumeResponse(publish_context={"node": node})
            if view.get("state") != "detached":
                raise precondition(f"volume {vid} is {view.get('state')} on node "
                                   f"{view.get('node')}: unpublish it there first")
            self._mgr.post(f"/v1/volumes/{vid}/attach", {"node": node})
        return pb.ControllerPublishVolumeResponse(publish_context={"node": node})

    @handler
    def ControllerUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Detach the volume from the node (OK when it is not attached there)."""
        if not request.volume_id:
            raise invalid("volume_id missing")
        vid = request.volume_id
        with self._locks.hold(vid):
            view = get_or_none(self._mgr, f"/v1/volumes/{vid}")
            if view is None:  # gone: unpublished from every node, as the spec allows
                return pb.ControllerUnpublishVolumeResponse()
            if view.get("state") != "detached" and (not request.node_id
                                                    or view.get("node") == request.node_id):
                self._mgr.post(f"/v1/volumes/{vid}/detach", {})
        return pb.ControllerUnpublishVolumeResponse()

    @handler
    def ValidateVolumeCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Confirm the capabilities when drove can serve all of them."""
        if not request.volume_id:
            raise invalid("volume_id missing")
        if not request.volume_capabilities:
            raise invalid("volume_capabilities missing")
        if get_or_none(self._mgr, f"/v1/volumes/{request.volume_id}") is None:
            raise not_found(f"volume {request.volume_id!r} does not exist")
        problems = [p for c in request.volume_capabilities if (p := ids.capability_problem(c))]
        if problems:
            return pb.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities, parameters=request.parameters,
            mutable_parameters=request.mutable_parameters)
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @handler
    def ListVolumes(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Every drove volume by name, a page at a time."""
        views = sorted(self._mgr.get("/v1/volumes"), key=lambda v: v["name"])
        chosen, token = page(views, [v["name"] for v in views], request.max_entries,
                             request.starting_token)
        status = pb.ListVolumesResponse.VolumeStatus
        entries = [pb.ListVolumesResponse.Entry(
            volume=csi_volume(v), status=status(published_node_ids=published_on(v),
                                                volume_condition=condition(v)))
            for v in chosen]
        return pb.ListVolumesResponse(entries=entries, next_token=token)

    @handler
    def ControllerGetVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """One volume, where it is published and its condition."""
        if not request.volume_id:
            raise invalid("volume_id missing")
        view = get_or_none(self._mgr, f"/v1/volumes/{request.volume_id}")
        if view is None:
            raise not_found(f"volume {request.volume_id!r} does not exist")
        status = pb.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=published_on(view), volume_condition=condition(view))
        return pb.ControllerGetVolumeResponse(volume=csi_volume(view), status=status)

    @handler
    def GetCapacity(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Room left for replicas on ready disks (of the pool; of the topology's node)."""
        for c in request.volume_capabilities:
            ids.check_capability(c, "volume_capabilities")
        pool = request.parameters.get("pool")
        node = request.accessible_topology.segments.get(TOPOLOGY_NODE)
        percent = self._mgr.get("/v1/settings").get("over_provisioning_percent", 100)
        rooms = [max(0, d["capacity"] * percent // 100 - d.get("reserved", 0)
                     - d.get("scheduled", 0))
                 for d in self._mgr.get("/v1/disks")
                 if d.get("state") == "ready" and (not pool or pool in d.get("tags", []))
                 and (not node or d.get("node") == node)]
        from google.protobuf.wrappers_pb2 import Int64Value

        largest = max(rooms, default=0) // ids.BLOCK * ids.BLOCK
        return pb.GetCapacityResponse(available_capacity=sum(rooms),
                                      maximum_volume_size=Int64Value(value=largest))

    @handler
    def ControllerGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        """What this controller does."""
        caps = [pb.ControllerServiceCapability(rpc=RPC(type=t)) for t in CAPABILITIES]
        return pb.ControllerGetCapabilitiesResponse(capabilities=caps)

    @handler
    def ControllerExpandVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Grow the volume (online when attached); the node grows the filesystem after."""
        if not request.volume_id:
            raise invalid("volume_id missing")
        if not request.HasField("capacity_range"):
            raise invalid("capacity_range missing")
        vid = request.volume_id
        with self._locks.hold(vid):
            view = get_or_none(self._mgr, f"/v1/volumes/{vid}")
            if view is None:
                raise not_found(f"volume {vid!r} does not exist")
            size = ids.size_for(request.capacity_range)
            if size > view["size"]:
                view = self._mgr.post(f"/v1/volumes/{vid}/expand", {"size": size})
            elif not ids.fits(view["size"], request.capacity_range):
                raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                               f"volume {vid} has {view['size']} bytes already, above "
                               f"limit_bytes {request.capacity_range.limit_bytes}: drove "
                               "does not shrink volumes")
        # Node expansion also for block access: a staged device is limited to the size it
        # was staged at until NodeExpandVolume raises it (host attach's growable view).
        return pb.ControllerExpandVolumeResponse(capacity_bytes=view["size"],
                                                 node_expansion_required=True)

    @handler
    def ControllerModifyVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Change the volume's QoS limits (at once in its engine when attached); the limits
        not named keep their value; INVALID_ARGUMENT for what cannot change (encryption)."""
        if not request.volume_id:
            raise invalid("volume_id missing")
        change = params.mutable(request.mutable_parameters)
        vid = request.volume_id
        with self._locks.hold(vid):
            if get_or_none(self._mgr, f"/v1/volumes/{vid}") is None:
                raise not_found(f"volume {vid!r} does not exist")
            if change:
                self._mgr.patch(f"/v1/volumes/{vid}", {"qos": change})
        return pb.ControllerModifyVolumeResponse()

    # ------------------------------------------------------------ snapshots

    @handler
    def CreateSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Snapshot a volume (:meth:`Snapshots.create`)."""
        return self._snapshots.create(request)

    @handler
    def DeleteSnapshot(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Delete a snapshot (:meth:`Snapshots.delete`)."""
        return self._snapshots.delete(request)

    @handler
    def ListSnapshots(self, request: Any, context: grpc.ServicerContext) -> Any:
        """List snapshots (:meth:`Snapshots.listing`)."""
        return self._snapshots.listing(request)
