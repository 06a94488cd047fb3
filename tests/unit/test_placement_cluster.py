"""Placement across hosts: roles, cordon, down nodes, zones, fault sets, pools, refusals."""

from __future__ import annotations

import pytest

from drove.manager.placement import PlacementError, place

G = 2**30


def disk(name, node, cap=100 * G, sched=0, tags=()):
    return {"name": name, "node": node, "path": f"/{name}", "capacity": cap,
            "scheduled": sched, "tags": list(tags), "state": "ready", "reserved": 0}


def put(count, disks, nodes, size=G, **kw):
    kw.setdefault("pool", None)
    kw.setdefault("used", [])
    return [d["name"] for d in place(count, size, disks, overprovision_percent=100,
                                     nodes=nodes, **kw)]


def test_roles_cordon_and_down_nodes_hold_no_replicas():
    disks = [disk(f"d{i}", f"n{i}", cap=(100 + i) * G) for i in range(1, 5)]
    nodes = {"n1": {"role": "compute"}, "n2": {"cordoned": True},
             "n3": {"state": "down", "last_seen": "2026-01-01T00:00:00Z"},
             "n4": {"role": "storage"}}
    assert put(1, disks, nodes) == ["d4"]
    with pytest.raises(PlacementError) as err:
        put(2, disks, nodes)
    msg = str(err.value)
    assert "node n1: role compute holds no replicas" in msg
    assert "node n2: cordoned" in msg
    assert "node n3: down (last seen 2026-01-01T00:00:00Z)" in msg
    assert "disk d2 on n2" in msg
    assert "drove node uncordon" in msg and "only 1 disk(s) fit" in msg
    # Uncordoned and back to both: it takes replicas again.
    nodes["n2"] = {"cordoned": False, "role": "both"}
    assert sorted(put(2, disks, nodes)) == ["d2", "d4"]


def test_never_two_replicas_in_one_fault_set():
    disks = [disk("a", "n1", 500 * G), disk("b", "n2", 400 * G), disk("c", "n3")]
    nodes = {"n1": {"fault_set": "rack1"}, "n2": {"fault_set": "rack1"},
             "n3": {"fault_set": "rack2"}}
    assert put(2, disks, nodes) == ["a", "c"]
    with pytest.raises(PlacementError) as err:
        put(3, disks, nodes)
    assert "disk b on n2 (/b): fault set rack1 already holds a replica" in str(err.value)
    assert "--fault-set" in str(err.value)
    # A replica already on n1 rules out rack1 for the next one.
    assert put(1, disks, nodes, used=[disks[0]]) == ["c"]
    # Nodes are only preferred distinct, fault sets never: a second disk of n3 is refused too.
    disks.append(disk("c2", "n3"))
    with pytest.raises(PlacementError, match=r"c2 on n3 .*fault set rack2"):
        put(1, disks, nodes, used=[disks[0], disks[2]])


def test_zones_spread_before_room():
    disks = [disk("a1", "a1", 900 * G), disk("a2", "a2", 800 * G), disk("b1", "b1", 10 * G),
             disk("c1", "c1", 20 * G)]
    nodes = {"a1": {"zone": "za"}, "a2": {"zone": "za"}, "b1": {"zone": "zb"},
             "c1": {"zone": "zc"}}
    assert put(3, disks, nodes) == ["a1", "c1", "b1"]
    # Without zones, room decides.
    assert put(3, disks, {}) == ["a1", "a2", "c1"]
    # The zone of a replica already there counts as used.
    assert put(1, disks, nodes, used=[disks[2]]) == ["a1"]
    assert put(2, disks, nodes, used=[disks[0]]) == ["c1", "b1"]


def test_prefer_node_pools_and_room_with_nodes():
    disks = [disk("a", "n1", 500 * G), disk("b", "n2", tags=["ssd"]),
             disk("c", "n3", 50 * G, tags=["ssd"]), disk("d", "n4", tags=["ssd"])]
    nodes = {"n1": {"zone": "z1"}, "n2": {"zone": "z2"}, "n3": {"zone": "z3"},
             "n4": {"role": "compute"}}
    assert put(1, disks, nodes, prefer_node="n3") == ["c"]
    assert sorted(put(2, disks, nodes, pool="ssd")) == ["b", "c"]
    with pytest.raises(PlacementError) as err:
        put(2, disks, nodes, pool="ssd", size=60 * G)
    msg = str(err.value)
    assert "disk a on n1 (/a): not in pool 'ssd'" in msg
    assert "disk c on n3 (/c): not enough room" in msg
    assert "node n4: role compute holds no replicas" in msg


def test_single_node_keeps_several_disks():
    disks = [disk("x", "local"), disk("y", "local")]
    assert sorted(put(2, disks, {"local": {}})) == ["x", "y"]
    # A node with a fault set is that fault set: one replica of a volume only.
    with pytest.raises(PlacementError, match="fault set f already holds"):
        put(2, disks, {"local": {"fault_set": "f"}})
