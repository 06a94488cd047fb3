"""Attaching and detaching volumes: starting a volume's replica processes and its engine,
giving the host a device, and stopping them all again; adopting or restarting what a
previous manager left running.

With data locality (:mod:`drove.manager.locality`) one replica on the attach node is
served by the engine itself: it has no process of its own, so its "process" is the
engine.
"""

from __future__ import annotations

import asyncio
import copy
import re
from pathlib import Path
from typing import Any

from drove.agent.processes import ProcessStartError
from drove.manager import locality
from drove.manager.agents import Agents
from drove.manager.datakeys import DataKeys, encryption
from drove.manager.disks import Disks
from drove.manager.engines import Engines, launch_epoch, process_endpoints
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.guard import VolumeGuard, check_not_busy, check_not_restoring
from drove.manager.locality import DISABLED
from drove.manager.qos import push_or_warn as push_qos_or_warn
from drove.manager.records import Records
from drove.manager.replicas import Replicas
from drove.manager.settings import Settings
from drove.manager.unrecorded import Unrecorded
from drove.manager.upgrade import UPGRADE_FIELD
from drove.manager.volumekey import volume_key
from drove.replica.fence import NOTHING_CLAIMED


class Attacher:
    """Brings volumes up on this node and down again."""

    def __init__(self, *, records: Records, replicas: Replicas, engines: Engines, disks: Disks,
                 agents: Agents, settings: Settings, event: EventFn,
                 guard: VolumeGuard, keys: DataKeys | None = None) -> None:
        self._records = records
        self._keys = keys or DataKeys()  # unwraps encrypted volumes' data keys
        self._replicas = replicas
        self._engines = engines
        self._disks = disks
        self._agents = agents
        self._settings = settings
        self._event = event
        self._guard = guard
        self._unrecorded = Unrecorded(agents, event)

    def check_node(self, doc: dict[str, Any], node: str | None) -> str:
        """The node to attach ``doc`` on (default: this manager's), or ApiError 409 why not.

        A strict-local volume attaches only where its replica lives; another node
        must be up, run an agent and have the compute role.
        """
        node = node or self._agents.default_node
        locality.check_attach_node(doc, node, self._records.locality(doc))
        if not self._agents.is_local(node):
            self._disks.health.check_compute_node(node, doc["name"])
        return node

    async def attach(self, name: str, mount: str | None = None,
                     fs: str = "ext4", internal: bool = False,
                     node: str | None = None, force: bool = False) -> dict[str, Any]:
        """Start replicas and engine on ``node`` (default: this manager's) and give the host
        a device, mounted at ``mount``; the volume's stored document after.

        ``force`` takes an attached volume over on ``node`` when the node of its engine
        is down (see :meth:`_take_over`).
        """
        if fs not in ("ext4", "xfs"):
            raise ApiError(422, f"unsupported filesystem {fs!r}: use ext4 or xfs")
        if mount is not None:
            _check_mount_path(mount)
        async with self._records.lock(name):
            doc = self._records.get(name)
            if not internal:
                check_not_restoring(self._guard, doc)
            if doc["state"] == "attached" and node is not None and node != doc.get("node"):
                self._check_take_over(doc, node, force)
                self.check_node(doc, node)
                await self._take_over(doc, node, mount, fs)
                return doc
            if doc["state"] == "attached":
                if mount and (doc.get("host") or {}).get("mountpoint") != mount:
                    raise ApiError(409, f"volume {name} is attached already "
                                        f"(mounted at {(doc.get('host') or {}).get('mountpoint')})"
                                        "; detach it first")
                return doc
            doc["node"] = self.check_node(doc, node)
            self.data_key(doc)  # a wrong or missing KEK: refused before anything changes
            doc["desired"], doc["mount"] = "attached", ({"path": mount, "fs": fs}
                                                        if mount else None)
            doc["state"] = "attaching"
            self._records.save(doc)
            await self._unrecorded.stop(doc, reason=_LEFT_OVER)
            await self._bring_up_or_undo(doc)
            return doc

    def _check_take_over(self, doc: dict[str, Any], node: str, force: bool) -> None:
        """ApiError 409 unless ``doc`` may move to ``node`` now: its engine's node is down
        and ``force`` says to take it over."""
        name, old = doc["name"], doc.get("node")
        down = self._disks.health.down_for(old)
        if down is None:
            raise ApiError(409, f"volume {name} is attached on node {old}, which is up: "
                                f"detach it first (`drove volume detach {name}`), then attach "
                                f"it on {node}")
        if not force:
            raise ApiError(409, f"volume {name} is attached on node {old}, which is down (no "
                                f"heartbeat for {down:.0f} s): to start its engine on {node} "
                                f"instead, `drove volume attach {name} --node {node} --force` "
                                f"(the engine on {old}, should it still run, is fenced and "
                                "stopped when its node returns)")
        # The old engine acknowledges a write only once a replica outside its process has
        # it; the new one must fence every such replica it could still reach, or both could
        # acknowledge writes, each on its side of a partition.
        away = [f"{r['name']} (node {where})" for r in doc["replicas"]
                if r["state"] not in ("abandoned", "failed")
                and (where := self._agents.node_of_replica(r)) != old
                and self._disks.health.down_for(where) is not None]
        if away:
            raise ApiError(409, f"volume {name}: cannot take it over while replica(s) "
                                f"{', '.join(away)} are down too: the engine on {old} may "
                                "still reach them (a partition) and write there; bring those "
                                "nodes back first")

    async def _take_over(self, doc: dict[str, Any], node: str, mount: str | None,
                         fs: str) -> None:
        """Start ``doc``'s engine on ``node`` while its old engine's node is down (lock held).

        The new engine gets a new epoch and must fence every replica outside the old
        node that is not failed (``--fence-all``): the old engine, should it run behind
        a partition, acknowledges a write once one of them has it, so a replica the new
        engine cannot reach (a partition between it and that replica's node only) may
        hold writes the new side would never see.  If one cannot be started or fenced,
        the takeover is refused (ApiError 409 naming it) and undone: what it started is
        stopped and the volume stays recorded attached on the old node.

        Once the new engine serves, the replicas on the down node are failed: rebuilt
        in place by delta if the node returns within ``replica_replenish_wait``,
        elsewhere after.  The processes still running for the old engine elsewhere are
        restarted for the new one; the old engine itself is stopped by its node's agent
        when it heartbeats again (its epoch is no longer the volume's).
        """
        name, old = doc["name"], doc.get("node")
        since = self._disks.health.last_seen(old)
        before = copy.deepcopy(doc)
        # (A pending replica never started: it holds nothing the old engine acknowledged.)
        fence = {r["name"]: self._agents.node_of_replica(r) for r in doc["replicas"]
                 if r["state"] not in ("abandoned", "failed", "pending")
                 and self._agents.node_of_replica(r) != old}
        stopped = set()  # processes stopped here: restarted if the takeover is undone
        for r in doc["replicas"]:
            if self._agents.node_of_replica(r) == old:
                r["local"] = False  # the old engine's local replica is not the new one's
            elif r["name"] in fence and r["state"] == "running":
                if await self._replicas.stop(r):
                    stopped.add(r["name"])
                r.update(state="stopped", proc=None)
        self._engines.drop(name)
        doc.update(engine=None, host=None, node=node, state="attaching", desired="attached",
                   mount={"path": mount, "fs": fs} if mount else None)
        self._records.save(doc)
        try:
            await self._bring_up(doc, fence=fence)
        except BaseException as exc:
            why = await self._undo_take_over(doc, before, node, fence, stopped, exc)
            if isinstance(exc, Exception):
                raise ApiError(409, why) from exc
            raise
        failed = []
        for r in doc["replicas"]:
            if r["state"] != "abandoned" and self._agents.node_of_replica(r) == old:
                if r["state"] != "failed":
                    self._replicas.fail(doc, r, f"node {old} is down: volume {name} was taken "
                                                f"over on node {node}")
                failed.append(r["name"])
        self._records.save(doc)
        self._event("volume-takeover",
                    f"volume {name}: node {old}, its engine's, is down (last seen {since}); "
                    f"its engine now runs on node {node} with a new epoch, which fenced "
                    f"every replica outside {old} ({', '.join(fence) or 'none'}); replicas "
                    f"on {old} failed: {', '.join(failed) or 'none'}; the old engine is "
                    "stopped by its agent if the node returns", name, level="warning")

    async def _undo_take_over(self, doc: dict[str, Any], before: dict[str, Any], node: str,
                              fence: dict[str, str | None], stopped: set[str],
                              exc: BaseException) -> str:
        """Stop what a refused takeover started on ``node`` and put ``doc`` back as
        ``before`` (attached on the old node), the replica processes it had ``stopped``
        running again; why it was refused (also an event)."""
        name, old = doc["name"], before.get("node")
        detail = str(exc)
        # An engine that refused says why on the last line of its log (after its argv,
        # which names every replica): that line alone names the replicas not fenced.
        cut = detail.rfind(" | error: ")
        if cut >= 0:
            detail = detail[cut + len(" | error: "):]
        named = [f"{r} (node {where})" for r, where in fence.items()
                 if re.search(r"(?<![A-Za-z0-9._-])" + re.escape(r) + r"(?![A-Za-z0-9._-])",
                              detail)]
        why = (f"volume {name}: cannot take it over on node {node}: "
               + (f"replica(s) {', '.join(named)} could not be fenced from there; "
                  if named else "")
               + f"{detail}. The volume stays attached on node {old}: the engine there, "
               "should it still run behind a partition, may still write to a replica the new "
               "engine cannot reach; restore the network between them and try again")
        try:
            if doc.get("host"):
                await asyncio.to_thread(self._agents.for_node(node).detach_host, name,
                                        doc.get("host"), force=True)
            await asyncio.to_thread(self._agents.for_node(node).stop, doc.get("engine"))
        except Exception as stop_exc:
            # The record goes back all the same: an engine left on that node is not the
            # volume's, so its agent is told to stop it (and an engine that took the new
            # epoch keeps the volume's epoch above the old engine's, which its agent stops).
            self._event("takeover-undo-incomplete", f"volume {name}: the engine started on "
                        f"node {node} could not be stopped: {stop_exc}", name, level="warning")
        # A replica stop that fails must not keep the record from going back either.
        await asyncio.gather(*(self._replicas.stop(r) for r in doc["replicas"]
                               if r["name"] in fence and r.get("proc")),
                             return_exceptions=True)
        # An engine or replica process started for the takeover whose start did not answer
        # would hold a replica's directory. (Only there: the old node is down.)
        await self._unrecorded.stop(doc, reason="started for a refused takeover",
                                    engine_node=node, keep_from=[doc, before],
                                    only=set(fence))
        self._engines.drop(name)
        # The epoch only grows once an engine may have claimed replicas with it; one that
        # refused before it claimed any leaves the old engine's epoch the volume's (the old
        # engine, when its node returns, is then not stopped as stale).
        epoch = max(int(doc.get("epoch") or 0), int(before.get("epoch") or 0))
        if NOTHING_CLAIMED in str(exc):
            epoch = int(before.get("epoch") or 0)
        doc.clear()
        doc.update(copy.deepcopy(before), epoch=epoch)
        # The processes the takeover stopped serve the old engine's volume again.
        # (One whose agent did not answer the stop still runs: its record is right.)
        for r in doc["replicas"]:
            if r["name"] in stopped:
                await self._replicas.start(doc, r)
        self._records.save(doc)
        self._event("volume-takeover-refused", why, name, level="warning")
        return why

    async def _bring_up_or_undo(self, doc: dict[str, Any]) -> None:
        """Start what ``doc`` needs on its node; on any failure stop what started and leave
        it detached (then re-raise)."""
        try:
            await self._bring_up(doc)
        except BaseException:
            doc["desired"] = "detached"
            await self.bring_down(doc, keep_desired=False)
            raise

    async def detach(self, name: str, force: bool = False,
                     internal: bool = False) -> dict[str, Any]:
        """Unmount, release devices, stop engine and replicas; the volume's document after."""
        async with self._records.lock(name):
            doc = self._records.get(name)
            if doc["state"] == "detached":
                return doc
            if not internal:
                check_not_busy(self._guard, doc, "detach")
            await self.bring_down(doc, keep_desired=False, force=force)
            return doc

    async def recover(self, doc: dict[str, Any]) -> None:
        """After a (clean or crashed) manager stop, or when its engine exited: adopt or
        restart the volume's processes (its lock held)."""
        name = doc["name"]
        agent = self._agents.for_node(doc.get("node"))
        engine_ok = await asyncio.to_thread(agent.alive, doc.get("engine"))
        if (doc["desired"] == "attached" and engine_ok and doc["state"] == "attached"
                and await self._engines.refresh(doc) is not None):
            self._event("volume-adopted", f"volume {name}: engine still running, adopted", name)
            return
        if (doc["desired"] == "attached" and doc["state"] == "attached" and not engine_ok
                and await self._adopt_successor(doc, agent)):
            return
        # Anything left of an earlier run goes; then attach afresh if it should be.
        await asyncio.to_thread(agent.detach_host, name, doc.get("host"), force=True)
        doc["host"] = None
        await self._stop_processes(doc)
        doc["state"] = "detached"
        self._records.save(doc)
        if doc["desired"] == "attached":
            doc["state"] = "attaching"
            try:
                await self._bring_up(doc)
            except Exception as exc:
                doc["state"] = "detached"
                self._records.save(doc)
                self._event("attach-failed",
                            f"volume {name} could not be attached again: {exc}",
                            name, level="error")

    async def _adopt_successor(self, doc: dict[str, Any], agent: Any) -> bool:
        """Adopt the engine a live upgrade started, when the recorded one is gone: its
        manager stopped before it recorded the new engine (drove.manager.upgrade), which
        took the volume over, its clients and mount with it; whether it did.  Found by the
        volume's epoch, stored before that engine started: no other engine has it."""
        name, old = doc["name"], doc.get("engine") or {}
        try:
            found = await asyncio.to_thread(agent.find_engine, name, int(doc.get("epoch") or 0))
        except Exception as exc:  # its agent away: the volume is brought back as before
            self._event("volume-adopt-failed", f"volume {name}: could not look for an engine "
                        f"a live upgrade started: {exc}", name, level="warning")
            return False
        if found is None or found.pid == old.get("pid"):
            return False
        doc["engine"] = found.to_json()
        doc.pop(UPGRADE_FIELD, None)  # the upgrade is done
        doc["replaced_engine"] = {"node": doc.get("node"), "epoch": launch_epoch(old)}
        self._records.save(doc)
        if await self._engines.refresh(doc) is None:
            return False  # it does not answer: stopped and started afresh like any other
        # It started without the volume's QoS limits, which its manager would have sent.
        await push_qos_or_warn(self._engines, doc, self._settings.get("rebuild_bandwidth_limit"),
                               self._event)
        self._event("volume-adopted", f"volume {name}: its recorded engine (pid "
                    f"{old.get('pid')}) is gone; the engine a live upgrade started in its place "
                    f"(pid {found.pid}, epoch {doc.get('epoch')}) serves it: adopted", name)
        return True

    def data_key(self, doc: dict[str, Any]) -> bytes | None:
        """The data key of an encrypted ``doc`` (None: plain); ApiError 422/409 when this
        manager's KEK is missing or is not the one that wrapped it."""
        enc = encryption(doc)
        return None if enc is None else self._keys.unwrap(enc, doc["name"])

    async def _bring_up(self, doc: dict[str, Any],
                        fence: dict[str, str | None] | None = None) -> None:
        """Start the replicas (one of them in the engine, with data locality), the engine
        and the host attachment of ``doc`` (its lock held).

        ``fence`` (replica name -> node; a takeover): every one of these replicas must
        start and take the new engine's epoch, else ApiError 409 naming it.
        """
        name = doc["name"]
        data_key = self.data_key(doc)  # before any process starts
        node = doc["node"] = self._records.attach_node(doc)
        first = not doc.get("initialized")
        usable = {"stopped", "pending"} if first else {"stopped"}
        for r in doc["replicas"]:
            if r["state"] in usable and (why := self._disks.problem(r)):
                self._replicas.fail(doc, r, why)
        local = (locality.choose_local(doc, node, usable)
                 if self._records.locality(doc) != DISABLED else None)
        for r in doc["replicas"]:
            r["local"] = r is local
        started: list[tuple[str, str]] = []
        for r in doc["replicas"]:
            if (r["state"] not in usable or r is local
                    or not await self._replicas.start(doc, r)):
                continue
            started.append((r["name"], (process_endpoints(r) or {})["control"]))
        if fence:
            served = {n for n, _ in started} | ({local["name"]} if local else set())
            missing = [f"{r['name']} (node {fence[r['name']]}: {r.get('error')})"
                       for r in doc["replicas"] if r["name"] in fence and r["name"] not in served]
            if missing:
                raise ApiError(409, f"volume {name}: replica(s) {', '.join(missing)} did not "
                                    "start, so the new engine cannot fence them")
        if not started and local is None:
            raise ApiError(409, f"volume {name}: no replica could be started ("
                           + "; ".join(f"{r['name']}: {r.get('error')}" for r in doc["replicas"])
                           + "); `drove event list` tells more")
        timeout = self._settings.get("replica_timeout")
        state_file = self._agents.engine_state_file(node, self._records.volume_dir(name), name)
        # Every engine start gets a new epoch, stored before the engine runs: its replicas
        # then refuse every older engine of this volume (drove.replica.fence).
        doc["epoch"] = int(doc.get("epoch", 0)) + 1
        self._records.save(doc)
        try:
            proc = await asyncio.to_thread(
                self._agents.for_node(node).start_engine, name, started, timeout=timeout,
                state_file=state_file,
                epoch=doc["epoch"], local=(local["name"], local["path"]) if local else None,
                size=doc["size"], key=volume_key(doc), fence_all=bool(fence),
                nbd_remote=self._settings.get("engine_nbd_listen") == "node",
                **({"data_key": data_key} if data_key is not None else {}))
        except ProcessStartError as exc:
            raise ApiError(409, f"engine of volume {name} did not start: {exc}") from exc
        if local is not None:
            # Its process is the engine: running while the engine runs (the healer marks it
            # failed if the engine reports it ERR, e.g. when it could not open its chain).
            local.update(state="running", proc=None, error=None)
        doc["engine"] = proc.to_json()
        doc["initialized"] = True
        self._records.save(doc)
        if doc.get("mount"):
            m = doc.get("mount") or {}
            try:
                doc["host"] = await asyncio.to_thread(self._agents.for_node(node).attach_host, name,
                                                      m.get("path"), m.get("fs", "ext4"))
            except Exception as exc:
                raise ApiError(409, f"volume {name}: host attach failed: {exc}") from exc
        doc["state"] = "attached"
        self._records.save(doc)
        # The volume's QoS limits and the rebuild QoS (drove.manager.qos), from the start on.
        await push_qos_or_warn(self._engines, doc, self._settings.get("rebuild_bandwidth_limit"),
                               self._event)
        await self._engines.refresh(doc)
        where = f", mounted at {doc['host']['mountpoint']}" if doc.get("host") else ""
        served = (f"; replica {local['name']} is local (served by the engine)" if local
                  else "")
        self._event("volume-attached", f"volume {name} attached on node {node}: "
                    f"{proc.ready.get('nbd')}{where}{served}", name)

    async def bring_down(self, doc: dict[str, Any], *, keep_desired: bool,
                         force: bool = False) -> None:
        """Release the host device, stop the engine and the replicas of ``doc`` (its lock
        held); ``keep_desired`` remembers it should be attached again at the next start."""
        name = doc["name"]
        doc["state"] = "detaching"
        self._records.save(doc)
        try:
            await asyncio.to_thread(self._agents.for_node(doc.get("node")).detach_host, name,
                                    doc.get("host"))
        except Exception as exc:
            if not force:
                doc["state"] = "attached"
                self._records.save(doc)
                raise ApiError(409, f"volume {name}: cannot release the host device: {exc}; "
                                    "stop what uses the mount, or detach with --force") from exc
            self._event("detach-forced", f"volume {name}: host device not released: {exc}",
                        name, level="warning")
        doc["host"] = None
        await self._stop_processes(doc)
        # A replica the engine had dropped holds stale data: it must be rebuilt, never
        # started as a peer of the good ones.
        info = self._engines.drop(name) or {}
        bad = {r["name"] for r in info.get("replicas", []) if r["mode"] != "RW"}
        for r in doc["replicas"]:
            if r["name"] in bad and r["state"] == "stopped":
                r.update(state="failed", error="was not RW when the volume was detached")
        doc["state"] = "detached"
        if not keep_desired:
            doc["desired"], doc["mount"], doc["node"] = "detached", None, None
        self._records.save(doc)
        self._event("volume-detached", f"volume {name} detached", name)

    async def _stop_processes(self, doc: dict[str, Any]) -> None:
        """Stop the engine (it flushes to every replica first), then the replicas at once;
        with them, every engine and replica process of the volume the agents run but the
        record does not name (engines first)."""
        await asyncio.to_thread(self._agents.for_node(doc.get("node")).stop, doc.get("engine"))
        # A manager killed after an agent started a process, before it recorded it, left
        # it running: it would hold a replica's directory (a lock) and keep it from starting.
        await self._unrecorded.stop(doc, reason=_LEFT_OVER)
        doc["engine"] = None
        await asyncio.gather(*(self._replicas.stop(r) for r in doc["replicas"]))
        for r in doc["replicas"]:
            r["proc"] = None
            if r["state"] == "running":
                r["state"] = "stopped"


_LEFT_OVER = ("left by an earlier start of the volume: a manager stopped after its agent "
              "started them, before it recorded them, or a start whose answer was lost")


def _check_mount_path(mount: str) -> None:
    """Refuse a mount path that would hide something: it must be new or an empty directory."""
    p = Path(mount)
    if not p.is_absolute() or ".." in p.parts:
        raise ApiError(422, f"mount path {mount!r} must be absolute, without '..'")
    if p.is_mount():
        raise ApiError(409, f"{mount} is a mount point already; choose an empty directory")
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ApiError(409, f"{mount} exists and is not an empty directory; mounting there "
                            "would hide what it holds")
