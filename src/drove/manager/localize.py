"""Data locality carried out on a live volume: switching a replica into or out of the
engine, building a local replica and then dropping a remote one, and saying (once) why a
volume's locality cannot be met.  The rules themselves are :mod:`drove.manager.locality`'s.
"""

from __future__ import annotations

from typing import Any

from drove.manager import locality
from drove.manager.engines import Engines, rebuild_running
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.locality import DISABLED, STRICT_LOCAL
from drove.manager.placement import PlacementError
from drove.manager.rebuild import Rebuilds
from drove.manager.records import Records
from drove.manager.replicas import Replicas


def check_change(doc: dict[str, Any], node: str, before: str, after: str,
                 replicas: int | None) -> None:
    """Refuse a change that breaks strict-local's one replica on the attach node ``node``."""
    if after != STRICT_LOCAL:
        return
    name = doc["name"]
    live = locality.live(doc)
    if replicas is not None:
        # Switching with another count in the same request contradicts itself (422);
        # another count for a volume that is strict-local already conflicts (409).
        locality.check_count(after, replicas, name, status=422 if before != after else 409)
        if doc["state"] == "attached" and not any(r["node"] == node for r in live):
            raise ApiError(409, f"volume {name} is attached on node {node}, which holds "
                                "none of its replicas: it cannot be strict-local there")
        return
    if before != after and len(live) != 1:
        raise ApiError(409, f"volume {name} has {len(live)} replicas; strict-local keeps "
                            f"exactly one: lower them first (`drove volume update {name} "
                            f"--replicas 1`) or give --replicas 1 with the change")
    if doc["state"] == "attached":
        locality.check_attach_node(doc, node, after)


class Localizer:
    """Moves an attached volume, one online step at a time, towards its data locality."""

    def __init__(self, *, records: Records, replicas: Replicas, rebuilds: Rebuilds,
                 engines: Engines, event: EventFn) -> None:
        self._records = records
        self._replicas = replicas
        self._rebuilds = rebuilds
        self._engines = engines
        self._event = event
        # volume -> (engine epoch, why its locality is unmet): said once per engine start.
        self._notes: dict[str, tuple[Any, str]] = {}

    async def changed(self, doc: dict[str, Any], before: str, after: str) -> None:
        """Say what a locality change does now; on an attached volume, start doing it."""
        name = doc["name"]
        if doc["state"] != "attached":
            self._event("data-locality", f"volume {name}: data locality {before} -> {after}; "
                        "it applies at the next attach", name)
            return
        self._event("data-locality", f"volume {name}: data locality {before} -> {after}, "
                    "applied online now", name)
        info = await self._engines.refresh(doc)
        if info is None or rebuild_running(info.get("rebuild")):
            return  # the healer applies it once the engine answers and no rebuild runs
        await self.keep(doc, {r["name"]: r for r in info["replicas"]})

    async def keep(self, doc: dict[str, Any], modes: dict[str, Any]) -> bool:
        """One step towards the volume's data locality on its attach node, online.

        Called when no rebuild runs; ``modes`` is the engine's report of each
        replica it holds.  True if the engine's membership changed.
        """
        name, node = doc["name"], self._records.attach_node(doc)
        where = self._records.locality(doc)
        live = locality.live(doc)
        rw = {r["name"] for r in live if (modes.get(r["name"]) or {}).get("mode") == "RW"}
        for r in live:
            if (r.get("replaces_remote") and r["name"] in rw and r["state"] == "running"
                    and not r.get("rebuilding")):
                return await self._drop_remote(doc, r, modes)
        if where == DISABLED:
            served = [r for r in live
                      if r.get("local") and r["name"] in rw and r["state"] == "running"]
            if not served:
                return False
            if len(rw) < 2:
                return self._note(doc, f"replica {served[0]['name']} stays in the "
                                  "engine while it is the only RW replica; data "
                                  "locality disabled applies at the next attach")
            r = served[0]
            self._event("data-locality", f"volume {name}: replica {r['name']} leaves the "
                        "engine for its own process (delta rebuild in place)", name)
            return await self._rebuilds.rebuild(doc, r, modes, why="data locality disabled")
        if any(r.get("local") for r in live):
            self._notes.pop(name, None)
            return False  # served already, or failed and the repair rebuilds it locally
        on_node = [r for r in live if r["node"] == node]
        ready = [r for r in on_node if r["name"] in rw and r["state"] == "running"]
        if ready:
            if len(rw) < 2:
                return self._note(doc, f"replica {ready[0]['name']} cannot leave the "
                                  "engine's mirror while it is the only RW replica; "
                                  f"data locality {where} applies at the next attach")
            r = ready[0]
            self._event("data-locality", f"volume {name}: replica {r['name']} on node {node} "
                        "becomes local: its process stops and the engine serves it (delta "
                        "rebuild in place, its data is reused)", name)
            return await self._rebuilds.rebuild(doc, r, modes, why=f"data locality {where}")
        if on_node or where != locality.BEST_EFFORT:
            return False  # one there is still rebuilding: it becomes local when rebuilt
        try:
            (new,) = self._replicas.place(doc, 1, only_node=node)
        except PlacementError as exc:
            return self._note(doc, f"node {node} holds none of its replicas and "
                              f"none can be placed there: {exc}")
        new["replaces_remote"] = True
        doc["replicas"].append(new)
        self._records.save(doc)
        self._event("data-locality", f"volume {name} is attached on node {node}, which holds "
                    f"none of its replicas: building {new['name']} on disk {new['disk']} as "
                    "its local replica (online rebuild); a remote replica goes once it is RW",
                    name)
        return await self._rebuilds.rebuild(doc, new, modes,
                                            why="local replica for data locality")

    async def _drop_remote(self, doc: dict[str, Any], rep: dict[str, Any],
                           modes: dict[str, Any]) -> bool:
        """The local replica ``rep`` built for locality is RW: one remote replica goes."""
        rep.pop("replaces_remote", None)
        live = locality.live(doc)
        victim = locality.remote_victim(doc, self._records.attach_node(doc), modes)
        if victim is None or len(live) <= doc["replica_count"]:
            self._records.save(doc)
            return False
        self._event("data-locality", f"volume {doc['name']}: local replica {rep['name']} is "
                    f"RW; remote replica {victim['name']} (node {victim['node']}, disk "
                    f"{victim['disk']}) goes", doc["name"])
        await self._replicas.remove(doc, victim)
        self._records.save(doc)
        return True

    def _note(self, doc: dict[str, Any], message: str) -> bool:
        """An event (once per engine start, not every heal pass) saying why the locality is
        not met; False."""
        name = doc["name"]
        # Keyed by the epoch too: each attach starts the engine with a new one, and what
        # still holds after it is said again.
        said = (doc.get("epoch"), message)
        if self._notes.get(name) != said:
            self._notes[name] = said
            self._event("data-locality-unmet", f"volume {name}: {message}", name,
                        level="warning")
        return False
