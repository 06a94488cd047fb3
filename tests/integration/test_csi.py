"""The CSI driver (`drove csi`) through a real gRPC client over its unix socket, against a
real `drove serve`: every RPC, real mounts and raw block devices (nbdfuse + loop), the
spec's error codes and idempotency."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_agent import agents  # noqa: F401 - agents is a fixture

from csitools import CsiDriver, Mode, block_cap, code_of, mount_cap, wait_for
from drove.csi.proto import PLUGIN_NAME, TOPOLOGY_NODE, TOPOLOGY_ZONE, pb
from managertools import ManagerProc

MiB = 1 << 20
C = grpc.StatusCode
ONE = {"replicas": "1"}  # one machine: one replica per volume


@pytest.fixture
def csi(manager: ManagerProc, tmp_path: Path) -> Iterator[tuple[ManagerProc, CsiDriver]]:
    """`drove csi` on the manager's node; stopped at teardown (the manager fixture then
    kills and unmounts whatever is left under tmp_path)."""
    node = manager.ok("GET", "/v1/nodes")[0]["name"]
    driver = CsiDriver(manager.data_dir, tmp_path, node).start()
    yield manager, driver
    driver.take_down_all()
    driver.stop()


def create(d: CsiDriver, name: str, size: int = 64 * MiB, params: dict[str, str] | None = None,
           cap: Any = None, source: Any = None, mutable: dict[str, str] | None = None) -> Any:
    """CreateVolume (``mutable``: its mutable_parameters); the Volume."""
    req = pb.CreateVolumeRequest(name=name, capacity_range=pb.CapacityRange(
        required_bytes=size), volume_capabilities=[cap or mount_cap()],
        parameters=ONE if params is None else params, volume_content_source=source,
        mutable_parameters=mutable or {})
    return d.controller.CreateVolume(req).volume


def stage_and_publish(d: CsiDriver, vid: str, tmp: Path, cap: Any, *,
                      readonly: bool = False, target: str = "target") -> tuple[str, str]:
    """ControllerPublish, NodeStage and NodePublish; (staging path, target path)."""
    d.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=d.node, volume_capability=cap))
    staging, tgt = tmp / f"staging-{vid}", tmp / "pods" / f"{target}-{vid}"
    staging.mkdir(exist_ok=True)
    d.node_service.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), volume_capability=cap))
    d.node_service.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vid, staging_target_path=str(staging), target_path=str(tgt),
        volume_capability=cap, readonly=readonly))
    return str(staging), str(tgt)


def take_down(d: CsiDriver, vid: str, staging: str, *targets: str) -> None:
    """NodeUnpublish every target, NodeUnstage, ControllerUnpublish."""
    for t in targets:
        d.node_service.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid,
                                                                         target_path=t))
    d.node_service.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid,
                                                                 staging_target_path=staging))
    d.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vid, node_id=d.node))


def test_identity_and_node_info(csi: tuple[ManagerProc, CsiDriver]) -> None:
    m, d = csi
    info = d.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == PLUGIN_NAME and info.vendor_version
    caps = d.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert services == {pb.PluginCapability.Service.CONTROLLER_SERVICE,
                        pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    assert d.identity.Probe(pb.ProbeRequest()).ready.value is True
    ctl = {c.rpc.type for c in d.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest()).capabilities}
    rpc = pb.ControllerServiceCapability.RPC
    assert {rpc.CREATE_DELETE_VOLUME, rpc.CLONE_VOLUME, rpc.EXPAND_VOLUME,
            rpc.CREATE_DELETE_SNAPSHOT, rpc.GET_VOLUME, rpc.VOLUME_CONDITION,
            rpc.MODIFY_VOLUME} <= ctl
    nrpc = pb.NodeServiceCapability.RPC
    node_caps = {c.rpc.type for c in d.node_service.NodeGetCapabilities(
        pb.NodeGetCapabilitiesRequest()).capabilities}
    assert {nrpc.STAGE_UNSTAGE_VOLUME, nrpc.GET_VOLUME_STATS, nrpc.EXPAND_VOLUME} <= node_caps
    got = d.node_service.NodeGetInfo(pb.NodeGetInfoRequest())
    assert got.node_id == d.node
    assert dict(got.accessible_topology.segments) == {TOPOLOGY_NODE: d.node}
    m.ok("PATCH", f"/v1/nodes/{d.node}", json={"zone": "z1"})
    got = d.node_service.NodeGetInfo(pb.NodeGetInfoRequest())
    assert dict(got.accessible_topology.segments) == {TOPOLOGY_NODE: d.node,
                                                      TOPOLOGY_ZONE: "z1"}
    m.stop()
    assert code_of(d.identity.Probe, pb.ProbeRequest()) == C.UNAVAILABLE  # no manager


def test_create_is_idempotent_and_refuses_what_differs(
        csi: tuple[ManagerProc, CsiDriver]) -> None:
    m, d = csi
    vol = create(d, "pvc-1", 64 * MiB, {"replicas": "1", "fsType": "xfs"})
    assert vol.volume_id == "pvc-1" and vol.capacity_bytes == 64 * MiB
    assert dict(vol.volume_context) == {"fsType": "xfs"}
    again = create(d, "pvc-1", 64 * MiB, {"replicas": "1", "fsType": "xfs"})
    assert again == vol
    assert len(m.ok("GET", "/v1/volumes")) == 1
    # The same name with another size or other parameters: ALREADY_EXISTS, nothing changed.
    with pytest.raises(grpc.RpcError) as err:
        create(d, "pvc-1", 128 * MiB, {"replicas": "1", "fsType": "xfs"})
    assert err.value.code() == C.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        create(d, "pvc-1", 64 * MiB, {"replicas": "1", "fsType": "ext4"})
    assert err.value.code() == C.ALREADY_EXISTS
    assert m.volume("pvc-1")["size"] == 64 * MiB
    # A CSI name no drove name can hold (128 characters, capitals) gets one of its own.
    long_name = "PVC-" + "x" * 124
    lv = create(d, long_name, 10 * MiB)
    assert lv.volume_id != long_name and create(d, long_name, 10 * MiB) == lv
    # An odd size is rounded up to 4 KiB blocks, within the limit.
    odd = d.controller.CreateVolume(pb.CreateVolumeRequest(
        name="odd", capacity_range=pb.CapacityRange(required_bytes=MiB + 1,
                                                    limit_bytes=2 * MiB),
        volume_capabilities=[mount_cap()], parameters=ONE)).volume
    assert odd.capacity_bytes == MiB + 4096


BAD_CREATES = [
    ({"name": ""}, C.INVALID_ARGUMENT, "name"),
    ({"name": "v", "volume_capabilities": []}, C.INVALID_ARGUMENT, "volume_capabilities"),
    ({"parameters": {"color": "blue"}}, C.INVALID_ARGUMENT, "color"),
    ({"parameters": {"replicas": "zero"}}, C.INVALID_ARGUMENT, "replicas"),
    ({"parameters": {"replicas": "1", "dataLocality": "near"}}, C.INVALID_ARGUMENT,
     "dataLocality"),
    ({"parameters": {"replicas": "1", "fsType": "ntfs"}}, C.INVALID_ARGUMENT, "ntfs"),
    ({"parameters": {"replicas": "1", "iopsLimit": "-5"}}, C.INVALID_ARGUMENT, "iopsLimit"),
    ({"parameters": {"replicas": "1", "bandwidthLimit": "fast"}}, C.INVALID_ARGUMENT,
     "bandwidthLimit"),
    ({"parameters": {"replicas": "1", "burst": "61"}}, C.INVALID_ARGUMENT, "burst"),
    ({"parameters": {"replicas": "1", "encrypted": "maybe"}}, C.INVALID_ARGUMENT, "encrypted"),
    # This manager has no key-encryption key: the manager's refusal, saying what it needs.
    ({"parameters": {"replicas": "1", "encrypted": "true"}}, C.INVALID_ARGUMENT, "--kek-file"),
    ({"mutable_parameters": {"encrypted": "true"}}, C.INVALID_ARGUMENT, "cannot change"),
    ({"mutable_parameters": {"XXX_FakeKey": "x"}}, C.INVALID_ARGUMENT, "XXX_FakeKey"),
    ({"volume_capabilities": [mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]},
     C.INVALID_ARGUMENT, "MULTI_NODE_MULTI_WRITER"),
    ({"volume_capabilities": [mount_cap(fs="zfs")]}, C.INVALID_ARGUMENT, "zfs"),
    ({"capacity_range": pb.CapacityRange(required_bytes=2 * MiB, limit_bytes=MiB)},
     C.OUT_OF_RANGE, "limit_bytes"),
    ({"capacity_range": pb.CapacityRange(required_bytes=MiB + 1, limit_bytes=MiB + 2)},
     C.OUT_OF_RANGE, "limit_bytes"),
    ({"volume_content_source": pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id="nope@s1"))},
     C.NOT_FOUND, "nope@s1"),
    ({"volume_content_source": pb.VolumeContentSource(
        volume=pb.VolumeContentSource.VolumeSource(volume_id="nope"))}, C.NOT_FOUND, "nope"),
]


def test_bad_create_requests_change_nothing(csi: tuple[ManagerProc, CsiDriver]) -> None:
    m, d = csi
    for request_fields, code, words in BAD_CREATES:
        fields = {"name": "bad", "volume_capabilities": [mount_cap()], "parameters": ONE,
                  "capacity_range": pb.CapacityRange(required_bytes=MiB), **request_fields}
        with pytest.raises(grpc.RpcError) as err:
            d.controller.CreateVolume(pb.CreateVolumeRequest(**fields))
        assert (err.value.code(), request_fields) == (code, request_fields)
        assert words in err.value.details()
    assert m.ok("GET", "/v1/volumes") == []


def test_list_get_capacity_and_delete(csi: tuple[ManagerProc, CsiDriver]) -> None:
    m, d = csi
    before = d.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity
    names = [f"v{i}" for i in range(5)]
    for n in names:
        create(d, n, 16 * MiB)
    after = d.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity
    assert before - after == 5 * 16 * MiB  # each replica's size is scheduled on the disk
    assert d.controller.GetCapacity(pb.GetCapacityRequest(
        parameters={"pool": "no-such-pool"})).available_capacity == 0
    seen, token, pages = [], "", 0
    while True:
        resp = d.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2,
                                                              starting_token=token))
        seen += [e.volume.volume_id for e in resp.entries]
        pages += 1
        assert len(resp.entries) <= 2
        token = resp.next_token
        if not token:
            break
    assert seen == names and pages == 3
    assert code_of(d.controller.ListVolumes,
                   pb.ListVolumesRequest(starting_token="garbage")) == C.ABORTED
    got = d.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id="v0"))
    assert got.volume.capacity_bytes == 16 * MiB and not got.status.published_node_ids
    assert got.status.volume_condition.abnormal is False
    for n in names:
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=n))
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=n))  # gone: still OK
    assert m.ok("GET", "/v1/volumes") == []
    assert code_of(d.controller.ControllerGetVolume,
                   pb.ControllerGetVolumeRequest(volume_id="v0")) == C.NOT_FOUND
    assert code_of(d.controller.DeleteVolume, pb.DeleteVolumeRequest()) == C.INVALID_ARGUMENT


def test_validate_and_publish_errors(csi: tuple[ManagerProc, CsiDriver], tmp_path: Path) -> None:
    m, d = csi
    create(d, "pv")
    ok = d.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id="pv", volume_capabilities=[mount_cap(), block_cap()]))
    assert len(ok.confirmed.volume_capabilities) == 2
    no = d.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id="pv", volume_capabilities=[mount_cap(mode=Mode.MULTI_NODE_READER_ONLY)]))
    assert not no.HasField("confirmed") and "MULTI_NODE_READER_ONLY" in no.message
    assert code_of(d.controller.ValidateVolumeCapabilities,
                   pb.ValidateVolumeCapabilitiesRequest(
                       volume_id="nope", volume_capabilities=[mount_cap()])) == C.NOT_FOUND
    publish = d.controller.ControllerPublishVolume
    assert code_of(publish, pb.ControllerPublishVolumeRequest(
        volume_id="nope", node_id=d.node, volume_capability=mount_cap())) == C.NOT_FOUND
    assert code_of(publish, pb.ControllerPublishVolumeRequest(
        volume_id="pv", node_id="no-such-node", volume_capability=mount_cap())) == C.NOT_FOUND
    assert code_of(publish, pb.ControllerPublishVolumeRequest(
        volume_id="pv", node_id=d.node)) == C.INVALID_ARGUMENT
    # Node calls before the controller published: refused, nothing set up.
    staging = tmp_path / "st"
    staging.mkdir()
    assert code_of(d.node_service.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="pv", staging_target_path=str(staging),
        volume_capability=mount_cap())) == C.FAILED_PRECONDITION
    assert code_of(d.node_service.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="nope", staging_target_path=str(staging),
        volume_capability=mount_cap())) == C.NOT_FOUND
    assert code_of(d.node_service.NodePublishVolume, pb.NodePublishVolumeRequest(
        volume_id="pv", staging_target_path=str(staging), target_path=str(tmp_path / "t"),
        volume_capability=mount_cap())) == C.FAILED_PRECONDITION
    assert code_of(d.node_service.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
        volume_id="pv", volume_path=str(staging))) == C.NOT_FOUND
    assert m.volume("pv")["state"] == "detached"
    # Published twice on the same node: one attach; unpublished twice: OK.
    for _ in range(2):
        publish(pb.ControllerPublishVolumeRequest(volume_id="pv", node_id=d.node,
                                                  volume_capability=mount_cap()))
    got = d.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id="pv"))
    assert list(got.status.published_node_ids) == [d.node]
    assert code_of(d.controller.DeleteVolume,
                   pb.DeleteVolumeRequest(volume_id="pv")) == C.FAILED_PRECONDITION
    for _ in range(2):
        d.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id="pv", node_id=d.node))
    assert m.volume("pv")["state"] == "detached"


def test_mount_lifecycle(csi: tuple[ManagerProc, CsiDriver], tmp_path: Path) -> None:
    m, d = csi
    create(d, "web", 64 * MiB)
    cap = mount_cap("ext4")
    staging, rw = stage_and_publish(d, "web", tmp_path, cap)
    # Repeated stage and publish: OK, nothing more set up.
    d.node_service.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id="web", staging_target_path=staging, volume_capability=cap))
    d.node_service.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id="web", staging_target_path=staging, target_path=rw, volume_capability=cap))
    ro = str(tmp_path / "pods" / "ro-web")
    d.node_service.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id="web", staging_target_path=staging, target_path=ro, volume_capability=cap,
        readonly=True))
    Path(rw, "hello.txt").write_text("from the first pod")
    os.sync()
    assert Path(ro, "hello.txt").read_text() == "from the first pod"
    with pytest.raises(OSError) as err:
        Path(ro, "nope.txt").write_text("x")
    assert err.value.errno == errno.EROFS
    stats = d.node_service.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id="web", volume_path=rw))
    usage = {u.unit: u for u in stats.usage}
    bytes_, inodes = usage[pb.VolumeUsage.BYTES], usage[pb.VolumeUsage.INODES]
    assert 50 * MiB < bytes_.total <= 64 * MiB and 0 < bytes_.used < bytes_.total
    assert inodes.total > 0 and inodes.used >= 12  # ext4's reserved inodes and our file
    assert stats.volume_condition.abnormal is False
    assert code_of(d.node_service.NodeGetVolumeStats, pb.NodeGetVolumeStatsRequest(
        volume_id="web", volume_path=str(tmp_path / "elsewhere"))) == C.NOT_FOUND
    # A target unmounted behind the driver's back: abnormal; publishing again mends it.
    subprocess.run(["umount", ro], check=True)
    cond = d.node_service.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id="web", volume_path=ro)).volume_condition
    assert cond.abnormal and "not mounted" in cond.message
    d.node_service.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id="web", staging_target_path=staging, target_path=ro, volume_capability=cap,
        readonly=True))
    assert Path(ro, "hello.txt").read_text() == "from the first pod"
    # Unstage refused while published; then down and up again: the file is still there
    # (the filesystem is never made again over data).
    assert code_of(d.node_service.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
        volume_id="web", staging_target_path=staging)) == C.FAILED_PRECONDITION
    take_down(d, "web", staging, rw, ro)
    assert not os.path.exists(rw) and not os.path.exists(ro)
    assert m.volume("web")["state"] == "detached"
    staging, rw = stage_and_publish(d, "web", tmp_path, cap)
    assert Path(rw, "hello.txt").read_text() == "from the first pod"
    take_down(d, "web", staging, rw)
    # Repeated take-down calls: OK.
    take_down(d, "web", staging, rw)
    assert not [p for p in m.mounts() if p.startswith((staging, rw))]
    assert not list((d.state_dir / "volumes").iterdir())  # nothing staged is remembered


def test_expand_online(csi: tuple[ManagerProc, CsiDriver], tmp_path: Path) -> None:
    _, d = csi
    # xfs: ext4 online growth needs CAP_SYS_RESOURCE, which test machines may lack
    # (tests/integration/test_online_growth.py covers both); xfs wants 300 MiB at least.
    create(d, "grow", 320 * MiB)
    staging, rw = stage_and_publish(d, "grow", tmp_path, mount_cap("xfs"))
    Path(rw, "keep").write_bytes(b"k" * 4096)
    before = os.statvfs(rw)
    resp = d.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id="grow", capacity_range=pb.CapacityRange(required_bytes=640 * MiB)))
    assert resp.capacity_bytes == 640 * MiB and resp.node_expansion_required
    again = d.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id="grow", capacity_range=pb.CapacityRange(required_bytes=400 * MiB)))
    assert again.capacity_bytes == 640 * MiB  # grown already: idempotent, never shrunk
    grown = d.node_service.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id="grow", volume_path=rw,
        capacity_range=pb.CapacityRange(required_bytes=640 * MiB)))
    assert grown.capacity_bytes == 640 * MiB
    after = os.statvfs(rw)
    assert after.f_blocks * after.f_frsize > 1.8 * before.f_blocks * before.f_frsize
    assert Path(rw, "keep").read_bytes() == b"k" * 4096
    assert code_of(d.node_service.NodeExpandVolume, pb.NodeExpandVolumeRequest(
        volume_id="grow")) == C.INVALID_ARGUMENT
    assert code_of(d.node_service.NodeExpandVolume, pb.NodeExpandVolumeRequest(
        volume_id="nope", volume_path=rw)) == C.NOT_FOUND
    assert code_of(d.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
        volume_id="nope", capacity_range=pb.CapacityRange(required_bytes=MiB))) == C.NOT_FOUND
    take_down(d, "grow", staging, rw)
    # Raw block: the device grows, and so does a read-only publish of it.
    cap = block_cap()
    create(d, "rawgrow", 32 * MiB, cap=cap)
    staging, dev = stage_and_publish(d, "rawgrow", tmp_path, cap)
    _, ro_dev = stage_and_publish(d, "rawgrow", tmp_path, cap, readonly=True, target="ro")
    d.controller.ControllerExpandVolume(pb.ControllerExpandVolumeRequest(
        volume_id="rawgrow", capacity_range=pb.CapacityRange(required_bytes=64 * MiB)))
    assert device_size(dev) == 32 * MiB  # until the node grows it
    grown = d.node_service.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id="rawgrow", volume_path=dev))
    assert grown.capacity_bytes == 64 * MiB
    assert device_size(dev) == device_size(ro_dev) == 64 * MiB
    take_down(d, "rawgrow", staging, dev, ro_dev)


def device_size(path: str) -> int:
    """Bytes of the block device at ``path``."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def test_block_snapshots_and_clones(csi: tuple[ManagerProc, CsiDriver], tmp_path: Path) -> None:
    m, d = csi
    cap = block_cap()
    create(d, "raw", 32 * MiB, cap=cap)
    staging, dev = stage_and_publish(d, "raw", tmp_path, cap)
    assert stat.S_ISBLK(os.stat(dev).st_mode)  # the device itself, at the target path
    pattern = bytes(range(256)) * 16
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, pattern, 5 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    stats = d.node_service.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id="raw", volume_path=dev))
    assert [(u.unit, u.total) for u in stats.usage] == [(pb.VolumeUsage.BYTES, 32 * MiB)]
    snap = d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        source_volume_id="raw", name="snap-1")).snapshot
    assert snap.source_volume_id == "raw" and snap.ready_to_use
    assert snap.size_bytes == 32 * MiB and snap.creation_time.seconds > 0
    assert d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        source_volume_id="raw", name="snap-1")).snapshot == snap
    take_down(d, "raw", staging, dev)
    assert not os.path.exists(dev)
    # A snapshot of a detached volume (attached for the snapshot, detached after).
    create(d, "other", 8 * MiB)
    assert code_of(d.controller.CreateSnapshot, pb.CreateSnapshotRequest(
        source_volume_id="other", name="snap-1")) == C.ALREADY_EXISTS
    s2 = d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        source_volume_id="other", name="snap-2")).snapshot
    assert m.volume("other")["state"] == "detached"
    listed = d.controller.ListSnapshots(pb.ListSnapshotsRequest())
    assert [e.snapshot.snapshot_id for e in listed.entries] == sorted(
        [snap.snapshot_id, s2.snapshot_id])
    one = d.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=s2.snapshot_id))
    assert [e.snapshot for e in one.entries] == [s2]
    by_src = d.controller.ListSnapshots(pb.ListSnapshotsRequest(source_volume_id="raw"))
    assert [e.snapshot for e in by_src.entries] == [snap]
    first = d.controller.ListSnapshots(pb.ListSnapshotsRequest(max_entries=1))
    assert len(first.entries) == 1 and first.next_token
    assert not d.controller.ListSnapshots(pb.ListSnapshotsRequest(
        snapshot_id="raw@missing")).entries
    # Volumes from the snapshot and from the volume: linked clones reading its data; one
    # asked larger is grown.
    src = pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(
        snapshot_id=snap.snapshot_id))
    c1 = create(d, "from-snap", 48 * MiB, cap=cap, source=src)
    assert c1.capacity_bytes == 48 * MiB and c1.content_source == src
    assert m.volume("from-snap")["clone_of"]["volume"] == "raw"
    assert create(d, "from-snap", 48 * MiB, cap=cap, source=src) == c1
    vsrc = pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id="raw"))
    with pytest.raises(grpc.RpcError) as err:
        create(d, "from-snap", 48 * MiB, cap=cap, source=vsrc)
    assert err.value.code() == C.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        d.controller.CreateVolume(pb.CreateVolumeRequest(
            name="too-small", capacity_range=pb.CapacityRange(limit_bytes=16 * MiB),
            volume_capabilities=[cap], parameters=ONE, volume_content_source=src))
    assert err.value.code() == C.OUT_OF_RANGE
    create(d, "from-vol", 32 * MiB, cap=cap, source=vsrc)
    for vid in ("from-snap", "from-vol"):
        staging, dev = stage_and_publish(d, vid, tmp_path, cap, readonly=True)
        with open(dev, "rb") as f:
            f.seek(5 * MiB)
            assert f.read(len(pattern)) == pattern
        with pytest.raises(OSError) as err:  # published read-only: the kernel refuses
            fd = os.open(dev, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
            finally:
                os.close(fd)
        assert err.value.errno in (errno.EPERM, errno.EROFS, errno.EACCES)
        take_down(d, vid, staging, dev)
    # Deleting: twice OK; the snapshot clones use stays hidden until they go.
    for s in (snap, s2):
        for _ in range(2):
            d.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id=s.snapshot_id))
    assert not d.controller.ListSnapshots(pb.ListSnapshotsRequest()).entries
    d.controller.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot_id="not-an-id"))
    for vid in ("from-snap", "from-vol", "raw", "other"):
        d.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
    assert m.ok("GET", "/v1/volumes") == []


def test_a_restarted_driver_takes_down_what_the_last_one_set_up(
        csi: tuple[ManagerProc, CsiDriver], tmp_path: Path) -> None:
    m, d = csi
    create(d, "kept")
    cap = mount_cap("ext4")
    staging, rw = stage_and_publish(d, "kept", tmp_path, cap)
    Path(rw, "f").write_text("still here")
    d.stop()
    d.start()
    assert Path(rw, "f").read_text() == "still here"  # mounts outlive the driver
    d.node_service.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id="kept", staging_target_path=staging, volume_capability=cap))
    assert code_of(d.node_service.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="kept", staging_target_path=str(tmp_path / "other"),
        volume_capability=cap)) == C.ALREADY_EXISTS
    take_down(d, "kept", staging, rw)
    assert not [p for p in m.mounts() if p.startswith((staging, rw))]
    assert m.volume("kept")["state"] == "detached"
    # A volume given a host device outside CSI is not staged over it.
    m.ok("POST", "/v1/volumes/kept/attach", json={"mount": str(tmp_path / "by-hand")})
    assert code_of(d.node_service.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id="kept", staging_target_path=staging,
        volume_capability=cap)) == C.FAILED_PRECONDITION
    assert Path(tmp_path, "by-hand", "f").read_text() == "still here"
    m.ok("POST", "/v1/volumes/kept/detach", json={})


def test_volumes_move_between_nodes(csi: tuple[ManagerProc, CsiDriver], agents: Any,  # noqa: F811
                                    tmp_path: Path) -> None:
    m, d = csi
    agents("n2", tmp_path / "n2", extra=("--zone", "z2"))
    wait_for(lambda: any(n["name"] == "n2" and n["state"] == "up"
                         for n in m.ok("GET", "/v1/nodes")), "node n2 to be up")
    (tmp_path / "n2-csi").mkdir()
    d2 = CsiDriver(m.data_dir, tmp_path / "n2-csi", "n2").start()
    try:
        info = d2.node_service.NodeGetInfo(pb.NodeGetInfoRequest())
        assert dict(info.accessible_topology.segments) == {TOPOLOGY_NODE: "n2",
                                                           TOPOLOGY_ZONE: "z2"}
        create(d, "moving", 16 * MiB)
        cap = mount_cap("ext4")
        staging, rw = stage_and_publish(d2, "moving", tmp_path, cap)
        Path(rw, "f").write_text("written on n2")
        assert m.volume("moving")["node"] == "n2"
        got = d.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id="moving"))
        assert list(got.status.published_node_ids) == ["n2"]
        # Published on n2: not on this node too.
        assert code_of(d.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id="moving", node_id=d.node, volume_capability=cap)) == C.FAILED_PRECONDITION
        assert code_of(d.node_service.NodeStageVolume, pb.NodeStageVolumeRequest(
            volume_id="moving", staging_target_path=str(tmp_path / "here"),
            volume_capability=cap)) == C.FAILED_PRECONDITION
        # Unpublishing from this node leaves n2's attach alone.
        d.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
            volume_id="moving", node_id=d.node))
        assert m.volume("moving")["node"] == "n2"
        take_down(d2, "moving", staging, rw)
        staging, rw = stage_and_publish(d, "moving", tmp_path, cap, target="back")
        assert Path(rw, "f").read_text() == "written on n2"
        assert m.volume("moving")["node"] == d.node
        take_down(d, "moving", staging, rw)
    finally:
        d2.take_down_all()
        d2.stop()
