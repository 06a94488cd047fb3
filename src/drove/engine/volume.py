"""The engine's volume: replicas, mirror, snapshots and membership, one process per volume."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from drove import service
from drove.engine.generation import (
    NoCurrentReplicaError,
    ReplicaState,
    choose,
    parse_state,
)
from drove.engine.local import LocalReplica
from drove.engine.mirror import DEFAULT_QUORUM_WAIT, Mirror, Mode
from drove.engine.qos import QosLimits
from drove.engine.rebuild import Rebuild
from drove.engine.replicas import ReplicaControlError, ReplicaHandle
from drove.engine.stack import LayerSettings, build_stack
from drove.nbd.arena import SLOT, Arena
from drove.replica.access import redact
from drove.replica.fence import NOTHING_CLAIMED
from drove.replica.meta import validate_snapshot_name

log = logging.getLogger("drove.engine")

DEFAULT_TIMEOUT = 8.0
"""Seconds a replica may take to answer before it is set to ERR."""

SYSTEM_LABEL = "drove.io/system"

ASK_WHY_TIMEOUT = 2.0
"""Seconds a dropped replica has to say whether a newer engine took it."""

CLAIM_ATTEMPTS = 5
"""Tries of an engine run without --epoch to claim its replicas (another raced it)."""


class FencedError(NoCurrentReplicaError):
    """A newer engine owns this volume's replicas: this one must not serve."""


class UnfencedReplicaError(NoCurrentReplicaError):
    """With ``fence_all``: a replica did not take this engine's epoch, so it is not served."""


class EngineError(Exception):
    """A refused engine operation; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def _new_arena() -> Arena | None:
    """The engine's shared payload arena (drove.nbd.arena), released while idle."""
    try:
        arena = Arena()
    except OSError as exc:  # no memfd here: large writes go inline
        log.warning("no shared arena for large writes: %s", exc)
        return None
    service.IDLE_HOOKS.append(arena.trim)
    return arena


class Engine:
    """One volume: its replicas, the mirror over them and the layers above it."""

    def __init__(self, name: str, size: int, replicas: list[tuple[str, str]], *,
                 timeout: float = DEFAULT_TIMEOUT, state_file: Path | None = None,
                 auto_rebuild: bool = True, epoch: int | None = None,
                 local: tuple[str, Path] | None = None,
                 local_nbd: tuple[str, int] | None = ("127.0.0.1", 0),
                 local_control: tuple[str, int] = ("127.0.0.1", 0),
                 quorum_wait: float = DEFAULT_QUORUM_WAIT, fence_all: bool = False,
                 layers: LayerSettings | None = None) -> None:
        self.name = name
        self.requested_epoch = epoch  # --epoch; None: one above the replicas' at start
        # A forced takeover: every replica must take our epoch before we serve, or the
        # engine we replace (cut off, maybe alive) could still write to the one we missed.
        self.fence_all = fence_all
        self.epoch: int | None = None  # the fencing epoch (drove.replica.fence), once claimed
        self.fenced: str | None = None  # why a newer engine took this volume over
        self.requested_size = size  # --size; 0: whatever the replicas hold
        self.timeout = timeout
        self.state_file = state_file
        self.auto_rebuild = auto_rebuild
        # A successor engine (drove.engine.handoff) starts its rebuilds once it committed:
        # a rebuild writes, and until then the engine it replaces may take the volume back.
        self.defer_rebuild = False
        self._deferred: list[ReplicaHandle] = []
        # The members let go of for a successor (suspend), to take back if it fails (resume).
        self._specs: tuple[list[tuple[str, str]], tuple[str, Path] | None] = ([], None)
        self._reclaim: int | None = None  # resume(): the epoch held already, taken back
        # Whether a claim of our epoch was ever sent: a successor that fails before says
        # so, and the engine it replaces keeps its own epoch (drove.engine.handoff).
        self.claim_sent = False
        self.upgrade: dict[str, Any] | None = None  # the last live upgrade (drove.engine.handoff)
        self.arena = _new_arena()
        self.replicas = [self._handle(n, url) for n, url in replicas]
        self._local_nbd, self._local_control = local_nbd, local_control
        if local is not None:
            self.replicas.append(self._local_handle(*local))
        self.mirror = Mirror(name, size, on_change=self._persist_membership,
                             on_drop=self._on_drop)
        self.mirror.quorum_wait = quorum_wait
        self.mirror.on_quorum = self._on_quorum
        stack = build_stack(layers or LayerSettings(), self.mirror)
        self.stats = stack.stats
        self.qos = stack.qos
        self.rebuild_bandwidth = 0  # bytes/s a rebuild copies at (the rebuild QoS; 0: any)
        self.export = stack.top  # what the NBD server serves: stats -> qos -> mirror
        self.generation = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        self.rebuild: Any = None  # drove.engine.rebuild.Rebuild while one runs / last one
        self.last_pause: dict[str, Any] | None = None
        self.nbd_connections = lambda: 0
        self._lock = asyncio.Lock()  # structural operations, one at a time
        self._unasked: list[ReplicaHandle] = []  # dropped, not yet asked whether fenced
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------- events, health

    def event(self, kind: str, message: str, **fields: Any) -> None:
        """Record what the engine did and why (also logged)."""
        message = redact(message)  # an NBD error names an export with the volume's key
        self.events.append({"time": time.time(), "kind": kind, "message": message, **fields})
        log.info("volume %s: %s", self.name, message)

    @property
    def size(self) -> int:
        """The volume size served (the mirror's)."""
        return self.mirror.size

    def health(self) -> str:
        """healthy, degraded or faulted."""
        if self.mirror.faulted is not None:
            return "faulted"
        if all(r.mode is Mode.RW for r in self.replicas):
            return "healthy"
        return "degraded"

    def info(self) -> dict[str, Any]:
        """The volume as the control API reports it."""
        return {
            "name": self.name, "size": self.mirror.size, "health": self.health(),
            "faulted": self.mirror.faulted, "generation": self.generation,
            "epoch": self.epoch, "fenced": self.fenced,
            "write_quorum": self.write_quorum(), "upgrade": self.upgrade,
            "replicas": [r.to_json() for r in self.replicas],
            "rebuild": self.rebuild.to_json() if self.rebuild is not None else None,
            "last_pause": self.last_pause,
            "connections": self.nbd_connections(),
            "arena": None if self.arena is None else {
                "slots": self.arena.size // SLOT, "in_use": self.arena.in_use,
                "retired": self.arena.retired},
        }

    def write_quorum(self) -> dict[str, Any]:
        """Whether writes need a replica outside this process, and whether one takes them."""
        m = self.mirror
        return {"required": m.outside_required, "met": m.quorum_met,
                "lost_since": m.quorum_lost_since, "waiting": m.waiting_for_quorum,
                "wait_seconds": m.quorum_wait}

    def _outside_required(self) -> bool:
        """Writes need an outside replica when the volume has a local one and others."""
        return self.local_replica() is not None and any(
            not isinstance(r, LocalReplica) for r in self.replicas)

    def _on_quorum(self, met: bool) -> None:
        if met:
            self.event("write-quorum-met", "a replica outside the engine's process takes "
                                           "writes again: writes are acknowledged")
        else:
            self.event("write-quorum-lost",
                       "no replica outside the engine's process is in the volume: writes "
                       f"wait up to {self.mirror.quorum_wait:g} s for one, then fail (EIO); "
                       "the local replica alone never acknowledges a write (it would be lost "
                       "if this host were cut off and the volume taken over elsewhere)")

    def _handle(self, name: str, url: str) -> ReplicaHandle:
        """A replica handle; once the start claimed the replicas, it sends our epoch.

        Not before: an epoch in the first reads would claim the replicas before the
        check that it is newer than theirs.
        """
        handle = ReplicaHandle(name, url, self.timeout, self.arena)
        handle.on_fenced = self._fenced
        if self.epoch is not None:
            handle.set_epoch(self.epoch)
        return handle

    def _local_handle(self, name: str, directory: Path) -> LocalReplica:
        """The handle of the replica this engine serves itself (data locality)."""
        if self.local_replica() is not None:
            raise EngineError(f"volume {self.name} has a local replica already "
                              f"({self.local_replica().name}); one per engine", 409)
        handle = LocalReplica(name, directory, self.requested_size or None, self.timeout,
                              nbd=self._local_nbd, control=self._local_control)
        handle.on_fenced = self._fenced
        if self.epoch is not None:
            handle.set_epoch(self.epoch)
        return handle

    def local_replica(self) -> LocalReplica | None:
        """The replica served in this process, if any."""
        return next((r for r in self.replicas if isinstance(r, LocalReplica)), None)

    def _fenced(self, why: str) -> None:
        """A replica says a newer engine owns it: stop serving at once, never write again."""
        if self.fenced is not None:
            return
        self.fenced = why
        self.event("fenced", f"a newer engine took the volume over ({why}); I/O now fails",
                   reason=why)
        self.mirror.fault(f"fenced by a newer engine: {why}")
        for r in self.replicas:
            r.disconnect()
        if self.rebuild is not None and self.rebuild.running:
            self.spawn(self.rebuild.cancel())

    def replica(self, name: str) -> ReplicaHandle:
        """The replica called ``name`` (EngineError 404 if none)."""
        for r in self.replicas:
            if r.name == name:
                return r
        raise EngineError(f"no replica {name!r} in volume {self.name}", 404)

    def exclusive(self) -> asyncio.Lock:
        """The lock structural operations hold (snapshot, delete, revert, expand, rebuild)."""
        return self._lock

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; cancelled when the engine stops."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----------------------------------------------------------- start / stop

    async def start(self) -> None:
        """Claim the replicas for this epoch, choose the current ones (generation.py), connect."""
        local = self.local_replica()
        if local is not None:
            await self._open_local(local)
        states = await self._claim()
        if not states:
            raise NoCurrentReplicaError("no replica is reachable")
        sel = choose(states, self.name, self._min_generation())
        for name, why in sel.reason.items():
            self.event("replica-excluded", f"replica {name} not serving: {why}", replica=name)
            self.replica(name).error = why
        size = max(s.size for s in states if s.name in sel.rw)
        if self.requested_size and self.requested_size != size:
            raise NoCurrentReplicaError(
                f"the replicas hold a volume of {size} bytes, not {self.requested_size}: "
                "omit --size, or grow the volume with `drove engine expand` once it is served")
        self.mirror.size = size
        for name in sel.rw:
            r = self.replica(name)
            await r.connect()
            r.mode, r.error = Mode.RW, None
            self.mirror.add(r)
        for r in self.replicas:
            if r not in self.mirror.members:
                self.mirror.add(r)  # as ERR: listed, receives nothing
        self.mirror.require_outside(self._outside_required())
        # Generations only grow on every replica: start above all of them.
        self.generation = max(s.generation for s in states)
        await self._persist_membership()
        await self.mirror.settled()
        if self.mirror.faulted is not None:
            raise NoCurrentReplicaError(f"could not mark any replica current: "
                                        f"{self.mirror.faulted}")
        self.event("started", f"serving with {len(self.mirror.rw_members())} RW replica(s) at "
                              f"generation {self.generation}, epoch {self.epoch}",
                   generation=self.generation, epoch=self.epoch)
        self.spawn(self._monitor())
        if self.auto_rebuild:
            to_rebuild = [self.replica(n) for n in sel.rebuild]
            if self.defer_rebuild:
                self._deferred = to_rebuild
            elif to_rebuild:
                self.spawn(self._rebuild_all(to_rebuild))

    def start_deferred_rebuilds(self) -> None:
        """Start the rebuilds a successor engine held back until its commit."""
        self.defer_rebuild = False
        to_rebuild, self._deferred = self._deferred, []
        if to_rebuild:
            self.spawn(self._rebuild_all(to_rebuild))

    async def suspend(self, flushed: bool = False) -> None:
        """Let go of every replica for a successor engine: close the local one and every
        connection (the successor claims them next).

        ``flushed``: no request is in flight and a flush just succeeded, so the replicas
        are marked clean first (the successor serves them all, reconciling none);
        otherwise nothing is written.
        """
        await self.mirror.settled()  # a membership change under way is persisted first
        for t in list(self._tasks):
            t.cancel()
        if flushed and self.mirror.faulted is None:
            await self._mark_clean()
        local = self.local_replica()
        self._specs = ([(r.name, r.url) for r in self.replicas if r is not local],
                       None if local is None else (local.name, local.directory))
        self.mirror.require_outside(False)  # leaving, not losing the outside replicas
        # RW members last: a mirror left with members but none RW faults.
        order = {Mode.ERR: 0, Mode.WO: 1, Mode.RW: 2}
        for r in sorted(self.replicas, key=lambda m: order[m.mode]):
            self.mirror.remove(r)
            with contextlib.suppress(Exception):
                await r.close()
        self.replicas = []

    async def resume(self, epoch: int) -> None:
        """Take the replicas back after a successor failed (it is dead), holding ``epoch``:
        ours, or the successor's when it may have claimed it; then serve as a start does."""
        names, local = self._specs
        self.replicas = [self._handle(n, url) for n, url in names]
        if local is not None:
            self.replicas.append(self._local_handle(*local))
        self._reclaim = epoch
        try:
            await self.start()
        finally:
            self._reclaim = None

    async def _open_local(self, local: LocalReplica) -> bool:
        """Open the local replica's chain here; False (recorded) when it cannot be."""
        try:
            addresses = await local.open()
        except Exception as exc:  # its disk is gone, it is locked, it is damaged
            local.error = f"cannot open {local.directory}: {exc}"
            self.event("replica-unreachable", f"local replica {local.name}: {local.error}",
                       replica=local.name)
            return False
        self.event("local-replica", f"replica {local.name} served in the engine process from "
                                    f"{local.directory}", replica=local.name, **addresses)
        return True

    async def _claim(self) -> list[ReplicaState]:
        """Take every reachable replica for this engine's epoch; their states after the claim.

        Without an epoch given, take one above the highest the replicas report,
        and try again with a higher one when another engine claimed it first.
        The states are read by the claim itself, after the replica cut the old
        engine's connections: nothing the old engine does can change them later.
        """
        if self._reclaim is not None:
            return await self._take_back(self._reclaim)
        requested = self.requested_epoch
        for _attempt in range(1 if requested is not None else CLAIM_ATTEMPTS):
            infos = await asyncio.gather(*(r.refresh() for r in self.replicas),
                                         return_exceptions=True)
            highest = max((int(i.get("epoch", 0)) for i in infos if isinstance(i, dict)),
                          default=0)
            if requested is not None and highest >= requested:
                raise FencedError(
                    f"epoch {requested} is not above the replicas' epoch {highest}: a newer "
                    "engine owns this volume (the manager issues a new epoch at every start)")
            epoch = highest + 1 if requested is None else requested
            reachable = [r for r, i in zip(self.replicas, infos, strict=True)
                         if isinstance(i, dict)]
            if self.fence_all:
                self._check_fenced(zip(self.replicas, infos, strict=True), epoch,
                                   NOTHING_CLAIMED)
            self.claim_sent = self.claim_sent or bool(reachable)
            claims = await asyncio.gather(*(r.claim(epoch) for r in reachable),
                                          return_exceptions=True)
            if any(isinstance(c, ReplicaControlError) and c.stale_epoch for c in claims):
                if requested is not None:
                    raise FencedError(f"epoch {epoch}: a newer engine claimed the replicas "
                                      "first; this one must not serve")
                continue  # raced with another engine run by hand: try a higher epoch
            if self.fence_all:
                self._check_fenced(zip(reachable, claims, strict=True), epoch,
                                   "the others were claimed")
            self.epoch = epoch
            for r in self.replicas:
                r.set_epoch(epoch)
            # What each replica answered last: its claim, or the failed read before it.
            answers = dict(zip(self.replicas, infos, strict=True))
            answers.update(zip(reachable, claims, strict=True))
            states: list[ReplicaState] = []
            for r, res in answers.items():
                if isinstance(res, BaseException):
                    r.error = f"unreachable at start: {res}"
                    self.event("replica-unreachable",
                               f"replica {r.name} unreachable at start: {res}", replica=r.name)
                else:
                    states.append(parse_state(r.name, res))
            return states
        raise FencedError(f"could not claim the replicas in {CLAIM_ATTEMPTS} tries: other "
                          "engines keep starting on them")

    async def _take_back(self, epoch: int) -> list[ReplicaState]:
        """The replicas' states, read with ``epoch``, which this engine (or its dead
        successor) claimed already: a replica at a lower one takes it, an equal one
        admits it, a higher one fences this engine (FencedError)."""
        for r in self.replicas:
            r.set_epoch(epoch)
        infos = await asyncio.gather(*(r.refresh() for r in self.replicas),
                                     return_exceptions=True)
        if any(isinstance(i, ReplicaControlError) and i.stale_epoch for i in infos):
            raise FencedError(f"epoch {epoch}: a newer engine claimed the replicas")
        self.epoch = epoch
        states: list[ReplicaState] = []
        for r, res in zip(self.replicas, infos, strict=True):
            if isinstance(res, BaseException):
                r.error = f"unreachable when taken back: {res}"
                self.event("replica-unreachable", f"replica {r.name} unreachable: {res}",
                           replica=r.name)
            else:
                states.append(parse_state(r.name, res))
        return states

    def _check_fenced(self, answers: Iterable[tuple[ReplicaHandle, Any]], epoch: int,
                      done: str) -> None:
        """With fence_all: UnfencedReplicaError naming every replica whose answer failed."""
        missing = [f"{r.name} ({redact(str(res)) or type(res).__name__})"
                   for r, res in answers if isinstance(res, BaseException)]
        if missing:
            raise UnfencedReplicaError(
                f"replica(s) {'; '.join(missing)} did not take epoch {epoch}, so not every "
                f"replica is fenced: not serving ({done}); the engine this one replaces may "
                "still write to a replica it did not fence")

    async def _monitor(self) -> None:
        """Run :meth:`health_check` every quarter of the timeout (0.5 to 5 s)."""
        interval = max(0.5, min(5.0, self.timeout / 4))
        while True:
            await asyncio.sleep(interval)
            await self.health_check()

    async def health_check(self) -> None:
        """Ping every member once, so a dead or hung replica is noticed without I/O.

        The ping is an NBD CACHE of one block: cheap, answered by a rebuilding
        replica too, and bounded by the connection's request timeout.  A failed
        ping drops the member only if the connection pinged is still the one it
        uses: a member dropped and re-added meanwhile (a rebuild made it WO on a
        new connection) is not dropped again for its old connection.
        """
        if self.mirror.is_paused or self.mirror.faulted is not None:
            return  # structural work swaps connections while paused
        pinged = [(r, r.io) for r in self.replicas
                  if r.mode in (Mode.RW, Mode.WO) and r.connected]
        results = await asyncio.gather(*(io.cache(0, 4096) for _, io in pinged),
                                       return_exceptions=True)
        for (r, io), res in zip(pinged, results, strict=True):
            if isinstance(res, Exception) and r.io is io and r.mode is not Mode.ERR:
                self.mirror.drop(r, f"health check failed: {res!r}")

    async def _rebuild_all(self, replicas: list[ReplicaHandle]) -> None:
        for r in replicas:
            try:
                await self.add_replica(r.name, wait=True)
            except Exception as exc:
                log.warning("volume %s: rebuild of %s failed: %s", self.name, r.name, exc)

    async def stop(self) -> None:
        """Flush every member, mark them clean, disconnect."""
        for t in list(self._tasks):
            t.cancel()
        if self.rebuild is not None:
            await self.rebuild.cancel()
        members = [r for r in self.replicas if r.mode in (Mode.RW, Mode.WO)]
        clean = False
        if not self.mirror.quorum_met:
            # Only the local replica is left: a flush would wait for a replica outside the
            # process that is not coming; the volume stays unclean (a start reconciles it).
            log.warning("volume %s: stopping without a replica outside the engine process; "
                        "not marked clean", self.name)
        elif self.mirror.faulted is None and members:
            try:
                await self.mirror.flush()
                clean = True
            except OSError as exc:
                log.warning("volume %s: final flush failed: %s", self.name, exc)
        if clean:
            await self._mark_clean()
            self.event("stopped", "stopped cleanly")
        for r in self.replicas:
            await r.close()

    async def _mark_clean(self) -> None:
        """Record on every RW replica that no write is in flight (after a final flush): the
        next start serves them all without reconciling one from another."""
        state = self._state(clean=True)
        results = await asyncio.gather(
            *(r.set_engine_state(state) for r in self.replicas if r.mode is Mode.RW),
            return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                log.warning("volume %s: marking clean failed: %s", self.name, res)

    # ----------------------------------------------------------- generations

    def _state(self, clean: bool = False) -> dict[str, Any]:
        return {
            "volume": self.name, "epoch": self.epoch, "generation": self.generation,
            "clean": clean,
            "members": [r.name for r in self.replicas if r.mode is Mode.RW],
            "rebuilding": [r.name for r in self.replicas if r.mode is Mode.WO],
            "updated": time.time(),
        }

    def _min_generation(self) -> int:
        if self.state_file is None or not self.state_file.exists():
            return 0
        try:
            return int(json.loads(self.state_file.read_text())["generation"])
        except (ValueError, KeyError, TypeError) as exc:
            raise NoCurrentReplicaError(f"{self.state_file} is unreadable: {exc}") from exc

    def _save_state_file(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self._state(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)
        dirfd = os.open(self.state_file.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    async def _persist_membership(self) -> None:
        """Bump the generation on every member; the mirror awaits this after each drop.

        A member that cannot store it is dropped, which makes the mirror call
        this again, so the loop ends with every remaining member agreeing.
        """
        # A replica that left may have left because a newer engine claimed it: ask the
        # ones dropped since the last change before anything is acknowledged without
        # them, so that a fenced engine does not go on alone on the replicas the new one
        # could not reach (its local one, typically).
        asked, self._unasked = self._unasked, []
        if asked:
            await asyncio.gather(*(self._ask_why(r) for r in asked))
            if self.fenced is not None:
                return  # the mirror faulted: nothing more is acknowledged
        members = [r for r in self.replicas if r.mode in (Mode.RW, Mode.WO)]
        if not members:
            return
        self.generation += 1
        state = self._state()
        results = await asyncio.gather(*(r.set_engine_state(state) for r in members),
                                       return_exceptions=True)
        failed = False
        for r, res in zip(members, results, strict=True):
            if isinstance(res, BaseException):
                failed = True
                self.mirror.drop(r, f"could not persist generation {self.generation}: {res}")
        if not failed:
            await asyncio.to_thread(self._save_state_file)
            self.event("generation", f"generation {self.generation}: RW {state['members']}, "
                                     f"WO {state['rebuilding']}", generation=self.generation)

    def _on_drop(self, member: Any, why: str) -> None:
        self.event("replica-failed", f"replica {member.name} set to ERR: {why}",
                   replica=member.name)
        if self.rebuild is not None and self.rebuild.target is member:
            self.rebuild.target_dropped(why)
        if self.fenced is None:
            self._unasked.append(member)  # asked by the membership change it causes

    async def _ask_why(self, member: ReplicaHandle) -> None:
        """Ask a dropped replica whether a newer engine took it (its connections were cut).

        The call carries our epoch, so a fenced replica answers 409 StaleEpochError,
        which fences this engine with the reason; any other failure (or no answer
        within :data:`ASK_WHY_TIMEOUT`) says nothing.
        """
        with contextlib.suppress(Exception):
            await asyncio.wait_for(member.refresh(), min(self.timeout, ASK_WHY_TIMEOUT))

    # ----------------------------------------------------------- snapshots

    def _check_not_faulted(self) -> None:
        if self.mirror.faulted is not None:
            raise EngineError(f"volume {self.name} is faulted: {self.mirror.faulted}", 409)

    async def on_all(self, what: str, call: Any) -> list[Any]:
        """Run ``call(replica)`` on every RW/WO replica; drop those that fail."""
        members = [r for r in self.replicas if r.mode in (Mode.RW, Mode.WO)]
        results = await asyncio.gather(*(call(r) for r in members), return_exceptions=True)
        for r, res in zip(members, results, strict=True):
            if isinstance(res, BaseException):
                self.mirror.drop(r, f"{what} failed: {res}")
        await self.mirror.settled()
        self._check_not_faulted()
        return [res for res in results if not isinstance(res, BaseException)]

    async def layers(self) -> list[dict[str, Any]]:
        """The chain as one RW replica reports it (all replicas hold the same tree)."""
        self._check_not_faulted()
        rw = self.mirror.rw_members()
        if not rw:
            raise EngineError("no RW replica", 409)
        return await rw[0].layers()  # type: ignore[attr-defined]

    async def _snapshot_names(self) -> set[str]:
        # A linked clone's base layers are its source's snapshots, not its own names.
        return {la["name"] for la in await self.layers()
                if la["name"] and not la["removed"] and not la.get("base")}

    async def snapshot(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Pause I/O, snapshot every replica under ``name``, resume; reports the pause."""
        try:
            validate_snapshot_name(name)
        except Exception as exc:
            raise EngineError(str(exc), 400) from exc
        async with self._lock:
            return await self._snapshot_locked(name, labels or {})

    async def _snapshot_locked(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        self._check_not_faulted()
        if name in await self._snapshot_names():
            raise EngineError(f"snapshot {name!r} already exists", 409)
        # Flush first: a replica fsyncs its head when snapshotting, and with the dirty
        # data already written back that fsync (inside the pause) is short.
        await self.mirror.flush()
        started = time.perf_counter()
        async with self.mirror.paused() as drain:
            t1 = time.perf_counter()
            await self.on_all(f"snapshot {name}", lambda r: r.snapshot(name, labels))
            t2 = time.perf_counter()
        pause = {"snapshot": name, "pause_ms": round((t2 - started) * 1e3, 2),
                 "drain_ms": round(drain * 1e3, 2), "snapshot_ms": round((t2 - t1) * 1e3, 2)}
        self.last_pause = pause
        self.event("snapshot", f"snapshot {name} taken; I/O paused {pause['pause_ms']} ms",
                   **pause)
        return pause

    def _no_rebuild(self, what: str) -> None:
        if self.rebuild is not None and self.rebuild.running:
            raise EngineError(f"cannot {what} while replica {self.rebuild.target.name} "
                              "rebuilds; wait for it or remove that replica", 409)

    async def delete_snapshot(self, name: str) -> dict[str, Any]:
        """Delete a snapshot on every replica (and purge)."""
        async with self._lock:
            self._no_rebuild("delete a snapshot")
            if name not in await self._snapshot_names():
                raise EngineError(f"no snapshot {name!r}", 404)
            await self.on_all(f"delete {name}", lambda r: r.delete_snapshot(name))
            self.event("snapshot-deleted", f"snapshot {name} deleted", snapshot=name)
            return {"deleted": name}

    async def revert(self, name: str, force: bool = False) -> dict[str, Any]:
        """Start a new head on snapshot ``name`` on every replica (no client connected).

        A replica cuts every head connection when it reverts (nothing queued may
        land in the new head), so the engine lets go of its own first, while
        I/O is paused, and connects again before resuming.
        """
        async with self._lock:
            self._no_rebuild("revert")
            if self.nbd_connections() and not force:
                raise EngineError(f"{self.nbd_connections()} NBD client(s) are connected; "
                                  "disconnect them before reverting (or force)", 409)
            if name not in await self._snapshot_names():
                raise EngineError(f"no snapshot {name!r}", 404)
            async with self.mirror.paused():
                members = [r for r in self.replicas if r.mode in (Mode.RW, Mode.WO)]
                for r in members:
                    r.disconnect()
                await self.on_all(f"revert to {name}", lambda r: r.revert(name))
                await self.on_all("reconnect after the revert", lambda r: r.connect())
            self.event("reverted", f"reverted to snapshot {name}", snapshot=name)
            return {"reverted": name}

    async def expand(self, size: int) -> dict[str, Any]:
        """Grow every replica, then the served size."""
        async with self._lock:
            self._no_rebuild("expand")
            if size < self.mirror.size:
                raise EngineError(f"cannot shrink from {self.mirror.size} to {size} bytes", 400)
            if size % 4096:
                raise EngineError("size must be a multiple of 4096", 400)
            if size == self.mirror.size:
                return {"size": size}
            async with self.mirror.paused():
                await self.on_all("expand", lambda r: r.expand(size))
                self.mirror.size = size
            self.event("expanded", f"expanded to {size} bytes", size=size)
            return {"size": size}

    def qos_json(self) -> dict[str, Any]:
        """The QoS limits and queues, and the rebuild's limit."""
        return {**self.qos.to_json(), "rebuild_bandwidth": self.rebuild_bandwidth}

    def set_qos(self, changes: dict[str, Any] | None, replace: bool = False,
                rebuild_bandwidth: int | None = None) -> dict[str, Any]:
        """Change the QoS limits live (``replace``: ``changes`` are the whole limits) and
        the rebuild's (from the next layer it copies); nothing changes when one is bad."""
        try:
            limits = (QosLimits.from_json(changes) if replace
                      else self.qos.limits.merged(changes or {}))
        except (TypeError, ValueError) as exc:
            raise EngineError(str(exc), 400) from exc
        if rebuild_bandwidth is not None and rebuild_bandwidth < 0:
            raise EngineError(f"rebuild_bandwidth must be 0 (no limit) or more bytes per "
                              f"second, not {rebuild_bandwidth}", 400)
        if limits != self.qos.limits:
            self.qos.set_limits(limits)
            self.event("qos", f"QoS limits now {limits.to_json()}", limits=limits.to_json())
        if rebuild_bandwidth is not None and rebuild_bandwidth != self.rebuild_bandwidth:
            self.rebuild_bandwidth = rebuild_bandwidth
            self.event("qos", f"rebuilds copy at most {rebuild_bandwidth} bytes/s "
                              "(0: no limit)", rebuild_bandwidth=rebuild_bandwidth)
        return self.qos_json()

    # ----------------------------------------------------------- replicas

    async def add_replica(self, name: str, url: str | None = None, wait: bool = False,
                          directory: Path | None = None) -> dict[str, Any]:
        """Rebuild replica ``name`` online; returns its progress.

        A new replica is given by its control ``url``, or by its ``directory``
        for one this engine serves itself (made when missing).
        """
        self._check_not_faulted()
        if self.rebuild is not None and self.rebuild.running:
            raise EngineError(f"replica {self.rebuild.target.name} is rebuilding already; "
                              "one rebuild per volume at a time", 409)
        if url is not None and directory is not None:
            raise EngineError("give a new replica's url or its local directory, not both", 400)
        if url is not None or directory is not None:
            if any(r.name == name for r in self.replicas):
                raise EngineError(f"replica {name!r} exists; remove it first", 409)
            if directory is not None:
                target: ReplicaHandle = self._local_handle(name, directory)
                target.service.set_size(self.mirror.size)
                if not await self._open_local(target):
                    await target.close()
                    raise EngineError(f"local replica {name}: {target.error}", 409)
            else:
                target = self._handle(name, url)
            self.replicas.append(target)
            self.mirror.add(target)
            self.mirror.require_outside(self._outside_required())
        else:
            target = self.replica(name)
            if target.mode is not Mode.ERR:
                raise EngineError(f"replica {name} is {target.mode}, not ERR", 409)
            if (isinstance(target, LocalReplica) and not target.opened
                    and not await self._open_local(target)):
                raise EngineError(f"local replica {name}: {target.error}", 409)
        self.rebuild = Rebuild(self, target)
        task = self.spawn(self.rebuild.run())
        if wait:
            await task
        return self.rebuild.to_json()

    async def remove_replica(self, name: str) -> dict[str, Any]:
        """Take replica ``name`` out of the volume (refused for the last RW one)."""
        r = self.replica(name)
        if r.mode is Mode.RW and len(self.mirror.rw_members()) == 1:
            raise EngineError(f"replica {name} is the last RW replica", 409)
        if self.rebuild is not None and self.rebuild.running and self.rebuild.target is r:
            await self.rebuild.cancel()
        if r.mode is not Mode.ERR:
            self.mirror.drop(r, "removed by request")
            await self.mirror.settled()
        self.mirror.remove(r)
        self.replicas.remove(r)
        self.mirror.require_outside(self._outside_required())
        await r.close()
        self.event("replica-removed", f"replica {name} removed", replica=name)
        return {"removed": name}


__all__ = ["DEFAULT_TIMEOUT", "Engine", "EngineError", "NoCurrentReplicaError",
           "ReplicaControlError"]
