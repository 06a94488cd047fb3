"""The mirror layer: every write to every replica in the volume, reads from one.

Each replica is a :class:`Member` in one of three modes:

* ``RW``: holds every acknowledged write; serves reads and receives writes.
* ``WO``: being rebuilt: receives every write, serves no reads.
* ``ERR``: left the volume after an error, a lost connection or a timeout.

A write (zero, trim, flush) goes to every RW and WO member in parallel and is
acknowledged when all of them acknowledged it.  A member that fails is set to
ERR and dropped; the request still succeeds as long as one RW member did.
Before any request completes after a drop, the mirror awaits ``on_change`` —
the engine persists the new membership (a generation bump) on the remaining
replicas there, so a dropped replica can never be mistaken for a current one
after a crash (see :mod:`drove.engine.generation`).

**Write quorum.**  A member served inside the engine process (``local``, data
locality) shares the engine's host: an acknowledgement resting on it alone is
lost if the host is cut off and the volume is taken over elsewhere (the new
engine cannot reach it).  So when the volume also has replicas outside the
process (:meth:`Mirror.require_outside`), a write, zero, trim or flush is
acknowledged only when at least one member outside the process (RW or WO)
has it as well.  While no such member is in the volume, those requests wait,
outside the in-flight count (a rebuild's pause can bring a replica back
meanwhile), up to ``quorum_wait`` seconds, then fail with EIO; a request that
reached only the local member is sent again once an outside one is back
(writes, zeros, trims and flushes are idempotent).  Reads are served as ever.

A WO replica's lower layers are still being copied, so it cannot
read-modify-write a partial block itself: for it, the mirror reads the edge
blocks from an RW member and sends whole blocks, serialising writes that share
an edge block.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from drove.nbd import eager
from drove.nbd.export import Capabilities, Extent
from drove.replica.backing import is_unavailable

log = logging.getLogger("drove.engine")

BLOCK = 4096

DEFAULT_QUORUM_WAIT = 15.0
"""Seconds a write waits for a replica outside the engine's process before failing (EIO)."""


class Mode(enum.StrEnum):
    """A replica's role in the volume."""

    RW = "RW"
    WO = "WO"
    ERR = "ERR"


class ReplicaIO(Protocol):
    """What the mirror needs of a replica connection (drove.nbd.client.NbdClient fits)."""

    async def read(self, offset: int, length: int) -> Any: ...
    async def write(self, offset: int, data: Any, *, fua: bool = False) -> None: ...
    async def zero(self, offset: int, length: int, *, fua: bool = False,
                   may_trim: bool = True, fast: bool = False) -> None: ...
    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None: ...
    async def flush(self) -> None: ...
    async def cache(self, offset: int, length: int) -> None: ...
    async def block_status(self, offset: int, length: int) -> list[Extent]: ...
    def abort(self) -> None: ...


class Member:
    """One replica as the mirror sees it."""

    local = False
    """Served in this process (data locality): it serves the reads while it is RW."""

    def __init__(self, name: str, io: ReplicaIO, mode: Mode = Mode.RW) -> None:
        self.name = name
        self.mode = mode
        self.error: str | None = None
        # Called when the connection in use goes away by itself (set by the mirror).
        self.on_lost: Callable[[Member, str], None] | None = None
        self.io = io

    @property
    def io(self) -> ReplicaIO:
        """The replica connection."""
        return self._io

    @io.setter
    def io(self, io: ReplicaIO) -> None:
        self._io = io
        self.submit: eager.Submit = eager.calls(io)  # its callback-style entry
        # A replica that dies while the volume is idle closes its socket: learn it then,
        # not at the next request.  A connection replaced or closed on purpose is
        # swapped out first, so its loss is ignored.
        lost = getattr(io, "lost", None)
        if lost is not None:
            lost.add_done_callback(lambda _, io=io: self.report_lost(io))

    def report_lost(self, io: Any) -> None:
        """Tell ``on_lost`` if ``io`` is still this member's connection and it is gone."""
        lost = getattr(io, "lost", None)
        if (io is self._io and lost is not None and lost.done() and self.mode is not Mode.ERR
                and self.on_lost is not None):
            self.on_lost(self, getattr(io, "reason", "") or "connection lost")

    def __repr__(self) -> str:
        return f"<Member {self.name} {self.mode}>"


class _NotOutside(Exception):
    """No member outside the engine process has the request: it is not acknowledged."""


def _errno_of(exc: BaseException) -> int | None:
    return exc.errno if isinstance(exc, OSError) else None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def gather_eager(coros: list[Any]) -> list[Any]:
    """Run coroutines concurrently without a Task each; results or exceptions, in order.

    ``asyncio.gather`` wraps every coroutine in a Task, which costs two trips
    through the event loop.  A replica write is one request sent and one
    future awaited, so each coroutine is stepped by hand: started at once
    (its request leaves in this turn of the loop), and resumed when the
    future it yielded is done.
    """
    results: list[Any] = [None] * len(coros)
    pending: list[tuple[int, Any, Any]] = []
    for i, coro in enumerate(coros):
        _step(coro, None, i, results, pending)
    try:
        while pending:
            i, coro, fut = pending.pop()
            if fut is None:  # a bare yield (asyncio.sleep(0)): give the loop a turn
                await asyncio.sleep(0)
            elif not fut.done():
                # Wait on a waiter of our own: cancelling us must not cancel ``fut``,
                # which belongs to the coroutine (it is cancelled through it below).
                waiter = asyncio.get_running_loop().create_future()
                fut.add_done_callback(lambda _, w=waiter: w.done() or w.set_result(None))
                await waiter
            _step(coro, fut, i, results, pending)
    except BaseException as exc:
        for _, coro, _ in pending:
            with contextlib.suppress(BaseException):
                coro.throw(exc)
            coro.close()
        raise
    return results


def _step(coro: Any, fut: Any, i: int, results: list[Any],
          pending: list[tuple[int, Any, Any]]) -> None:
    """Advance ``coro`` once; record its result/exception or what it waits on next."""
    try:
        if fut is not None and fut.cancelled():
            nxt = coro.throw(asyncio.CancelledError())
        else:
            nxt = coro.send(None)
    except StopIteration as stop:
        results[i] = stop.value
    except Exception as exc:
        results[i] = exc
    else:
        pending.append((i, coro, nxt))


class _FanoutDone:
    """Completion of a write or flush submitted to every target: waits for all."""

    __slots__ = ("done", "failed", "left", "mirror", "request", "results", "targets")

    def __init__(self, mirror: Mirror, targets: list[Member], done: eager.Done,
                 request: tuple[int, int, int, Any, bool]) -> None:
        self.mirror = mirror
        self.targets = targets
        self.done = done
        self.request = request  # (cmd, offset, length, data, fua): sent again if unacknowledged
        self.results: list[BaseException | None] = [None] * len(targets)
        self.left = len(targets)
        self.failed = False

    def one(self, i: int, value: Any, exc: BaseException | None) -> None:
        """Target ``i`` answered."""
        if exc is not None:
            self.results[i] = exc
            self.failed = True
        self.left -= 1
        if not self.left:
            mirror = self.mirror
            if self.failed or mirror._change_task is not None or mirror.faulted is not None:
                eager.run(mirror._settle(self), self.done)
            else:
                mirror._leave()
                self.done(None, None)

    def __call__(self, value: Any, exc: BaseException | None) -> None:
        """The only target answered."""
        self.one(0, value, exc)


class _ReadDone:
    """Completion of a read submitted to one RW member; fails over on error."""

    __slots__ = ("done", "length", "member", "mirror", "offset")

    def __init__(self, mirror: Mirror, member: Member, offset: int, length: int,
                 done: eager.Done) -> None:
        self.mirror = mirror
        self.member = member
        self.offset = offset
        self.length = length
        self.done = done

    def __call__(self, value: Any, exc: BaseException | None) -> None:
        mirror = self.mirror
        mirror._leave()
        if exc is None:
            if mirror.faulted is not None:  # nothing is answered once the volume faulted
                self.done(None, mirror.fault_error())
                return
            self.done(value, None)
        else:
            eager.run(mirror._read_again(self.member, exc, self.offset, self.length), self.done)


class Mirror:
    """An Export that fans writes out to every member and reads from an RW one."""

    description = "drove volume"

    def __init__(self, name: str, size: int,
                 on_change: Callable[[], Awaitable[None]] | None = None,
                 on_drop: Callable[[Member, str], None] | None = None) -> None:
        self.name = name
        self._size = size
        self.caps = Capabilities()
        self.on_change = on_change
        self.on_drop = on_drop
        self.members: list[Member] = []
        self.faulted: str | None = None
        self._targets: list[Member] = []  # RW + WO, the write fan-out
        self._rw: list[Member] = []
        self._readers: list[Member] = []  # the local RW member if any, else every RW one
        self._has_wo = False
        self._rr = 0
        self._inflight = 0
        self._pause: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._change_pending = False
        self._change_task: asyncio.Task[None] | None = None
        self._edges: dict[int, asyncio.Future[None]] = {}
        # Write quorum (see the module docstring).
        self.outside_required = False
        self.quorum_wait = DEFAULT_QUORUM_WAIT
        self.on_quorum: Callable[[bool], None] | None = None  # told when it is lost/met
        self.quorum_lost_since: float | None = None  # wall clock, while lost
        self.waiting_for_quorum = 0  # requests waiting for an outside member now
        self._alone = False  # outside members required, none receives writes
        self._quorum_back: asyncio.Future[None] | None = None

    # ----------------------------------------------------------- membership

    @property
    def size(self) -> int:
        """The volume size served to clients."""
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value

    def add(self, member: Member) -> None:
        """Add ``member`` (its mode decides what it receives) at a quiet moment."""
        self.members.append(member)
        member.on_lost = self._lost
        self._recompute()
        member.report_lost(member.io)  # it may have gone before it was watched

    def _lost(self, member: Member, why: str) -> None:
        """``member``'s connection went away by itself: it leaves the volume now."""
        if member in self.members:
            self.drop(member, why)

    def set_mode(self, member: Member, mode: Mode) -> None:
        """Change a member's mode (WO -> RW when its rebuild finished)."""
        member.mode = mode
        self._recompute()

    def remove(self, member: Member) -> None:
        """Forget ``member`` entirely."""
        if member in self.members:
            self.members.remove(member)
        member.on_lost = None
        self._recompute()

    def rw_members(self) -> list[Member]:
        """Members holding every acknowledged write."""
        return list(self._rw)

    def readers(self) -> list[Member]:
        """Members serving reads: the local one while it is RW, else every RW member."""
        return list(self._readers)

    def _recompute(self) -> None:
        self._rw = [m for m in self.members if m.mode is Mode.RW]
        self._readers = [m for m in self._rw if m.local] or self._rw
        # Remote members first: their requests leave before a local member's inline I/O runs.
        self._targets = sorted((m for m in self.members if m.mode in (Mode.RW, Mode.WO)),
                               key=lambda m: m.local)
        self._has_wo = len(self._targets) != len(self._rw)
        if not self._rw and self.members and self.faulted is None:
            self.faulted = "no RW replica left"
            log.error("volume %s faulted: no RW replica left", self.name)
            self._wake_quorum_waiters()
        alone = self.outside_required and not any(not m.local for m in self._targets)
        if alone != self._alone:
            self._alone = alone
            self.quorum_lost_since = time.time() if alone else None
            if not alone:
                self._wake_quorum_waiters()
            if self.on_quorum is not None:
                self.on_quorum(not alone)

    def require_outside(self, required: bool) -> None:
        """Whether writes need a member outside this process (the volume has such replicas)."""
        self.outside_required = required
        self._recompute()

    @property
    def quorum_met(self) -> bool:
        """False while writes wait because no member outside this process receives them."""
        return not self._alone

    def _wake_quorum_waiters(self) -> None:
        fut, self._quorum_back = self._quorum_back, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _quorum_error(self) -> OSError:
        return OSError(errno.EIO, f"volume {self.name}: no replica outside the engine's "
                       f"process took the request within {self.quorum_wait:g} s (the local "
                       "replica alone cannot acknowledge a write: it would be lost if this "
                       "host were taken over)")

    async def _wait_outside(self, give_up: float | None) -> float:
        """Wait (not in flight) until a member outside this process receives writes.

        ``give_up`` is the loop time after which the request fails (EIO); returns it.
        """
        loop = asyncio.get_running_loop()
        if give_up is None:
            give_up = loop.time() + self.quorum_wait
        self.waiting_for_quorum += 1
        try:
            while self._alone and self.faulted is None:
                left = give_up - loop.time()
                if left <= 0:
                    raise self._quorum_error()
                if self._quorum_back is None:
                    self._quorum_back = loop.create_future()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._quorum_back), left)
        finally:
            self.waiting_for_quorum -= 1
        self._check()
        return give_up

    async def _acknowledged(self, op: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run write-type ``op`` until a member outside this process has it (write quorum)."""
        give_up: float | None = None
        while True:
            if self._alone:
                give_up = await self._wait_outside(give_up)
            if (waiting := self._enter()) is not None:
                await waiting
            try:
                await op(*args)
                return
            except _NotOutside:
                now = asyncio.get_running_loop().time()
                if give_up is None:
                    give_up = now + self.quorum_wait
                elif now >= give_up:
                    raise self._quorum_error() from None
            finally:
                self._leave()

    def _outside_ok(self, targets: Sequence[Member], results: Sequence[Any]) -> bool:
        """Whether quorum holds for one fan-out: not required, or an outside member succeeded."""
        return not self.outside_required or any(
            not m.local and not isinstance(r, BaseException)
            for m, r in zip(targets, results, strict=True))

    def drop(self, member: Member, exc: BaseException | str) -> None:
        """Set ``member`` to ERR, cut its connection and persist the new membership."""
        if member.mode is Mode.ERR:
            return
        was = member.mode
        member.mode = Mode.ERR
        member.error = exc if isinstance(exc, str) else _describe(exc)
        log.warning("volume %s: replica %s (%s) set to ERR: %s", self.name, member.name, was,
                    member.error)
        self._recompute()
        with contextlib.suppress(Exception):
            member.io.abort()
        if self.on_drop is not None:
            self.on_drop(member, member.error)
        self.membership_changed()

    def membership_changed(self) -> None:
        """Schedule ``on_change``; requests completing from now on wait for it."""
        if self.on_change is None:
            return
        self._change_pending = True
        if self._change_task is None:
            self._change_task = asyncio.ensure_future(self._run_changes())

    async def _run_changes(self) -> None:
        try:
            while self._change_pending:
                self._change_pending = False
                try:
                    await self.on_change()
                except Exception as exc:  # the volume cannot prove who is current
                    log.exception("volume %s: persisting membership failed", self.name)
                    self.fault(f"persisting membership failed: {_describe(exc)}")
        finally:
            self._change_task = None

    async def settled(self) -> None:
        """Wait until every membership change so far is persisted."""
        while self._change_task is not None:
            await asyncio.shield(self._change_task)

    def fault(self, why: str) -> None:
        """Stop serving I/O: every request fails with EIO from now on."""
        if self.faulted is None:
            self.faulted = why
            log.error("volume %s faulted: %s", self.name, why)
            self._wake_quorum_waiters()

    def fault_error(self) -> OSError:
        """The error every request gets once the volume faulted."""
        return OSError(errno.EIO, f"volume {self.name} is faulted: {self.faulted}")

    def _check(self) -> None:
        if self.faulted is not None:
            raise self.fault_error()

    # ----------------------------------------------------------- pause

    @property
    def is_paused(self) -> bool:
        """Whether I/O is held for a structural change right now."""
        return self._pause is not None

    async def _wait_resume(self) -> None:
        while self._pause is not None:
            await asyncio.shield(self._pause)

    def _enter(self) -> Awaitable[None] | None:
        """Count a request in; returns an awaitable to wait on first while paused.

        Not a coroutine: on the hot path (no pause) entering costs no frame.
        """
        if self._pause is not None:
            return self._enter_paused()
        self._check()
        self._inflight += 1
        return None

    async def _enter_paused(self) -> None:
        await self._wait_resume()
        self._check()
        self._inflight += 1

    def _leave(self) -> None:
        self._inflight -= 1
        if not self._inflight and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[float]:
        """Hold new requests and wait out in-flight ones; yields the drain time in seconds."""
        loop = asyncio.get_running_loop()
        await self._wait_resume()  # one pause at a time
        self._pause = loop.create_future()
        started = loop.time()
        try:
            while self._inflight:
                self._drained = loop.create_future()
                await self._drained
            self._drained = None
            await self.settled()
            yield loop.time() - started
        finally:
            pause, self._pause = self._pause, None
            pause.set_result(None)

    # ----------------------------------------------------------- fan-out

    async def _fanout(self, targets: Sequence[Member],
                      call: Callable[[Member], Awaitable[Any]], outside: bool = True) -> None:
        """Run ``call`` on every target; drop failures; raise if no RW member succeeded.

        With ``outside`` (and the write quorum required), _NotOutside when no
        target outside this process succeeded.
        """
        if len(targets) == 1:
            m = targets[0]
            try:
                await call(m)
            except Exception as exc:
                results: list[Any] = [exc]
            else:
                if self._change_task is not None:
                    await self.settled()
                self._check()  # nothing is acknowledged once the volume faulted
                if outside and m.local and self.outside_required:
                    raise _NotOutside
                return
        else:
            results = await gather_eager([call(m) for m in targets])
        self._judge(targets, results)
        if self._change_task is not None:
            await self.settled()
        self._check()
        if outside and not self._outside_ok(targets, results):
            raise _NotOutside

    def _judge(self, targets: Sequence[Member], results: Sequence[Any]) -> None:
        """Apply the failure rules to one fan-out's results."""
        failed = [(m, r) for m, r in zip(targets, results, strict=True)
                  if isinstance(r, BaseException)]
        if not failed:
            return
        for _, r in failed:
            if not isinstance(r, Exception):
                raise r  # cancellation: propagate, the request is being torn down
        rw_ok = any(m.mode is Mode.RW for m, r in zip(targets, results, strict=True)
                    if not isinstance(r, BaseException))
        if rw_ok:
            for m, r in failed:
                self.drop(m, r)
            return
        # No RW member succeeded.  ENOSPC on every RW member that was asked is the
        # client's problem, not the replicas': report it and keep them.
        enospc = [m for m, r in failed if _errno_of(r) == errno.ENOSPC and m.mode is Mode.RW]
        # Backup data an instant restore cannot fetch fails every RW member alike: keep them.
        lacking = [m for m, r in failed if is_unavailable(r) and m.mode is Mode.RW]
        for m, r in failed:
            if m not in enospc and m not in lacking:
                self.drop(m, r)
        for m, r in zip(targets, results, strict=True):
            if m.mode is Mode.WO and not isinstance(r, BaseException):
                # It applied a write the RW replicas refused: it no longer matches them.
                self.drop(m, "diverged: a write failed on every RW replica but not on it")
        if enospc and self._rw:
            raise OSError(errno.ENOSPC, "no space left on the volume's replicas")
        if lacking and self._rw:
            raise OSError(errno.EIO, "the data this request needs is still in the backup and "
                          "cannot be fetched now")
        raise OSError(errno.EIO, "every replica failed this request")

    async def _from_rw(self, call: Callable[[Member], Awaitable[Any]]) -> Any:
        """Run ``call`` on one RW member, failing over to the next on error.

        A member that lacks the data because its instant restore cannot fetch it from
        the backup (drove.replica.backing) is not broken: another may have it; when
        none has, the request fails with EIO and every member stays.
        """
        lacking: set[str] = set()
        lacking_error = ""
        while True:
            rw = self._readers if not lacking else [
                m for m in self._readers if m.name not in lacking]
            if not rw:
                self._check()
                if lacking:
                    raise OSError(errno.EIO, f"volume {self.name}: {lacking_error}")
                raise OSError(errno.EIO, f"volume {self.name} has no RW replica")
            self._rr += 1
            m = rw[self._rr % len(rw)]
            try:
                value = await call(m)
            except Exception as exc:
                if is_unavailable(exc):
                    lacking.add(m.name)
                    lacking_error = getattr(exc, "server_message", "") or str(exc)
                    continue
                self.drop(m, exc)
                await self.settled()
                continue
            self._check()  # nothing is answered once the volume faulted
            return value

    # ----------------------------------------------------------- Export

    async def read(self, offset: int, length: int) -> Any:
        """Read from one RW replica (round robin), failing over on error."""
        if (waiting := self._enter()) is not None:
            await waiting
        try:
            return await self._from_rw(lambda m: m.io.read(offset, length))
        finally:
            self._leave()

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write to every RW and WO replica."""
        await self._acknowledged(self._write, offset, data, fua)

    async def _write(self, offset: int, data: memoryview, fua: bool) -> None:
        if self._has_wo and (offset % BLOCK or (offset + len(data)) % BLOCK):
            await self._edge_write(offset, len(data), data, fua)
        else:
            await self._fanout(self._targets, lambda m: m.io.write(offset, data, fua=fua))

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
                   fast: bool = False) -> None:
        """Zero on every replica; a fast zero only when all can do it fast."""
        await self._acknowledged(self._zero, offset, length, fua, may_trim, fast)

    async def _zero(self, offset: int, length: int, fua: bool, may_trim: bool,
                    fast: bool) -> None:
        if fast and self._has_wo:
            # A rebuilding replica must write real zeros; refuse before anything changes.
            raise OSError(errno.ENOTSUP, "fast zero unavailable while a replica rebuilds")
        if self._has_wo and (offset % BLOCK or (offset + length) % BLOCK):
            await self._edge_write(offset, length, None, fua, may_trim=may_trim)
        elif fast:
            await self._fast_zero(offset, length, fua, may_trim)
        else:
            await self._fanout(self._targets, lambda m: m.io.zero(
                offset, length, fua=fua, may_trim=may_trim))

    async def _fast_zero(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        targets = self._targets
        results = await gather_eager(
            [m.io.zero(offset, length, fua=fua, may_trim=may_trim, fast=True) for m in targets])
        slow = [m for m, r in zip(targets, results, strict=True) if _errno_of(r) == errno.ENOTSUP]
        if len(slow) == len(targets):
            raise OSError(errno.ENOTSUP, "fast zero not possible here")
        done = [(m, r) for m, r in zip(targets, results, strict=True) if m not in slow]
        self._judge([m for m, _ in done], [r for _, r in done])
        outside_ok = self._outside_ok([m for m, _ in done], [r for _, r in done])
        if slow:
            # Some replicas zeroed already: the others must too, or they would differ.
            await self._fanout(slow, lambda m: m.io.zero(offset, length, fua=fua,
                                                         may_trim=may_trim),
                               outside=not outside_ok)
        elif not outside_ok:
            raise _NotOutside
        if self._change_task is not None:
            await self.settled()
        self._check()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Trim on every replica (drove replicas then read zeros there)."""
        await self._acknowledged(self._trim, offset, length, fua)

    async def _trim(self, offset: int, length: int, fua: bool) -> None:
        if self._has_wo and (offset % BLOCK or (offset + length) % BLOCK):
            await self._edge_write(offset, length, None, fua, trim=True)
        else:
            await self._fanout(self._targets, lambda m: m.io.trim(offset, length, fua=fua))

    async def flush(self) -> None:
        """Acknowledged when every RW and WO replica flushed."""
        await self._acknowledged(self._flush)

    async def _flush(self) -> None:
        await self._fanout(self._targets, lambda m: m.io.flush())

    async def cache(self, offset: int, length: int) -> None:
        """Pass the hint to one RW replica; errors are ignored (it is only a hint)."""
        rw = self._readers
        if rw:
            with contextlib.suppress(Exception):
                await rw[self._rr % len(rw)].io.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation as one RW replica reports it."""
        if (waiting := self._enter()) is not None:
            await waiting
        try:
            return await self._from_rw(lambda m: m.io.block_status(offset, length))
        finally:
            self._leave()

    # ----------------------------------------------------------- callback style

    def submit(self, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: eager.Done) -> None:
        """READ, WRITE or FLUSH in callback style (see :mod:`drove.nbd.eager`).

        The common case only: no pause, no fault, no membership change being
        persisted, no edge merge for a WO member, and every replica
        succeeding.  Anything else is handed to the coroutine methods above,
        which hold every rule; the two paths share :meth:`_judge`.
        """
        if (self._pause is not None or self.faulted is not None or self._change_task is not None
                or (self._alone and cmd != eager.READ)):
            eager.run(self._coroutine(cmd, offset, length, data, fua), done)
            return
        if cmd == eager.READ:
            rw = self._readers
            if not rw:
                eager.run(self.read(offset, length), done)
                return
            self._rr += 1
            m = rw[self._rr % len(rw)]
            self._inflight += 1
            m.submit(cmd, offset, length, None, False, _ReadDone(self, m, offset, length, done))
            return
        if cmd == eager.WRITE and self._has_wo and (offset % BLOCK or (offset + length) % BLOCK):
            eager.run(self.write(offset, data, fua), done)
            return
        targets = self._targets
        self._inflight += 1
        fan = _FanoutDone(self, targets, done, (cmd, offset, length, data, fua))
        if len(targets) == 1:
            targets[0].submit(cmd, offset, length, data, fua, fan)
        else:
            for i, m in enumerate(targets):
                m.submit(cmd, offset, length, data, fua, functools.partial(fan.one, i))

    def _coroutine(self, cmd: int, offset: int, length: int, data: Any,
                   fua: bool) -> Awaitable[Any]:
        if cmd == eager.READ:
            return self.read(offset, length)
        if cmd == eager.WRITE:
            return self.write(offset, data, fua)
        return self.flush()

    async def _settle(self, fan: _FanoutDone) -> Any:
        try:
            self._judge(fan.targets, fan.results)
            if self._change_task is not None:
                await self.settled()
            self._check()
            if self._outside_ok(fan.targets, fan.results):
                return None
        finally:
            self._leave()
        # Only this process's replica has it: not acknowledged; sent again by the
        # coroutine path once a replica outside is back (or EIO after quorum_wait).
        return await self._coroutine(*fan.request)

    async def _read_again(self, failed: Member, exc: BaseException, offset: int,
                          length: int) -> Any:
        """A submitted read failed on ``failed``: drop it and read from another (unless it
        lacks backup data, which is not its fault: see :meth:`_from_rw`)."""
        if not isinstance(exc, Exception):
            raise exc
        if is_unavailable(exc):
            return await self.read(offset, length)
        self.drop(failed, exc)
        await self.settled()
        return await self.read(offset, length)

    # ----------------------------------------------------------- WO edges

    async def _edge_write(self, offset: int, length: int, data: memoryview | None, fua: bool,
                          *, may_trim: bool = True, trim: bool = False) -> None:
        """An unaligned write/zero/trim while a WO member exists.

        RW members get the request as it is.  WO members get whole blocks: the
        edge blocks are read from an RW member, merged, and written; the
        aligned middle of a zero/trim is sent as a zero/trim.
        """
        end = offset + length
        lo, hi = offset // BLOCK * BLOCK, -(-end // BLOCK) * BLOCK
        edge_blocks = sorted({lo // BLOCK, (hi - 1) // BLOCK})
        async with self._edge_lock(edge_blocks):
            if data is not None:
                merged = bytearray(hi - lo)
                await self._fill_edges(merged, lo, hi, offset, end)
                merged[offset - lo:end - lo] = data
                wo_writes = [(lo, memoryview(merged))]
                wo_zero: tuple[int, int] | None = None
            else:
                wo_writes, wo_zero = [], None
                first_full, last_full = -(-offset // BLOCK) * BLOCK, end // BLOCK * BLOCK
                for blk in edge_blocks:
                    b0 = blk * BLOCK
                    if b0 < offset or b0 + BLOCK > end:  # partly covered
                        buf = bytearray(await self._read_rw(b0, BLOCK))
                        z0, z1 = max(offset, b0), min(end, b0 + BLOCK)
                        buf[z0 - b0:z1 - b0] = bytes(z1 - z0)
                        wo_writes.append((b0, memoryview(buf)))
                if first_full < last_full:
                    wo_zero = (first_full, last_full - first_full)

            async def call(m: Member) -> None:
                if m.mode is Mode.RW:
                    if data is not None:
                        await m.io.write(offset, data, fua=fua)
                    elif trim:
                        await m.io.trim(offset, length, fua=fua)
                    else:
                        await m.io.zero(offset, length, fua=fua, may_trim=may_trim)
                    return
                for woff, buf in wo_writes:
                    await m.io.write(woff, buf, fua=fua)
                if wo_zero is not None:
                    if trim:
                        await m.io.trim(*wo_zero, fua=fua)
                    else:
                        await m.io.zero(*wo_zero, fua=fua, may_trim=may_trim)

            await self._fanout(self._targets, call)

    async def _fill_edges(self, buf: bytearray, lo: int, hi: int, offset: int, end: int) -> None:
        """Fill the partly covered first/last blocks of ``buf`` (spanning [lo, hi))."""
        if offset != lo:
            buf[0:BLOCK] = await self._read_rw(lo, BLOCK)
        if end != hi and (hi - BLOCK != lo or offset == lo):
            buf[hi - lo - BLOCK:] = await self._read_rw(hi - BLOCK, BLOCK)

    async def _read_rw(self, offset: int, length: int) -> Any:
        return await self._from_rw(lambda m: m.io.read(offset, length))

    @contextlib.asynccontextmanager
    async def _edge_lock(self, blocks: list[int]) -> AsyncIterator[None]:
        """Hold the edge blocks so two partial writes to one block cannot interleave."""
        while True:
            busy = [self._edges[b] for b in blocks if b in self._edges]
            if not busy:
                break
            await asyncio.shield(busy[0])
        fut = asyncio.get_running_loop().create_future()
        for b in blocks:
            self._edges[b] = fut
        try:
            yield
        finally:
            for b in blocks:
                del self._edges[b]
            fut.set_result(None)
