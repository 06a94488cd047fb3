"""The CSI Node service: the volume's device on this host (nbdfuse + loop, drove's host
attach), its filesystem staged once and bind-mounted at each target, or the raw device
itself published for block access.

What each staged volume set up is kept in ``STATE_DIR/volumes/VOLUME.json`` (the host
attachment, the staging path, the published targets), so a restarted driver unstages
and unpublishes what an earlier one did.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import grpc

from drove.agent import hostattach
from drove.cli.client import Manager, ManagerError
from drove.csi import ids, mounts
from drove.csi.common import VolumeLocks, condition, get_or_none
from drove.csi.errors import CsiError, handler, invalid, not_found, precondition
from drove.csi.proto import TOPOLOGY_NODE, TOPOLOGY_ZONE, pb, rpc
from drove.engine.hostview import view_name
from drove.manager.errors import NAME_RE

NodeRPC = pb.NodeServiceCapability.RPC
CAPABILITIES = (NodeRPC.STAGE_UNSTAGE_VOLUME, NodeRPC.GET_VOLUME_STATS, NodeRPC.EXPAND_VOLUME,
                NodeRPC.VOLUME_CONDITION)


class Node(rpc.NodeServicer):
    """The Node service of node ``node_id``, keeping its state under ``state_dir``."""

    def __init__(self, mgr: Manager, node_id: str, state_dir: Path) -> None:
        self._mgr = mgr
        self._node = node_id
        self._dir = state_dir
        (state_dir / "volumes").mkdir(parents=True, exist_ok=True)
        self._locks = VolumeLocks()

    # ------------------------------------------------------------ records

    def _record_path(self, vid: str) -> Path:
        if not NAME_RE.match(vid):
            raise not_found(f"volume {vid!r} does not exist (not a drove volume name)")
        return self._dir / "volumes" / f"{vid}.json"

    def _load(self, vid: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._record_path(vid).read_text())
        except FileNotFoundError:
            return None

    def _save(self, vid: str, record: dict[str, Any]) -> None:
        # Written whole and renamed: a crash leaves the old record or the new one.
        path = self._record_path(vid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def _workdir(self, vid: str) -> Path:
        return self._dir / "attach" / vid

    # ------------------------------------------------------------ stage

    @handler
    def NodeStageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Give this host the volume's device; for mount access make a filesystem if it is
        blank and mount it at the staging path."""
        vid, staging = request.volume_id, request.staging_target_path
        if not vid:
            raise invalid("volume_id missing")
        if not staging:
            raise invalid("staging_target_path missing")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability missing")
        fs = ids.check_capability(request.volume_capability)
        block = fs is None
        with self._locks.hold(vid):
            record = self._load(vid)
            if record is not None:
                if record["staging"] != staging or record["block"] != block:
                    raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"volume {vid} is staged at {record['staging']} already "
                                   f"({'block' if record['block'] else 'mount'} access)")
                return pb.NodeStageVolumeResponse()
            view = get_or_none(self._mgr, f"/v1/volumes/{vid}")
            if view is None:
                raise not_found(f"volume {vid!r} does not exist")
            if view.get("state") != "attached" or view.get("node") != self._node:
                raise precondition(f"volume {vid} is not published on node {self._node} "
                                   f"(it is {view.get('state')} on {view.get('node')}): "
                                   "ControllerPublishVolume first")
            if view.get("device"):
                raise precondition(f"volume {vid} has a host device already ({view['device']}"
                                   f", mounted at {view.get('mountpoint')}): it was attached "
                                   "outside CSI; detach it first")
            fs = fs or request.volume_context.get("fsType") or "ext4"
            uri, grow_uri = view["nbd_uri"], None
            if view.get("nbd_unix"):
                sock = view["nbd_unix"]
                # The engine's growable view of the volume: the device can grow online.
                uri, grow_uri = (f"nbd+unix:///{vid}?socket={sock}",
                                 f"nbd+unix:///{view_name(vid)}?socket={sock}")
            hostattach.cleanup_stale(self._workdir(vid))
            try:
                att = hostattach.attach(uri, self._workdir(vid), fuse_uri=grow_uri,
                                        mount=None if block else Path(staging), fs=fs)
            except hostattach.HostAttachError as exc:
                raise CsiError(grpc.StatusCode.INTERNAL,
                               f"volume {vid}: host attach failed: {exc}") from exc
            flags = list(request.volume_capability.mount.mount_flags)
            if flags and not block:
                try:
                    mounts.remount(staging, flags)
                except mounts.MountError as exc:
                    hostattach.detach(att)
                    raise invalid(f"mount_flags {flags}: {exc}") from exc
            self._save(vid, {"volume": vid, "staging": staging, "block": block,
                             "attachment": att.to_json(), "targets": {}})
        return pb.NodeStageVolumeResponse()

    @handler
    def NodeUnstageVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Unmount the staging path and release the device (OK when not staged)."""
        vid, staging = request.volume_id, request.staging_target_path
        if not vid:
            raise invalid("volume_id missing")
        if not staging:
            raise invalid("staging_target_path missing")
        with self._locks.hold(vid):
            record = self._load(vid)
            if record is None:
                return pb.NodeUnstageVolumeResponse()
            if record["targets"]:
                raise precondition(f"volume {vid} is still published at "
                                   f"{', '.join(sorted(record['targets']))}: "
                                   "NodeUnpublishVolume first")
            try:
                hostattach.detach(hostattach.HostAttachment.from_json(record["attachment"]))
            except hostattach.HostAttachError as exc:
                raise CsiError(grpc.StatusCode.INTERNAL,
                               f"volume {vid}: cannot release its device: {exc}") from exc
            hostattach.cleanup_stale(self._workdir(vid))
            self._record_path(vid).unlink()
        return pb.NodeUnstageVolumeResponse()

    # ------------------------------------------------------------ publish

    @handler
    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Bind the staged filesystem (or, for block access, the device itself) at the
        target path; read-only when asked."""
        vid, target = request.volume_id, request.target_path
        if not vid:
            raise invalid("volume_id missing")
        if not target:
            raise invalid("target_path missing")
        if not request.staging_target_path:
            raise invalid("staging_target_path missing: the volume must be staged first")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability missing")
        block = ids.check_capability(request.volume_capability) is None
        with self._locks.hold(vid):
            record = self._staged(vid)
            if record["block"] != block:
                raise invalid(f"volume {vid} is staged for "
                              f"{'block' if record['block'] else 'mount'} access")
            published = record["targets"].get(target)
            if published is not None:
                if published["readonly"] != request.readonly:
                    raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                                   f"volume {vid} is published at {target} already "
                                   f"(readonly={published['readonly']})")
                if mounts.is_mount(target):
                    return pb.NodePublishVolumeResponse()
            entry: dict[str, Any] = {"readonly": request.readonly}
            try:
                if block:
                    source = record["attachment"]["device"]
                    if request.readonly:
                        source = entry["loop"] = mounts.readonly_device(source)
                        # Saved before the bind: an unpublish finds the loop to release.
                        record["targets"][target] = entry
                        self._save(vid, record)
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                    Path(target).touch(exist_ok=True)
                else:
                    source = record["staging"]
                    Path(target).mkdir(parents=True, exist_ok=True)
                flags = [] if block else list(request.volume_capability.mount.mount_flags)
                mounts.bind(source, target, readonly=request.readonly, flags=flags)
            except mounts.MountError as exc:
                raise CsiError(grpc.StatusCode.INTERNAL, f"volume {vid}: {exc}") from exc
            record["targets"][target] = entry
            self._save(vid, record)
        return pb.NodePublishVolumeResponse()

    def _staged(self, vid: str) -> dict[str, Any]:
        """The record of a staged volume; NOT_FOUND for an unknown volume, else
        FAILED_PRECONDITION."""
        record = self._load(vid)
        if record is None:
            if get_or_none(self._mgr, f"/v1/volumes/{vid}") is None:
                raise not_found(f"volume {vid!r} does not exist")
            raise precondition(f"volume {vid} is not staged on this node: "
                               "NodeStageVolume first")
        return record

    @handler
    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Unmount the target and remove it (OK when it is not published)."""
        vid, target = request.volume_id, request.target_path
        if not vid:
            raise invalid("volume_id missing")
        if not target:
            raise invalid("target_path missing")
        with self._locks.hold(vid):
            record = self._load(vid)
            entry = (record or {}).get("targets", {}).get(target) or {}
            try:
                if mounts.is_mount(target):
                    mounts.unmount(target)
                if entry.get("loop"):
                    mounts.release_device(entry["loop"])
            except mounts.MountError as exc:
                raise CsiError(grpc.StatusCode.INTERNAL,
                               f"volume {vid}: cannot unpublish {target}: {exc}") from exc
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(target) and not os.path.islink(target):
                    os.rmdir(target)
                else:
                    os.unlink(target)
            if record is not None and target in record["targets"]:
                del record["targets"][target]
                self._save(vid, record)
        return pb.NodeUnpublishVolumeResponse()

    # ------------------------------------------------------------ stats, growth, info

    def _at_path(self, vid: str, path: str, what: str) -> dict[str, Any]:
        """The record of ``vid`` when ``path`` is its staging path or a target of it."""
        if not vid:
            raise invalid("volume_id missing")
        if not path:
            raise invalid(f"{what} missing")
        record = self._load(vid)
        if record is None:
            raise not_found(f"volume {vid!r} is not staged on node {self._node}")
        if not os.path.exists(path) or (path != record["staging"]
                                        and path not in record["targets"]):
            raise not_found(f"volume {vid} is not staged or published at {path}")
        return record

    @handler
    def NodeGetVolumeStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Bytes and inodes of the filesystem (bytes of the device for block access), and
        the volume's condition."""
        record = self._at_path(request.volume_id, request.volume_path, "volume_path")
        unit = pb.VolumeUsage
        device = record["attachment"]["device"]
        problems = []
        staged_block = record["block"] and request.volume_path == record["staging"]
        if not staged_block and not mounts.is_mount(request.volume_path):
            problems.append(f"{request.volume_path} is not mounted")
        try:
            view = self._mgr.get(f"/v1/volumes/{request.volume_id}")
            cond = condition(view)
        except ManagerError as exc:
            cond = pb.VolumeCondition(abnormal=True, message=f"manager: {exc}")
        if problems:
            cond = pb.VolumeCondition(abnormal=True,
                                      message="; ".join([*problems, cond.message]))
        if record["block"]:
            usage = [unit(total=mounts.device_size(device), unit=unit.BYTES)]
        else:
            st = os.statvfs(request.volume_path)
            usage = [unit(total=st.f_blocks * st.f_frsize, available=st.f_bavail * st.f_frsize,
                          used=(st.f_blocks - st.f_bfree) * st.f_frsize, unit=unit.BYTES),
                     unit(total=st.f_files, available=st.f_favail,
                          used=st.f_files - st.f_ffree, unit=unit.INODES)]
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=cond)

    @handler
    def NodeExpandVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Grow the device to the volume's new size and its filesystem, online."""
        path = request.volume_path
        with self._locks.hold(request.volume_id or "-"):
            record = self._at_path(request.volume_id, path, "volume_path")
            att = hostattach.HostAttachment.from_json(record["attachment"])
            want = self._mgr.get(f"/v1/volumes/{request.volume_id}")["size"]
            try:
                if mounts.device_size(att.device) < want:
                    # The device grows (then its filesystem) with the host attach's growth.
                    att = hostattach.grow(att)
                    record["attachment"] = att.to_json()
                    self._save(request.volume_id, record)
                    for entry in record["targets"].values():
                        if entry.get("loop"):  # a read-only loop over the device: resize it
                            mounts.refresh_size(entry["loop"])
                elif not record["block"]:
                    # The device has its size (grown before staging, or by an earlier call
                    # whose filesystem step failed): the filesystem may not.
                    hostattach.grow_filesystem(att.device, record["staging"])
            except (hostattach.HostAttachError, mounts.MountError) as exc:
                raise CsiError(grpc.StatusCode.INTERNAL,
                               f"volume {request.volume_id}: cannot grow: {exc}") from exc
            size = mounts.device_size(att.device)
        required = request.capacity_range.required_bytes
        if required and size < required:
            raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                           f"volume {request.volume_id}: the device has {size} bytes, fewer "
                           f"than the {required} asked: ControllerExpandVolume first")
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)

    @handler
    def NodeGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Stage/unstage, volume stats and condition, expansion."""
        caps = [pb.NodeServiceCapability(rpc=NodeRPC(type=t)) for t in CAPABILITIES]
        return pb.NodeGetCapabilitiesResponse(capabilities=caps)

    @handler
    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        """This node's ID and topology: the node, and its zone when it has one."""
        segments = {TOPOLOGY_NODE: self._node}
        node = next((n for n in self._mgr.get("/v1/nodes") if n["name"] == self._node), None)
        if node and node.get("zone"):
            segments[TOPOLOGY_ZONE] = node["zone"]
        return pb.NodeGetInfoResponse(node_id=self._node,
                                      accessible_topology=pb.Topology(segments=segments))
