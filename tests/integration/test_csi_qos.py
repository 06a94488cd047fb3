"""QoS limits and encryption through the CSI driver: CreateVolume's parameters reach the
manager and the engine, ControllerModifyVolume changes the limits live (fio at the new
limit), an encrypted volume stores no plaintext; bad parameters change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_crypt_e2e import (
    MARK,
    PATTERN,
    files_holding,
    kek_manager,  # noqa: F401 - a fixture
    nbd_read,
    nbd_write,
)
from test_csi import create
from test_qos_manager import engine_qos, fio_iops

from csitools import CsiDriver, block_cap, code_of, mount_cap
from drove.csi.proto import pb
from managertools import ManagerProc

MiB = 1 << 20
C = grpc.StatusCode


@pytest.fixture
def kcsi(kek_manager: tuple[ManagerProc, Path],  # noqa: F811 - a fixture
         tmp_path: Path) -> Iterator[tuple[ManagerProc, CsiDriver]]:
    """`drove csi` beside a `drove serve --kek-file` (encrypted volumes can be made)."""
    m, _ = kek_manager
    driver = CsiDriver(m.data_dir, tmp_path, m.ok("GET", "/v1/nodes")[0]["name"]).start()
    yield m, driver
    driver.take_down_all()
    driver.stop()


def publish(d: CsiDriver, vid: str) -> None:
    """ControllerPublishVolume on the driver's node (the engine starts there)."""
    d.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=d.node, volume_capability=mount_cap()))


def unpublish(d: CsiDriver, vid: str) -> None:
    """ControllerUnpublishVolume from the driver's node."""
    d.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(
        volume_id=vid, node_id=d.node))


def modify(d: CsiDriver, vid: str, mutable: dict[str, str]) -> None:
    """ControllerModifyVolume."""
    d.controller.ControllerModifyVolume(pb.ControllerModifyVolumeRequest(
        volume_id=vid, mutable_parameters=mutable))


def refused(d: CsiDriver, vid: str, mutable: dict[str, str]) -> tuple[grpc.StatusCode, str]:
    """The code and message of a ModifyVolume that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        modify(d, vid, mutable)
    return err.value.code(), err.value.details()


def test_qos_from_create_to_a_live_modify(kcsi: tuple[ManagerProc, CsiDriver]) -> None:
    m, d = kcsi
    rpc = pb.ControllerServiceCapability.RPC
    assert rpc.MODIFY_VOLUME in {c.rpc.type for c in d.controller.ControllerGetCapabilities(
        pb.ControllerGetCapabilitiesRequest()).capabilities}
    # The StorageClass's limits, and the VolumeAttributesClass's (mutable_parameters).
    asked = {"replicas": "1", "iopsLimit": "5000", "writeBandwidthLimit": "10M",
             "burst": "0.5"}
    create(d, "pvc-q", params=asked, mutable={"readIopsLimit": "300"})
    want = {"iops": 5000, "bandwidth": 0, "read_iops": 300, "write_iops": 0,
            "read_bandwidth": 0, "write_bandwidth": 10 * MiB, "burst": 0.5}
    assert m.cli_json("volume", "get", "pvc-q")["qos"] == want
    publish(d, "pvc-q")
    assert engine_qos(m, "pvc-q")["limits"] == want

    # A live change: the limits named change in the record and the running engine at
    # once, the others keep their value; fio reads at the new limit.
    modify(d, "pvc-q", {"readIopsLimit": "600", "iopsLimit": "0"})
    want |= {"read_iops": 600, "iops": 0}
    assert m.cli_json("volume", "get", "pvc-q")["qos"] == want
    assert engine_qos(m, "pvc-q")["limits"] == want
    iops = fio_iops(m.volume("pvc-q")["nbd_uri"])
    assert abs(iops - 600) <= 30, iops
    # A repeated CreateVolume as first asked still finds the volume (the change is the
    # volume's, not what its creation asked); other mutable parameters: ALREADY_EXISTS.
    assert create(d, "pvc-q", params=asked, mutable={"readIopsLimit": "300"}).volume_id \
        == "pvc-q"
    with pytest.raises(grpc.RpcError) as err:
        create(d, "pvc-q", params=asked, mutable={"readIopsLimit": "600"})
    assert err.value.code() == C.ALREADY_EXISTS

    # What cannot change or is bad: INVALID_ARGUMENT naming it, nothing changed.
    for mutable, words in (({"encrypted": "true"}, "encrypted cannot change"),
                           ({"replicas": "2"}, "replicas cannot change"),
                           ({"iopsLimit": "many"}, "iopsLimit='many'"),
                           ({"burst": "600", "iopsLimit": "10"}, "burst is at most 60"),
                           ({"color": "blue"}, "color")):
        code, message = refused(d, "pvc-q", mutable)
        assert code == C.INVALID_ARGUMENT and words in message, (mutable, message)
    assert m.volume("pvc-q")["qos"] == want
    assert engine_qos(m, "pvc-q")["limits"] == want
    assert refused(d, "nope", {"iopsLimit": "1"})[0] == C.NOT_FOUND
    assert refused(d, "", {"iopsLimit": "1"})[0] == C.INVALID_ARGUMENT
    unpublish(d, "pvc-q")
    # A detached volume takes the change for its next attach.
    modify(d, "pvc-q", {"writeIopsLimit": "100"})
    assert m.volume("pvc-q")["qos"]["write_iops"] == 100
    publish(d, "pvc-q")
    assert engine_qos(m, "pvc-q")["limits"]["write_iops"] == 100
    unpublish(d, "pvc-q")


def test_an_encrypted_volume_through_csi(kcsi: tuple[ManagerProc, CsiDriver]) -> None:
    m, d = kcsi
    create(d, "pvc-sec", params={"replicas": "1", "encrypted": "true"}, cap=block_cap())
    enc = m.cli_json("volume", "get", "pvc-sec")["encryption"]
    assert enc["cipher"] == "aes-xts-plain64-4k", enc
    create(d, "pvc-plain", params={"replicas": "1", "encrypted": "false"})
    assert m.volume("pvc-plain")["encryption"] is None

    def stored(vid: str) -> list[Path]:
        """The files of the volume's replicas holding the plaintext marker."""
        return [f for r in m.volume(vid)["replicas"] for f in files_holding(Path(r["path"]),
                                                                           MARK)]

    for vid in ("pvc-plain", "pvc-sec"):
        publish(d, vid)
        uri = m.volume(vid)["nbd_uri"]
        nbd_write(uri, MiB, PATTERN, 64)
        assert nbd_read(uri, MiB, 256 * 1024) == PATTERN * 64
    assert stored("pvc-plain")  # the search finds plaintext where there is some
    assert stored("pvc-sec") == []  # the encrypted volume's replicas hold ciphertext only
    unpublish(d, "pvc-plain")

    # A clone shares its source's key: asking it otherwise is refused, nothing made.
    snap = d.controller.CreateSnapshot(pb.CreateSnapshotRequest(
        source_volume_id="pvc-sec", name="s1")).snapshot
    source = pb.VolumeContentSource(
        snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
    assert code_of(d.controller.CreateVolume, pb.CreateVolumeRequest(
        name="cl", volume_capabilities=[block_cap()], volume_content_source=source,
        parameters={"replicas": "1", "encrypted": "false"})) == C.INVALID_ARGUMENT
    assert m.api("GET", "/v1/volumes/cl").status_code == 404
    create(d, "cl", params={"replicas": "1", "encrypted": "true", "iopsLimit": "700"},
           cap=block_cap(), source=source)
    clone = m.volume("cl")
    assert clone["encryption"]["key_id"] == enc["key_id"] and clone["qos"]["iops"] == 700
    publish(d, "cl")
    assert nbd_read(m.volume("cl")["nbd_uri"], MiB, 256 * 1024) == PATTERN * 64
    unpublish(d, "cl")
    unpublish(d, "pvc-sec")
    assert stored("pvc-sec") == [] and stored("cl") == []
