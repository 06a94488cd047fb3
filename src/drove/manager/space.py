"""Space honesty: each replica's actual size on its disk, the data the head and each snapshot
hold and what deleting a snapshot would free (asked of every replica, one call each), and
trimming a volume's mounted filesystem so that what it deleted is freed.

A running replica (a process, or the local replica its engine serves) answers on its
control API (GET ``/v1/space``, drove.replica.usage); a detached volume's replica is read
by the agent of its node.  Nothing reads volume data: the figures come from the layer
files' extents and allocation.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from drove.agent.hostattach import HostAttachError
from drove.cluster.remoteagent import AgentError, AgentUnreachableError
from drove.manager.agents import Agents
from drove.manager.clones import Clones
from drove.manager.engines import Engines
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.records import Records
from drove.units import format_size

SPACE_TIMEOUT = 30.0
"""Seconds one replica may take to report its space (it scans its layers' extents)."""

TRIM_TIMEOUT = 600.0
"""Seconds fstrim may run (a large filesystem's first trim sends every free range)."""

KIND = "trim"
"""The job kind that trims volumes on a schedule."""


class Space:
    """Reports volumes' space and trims their mounted filesystems."""

    def __init__(self, *, records: Records, engines: Engines, agents: Agents, clones: Clones,
                 event: EventFn) -> None:
        self._records = records
        self._engines = engines
        self._agents = agents
        self._clones = clones
        self._event = event

    # ------------------------------------------------------------ reports

    async def replica(self, doc: dict[str, Any], rep: dict[str, Any]) -> dict[str, Any]:
        """Replica ``rep``'s space report (drove.replica.usage.space_json), or its name with
        ``error`` saying why there is none."""
        out: dict[str, Any] = {"replica": rep["name"], "node": rep.get("node"),
                               "disk": rep.get("disk")}
        try:
            out.update(await self._ask(doc, rep))
        except (ApiError, AgentError, AgentUnreachableError, ValueError, OSError,
                httpx.HTTPError) as exc:
            out["error"] = str(exc) or repr(exc)
        return out

    async def _ask(self, doc: dict[str, Any], rep: dict[str, Any]) -> dict[str, Any]:
        """One call to whoever serves ``rep`` now: its control API, or its node's agent."""
        if doc["state"] == "attached" and rep["state"] == "running":
            ends = await self._engines.replica_endpoints(doc, rep)
            if ends is None:
                raise ApiError(409, f"replica {rep['name']} is not served now")
            r = await self._engines.http.get(ends["control"] + "/v1/space",
                                             headers=ends["headers"], timeout=SPACE_TIMEOUT)
            if r.status_code >= 400:
                raise ApiError(502, f"replica {rep['name']}: {r.status_code} {r.text[:300]}")
            res: dict[str, Any] = r.json()
            return res
        if doc["state"] != "attached" and rep["state"] == "stopped":
            agent = self._agents.for_replica(rep)
            res = await asyncio.to_thread(agent.replica_space, rep["path"])
            return res
        raise ApiError(409, f"replica {rep['name']} is {rep['state']}")

    async def volume(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The volume's space: per replica its actual size on its disk (own and shared with
        linked clones apart) and the head's data; per snapshot (from the first replica that
        answers) the data it holds and what deleting it frees, and why."""
        reps = [r for r in doc["replicas"] if r["state"] != "abandoned"]
        answers = await asyncio.gather(*(self.replica(doc, r) for r in reps))
        rows = [{**{k: a.get(k) for k in ("replica", "node", "disk", "actual", "own", "shared",
                                          "head", "pending_purge", "error")},
                 # This disk's own figures: a layer's allocation differs a little by disk.
                 "snapshots": {la["name"]: {"data": la["data"],
                                            "freed_by_delete": la["freed_by_delete"]}
                               for la in a.get("layers", [])
                               if la["name"] and not la["removed"] and not la["base"]}}
                for a in answers]
        source = next((a for a in answers if "error" not in a), None)
        snapshots: list[dict[str, Any]] = []
        if source is not None:
            snapshots = self._snapshots(doc, source["layers"])
        return {"replicas": rows, "source": source["replica"] if source else None,
                "head": source["head"] if source else None, "snapshots": snapshots,
                "block_size": source["block_size"] if source else None}

    def _snapshots(self, doc: dict[str, Any], layers: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
        """Per snapshot of the volume (and per deleted layer still holding data): its data
        and what deleting it frees; a snapshot clones depend on frees nothing."""
        hidden = set(doc.get("hidden_snapshots", []))
        out = []
        for la in layers:
            if la["head"] or la["base"]:
                continue
            row = {"name": la["name"], "file": la["file"], "data": la["data"],
                   "allocated": la["allocated"], "removed": la["removed"],
                   "shared": la["shared"], "freed_by_delete": la["freed_by_delete"],
                   "why": la["why"]}
            if not la["removed"]:
                deps = self._clones.dependants(doc["name"], la["name"])
                if la["name"] in hidden:
                    row.update(freed_by_delete=0, why=(
                        f"deleted, hidden: linked clone(s) {', '.join(deps) or '(none left)'} "
                        "depend on it; it goes with the last of them"))
                elif deps:
                    row.update(freed_by_delete=0, why=(
                        f"linked clone(s) {', '.join(deps)} depend on it: deleting it only "
                        "hides it"))
            out.append(row)
        return out

    async def annotate(self, name: str, tree: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The snapshot tree with each snapshot's ``data``, ``freed_by_delete`` and ``why``
        and the head's ``data`` (None where no replica answered)."""
        doc = self._records.get(name)
        space = await self.volume(doc)
        by_name = {s["name"]: s for s in space["snapshots"] if not s["removed"]}
        out = []
        for s in tree:
            if s.get("head"):
                out.append({**s, "data": space["head"], "freed_by_delete": None,
                            "why": "the head: it holds the live data"})
                continue
            sp = by_name.get(s["name"], {})
            out.append({**s, "data": sp.get("data"), "freed_by_delete":
                        sp.get("freed_by_delete"), "why": sp.get("why")})
        return out

    # ------------------------------------------------------------ trim

    def check_trim(self, name: str) -> dict[str, Any]:
        """Refuse to trim a volume drove has not mounted (ApiError 409); its document."""
        doc = self._records.get(name)
        mnt = (doc.get("host") or {}).get("mountpoint")
        if doc["state"] != "attached" or not mnt:
            how = ("it is " + doc["state"]) if doc["state"] != "attached" else \
                "it is attached without a filesystem mounted by drove"
            raise ApiError(409, f"volume {name} cannot be trimmed here: {how}. Attach it with "
                                f"`drove volume attach {name} --mount DIR` (drove then runs "
                                "fstrim on that mount), or run fstrim in the container that "
                                "mounts it")
        return doc

    async def trim(self, name: str) -> dict[str, Any]:
        """fstrim the volume's filesystem where drove mounted it (its node's agent runs it);
        what fstrim trimmed and how much the replicas' actual size fell."""
        doc = self.check_trim(name)
        node, mnt = doc.get("node"), doc["host"]["mountpoint"]
        before = await self.volume(doc)
        try:
            res = await asyncio.to_thread(self._agents.for_node(node).trim_host, doc["host"])
        except (HostAttachError, AgentError) as exc:
            raise ApiError(409, f"volume {name}: {exc}") from exc
        except AgentUnreachableError as exc:
            raise ApiError(503, f"volume {name}: {exc}") from exc
        after = await self.volume(self._records.get(name))
        was = {r["replica"]: r for r in before["replicas"] if r.get("error") is None}
        replicas = []
        for r in after["replicas"]:
            old = was.get(r["replica"])
            freed = (old["actual"] - r["actual"]
                     if old is not None and r.get("error") is None else None)
            replicas.append({"replica": r["replica"], "node": r["node"], "disk": r["disk"],
                             "actual_before": old["actual"] if old else None,
                             "actual": r.get("actual"), "freed": freed, "error": r.get("error")})
        freed_all = [r["freed"] for r in replicas if r["freed"] is not None]
        freed = sum(freed_all) if freed_all else None
        if freed is None:
            change = "no replica reported its size"
        elif freed >= 0:
            change = f"the replicas' actual size fell by {format_size(freed)} in all"
        else:  # writes meanwhile
            change = f"the replicas' actual size grew by {format_size(-freed)} in all"
        message = (f"fstrim on node {node} at {mnt} trimmed {format_size(res['trimmed'])}; "
                   + change
                   + (f", the head holds {format_size(after['head'])}"
                      if after["head"] is not None else ""))
        self._event("volume-trimmed", f"volume {name}: {message}", name)
        return {"volume": name, "node": node, "mountpoint": mnt, "trimmed": res["trimmed"],
                "fstrim": res.get("output"), "freed": freed, "head": after["head"],
                "head_before": before["head"], "replicas": replicas, "message": message}
