"""Nodes that run their own agent: registration by heartbeat, up or down, their disks' state.

An agent (`drove agent`) heartbeats every second with who it is and the state
of its disks; a node whose last heartbeat is older than ``NODE_DOWN_AFTER`` is
``down``.  The manager's own node (the in-process agent) is always up.  A node
name belongs to the host that registered it first (its node id): another host
heartbeating under the same name is refused, so two hosts can never be mixed up.

An agent learns what it must act on through a long-poll (:meth:`NodeHealth.changes`,
``GET``/``POST /v1/agents/{node}/changes``): it names the engines running on the node and
the revision it last heard of; the answer comes as soon as one of them must stop, fed by the
store's changes (:mod:`drove.manager.changes`), or when the poll's time is up. A heartbeat
that lists the node's engines (an agent from before the long-poll, or one whose poll
fails) is answered the same way. Those that must stop (``stop_engines``) are: an engine
of a volume that is now attached on another node (a takeover while this one was down),
detached, or running with an older epoch than the volume's.  The manager records a
volume's node and epoch before it asks an agent to start its engine, so an engine the
agent saw before its request left is never named while it is the current one.  An engine
of a volume the manager does not know is left alone (a wrong store must not stop a
cluster's engines).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from drove.manager.changes import ChangeFeed
from drove.manager.engines import launch_epoch
from drove.manager.errors import ApiError, validate_name, validate_role
from drove.manager.events import EventFn
from drove.manager.store import ConflictError, Store, StoreError, now_iso
from drove.manager.upgrade import UPGRADE_FIELD

NODE_DOWN_AFTER = 5.0
"""Seconds without a heartbeat after which a node is down (five missed heartbeats)."""

NODE_SILENT_AFTER = 2.5
"""Seconds without a heartbeat after which a node's agent is not called for slow work
(it may be frozen or cut off: a call would wait for its timeout), before it is down."""

MAX_POLL = 60.0
"""The longest an agent's long-poll may wait (seconds)."""
FEED_READY = 10.0
"""Seconds a long-poll waits for the store's first snapshot of the volumes (etcd)."""

def parse_engines(text: str) -> dict[str, int | None]:
    """``VOLUME@EPOCH,VOLUME,...`` (a long-poll's engines; no epoch: unknown) as a dict;
    ApiError 422 naming the item that is malformed."""
    engines: dict[str, int | None] = {}
    for item in filter(None, text.split(",")):
        volume, sep, epoch = item.partition("@")
        if (sep and not epoch.isdigit()) or not volume:
            raise ApiError(422, f"engines: {item!r} is not VOLUME@EPOCH (e.g. v1@3)")
        engines[validate_name("volume", volume)] = int(epoch) if sep else None
    return engines


class NodeHealth:
    """Heartbeats of the agents, and the state they give each node and disk."""

    def __init__(self, store: Store, local_node: str, event: EventFn) -> None:
        self._store = store
        self._local = local_node
        self._event = event
        self._told: set[tuple[str, str, Any]] = set()  # stale engines an event named
        self._feed = ChangeFeed(store)  # started by the first long-poll

    def heartbeat(self, beat: dict[str, Any]) -> dict[str, Any]:
        """Record a heartbeat (registering the node the first time); the node's disks."""
        name = validate_name("node", beat["name"])
        if name == self._local:
            raise ApiError(409, f"node {name!r} is the manager's own node; start the agent "
                                "with another --node")
        validate_role(beat.get("role", "both"))
        doc = self._store.get("nodes", name)
        if doc and doc.get("id") and doc["id"] != beat["id"]:
            raise ApiError(409, f"node {name!r} is another host (node id {doc['id']}); give "
                                "this agent another --node, or `drove node remove` the old one")
        was_up = doc is not None and self.state(doc) == "up" and not doc.get("down_since")
        doc = dict(doc or {"name": name})
        if "role" not in doc or doc.get("agent_started") != beat.get("started"):
            # A (re)started agent states its zone and role; later `drove node update` wins.
            doc.update(zone=beat.get("zone"), role=beat.get("role", "both"),
                       agent_started=beat.get("started"))
        doc.update(id=beat["id"], address=beat["address"], agent_url=beat["agent_url"],
                   version=beat.get("version"), last_seen=now_iso(),
                   last_seen_ts=time.time(), disk_status=beat.get("disks") or {})
        doc.pop("_version", None)
        doc.pop("down_since", None)
        self._store.put("nodes", name, doc)
        disks = [d for d in self._store.list("disks") if d["node"] == name]
        if not disks:
            disks = self._add_default_disk(name, beat.get("default_disk"))
        if not was_up:
            self._event("node-up", f"node {name} is up: its agent at {beat['agent_url']} "
                                   "heartbeats", None, "info")
        return {"disks": [{"name": d["name"], "path": d["path"], "id": d["id"]} for d in disks],
                "stop_engines": self._stale_engines(name, beat.get("engines") or [])}

    async def changes(self, node: str, engines: dict[str, int | None], since: int | None,
                      timeout: float) -> dict[str, Any]:
        """An agent's long-poll: ``{revision, stop_engines}`` as soon as one of ``engines``
        (volume: epoch, running on ``node``) must stop, or at once when ``since`` (the
        revision of the agent's last answer) is absent or unknown here, or when a volume the
        poll does not name moved to or off the node (an engine started meanwhile: the agent
        asks again with it); else after ``timeout`` s with nothing to stop."""
        name = validate_name("node", node)
        self._check_open()
        if not 0 <= timeout <= MAX_POLL:
            raise ApiError(422, f"timeout {timeout} is out of range: 0 to {MAX_POLL:.0f} s")
        if await asyncio.to_thread(self._store.get, "nodes", name) is None:
            raise ApiError(404, f"no node {name!r}: an agent registers its node with its "
                                "first heartbeat (POST /v1/cluster/heartbeat)")
        await asyncio.to_thread(self._feed.start)
        if not await asyncio.to_thread(self._feed.wait_ready, FEED_READY):
            raise StoreError("the store did not tell the volumes in time")
        listed = [{"volume": v, "epoch": e} for v, e in engines.items()]
        volumes = frozenset(engines)
        deadline = time.monotonic() + timeout
        with self._feed.waiter(name, volumes) as waiter:
            while True:
                revision = self._feed.revision
                touched = (self._feed.touched(since, name, volumes)
                           if since is not None and self._feed.known(since) else None)
                if touched is None or touched:
                    # Only a volume that changed can have made its engine stale since the
                    # last look: one store read per engine concerned, not per engine listed.
                    look = listed if touched is None else [
                        e for e in listed if e["volume"] in touched]
                    stale = await asyncio.to_thread(self._stale_engines, name, look)
                    if stale or touched is None or touched - volumes:
                        return {"revision": revision, "stop_engines": stale}
                    since = revision  # looked: nothing to do until the next change
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await waiter.wait(remaining):
                    return {"revision": revision, "stop_engines": []}
                self._check_open()

    def end_polls(self) -> None:
        """The manager stops: the long-polls waiting here end now (503: ask another
        manager), rather than holding its HTTP server's shutdown until their time is up."""
        self._feed.close()

    def _check_open(self) -> None:
        if self._feed.closed:
            raise ApiError(503, "this manager is stopping: poll another one")

    def _stale_engines(self, node: str, engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Of the engines running on ``node``, those that must stop, each with the reason."""
        stale = []
        for e in engines:
            volume, epoch = e.get("volume"), e.get("epoch")
            doc = self._store.get("volumes", volume) if isinstance(volume, str) else None
            if doc is None or doc.get("state") == "attaching":
                continue  # judged once the attach ends: a refused takeover leaves it the volume's
            if doc.get("state") == "detached":
                why = f"volume {volume} is detached"
            elif doc.get("node") != node:
                why = f"volume {volume} is attached on node {doc.get('node')} now"
            elif ({"node": node, "epoch": epoch} == doc.get(UPGRADE_FIELD)
                  and epoch == launch_epoch(doc.get("engine"))):
                continue  # the recorded engine, which may hold a newer epoch than it was
                # started with (a live upgrade under way, or one that failed after the new
                # engine claimed the replicas: drove.manager.upgrade)
            elif {"node": node, "epoch": epoch} == doc.get("replaced_engine"):
                continue  # the engine a live upgrade replaced here: it exits by itself once
                # it handed over (a poll's list may predate that), its agent stopped it else
            elif not isinstance(epoch, int) or epoch < int(doc.get("epoch") or 0):
                why = f"epoch {epoch} is not the volume's current epoch {doc.get('epoch')}"
            else:
                continue
            stale.append({"volume": volume, "epoch": epoch, "reason": why})
            if (node, volume, epoch) not in self._told:
                self._told.add((node, volume, epoch))
                self._event("engine-stale", f"node {node} runs an engine of volume {volume} "
                            f"(epoch {epoch}) it must not: {why}; its agent stops it (the "
                            "volume's replicas refuse it already)", volume, "warning")
        return stale

    def _add_default_disk(self, node: str, disk: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Make the agent's data directory the first disk of a node that has none; [it]."""
        if not disk:
            return []
        name = validate_name("disk", disk["name"])
        if self._store.get("disks", name):
            return []
        doc = {"name": name, "node": node, "path": disk["path"], "tags": [], "reserved": 0,
               "id": disk["id"]}
        self._store.put("disks", name, doc)
        self._event("disk-added", f"disk {name} added at {disk['path']} on node {node} "
                                  "(the agent's data directory)", None, "info")
        return [doc]

    def sweep(self) -> list[str]:
        """Say once of each node that stopped heartbeating that it is down; their names."""
        gone = []
        for doc in self._store.list("nodes"):
            if doc.get("down_since") or self.state(doc) == "up":
                continue
            version = doc.pop("_version")
            doc["down_since"] = now_iso()
            try:
                self._store.put("nodes", doc["name"], doc, expect_version=version)
            except ConflictError:
                continue  # it heartbeated meanwhile
            gone.append(doc["name"])
            self._event("node-down", f"node {doc['name']} is down: no heartbeat from its agent "
                                     f"since {doc.get('last_seen')} (more than "
                                     f"{NODE_DOWN_AFTER:.0f} s); its replicas cannot serve",
                        None, "error")
        return gone

    def down_for(self, node: str | None) -> float | None:
        """Seconds since ``node`` last heartbeated if it is down (None: up or no agent)."""
        doc = self._store.get("nodes", node) if node else None
        if doc is None or "last_seen_ts" not in doc or self.state(doc) == "up":
            return None
        return time.time() - doc["last_seen_ts"]

    def silent(self, node: str | None) -> bool:
        """Whether ``node`` has an agent that missed its last heartbeats (down, or about to)."""
        doc = self._store.get("nodes", node) if node else None
        if doc is None or "last_seen_ts" not in doc or node == self._local:
            return False
        return time.time() - doc["last_seen_ts"] > NODE_SILENT_AFTER

    def last_seen(self, node: str | None) -> str | None:
        """When ``node``'s agent last heartbeated (ISO time; None: never, or no such node)."""
        doc = self._store.get("nodes", node) if node else None
        return None if doc is None else doc.get("last_seen")

    def state(self, node: dict[str, Any]) -> str:
        """``up`` or ``down``: the manager's own node is up; others while they heartbeat."""
        if node["name"] == self._local or "last_seen_ts" not in node:
            return "up"
        return "up" if time.time() - node["last_seen_ts"] <= NODE_DOWN_AFTER else "down"

    def check_compute_node(self, node: str, volume: str) -> None:
        """ApiError 409 unless ``node`` can run ``volume``'s engine: up, with an agent, compute."""
        doc = self._store.get("nodes", node)
        if doc is None:
            raise ApiError(404, f"no node {node!r}; `drove node list` shows them")
        why = None
        if self.state(doc) != "up":
            why = f"it is down (last seen {doc.get('last_seen')})"
        elif not doc.get("agent_url"):
            why = "it runs no agent"
        elif doc.get("role", "both") == "storage":
            why = "its role is storage (set `drove node update --role both` to attach there)"
        if why:
            raise ApiError(409, f"volume {volume}: cannot attach on node {node}: {why}")

    def disk_status(self, disk: dict[str, Any]) -> dict[str, Any] | None:
        """The state another node's agent last reported for ``disk`` (None: check it here)."""
        if disk["node"] == self._local:
            return None
        node = self._store.get("nodes", disk["node"])
        if node is not None and not node.get("agent_url"):
            return None  # a node without an agent of its own: its disks are checked here
        if node is None or self.state(node) != "up":
            return {"state": "unavailable", "capacity": 0, "available": 0,
                    "error": f"node {disk['node']} is down"}
        status = (node.get("disk_status") or {}).get(disk["name"])
        return status or {"state": "unavailable", "capacity": 0, "available": 0,
                          "error": f"node {disk['node']} has not reported it yet"}
