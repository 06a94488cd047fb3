"""CSI names to drove names, capacity ranges to sizes, snapshot IDs (drove.csi.ids)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from drove.csi import ids
from drove.csi.errors import CsiError
from drove.csi.proto import pb
from drove.manager.errors import NAME_RE

MiB = 1 << 20


@given(st.text(min_size=1, max_size=128))
def test_every_csi_name_gets_a_valid_drove_name(name: str) -> None:
    got = ids.drove_name(name)
    assert NAME_RE.match(got)
    assert got == ids.drove_name(name)  # stable: a repeated CreateVolume finds it again


def test_valid_names_stay_and_others_do_not_meet() -> None:
    assert ids.drove_name("pvc-0f3c2b1a-6f6e-4c1e-9a55-1b2c3d4e5f60") == (
        "pvc-0f3c2b1a-6f6e-4c1e-9a55-1b2c3d4e5f60")
    # Names that read the same once made valid still get different drove names.
    made = {ids.drove_name(n) for n in ("Data", "data!", "DATA", "da ta", "x" * 64,
                                         "x" * 65, "--")}
    assert len(made) == 7


def test_snapshot_ids_round_trip() -> None:
    assert ids.parse_snapshot_id(ids.snapshot_id("vol", "snap")) == ("vol", "snap")
    for bad in ("vol", "@snap", "vol@", "Vol@snap", "a@b@c", ""):
        assert ids.parse_snapshot_id(bad) is None


def size(required: int = 0, limit: int = 0, minimum: int = 0) -> int:
    return ids.size_for(pb.CapacityRange(required_bytes=required, limit_bytes=limit),
                        minimum=minimum)


def test_sizes_from_capacity_ranges() -> None:
    assert size() == ids.DEFAULT_SIZE
    assert size(limit=MiB + 100) == MiB  # no request: the default, cut to the limit
    assert size(required=1) == 4096
    assert size(required=MiB, limit=MiB) == MiB
    assert size(minimum=8 * MiB) == 8 * MiB  # a clone is at least its source
    assert size(required=MiB, minimum=8 * MiB) == 8 * MiB
    for required, limit, minimum in ((2 * MiB, MiB, 0), (MiB + 1, MiB + 2, 0),
                                     (0, 100, 0), (MiB, 2 * MiB, 4 * MiB)):
        with pytest.raises(CsiError) as err:
            size(required, limit, minimum)
        assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(CsiError) as err:
        size(required=-1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_volume_condition_from_health() -> None:
    from drove.csi.common import condition

    ok = condition({"health": "healthy", "replicas": [{"name": "v-r1", "mode": "RW"}]})
    assert not ok.abnormal
    bad = condition({"health": "degraded", "replicas": [
        {"name": "v-r1", "mode": "RW"}, {"name": "v-r2", "mode": "ERR"}]})
    assert bad.abnormal and "degraded" in bad.message and "v-r2 ERR" in bad.message
    assert condition({"health": "faulted", "replicas": []}).abnormal


def test_pages_skip_nothing_when_items_come_and_go() -> None:
    from drove.csi.common import page

    names = ["a", "b", "c", "d", "e"]
    first, token = page(names, names, 2, "")
    assert first == ["a", "b"] and token
    # "b" (the last of the page) is deleted and "cc" added before the next call: the next
    # page starts at "c" all the same (an index would skip it) and finds "cc".
    now = ["a", "c", "cc", "d", "e"]
    second, token = page(now, now, 2, token)
    assert second == ["c", "cc"]
    third, token = page(now, now, 2, token)
    assert third == ["d", "e"] and token == ""
    assert page(names, names, 0, "")[0] == names
    with pytest.raises(CsiError) as err:
        page(names, names, 2, "3")  # not a token this driver gives
    assert err.value.code == grpc.StatusCode.ABORTED
    with pytest.raises(CsiError) as err:
        page(names, names, -1, "")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
