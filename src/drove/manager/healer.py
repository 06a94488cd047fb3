"""The healer: a loop over the attached volumes that closes the gap between what should
be and what is.  A replica whose process exited or that its engine set to ERR is failed;
a failed replica is rebuilt in place (a delta rebuild) or, when its disk is gone, replaced
on another disk (a full rebuild); an engine that exited is restarted; data locality is
kept; the data of replaced replicas goes once their disk is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from drove.manager.agents import Agents
from drove.manager.attach import Attacher
from drove.manager.disks import Disks
from drove.manager.engines import Engines, rebuild_running
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.locality import STRICT_LOCAL
from drove.manager.localize import Localizer
from drove.manager.placement import PlacementError
from drove.manager.rebuild import Rebuilds
from drove.manager.records import Records
from drove.manager.replicas import Replicas
from drove.manager.settings import Settings
from drove.manager.store import StoreError
from drove.manager.views import health

log = logging.getLogger("drove.manager")

STORE_RETRY = 1.0
"""Seconds before the healer tries again when the store does not answer."""


class Healer:
    """Heals every attached volume, one pass each ``heal_interval`` seconds."""

    def __init__(self, *, records: Records, attacher: Attacher, replicas: Replicas,
                 rebuilds: Rebuilds, localizer: Localizer, engines: Engines, disks: Disks,
                 agents: Agents, settings: Settings, event: EventFn) -> None:
        self._records = records
        self._attacher = attacher
        self._replicas = replicas
        self._rebuilds = rebuilds
        self._localizer = localizer
        self._engines = engines
        self._disks = disks
        self._agents = agents
        self._settings = settings
        self._event = event
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_health: dict[str, str] = {}
        self._engine_down_noted: set[str] = set()  # volumes an engine-node-down event named
        self._quorum_lost: set[str] = set()  # volumes whose writes wait for an outside replica

    def start(self) -> None:
        """Start the healing loop (again, after a stop: a manager that leads once more)."""
        self._stopping = False
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the healing loop (a pass under way is cancelled)."""
        self._stopping = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                self._disks.health.sweep()
            except Exception:
                log.exception("checking the nodes' heartbeats")
            try:
                await self._pass()
            except StoreError as exc:  # etcd away for a moment: the next pass tries again
                log.warning("healing: the store does not answer: %s", exc)
                await asyncio.sleep(STORE_RETRY)
                continue
            await asyncio.sleep(self._settings.get("heal_interval"))

    async def _pass(self) -> None:
        """One healing pass over every attached volume not busy with an operation."""
        for doc in self._records.all():
            lock = self._records.lock(doc["name"])
            if doc["state"] != "attached" or lock.locked():
                continue
            async with lock:
                fresh = self._records.find(doc["name"])
                if fresh is None or fresh["state"] != "attached":
                    continue
                try:
                    await self.heal(fresh)
                except Exception:
                    log.exception("healing volume %s", doc["name"])

    async def heal(self, doc: dict[str, Any]) -> None:
        """One pass of self-healing over an attached volume (its lock held)."""
        name = doc["name"]
        if self._engine_node_silent(doc):
            return
        engine_agent = self._agents.for_node(doc.get("node"))
        if not await asyncio.to_thread(engine_agent.alive, doc.get("engine")):
            if self._engine_node_silent(doc):
                return  # its agent stopped answering meanwhile: the node, not the engine
            self._event("engine-failed", f"engine of volume {name} exited; restarting it",
                        name, level="error")
            await self._attacher.recover(doc)
            return
        info = await self._engines.refresh(doc)
        if info is None:
            return
        modes = {r["name"]: r for r in info["replicas"]}
        for r in doc["replicas"]:
            if r["state"] != "running":
                continue
            live = modes.get(r["name"])
            if r.get("local"):
                # Its process is the engine, alive (checked above): only its mode counts.
                if live is None or live["mode"] == "ERR":
                    why = (live or {}).get("error") or "not in the engine"
                    self._replicas.fail(doc, r, f"engine set its local replica to ERR: {why}")
                elif live["mode"] == "RW" and r.get("rebuilding"):
                    r.update(rebuilding=False, failures=0)
                    self._records.save(doc)
                    self._event("rebuild-finished", f"replica {r['name']} rebuilt, now RW "
                                "(local: served by the engine)", name)
                continue
            if not await asyncio.to_thread(self._agents.for_replica(r).alive, r.get("proc")):
                self._replicas.fail(doc, r, "process exited")
            elif live is None or live["mode"] == "ERR":
                why = (live or {}).get("error") or "not in the engine"
                await self._replicas.stop(r, 5.0)
                self._replicas.fail(doc, r, f"engine set it to ERR: {why}")
            elif live["mode"] == "RW" and r.get("rebuilding"):
                r.update(rebuilding=False, failures=0)
                self._records.save(doc)
                self._event("rebuild-finished", f"replica {r['name']} rebuilt, now RW", name)
        self._note_health(doc, info)
        self._note_quorum(doc, info)
        if rebuild_running(info.get("rebuild")):
            return
        if (await self._repair_one(doc, modes)
                or await self._localizer.keep(doc, modes)):
            await self._engines.refresh(doc)
        await self._drop_abandoned(doc)

    def _engine_node_silent(self, doc: dict[str, Any]) -> bool:
        """True while the node of ``doc``'s engine misses heartbeats (an event once it is down).

        Its engine cannot be reached, stopped or restarted there; it may still serve
        clients on that host.  Taking the volume over is a person's decision (attach
        --force), not the healer's.
        """
        name, node = doc["name"], doc.get("node")
        health = self._disks.health
        if not health.silent(node):
            self._engine_down_noted.discard(name)
            return False
        down = health.down_for(node)
        if down is not None and name not in self._engine_down_noted:
            self._engine_down_noted.add(name)
            self._event("engine-node-down", f"volume {name}: node {node}, where its engine "
                        f"runs, is down (last seen {health.last_seen(node)}); it serves "
                        f"again when the node returns, or `drove volume attach {name} --node "
                        "OTHER --force` starts it elsewhere", name, level="error")
        return True

    async def _repair_one(self, doc: dict[str, Any], modes: dict[str, Any]) -> bool:
        """Start one rebuild: a failed replica in place, else a replacement, else a pending one.

        True if the engine's membership changed.
        """
        now = time.time()
        live = [r for r in doc["replicas"] if r["state"] != "abandoned"]
        for r in live:
            if r["state"] == "failed" and r.get("retry_at", 0) <= now:
                if self._disks.state(r["disk"]) == "ready":
                    r.pop("replenish_noted", None)
                    return await self._rebuilds.rebuild(doc, r, modes,
                                                        why="delta rebuild in place")
                if self._wait_for_node(doc, r):
                    continue
                # Its disk is gone: replace it elsewhere if possible; keep it for when the
                # disk returns if not.
                # A strict-local volume's replica may only live on its attach node.
                strict = self._records.locality(doc) == STRICT_LOCAL
                try:
                    (new,) = self._replicas.place(doc, 1, only_node=self._records.attach_node(doc)
                                                  if strict else None)
                except PlacementError as exc:
                    r["retry_at"] = now + self._settings.get("failed_replica_retry_seconds")
                    self._records.save(doc)
                    log.info("volume %s: cannot replace %s yet: %s", doc["name"], r["name"], exc)
                    continue
                r["state"] = "abandoned"
                listed = r["name"] in modes
                if listed and r.get("local"):
                    # Out of the engine too: a local one would hold the engine's one local
                    # place (and its chain) otherwise.
                    with contextlib.suppress(ApiError):
                        await self._engines.forget(doc, r["name"])
                doc["replicas"].append(new)
                self._event("replica-replaced", f"replica {r['name']} (disk {r['disk']} "
                            f"unavailable) replaced by {new['name']} on disk {new['disk']}",
                            doc["name"], level="warning")
                changed = await self._rebuilds.rebuild(doc, new, modes, why="new replica")
                if listed and not r.get("local"):
                    # Only now: forgotten first, the last replica outside the engine would
                    # leave a local one alone in the volume, acknowledging writes by itself
                    # (the write quorum binds only while the volume has others).
                    with contextlib.suppress(ApiError):
                        await self._engines.forget(doc, r["name"])
                    changed = True
                return changed
        for r in live:
            if r["state"] == "pending":
                return await self._rebuilds.rebuild(doc, r, modes, why="new replica")
        return False

    def _wait_for_node(self, doc: dict[str, Any], rep: dict[str, Any]) -> bool:
        """True while ``rep``'s node is down for less than ``replica_replenish_wait``.

        A node that returns in time gets its replicas rebuilt in place by delta; only
        one gone for longer has them rebuilt elsewhere in full.
        """
        node = self._agents.node_of_replica(rep)
        down = self._disks.health.down_for(node)
        wait = self._settings.get("replica_replenish_wait")
        if down is None or down >= wait:
            return False
        if not rep.get("replenish_noted"):
            rep["replenish_noted"] = True
            self._records.save(doc)
            self._event("replica-replenish-wait", f"replica {rep['name']}: node {node} is "
                        f"down; it is rebuilt elsewhere in {wait - down:.0f} s unless the node "
                        "returns (then in place, by delta)", doc["name"], level="warning")
        return True

    def _note_health(self, doc: dict[str, Any], info: dict[str, Any]) -> None:
        """An event when the volume's health changes."""
        now = health(doc, info)
        before = self._last_health.get(doc["name"])
        self._last_health[doc["name"]] = now
        if before is not None and before != now:
            self._event(f"volume-{now}", f"volume {doc['name']} is {now} (was {before})",
                        doc["name"], level="info" if now == "healthy" else "warning")

    def _note_quorum(self, doc: dict[str, Any], info: dict[str, Any]) -> None:
        """An event when writes start or stop waiting for a replica outside the engine."""
        name = doc["name"]
        quorum = info.get("write_quorum") or {}
        lost = bool(quorum.get("required")) and quorum.get("met") is False
        if lost and name not in self._quorum_lost:
            self._quorum_lost.add(name)
            self._event("write-quorum-lost", f"volume {name}: no replica outside its engine's "
                        "process is in the volume: writes wait for one (a rebuild), then fail "
                        "(the local replica alone acknowledges none)", name, level="error")
        elif not lost and name in self._quorum_lost:
            self._quorum_lost.discard(name)
            self._event("write-quorum-met", f"volume {name}: a replica outside its engine's "
                        "process takes writes again", name)

    async def _drop_abandoned(self, doc: dict[str, Any]) -> None:
        """Delete the data of replaced replicas whose disk came back."""
        for r in list(doc["replicas"]):
            if r["state"] != "abandoned":
                continue
            state = self._disks.state(r["disk"])
            if state == "ready":
                agent = self._agents.for_replica(r)
                await asyncio.to_thread(agent.remove_replica_data, r["path"])
                doc["replicas"].remove(r)
                self._records.save(doc)
                self._event("replica-cleaned", f"disk {r['disk']} is back: data of replaced "
                            f"replica {r['name']} deleted", doc["name"])
            elif state is None:
                doc["replicas"].remove(r)
                self._records.save(doc)
