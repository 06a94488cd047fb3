"""Taking a node out: drain moves every replica off it by online rebuild, remove forgets it.

Draining a node cordons it (no new replica goes there), then, one volume at a
time, builds a replacement of each of the node's replicas on another node
(placement as usual: other nodes, zones, fault sets, pools) by an online
rebuild, and removes the old replica, its process and its data once the
replacement is RW.  The volume keeps serving all along and never has fewer RW
replicas than before.  A detached volume is attached for the move (no device,
on a node that holds another of its replicas where possible) and detached
after.  Volumes whose engine runs on the node are not moved: moving an engine
interrupts its users, so the drain is refused until they are detached or
attached elsewhere (the refusal lists them).

Removing a node is refused while it holds a replica or runs an engine, and
while its agent still heartbeats (it would register the node again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from drove.manager.attach import Attacher
from drove.manager.disks import Disks
from drove.manager.engines import Engines, rebuild_running
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.placement import PlacementError
from drove.manager.rebuild import Rebuilds
from drove.manager.records import Records
from drove.manager.replicas import Replicas
from drove.manager.tasks import TaskContext, TaskFailed

log = logging.getLogger("drove.manager")

POLL = 0.5
"""Seconds between looks at a volume whose replacement replica is being rebuilt."""

MAX_FAILURES = 5
"""A replacement that failed this many times ends the volume's move (the drain says why)."""


def _live(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["replicas"] if r["state"] != "abandoned"]


def replicas_on(doc: dict[str, Any], node: str) -> list[dict[str, Any]]:
    """The live replicas of volume ``doc`` on ``node``."""
    return [r for r in _live(doc) if r.get("node") == node]


def engine_on(doc: dict[str, Any], node: str) -> bool:
    """Whether volume ``doc``'s engine runs (or is being started) on ``node``."""
    return doc["state"] != "detached" and doc.get("node") == node


class Drainer:
    """Drains nodes of their replicas and removes drained nodes."""

    def __init__(self, *, records: Records, replicas: Replicas, rebuilds: Rebuilds,
                 engines: Engines, disks: Disks, attacher: Attacher, event: EventFn) -> None:
        self._records = records
        self._replicas = replicas
        self._rebuilds = rebuilds
        self._engines = engines
        self._disks = disks
        self._attacher = attacher
        self._event = event
        self._draining: set[str] = set()

    # ------------------------------------------------------------ what is there

    def holdings(self, node: str) -> dict[str, Any]:
        """What ``node`` holds: volumes with replicas there, volumes whose engine runs there."""
        self._disks.node(node)  # 404 for an unknown node
        docs = self._records.all()
        return {
            "replicas": [{"volume": d["name"], "replica": r["name"], "disk": r["disk"],
                          "state": r["state"]}
                         for d in docs for r in replicas_on(d, node)],
            "engines": sorted(d["name"] for d in docs if engine_on(d, node)),
        }

    def check_drain(self, node: str) -> dict[str, Any]:
        """What a drain of ``node`` moves (ApiError 404, or 409 while engines run there)."""
        held = self.holdings(node)
        if node in self._draining:
            raise ApiError(409, f"node {node} is being drained already (`drove task list`)")
        if held["engines"]:
            names = ", ".join(held["engines"])
            raise ApiError(409, f"node {node} runs the engine of volume(s) {names}: a drain "
                                "moves replicas, not engines; detach them (`drove volume "
                                "detach V`) or attach them on another node (`--node`) first")
        return held

    # ------------------------------------------------------------ drain

    def task(self, node: str) -> Callable[[TaskContext], Awaitable[dict[str, Any]]]:
        """The body of the task draining ``node`` (one at a time per node)."""
        self._draining.add(node)

        async def run(ctx: TaskContext) -> dict[str, Any]:
            try:
                return await self._drain(node, ctx)
            finally:
                self._draining.discard(node)
        return run

    async def _drain(self, node: str, ctx: TaskContext) -> dict[str, Any]:
        """Every replica of ``node`` rebuilt elsewhere, then removed; what moved."""
        held = self.holdings(node)
        volumes = sorted({h["volume"] for h in held["replicas"]})
        total = len(held["replicas"])
        ctx.set(node=node)
        ctx.progress(0, total)
        self._event("node-drain-started", f"node {node}: draining {total} replica(s) of "
                    f"{len(volumes)} volume(s) to other nodes", None)
        moved: list[dict[str, Any]] = []
        failed: list[dict[str, str]] = []
        for name in volumes:
            try:
                moved += await self._move_volume(name, node, ctx, total, len(moved))
            except (ApiError, TaskFailed) as exc:
                failed.append({"volume": name, "error": str(exc)})
                self._event("node-drain-stuck", f"node {node}: volume {name} could not be "
                            f"moved off it: {exc}", name, level="error")
        result = {"node": node, "moved": moved, "failed": failed}
        left = self.holdings(node)["replicas"]
        if failed or left:
            self._event("node-drain-failed", f"node {node}: drain ended with {len(left)} "
                        f"replica(s) still there", None, level="error")
            why = "; ".join(f"{f['volume']}: {f['error']}" for f in failed) or (
                f"{len(left)} replica(s) still on the node")
            raise TaskFailed(f"node {node} is not drained: {why}", result)
        self._event("node-drained", f"node {node}: drained, {len(moved)} replica(s) moved; "
                    f"`drove node remove {node}` forgets it once its agent is stopped", None)
        return result

    async def _move_volume(self, name: str, node: str, ctx: TaskContext, total: int,
                           done: int) -> list[dict[str, Any]]:
        """Move every replica of volume ``name`` off ``node``; the moves made."""
        doc = self._records.find(name)
        if doc is None:
            return []
        attached_here = False
        if doc["state"] == "detached":
            ctx.message(f"volume {name}: attaching it for the move")
            where = self._attach_node(doc, node)
            await self._attacher.attach(name, internal=True, node=where)
            attached_here = True
            self._event("node-drain", f"volume {name} attached on node {where} while its "
                        f"replicas move off node {node}; detached after", name)
        try:
            return await self._move_attached(name, node, ctx, total, done)
        finally:
            if attached_here:
                ctx.message(f"volume {name}: detaching it")
                await self._attacher.detach(name, internal=True)

    def _attach_node(self, doc: dict[str, Any], drained: str) -> str:
        """A node to attach detached ``doc`` on for the move: one holding another of its
        replicas first (its data stays local), else any that may run its engine."""
        first = [r["node"] for r in _live(doc) if r.get("node") not in (drained, None)]
        rest = sorted(n for n in self._disks.node_docs() if n != drained and n not in first)
        reasons = []
        for candidate in [*first, *rest]:
            try:
                return self._attacher.check_node(doc, candidate)
            except ApiError as exc:
                reasons.append(str(exc))
        raise ApiError(409, f"volume {doc['name']} is detached and no node may run its engine "
                            "for the move: " + "; ".join(reasons))

    async def _move_attached(self, name: str, node: str, ctx: TaskContext, total: int,
                             done: int) -> list[dict[str, Any]]:
        """Step volume ``name`` (attached) until none of its replicas is on ``node``."""
        moved: list[dict[str, Any]] = []
        while True:
            async with self._records.lock(name):
                doc = self._records.find(name)
                if doc is None or not replicas_on(doc, node):
                    return moved
                if doc["state"] != "attached":
                    raise TaskFailed(f"volume {name} was {doc['state']} during the move")
                step = await self._step(doc, node, ctx)
            if step is not None:
                moved.append(step)
                ctx.progress(done + len(moved), total)
                continue
            await asyncio.sleep(POLL)

    async def _step(self, doc: dict[str, Any], node: str,
                    ctx: TaskContext) -> dict[str, Any] | None:
        """One step of moving ``doc`` off ``node`` (its lock held): remove a replica whose
        replacement is RW, or start building a replacement; the move when one was removed."""
        name = doc["name"]
        info = await self._engines.refresh(doc)
        if info is None:
            ctx.message(f"volume {name}: waiting for its engine to answer")
            return None
        rebuild = info.get("rebuild")
        if rebuild_running(rebuild):
            ctx.message(f"volume {name}: rebuilding {rebuild.get('replica')} "
                        f"({rebuild.get('bytes_done', 0)} of {rebuild.get('bytes_total', 0)} "
                        "bytes)")
            return None
        modes = {r["name"]: r for r in info["replicas"]}
        victims = replicas_on(doc, node)
        others = [r for r in _live(doc) if r.get("node") != node]
        rw = [r for r in others if (modes.get(r["name"]) or {}).get("mode") == "RW"
              and r["state"] == "running"]
        if len(rw) >= doc["replica_count"]:
            # Enough RW copies elsewhere: the least useful victim goes (a failed one first).
            victim = sorted(victims, key=lambda r: (modes.get(r["name"]) or {}).get("mode")
                            == "RW")[0]
            new = next((r for r in rw if r.get("drain_of") == victim["name"]), None)
            await self._replicas.remove(doc, victim)
            if new is not None:
                new.pop("drain_of", None)
            self._records.save(doc)
            self._event("replica-drained", f"replica {victim['name']} removed from node {node} "
                        f"(disk {victim['disk']})"
                        + (f": {new['name']} on node {new['node']} replaces it" if new else ""),
                        name)
            return {"volume": name, "replica": victim["name"],
                    "by": new["name"] if new else None,
                    "to_node": new["node"] if new else None}
        building = [r for r in others if r not in rw]
        for r in building:
            if r.get("failures", 0) >= MAX_FAILURES:
                raise TaskFailed(f"replica {r['name']} failed {r['failures']} times: "
                                 f"{r.get('error')}")
        if building:
            # A replacement (or another replica) is on its way: the healer retries failed ones.
            ctx.message(f"volume {name}: waiting for {building[0]['name']} to become RW "
                        f"({building[0]['state']})")
            return None
        victim = victims[0]
        try:
            (new,) = self._replicas.place(doc, 1)
        except PlacementError as exc:
            raise TaskFailed(f"no other node can take replica {victim['name']}: {exc}") from exc
        new["drain_of"] = victim["name"]
        doc["replicas"].append(new)
        self._records.save(doc)
        self._event("node-drain", f"volume {name}: {new['name']} on disk {new['disk']} (node "
                    f"{new['node']}) is built to replace {victim['name']} on node {node}", name)
        ctx.message(f"volume {name}: building {new['name']} on node {new['node']}")
        await self._rebuilds.rebuild(doc, new, modes, why=f"node {node} is drained")
        self._records.save(doc)
        return None

    # ------------------------------------------------------------ remove

    async def remove(self, node: str) -> dict[str, Any]:
        """Forget ``node`` and its disks (409 with what it holds, or while it is up)."""
        n = self._disks.node(node)
        if self._disks.is_own(node):
            raise ApiError(409, f"node {node} is this manager's own: it registers it at "
                                "every start")
        held = self.holdings(node)
        if held["replicas"] or held["engines"]:
            what = [f"replica {h['replica']} of volume {h['volume']}" for h in held["replicas"]]
            what += [f"the engine of volume {v}" for v in held["engines"]]
            raise ApiError(409, f"node {node} holds {', '.join(what)}: drain it first "
                                f"(`drove node drain {node}`)")
        if n.get("state") == "up" and n.get("agent_url"):
            raise ApiError(409, f"node {node} is up: stop its agent first (a running agent "
                                "registers its node again), then remove it once it is down")
        dropped = await self._forget_abandoned(node)
        disks = self._disks.remove_node(node)
        self._event("node-removed", f"node {node} removed with its disk(s) "
                    f"{', '.join(disks) or '-'}"
                    + (f"; {dropped} replaced replica(s) left there forgotten" if dropped
                       else ""), None)
        return {"deleted": node, "disks": disks}

    async def _forget_abandoned(self, node: str) -> int:
        """Drop the records of replaced replicas whose data is on ``node`` (it is gone)."""
        count = 0
        for name in [d["name"] for d in self._records.all()]:
            async with self._records.lock(name):
                doc = self._records.find(name)
                if doc is None:
                    continue
                keep = [r for r in doc["replicas"]
                        if not (r["state"] == "abandoned" and r.get("node") == node)]
                if len(keep) != len(doc["replicas"]):
                    count += len(doc["replicas"]) - len(keep)
                    doc["replicas"] = keep
                    self._records.save(doc)
        return count
