"""Live engine upgrade: a volume's engine replaced by a new process of its agent's drove,
without a detach, on request (``POST /v1/volumes/{name}/upgrade-engine``) or by itself when
the agent runs a newer drove than the engine (setting ``engine_auto_upgrade``).

The old engine, started with ``--handoff PATH`` (every engine an agent starts), drains
and hands its NBD listening sockets and client connections to its successor
(``--takeover PATH``), which claims a new epoch on the replicas: clients and a mounted
filesystem see no error.  The new epoch is allocated and stored before the successor
starts, as at an attach.  If the successor fails, the old engine serves on; the record
keeps it, with the epoch it reports holding then (the new one if the successor had begun
claiming the replicas, else its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from drove.agent.orphans import option
from drove.agent.processes import Proc
from drove.manager.agents import Agents
from drove.manager.datakeys import DataKeys, encryption
from drove.manager.engines import Engines, launch_epoch, rebuild_running
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.guard import VolumeGuard
from drove.manager.qos import push_or_warn as push_qos_or_warn
from drove.manager.records import Records
from drove.manager.settings import Settings
from drove.manager.store import StoreError
from drove.manager.volumekey import volume_key

log = logging.getLogger("drove.manager")

AUTO_INTERVAL = 5.0
"""Seconds between two looks for engines older than their agent (a restarted agent's
heartbeat says its version; this manager's own agent is its own)."""


UPGRADE_FIELD = "engine_upgrade"
"""In a volume's record while its recorded engine may hold a newer epoch than it was started
with (a live upgrade under way, or one that failed after the new engine had claimed the
replicas): ``{"node", "epoch"}``, that engine's node and launch epoch."""


SETTLE_WAIT = 45.0
"""Seconds an engine whose successor failed may take to serve again (it takes its replicas
back): the engine's own limit on a handoff (30 s) and its grace for the successor's end."""

# An engine's upgrade states (its info's ``upgrade``) while it hands over to a successor.
_HANDING_OVER = frozenset({"draining", "handing-over", "successor-claiming"})


class UpgradeFailedError(ApiError):
    """The successor engine was started and failed: the old engine serves on."""


def version_key(version: str | None) -> tuple[int, ...]:
    """The release numbers of a drove version ("0.10.1" -> (0, 10, 1)); () when unknown,
    which sorts before every version."""
    match = re.match(r"\d+(?:\.\d+)*", version or "")
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def older(have: str | None, than: str | None) -> bool:
    """Whether drove ``have`` (None: an engine too old to say) is older than ``than``."""
    return than is not None and version_key(have) < version_key(than)


def engine_version(engine: dict[str, Any] | None) -> str | None:
    """The drove version an engine process runs, as its ready line said (None: unknown)."""
    return ((engine or {}).get("ready") or {}).get("version")


def handoff_path(engine: dict[str, Any] | None) -> str | None:
    """The unix socket an engine listens on for its successor (None: started without)."""
    return option((engine or {}).get("argv") or [], "--handoff")


def _last_words(exc: Exception) -> str:
    """What a failed start says last: the end of the new engine's log (the rest of the
    message, its command lines, is in the event)."""
    text = str(exc)
    if " | " not in text:
        return f"failed: {text}"
    head = text.split(": ", 1)[0]  # e.g. "['engine', 'serve'] exited with status 1"
    status = head.split("] ", 1)[-1] if "] " in head else "failed"
    return f"{status}: {text.rsplit(' | ', 1)[-1]}"


class EngineUpgrades:
    """Upgrades of attached volumes' engines, asked for or automatic."""

    def __init__(self, *, records: Records, engines: Engines, agents: Agents,
                 settings: Settings, keys: DataKeys, guard: VolumeGuard,
                 event: EventFn) -> None:
        self._records = records
        self._engines = engines
        self._agents = agents
        self._settings = settings
        self._keys = keys
        self._guard = guard
        self._event = event
        self._task: asyncio.Task[None] | None = None
        # (volume, engine pid, target version) already tried, or told not upgradable:
        # an automatic upgrade that failed is not retried until either changes.
        self._tried: set[tuple[str, int, str]] = set()

    # ------------------------------------------------------------- on request

    async def upgrade(self, name: str) -> dict[str, Any]:
        """Replace the engine of attached volume ``name`` live; what changed (``from`` and
        ``to``: pid, version, epoch).  ApiError 409 when it cannot be (not attached, an
        engine without a handoff socket, a task or a rebuild under way), or when the new
        engine failed (the old one serves on)."""
        async with self._records.lock(name):
            doc = self._records.get(name)
            return await self._upgrade(doc, "asked for")

    def check(self, doc: dict[str, Any]) -> str:
        """The handoff socket of ``doc``'s engine, or ApiError 409 why it cannot be
        upgraded now (nothing changes)."""
        name, engine = doc["name"], doc.get("engine")
        if doc["state"] != "attached" or not engine:
            raise ApiError(409, f"volume {name} is {doc['state']}: only an attached volume's "
                                "engine is upgraded (a detached volume's engine starts from "
                                "this drove at its next attach)")
        path = handoff_path(engine)
        if path is None:
            raise ApiError(409, f"volume {name}: its engine (pid {engine['pid']}) was started "
                                "without a handoff socket (by a drove from before live "
                                "upgrades), so it cannot hand over its connections; detach "
                                f"and attach the volume once (`drove volume detach {name}`, "
                                f"`drove volume attach {name}`): its next engine can")
        why = self._guard.busy(name)
        if why:
            raise ApiError(409, f"cannot upgrade the engine of volume {name} now: {why}; wait "
                                "for the task or cancel it (`drove task cancel ID`)")
        return path

    async def _upgrade(self, doc: dict[str, Any], reason: str) -> dict[str, Any]:
        """Upgrade ``doc``'s engine (its lock held); ``reason`` goes in the events."""
        self.check(doc)
        name, node = doc["name"], doc.get("node")
        info = await self._engines.refresh(doc)
        if info is None:
            raise ApiError(503, f"engine of volume {name} does not answer; the healer "
                                "restarts it")
        if rebuild_running(info.get("rebuild")):
            raise ApiError(409, f"volume {name}: a rebuild of replica "
                                f"{info['rebuild'].get('replica')} is under way; upgrade its "
                                "engine once it is done (`drove volume wait "
                                f"{name}`)")
        replicas, local = self._served(doc, info)
        enc = encryption(doc)
        # A missing or wrong KEK is refused here, before the epoch moves.
        data_key = None if enc is None else self._keys.unwrap(enc, name)
        old, old_epoch = doc["engine"], int(doc.get("epoch") or 0)
        # Like an attach: the new epoch is stored before the engine that claims it runs.
        doc["epoch"] = new_epoch = old_epoch + 1
        # Meanwhile the old engine, started with an older epoch, is still the volume's: its
        # agent is not told to stop it (drove.manager.heartbeats).
        doc[UPGRADE_FIELD] = {"node": node, "epoch": launch_epoch(old)}
        self._records.save(doc)
        agent = self._agents.for_node(node)
        try:
            proc: Proc = await asyncio.to_thread(
                agent.upgrade_engine, name, old, replicas,
                timeout=self._settings.get("replica_timeout"),
                state_file=self._agents.engine_state_file(node, self._records.volume_dir(name),
                                                          name),
                epoch=new_epoch, local=local, key=volume_key(doc),
                **({"data_key": data_key} if data_key is not None else {}))
        except Exception as exc:
            raise await self._failed(doc, old_epoch, reason, exc) from exc
        doc["engine"] = proc.to_json()
        # Its agent's long-poll may still list the old engine a moment: not to be named stale.
        doc["replaced_engine"] = doc.pop(UPGRADE_FIELD)
        self._records.save(doc)
        self._engines.drop(name)
        # The new engine starts without the volume's QoS limits: they go to it as at attach.
        await push_qos_or_warn(self._engines, doc, self._settings.get("rebuild_bandwidth_limit"),
                               self._event, engine="its new engine")
        await self._engines.refresh(doc)
        change = {"from": {"pid": old["pid"], "version": engine_version(old),
                           "epoch": old_epoch},
                  "to": {"pid": proc.pid, "version": engine_version(doc["engine"]),
                         "epoch": new_epoch}}
        self._event("engine-upgraded", f"volume {name} ({reason}): engine pid {old['pid']} -> "
                    f"{proc.pid}, drove {change['from']['version'] or 'unknown'} -> "
                    f"{change['to']['version'] or 'unknown'}, epoch {old_epoch} -> "
                    f"{new_epoch}; the volume stayed attached", name)
        return change

    def _served(self, doc: dict[str, Any], info: dict[str, Any]
                ) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
        """The replica processes (name, control URL) and the local replica (name, directory)
        the new engine takes over: those the old one has RW (one it dropped is rebuilt by the
        healer, as after any drop); ApiError 409 when its local replica is not RW."""
        modes = {r["name"]: r.get("mode") for r in info.get("replicas", [])}
        replicas, local = [], None
        for r in doc["replicas"]:
            if r["state"] != "running" or modes.get(r["name"]) != "RW":
                if r.get("local") and r["state"] == "running":
                    raise ApiError(409, f"volume {doc['name']}: its local replica {r['name']} "
                                        f"is {modes.get(r['name'])}, not RW; upgrade the "
                                        "engine once the healer has it back "
                                        f"(`drove volume wait {doc['name']}`)")
                continue
            if r.get("local"):
                local = (r["name"], r["path"])
            elif (ready := (r.get("proc") or {}).get("ready") or {}).get("control"):
                replicas.append((r["name"], ready["control"]))
        if not replicas and local is None:
            raise ApiError(409, f"volume {doc['name']}: no replica is RW in its engine; "
                                "nothing a new engine could serve")
        return replicas, local

    async def _failed(self, doc: dict[str, Any], old_epoch: int, reason: str,
                      exc: Exception) -> ApiError:
        """Put the record back on the old engine after its successor failed; the error."""
        name = doc["name"]
        tried = doc["epoch"]
        info = await self._settled(doc)  # the record still names the old engine
        held = (info or {}).get("epoch")
        # The epoch the old engine holds now (the new one if the successor began claiming
        # the replicas); when it does not answer, the higher: an epoch is never reused.
        doc["epoch"] = held if isinstance(held, int) and held in (old_epoch, tried) else tried
        if doc["epoch"] == launch_epoch(doc.get("engine")):
            doc.pop(UPGRADE_FIELD, None)  # it holds the epoch it was started with: as before
        self._records.save(doc)
        alive = await asyncio.to_thread(self._agents.for_node(doc.get("node")).alive,
                                        doc.get("engine"))
        after = (f"the old engine (pid {doc['engine']['pid']}) serves on, epoch "
                 f"{doc['epoch']}" if alive and info is not None else
                 f"the old engine (pid {doc['engine']['pid']}) "
                 + ("does not answer" if alive else "exited too")
                 + ": the healer restarts it")
        self._event("engine-upgrade-failed", f"volume {name}: the engine upgrade ({reason}) "
                    f"failed: {exc}; {after}", name, level="error")
        return UpgradeFailedError(409, f"volume {name}: the engine upgrade failed: the new "
                                       f"engine {_last_words(exc)}; {after}; the engine's "
                                       "log and `drove event list` tell more")

    async def _settled(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """What ``doc``'s (old) engine reports once it is done with a handoff (serving
        again, its replicas taken back, after a successor that failed); None when it does
        not answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_WAIT
        while True:
            info = await self._engines.refresh(doc)
            state = ((info or {}).get("upgrade") or {}).get("state")
            if info is None or state not in _HANDING_OVER or loop.time() > deadline:
                return info
            await asyncio.sleep(0.1)

    # -------------------------------------------------------------- automatic

    def start(self) -> None:
        """Start looking for engines older than their agent (the manager leads)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop looking (an upgrade under way is cancelled with the task)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.auto_pass()
            except StoreError as exc:
                log.warning("engine upgrades: the store does not answer: %s", exc)
            except Exception:
                log.exception("looking for engines to upgrade")
            await asyncio.sleep(AUTO_INTERVAL)

    async def auto_pass(self) -> list[str]:
        """Upgrade every attached volume's engine that runs an older drove than its node's
        agent (unless the setting ``engine_auto_upgrade`` is false); the volumes upgraded."""
        done: list[str] = []
        if not self._settings.get("engine_auto_upgrade"):
            return done
        versions: dict[str | None, str | None] = {}  # by node: one store read each per pass
        for doc in self._records.all():
            engine = doc.get("engine")
            if doc["state"] != "attached" or not engine:
                continue
            node = doc.get("node")
            if node not in versions:
                versions[node] = await asyncio.to_thread(self._agents.version, node)
            target = versions[node]
            have = engine_version(engine)
            tried = (doc["name"], int(engine["pid"]), str(target))
            if not older(have, target) or tried in self._tried:
                continue
            lock = self._records.lock(doc["name"])
            if lock.locked():
                continue  # busy with another operation: the next pass looks again
            async with lock:
                fresh = self._records.find(doc["name"])
                if fresh is None or (fresh.get("engine") or {}).get("pid") != engine["pid"]:
                    continue
                if await self._auto_one(fresh, have, str(target), tried):
                    done.append(doc["name"])
        return done

    async def _auto_one(self, doc: dict[str, Any], have: str | None, target: str,
                        tried: tuple[str, int, str]) -> bool:
        """Upgrade one engine found older than its agent (lock held); whether it was."""
        name = doc["name"]
        if handoff_path(doc.get("engine")) is None:
            self._tried.add(tried)  # said once per engine
            self._event("engine-upgrade-needed", f"volume {name}: its engine runs drove "
                        f"{have or 'from before versions were reported'}, its agent "
                        f"{target}, and was started without a handoff socket, so it cannot "
                        f"be upgraded live; detach and attach the volume once", name,
                        level="warning")
            return False
        try:
            await self._upgrade(doc, f"its agent runs drove {target}, the engine "
                                     f"{have or 'an older one'}")
        except UpgradeFailedError:
            self._tried.add(tried)  # the event says why; not tried again for this pair
            return False
        except ApiError as exc:  # not now (a task, a rebuild): the next pass looks again
            log.info("volume %s: engine upgrade put off: %s", name, exc)
            return False
        return True
