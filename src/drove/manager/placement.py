"""Where a volume's replicas go: distinct nodes where possible, else distinct disks.

A disk qualifies when it is ready, carries the volume's pool tag (if any), holds
no replica of the volume yet, and has room: the sizes of the replicas scheduled
on it plus this one fit in its capacity less its reserved space, scaled by the
over-provisioning setting (100% = no more than the space there is; replicas are
sparse, so operators raise it knowingly).  Among those, a disk on a node the
volume does not use yet wins, then one on the preferred node (where the volume
is attached, for data locality); ties go to the disk with the most room left.
"""

from __future__ import annotations

from typing import Any


class PlacementError(Exception):
    """The replicas cannot be placed; the message says why for every disk."""


def room(disk: dict[str, Any], overprovision_percent: int) -> int:
    """Bytes that may still be scheduled on ``disk``."""
    usable = max(0, disk.get("capacity", 0) - disk.get("reserved", 0))
    return usable * overprovision_percent // 100 - disk.get("scheduled", 0)


def place(count: int, size: int, disks: list[dict[str, Any]], *, pool: str | None,
          used: list[dict[str, Any]], overprovision_percent: int,
          prefer_node: str | None = None) -> list[dict[str, Any]]:
    """Choose ``count`` disks for new replicas of ``size`` bytes (PlacementError if impossible).

    ``used`` are the disks already holding replicas of this volume; a disk on
    ``prefer_node`` wins among those on nodes the volume does not use yet.
    """
    used_disks = {d["name"] for d in used}
    used_nodes = {d["node"] for d in used}
    reasons: list[str] = []
    candidates = []
    for d in disks:
        why = _unfit(d, size, pool, used_disks, overprovision_percent)
        if why:
            reasons.append(f"disk {d['name']} ({d['path']}): {why}")
        else:
            candidates.append(d)
    chosen: list[dict[str, Any]] = []
    for _ in range(count):
        if not candidates:
            have = len(chosen)
            raise PlacementError(
                f"cannot place {count} replica(s) of {size} bytes: only {have} disk(s) fit"
                + ("; " + "; ".join(reasons) if reasons else "")
                + ". Add disks with `drove disk add PATH`, lower --replicas, or raise the "
                  "over_provisioning_percent setting")
        best = max(candidates, key=lambda d: (d["node"] not in used_nodes,
                                              d["node"] == prefer_node,
                                              room(d, overprovision_percent)))
        chosen.append(best)
        used_nodes.add(best["node"])
        candidates = [d for d in candidates if d["name"] != best["name"]]
    return chosen


def _unfit(disk: dict[str, Any], size: int, pool: str | None, used: set[str],
           overprovision_percent: int) -> str | None:
    if disk.get("state") != "ready":
        return f"unavailable ({disk.get('error') or disk.get('state')})"
    if pool is not None and pool not in disk.get("tags", []):
        return f"not in pool {pool!r} (tags: {', '.join(disk.get('tags', [])) or 'none'})"
    if disk["name"] in used:
        return "already holds a replica of this volume"
    left = room(disk, overprovision_percent)
    if left < size:
        return f"not enough room ({max(left, 0)} bytes schedulable, {size} needed)"
    return None
