"""Data locality's decisions: values, strict-local's one replica, which replica is local."""

from __future__ import annotations

import pytest

from drove.manager import locality
from drove.manager.errors import ApiError
from drove.manager.placement import place

G = 2**30


def rep(name, node, state="stopped", local=False):
    return {"name": name, "node": node, "disk": f"{node}-disk", "state": state,
            "local": local}


def vol(*replicas):
    return {"name": "v", "replicas": list(replicas)}


def test_values_and_strict_local_count():
    assert locality.check_locality("strict-local") == "strict-local"
    with pytest.raises(ApiError) as err:
        locality.check_locality("local")
    assert err.value.status == 422
    assert "disabled, best-effort, strict-local" in str(err.value)
    assert locality.locality_of({}, "disabled") == "disabled"
    assert locality.locality_of({"data_locality": "strict-local"}, "disabled") == "strict-local"
    locality.check_count("strict-local", 1, "v")
    locality.check_count("best-effort", 3, "v")
    with pytest.raises(ApiError) as err:
        locality.check_count("strict-local", 2, "v", status=409)
    assert err.value.status == 409 and "exactly one replica" in str(err.value)


def test_strict_local_attaches_only_where_its_replica_is():
    doc = vol(rep("r1", "B"))
    locality.check_attach_node(doc, "B", "strict-local")
    locality.check_attach_node(doc, "A", "best-effort")
    with pytest.raises(ApiError) as err:
        locality.check_attach_node(doc, "A", "strict-local")
    assert err.value.status == 409 and "node B" in str(err.value) and "not on node A" in str(
        err.value)
    # A replica abandoned on a lost disk does not count.
    locality.check_attach_node(vol(rep("r1", "A"), rep("r0", "B", "abandoned")), "A",
                               "strict-local")


def test_the_local_replica_stays_while_usable():
    a1, a2, b1 = rep("r1", "A"), rep("r2", "A", local=True), rep("r3", "B")
    doc = vol(a1, a2, b1)
    assert locality.choose_local(doc, "A", {"stopped"}) is a2  # the one local before
    a2["state"] = "failed"
    assert locality.choose_local(doc, "A", {"stopped"}) is a1  # else one that can serve
    assert locality.choose_local(doc, "C", {"stopped"}) is None
    # Rebuilt while attached: local if on the node and no other one is local.
    assert locality.wants_local(doc, a2, "A", "best-effort")
    assert not locality.wants_local(doc, b1, "A", "best-effort")
    assert not locality.wants_local(doc, a2, "A", "disabled")
    assert not locality.wants_local(doc, a1, "A", "best-effort")  # a2 is local


def test_the_remote_victim_is_the_least_useful():
    local = rep("r0", "A", "running", local=True)
    healthy, stale = rep("r1", "B", "running"), rep("r2", "C", "running")
    doc = vol(local, healthy, stale)
    modes = {"r0": {"mode": "RW"}, "r1": {"mode": "RW"}, "r2": {"mode": "WO"}}
    assert locality.remote_victim(doc, "A", modes) is stale
    stale["state"] = "abandoned"
    assert locality.remote_victim(doc, "A", modes) is healthy
    assert locality.remote_victim(vol(local), "A", modes) is None


def test_placement_prefers_the_attach_node():
    disks = [{"name": n, "node": node, "path": f"/{n}", "capacity": cap, "scheduled": 0,
              "tags": [], "state": "ready", "reserved": 0}
             for n, node, cap in (("b1", "B", 500 * G), ("a1", "A", 100 * G),
                                  ("c1", "C", 300 * G))]
    got = place(2, G, disks, pool=None, used=[], overprovision_percent=100, prefer_node="A")
    assert [d["name"] for d in got] == ["a1", "b1"]
    got = place(2, G, disks, pool=None, used=[], overprovision_percent=100)
    assert [d["name"] for d in got] == ["b1", "c1"]
