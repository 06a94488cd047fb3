"""This node and its disks: registration, the disk list with live state and use, add, remove."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drove.agent import disks as disklib
from drove.agent.node import NodeAgent
from drove.manager.errors import ApiError, validate_name, validate_role
from drove.manager.events import EventFn
from drove.manager.heartbeats import NodeHealth
from drove.manager.placement import node_attrs
from drove.manager.store import ConflictError, Store
from drove.units import parse_size


class Disks:
    """The node this manager runs on and the disks its replicas live on."""

    def __init__(self, store: Store, agent: NodeAgent | None, data_dir: Path,
                 event: EventFn) -> None:
        self._store = store
        self._agent = agent  # None: the manager runs no agent (serve --no-agent)
        self._data_dir = data_dir
        self._event = event
        self.health = NodeHealth(store, agent.name if agent else None, event)

    def _status(self, disk: dict[str, Any]) -> dict[str, Any]:
        """A disk's live state: checked here, or as its node's agent last reported it."""
        return self.health.disk_status(disk) or disklib.disk_status(disk["path"], disk["id"])

    def ensure_node(self) -> None:
        """Register this node and its default disk (the data directory)."""
        if self._agent is None:
            return
        # Keep what `drove node update` / `cordon` set on this node across restarts.
        doc = dict(self._store.get("nodes", self._agent.name) or {})
        doc.pop("_version", None)
        doc.update(name=self._agent.name, address=self._agent.address)
        self._store.put("nodes", self._agent.name, doc)
        if not self._store.list("disks"):
            self.add(str(self._data_dir), tags=[], reserved=0, name="default")

    def nodes(self) -> list[dict[str, Any]]:
        """Every node with its disks."""
        all_disks = self.all()
        return [{"name": n["name"], "address": n["address"], "state": self.health.state(n),
                 "last_seen": n.get("last_seen"), "agent_url": n.get("agent_url"),
                 **node_attrs(n),
                 "disks": [d for d in all_disks if d["node"] == n["name"]]}
                for n in self._store.list("nodes")]

    def node_docs(self) -> dict[str, dict[str, Any]]:
        """Node name -> its placement attributes and live state (no disks: cheap)."""
        return {n["name"]: {**node_attrs(n), "state": self.health.state(n),
                            "last_seen": n.get("last_seen")}
                for n in self._store.list("nodes")}

    def node(self, name: str) -> dict[str, Any]:
        """One node with its disks (ApiError 404)."""
        for n in self.nodes():
            if n["name"] == name:
                return n
        raise ApiError(404, f"no node {name!r}; `drove node list` shows them")

    def update_node(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Set a node's zone, fault_set, role or cordoned (keys absent stay; "" clears)."""
        self.node(name)
        bad = set(changes) - {"zone", "fault_set", "role", "cordoned"}
        if bad:
            raise ApiError(422, f"cannot change {', '.join(sorted(bad))} of a node")
        if "role" in changes:
            validate_role(changes["role"])
        if "cordoned" in changes and not isinstance(changes["cordoned"], bool):
            raise ApiError(422, "cordoned must be true or false")
        clean = dict(changes)
        for key in ("zone", "fault_set"):
            if clean.get(key):
                validate_name(key.replace("_", " "), clean[key])
            elif key in clean:
                clean[key] = None  # "" or null clears it
        for _ in range(10):  # a heartbeat may rewrite the document meanwhile: retry
            doc = dict(self._store.get("nodes", name) or {"name": name})
            version = doc.pop("_version", None)
            before = node_attrs(doc)
            doc.update(clean)
            try:
                self._store.put("nodes", name, doc, expect_version=version)
                break
            except ConflictError:
                continue
        else:
            raise ApiError(409, f"node {name!r} changed too often to update; try again")
        after = node_attrs(doc)
        what = [f"{k} {before[k]} -> {after[k]}" for k in after if before[k] != after[k]]
        if what:
            self._event("node-updated", f"node {name}: {', '.join(what)}", None, "info")
        return self.node(name)

    def all(self) -> list[dict[str, Any]]:
        """Every disk with its live state, capacity, free and scheduled space."""
        volumes = self._store.list("volumes")
        out = []
        for d in self._store.list("disks"):
            status = self._status(d)
            reps = [(v, r) for v in volumes for r in v["replicas"]
                    if r["disk"] == d["name"] and r["state"] != "abandoned"]
            out.append({"name": d["name"], "node": d["node"], "path": d["path"],
                        "tags": d["tags"], "reserved": d["reserved"], **status,
                        "scheduled": sum(v["size"] for v, _ in reps), "replicas": len(reps)})
        return out

    def get(self, name: str) -> dict[str, Any]:
        """One disk with its live state (ApiError 404)."""
        for d in self.all():
            if d["name"] == name:
                return d
        raise ApiError(404, f"no disk {name!r}; `drove disk list` shows them")

    def add(self, path: str, *, tags: list[str], reserved: int | str = 0,
            name: str | None = None) -> dict[str, Any]:
        """Add a directory as a disk of this node."""
        if self._agent is None:
            raise ApiError(409, "this manager runs no node agent (drove serve --no-agent), so "
                                "it has no disks of its own; a `drove agent`'s data directory "
                                "is its node's disk")
        p = Path(path).expanduser()
        if not p.is_absolute():
            raise ApiError(422, f"disk path {path!r} must be absolute")
        p = p.resolve()
        existing = self._store.list("disks")
        for d in existing:
            if Path(d["path"]) == p:
                raise ApiError(409, f"{p} is disk {d['name']} already")
        name = validate_name("disk", name or f"disk{len(existing)}")
        if self._store.get("disks", name):
            raise ApiError(409, f"disk {name!r} exists; choose another --name")
        for t in tags:
            validate_name("tag", t)
        reserved_bytes = parse_size(reserved) if reserved else 0
        try:
            disk_id = disklib.init_disk(p, name)
        except disklib.DiskError as exc:
            raise ApiError(422, str(exc)) from exc
        self._store.put("disks", name, {"name": name, "node": self._agent.name, "path": str(p),
                                        "tags": sorted(set(tags)), "reserved": reserved_bytes,
                                        "id": disk_id})
        self._event("disk-added",
                    f"disk {name} added at {p} (tags: {', '.join(tags) or 'none'})")
        return self.get(name)

    def remove(self, name: str, force: bool = False) -> dict[str, Any]:
        """Forget a disk (refused while replicas live there unless ``force``)."""
        d = self.get(name)
        if d["replicas"] and not force:
            raise ApiError(409, f"disk {name} holds {d['replicas']} replica(s); move them first "
                                "(lower and raise the volumes' replica counts) or use --force")
        self._store.delete("disks", name)
        self._event("disk-removed", f"disk {name} ({d['path']}) removed")
        return {"deleted": name}

    def is_own(self, name: str) -> bool:
        """Whether ``name`` is the node of this manager's in-process agent."""
        return self._agent is not None and self._agent.name == name

    def remove_node(self, name: str) -> list[str]:
        """Delete node ``name`` and its disks from the store; the disks' names (the caller
        checked that nothing lives there)."""
        disks = sorted(d["name"] for d in self._store.list("disks") if d["node"] == name)
        for disk in disks:
            self._store.delete("disks", disk)
        self._store.delete("nodes", name)
        return disks

    def state(self, name: str) -> str | None:
        """The live state of disk ``name`` ("ready" when usable; None: it was removed)."""
        disk = self._store.get("disks", name)
        if disk is None:
            return None
        return str(self._status(disk)["state"])

    def problem(self, rep: dict[str, Any]) -> str | None:
        """Why replica ``rep``'s disk cannot hold it now (None: it is ready)."""
        disk = self._store.get("disks", rep["disk"])
        status = self._status(disk) if disk else {
            "state": "unavailable", "error": "disk removed"}
        if status["state"] != "ready":
            return f"disk {rep['disk']} unavailable: {status['error']}"
        return None
