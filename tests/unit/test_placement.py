"""Placement: distinct nodes first, then distinct disks; room, pools and reasons."""

from __future__ import annotations

import pytest

from drove.manager.placement import PlacementError, place

G = 2**30


def disk(name, node, cap=100 * G, sched=0, tags=(), state="ready", reserved=0):
    return {"name": name, "node": node, "path": f"/{name}", "capacity": cap,
            "scheduled": sched, "tags": list(tags), "state": state, "reserved": reserved}


def test_distinct_nodes_before_distinct_disks():
    disks = [disk("a1", "A", 500 * G), disk("a2", "A", 400 * G), disk("b1", "B"),
             disk("c1", "C", 50 * G)]
    chosen = place(3, 10 * G, disks, pool=None, used=[], overprovision_percent=100)
    assert {d["node"] for d in chosen} == {"A", "B", "C"}
    assert chosen[0]["name"] == "a1"  # most room first
    # Only two nodes left room: the third replica goes to another disk of a used node.
    chosen = place(3, 60 * G, disks, pool=None, used=[], overprovision_percent=100)
    assert [d["name"] for d in chosen] == ["a1", "b1", "a2"]


def test_room_overprovisioning_pool_and_reasons():
    disks = [disk("d1", "A", 100 * G, sched=90 * G), disk("d2", "A", tags=["ssd"]),
             disk("d3", "A", state="unavailable"), disk("d4", "A", reserved=95 * G)]
    with pytest.raises(PlacementError) as err:
        place(2, 20 * G, disks, pool=None, used=[], overprovision_percent=100)
    msg = str(err.value)
    assert "d1" in msg and "not enough room" in msg and "unavailable" in msg
    assert "drove disk add" in msg
    got = place(2, 20 * G, disks, pool=None, used=[], overprovision_percent=200)
    assert {d["name"] for d in got} == {"d1", "d2"}
    assert [d["name"] for d in place(1, G, disks, pool="ssd", used=[],
                                     overprovision_percent=100)] == ["d2"]
    with pytest.raises(PlacementError, match="not in pool"):
        place(2, G, disks, pool="ssd", used=[], overprovision_percent=100)
    # A disk already holding a replica of the volume is never chosen again.
    with pytest.raises(PlacementError, match="already holds"):
        place(1, G, [disk("x", "A")], pool=None, used=[disk("x", "A")],
              overprovision_percent=100)
