"""Where a volume's replicas go: distinct nodes, zones and fault sets; disks with room.

A node may hold replicas when its role holds storage (``storage`` or ``both``, the
default), it is not cordoned and not ``down``.  A disk on such a node qualifies
when it is ready, carries the volume's pool tag (if any), holds no replica of the
volume yet, its node's fault set (if any) holds none either (a hard rule: nodes
of one fault set fail together), and it has room: the sizes of the replicas
scheduled on it plus this one fit in its capacity less its reserved space, scaled
by the over-provisioning setting (100% = no more than the space there is; replicas
are sparse, so operators raise it knowingly).  Among those, a disk on a node the
volume does not use yet wins, then one in a zone it does not use yet, then one
on the preferred node (where the volume is attached, for data locality); ties go
to the disk with the most room left.  Distinct nodes are only preferred, so a
single machine still takes several replicas on several disks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STORAGE_ROLES = ("storage", "both")
ROLES = ("storage", "compute", "both")


class PlacementError(Exception):
    """The replicas cannot be placed; the message says why for every node and disk."""


def room(disk: dict[str, Any], overprovision_percent: int) -> int:
    """Bytes that may still be scheduled on ``disk``."""
    usable = max(0, disk.get("capacity", 0) - disk.get("reserved", 0))
    return usable * overprovision_percent // 100 - disk.get("scheduled", 0)


def node_attrs(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """A node document's placement attributes, defaults filled in."""
    doc = doc or {}
    return {"zone": doc.get("zone") or None, "fault_set": doc.get("fault_set") or None,
            "role": doc.get("role") or "both", "cordoned": bool(doc.get("cordoned", False))}


def node_unfit(name: str, doc: Mapping[str, Any] | None) -> str | None:
    """Why node ``name`` may hold no replicas (None: it may)."""
    attrs = node_attrs(doc)
    if attrs["role"] not in STORAGE_ROLES:
        return f"role {attrs['role']} holds no replicas"
    if attrs["cordoned"]:
        return "cordoned"
    if doc and doc.get("state") == "down":
        return f"down (last seen {doc.get('last_seen') or 'never'})"
    return None


def place(count: int, size: int, disks: list[dict[str, Any]], *, pool: str | None,
          used: list[dict[str, Any]], overprovision_percent: int,
          prefer_node: str | None = None,
          nodes: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Choose ``count`` disks for new replicas of ``size`` bytes (PlacementError if impossible).

    ``used`` are the disks already holding replicas of this volume; ``nodes`` maps a
    node's name to its document (zone, fault_set, role, cordoned, state; missing
    nodes and fields take the defaults); a disk on ``prefer_node`` wins among those
    on nodes and zones the volume does not use yet.
    """
    nodes = nodes or {}

    def attrs(node: str) -> dict[str, Any]:
        return node_attrs(nodes.get(node))

    used_disks = {d["name"] for d in used}
    used_nodes = {d["node"] for d in used}
    used_zones = {attrs(n)["zone"] for n in used_nodes} - {None}
    used_sets = {attrs(n)["fault_set"] for n in used_nodes} - {None}
    reasons: list[str] = []
    bad_nodes: dict[str, str] = {}
    for name in sorted(set(nodes) | {d["node"] for d in disks}):
        why = node_unfit(name, nodes.get(name))
        if why:
            bad_nodes[name] = why
            reasons.append(f"node {name}: {why}")
        elif name in nodes and not any(d["node"] == name for d in disks):
            reasons.append(f"node {name}: no disk")
    candidates = []
    for d in disks:
        if d["node"] in bad_nodes:
            why = f"its node cannot hold replicas ({bad_nodes[d['node']]})"
        else:
            why = _unfit(d, size, pool, used_disks, overprovision_percent)
        if why:
            reasons.append(f"disk {d['name']} on {d['node']} ({d['path']}): {why}")
        else:
            candidates.append(d)
    chosen: list[dict[str, Any]] = []
    for _ in range(count):
        fits = [d for d in candidates if attrs(d["node"])["fault_set"] not in used_sets]
        if not fits:
            reasons += [f"disk {d['name']} on {d['node']} ({d['path']}): fault set "
                        f"{attrs(d['node'])['fault_set']} already holds a replica"
                        for d in candidates]
            raise PlacementError(
                f"cannot place {count} replica(s) of {size} bytes: only {len(chosen)} "
                "disk(s) fit" + ("; " + "; ".join(reasons) if reasons else "")
                + ". Add disks with `drove disk add PATH` (or nodes with `drove agent`), "
                  "uncordon a node (`drove node uncordon NAME`), give a node the storage "
                  "role or its own fault set (`drove node update NAME --role both "
                  "--fault-set F`), lower --replicas, or raise the "
                  "over_provisioning_percent setting")
        best = max(fits, key=lambda d: (d["node"] not in used_nodes,
                                        attrs(d["node"])["zone"] not in used_zones | {None},
                                        d["node"] == prefer_node,
                                        room(d, overprovision_percent)))
        chosen.append(best)
        used_nodes.add(best["node"])
        best_attrs = attrs(best["node"])
        if best_attrs["zone"] is not None:
            used_zones.add(best_attrs["zone"])
        if best_attrs["fault_set"] is not None:
            used_sets.add(best_attrs["fault_set"])
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
