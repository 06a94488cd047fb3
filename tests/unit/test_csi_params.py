"""A StorageClass's and a VolumeAttributesClass's parameters to the manager's fields
(drove.csi.params): QoS limits, encryption, what may change and what is refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from drove.csi import params
from drove.csi.errors import CsiError
from drove.engine.qos import QosLimits

MiB = 1 << 20


def refused(call: Callable[..., Any], *args: Any) -> str:
    """The message of the INVALID_ARGUMENT ``call(*args)`` must raise."""
    with pytest.raises(CsiError) as err:
        call(*args)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return str(err.value)


def test_every_qos_parameter_sets_its_field_as_the_cli_would() -> None:
    body = params.create_body({
        "replicas": "2", "iopsLimit": "500", "readIopsLimit": "300", "writeIopsLimit": "0",
        "bandwidthLimit": "100M", "readBandwidthLimit": "64Mi",
        "writeBandwidthLimit": "1048576", "burst": "0.5", "encrypted": "true",
        "csi.storage.k8s.io/pvc/name": "data"}, {})
    assert body == {"replicas": 2, "encrypted": True, "qos": {
        "iops": 500, "read_iops": 300, "write_iops": 0, "bandwidth": 100 * MiB,
        "read_bandwidth": 64 * MiB, "write_bandwidth": MiB, "burst": 0.5}}
    # Every QoS field the engine knows has a parameter.
    assert set(params.QOS.values()) == set(QosLimits().to_json())
    assert params.create_body({"encrypted": "False"}, {}) == {"encrypted": False}
    assert params.create_body({}, {}) == {}


def test_mutable_parameters_take_precedence_at_create() -> None:
    body = params.create_body({"iopsLimit": "500", "burst": "2"}, {"iopsLimit": "800"})
    assert body["qos"] == {"iops": 800, "burst": 2.0}


@pytest.mark.parametrize(("given", "mutable", "words"), [
    ({"color": "blue"}, {}, "color"),
    ({"iopsLimit": "-1"}, {}, "iopsLimit='-1'"),
    ({"iopsLimit": "1.5"}, {}, "iopsLimit"),
    ({"bandwidthLimit": "fast"}, {}, "bandwidthLimit='fast'"),
    ({"burst": "nan"}, {}, "burst"),
    ({"burst": "600"}, {}, "burst is at most 60"),
    ({"encrypted": "yes"}, {}, "encrypted='yes'"),
    ({}, {"encrypted": "true"}, "encrypted cannot change"),
    ({}, {"replicas": "2"}, "replicas cannot change"),
    ({}, {"XXX_FakeKey": "XXX_FakeValue"}, "XXX_FakeKey"),
    ({"burst": "40"}, {"burst": "61"}, "burst is at most 60"),
])
def test_bad_parameters_are_refused_naming_them(given: dict[str, str], mutable: dict[str, str],
                                                words: str) -> None:
    assert words in refused(params.create_body, given, mutable)


def test_modify_takes_qos_only() -> None:
    assert params.mutable({"writeIopsLimit": "200", "bandwidthLimit": "0"}) == {
        "write_iops": 200, "bandwidth": 0}
    assert params.mutable({}) == {}
    assert "cannot change" in refused(params.mutable, {"encrypted": "false"})
    assert "pool" in refused(params.mutable, {"pool": "ssd", "iopsLimit": "1"})
    assert "fsType" in refused(params.mutable, {"fsType": "xfs"})


def test_label_round_trip_and_old_labels() -> None:
    asked = {"replicas": "1", "iopsLimit": "500", "fsType": "xfs"}
    text = params.label(asked)
    assert " " not in text and params.from_label(text) == asked
    # An older driver's label (json.dumps with spaces) reads the same.
    assert params.from_label('{"fsType": "xfs", "iopsLimit": "500", "replicas": "1"}') == asked
    assert params.from_label("not json") == {} and params.from_label(None) == {}
