"""Lock files on the target, so deletion never removes blocks a running backup uses.

A backup, restore or verify holds a *shared* lock; delete and gc hold the *exclusive*
lock.  Each holder keeps ``locks/<uuid>.json`` on the target and rewrites it every
``stale_after / 5`` seconds; a lock not refreshed for ``stale_after`` seconds is stale
(its holder died or stalled) and is ignored, and deleted by exclusive acquirers.  The
scheme is restic's: put your own lock, then list the others, and back off on conflict.
It relies on list-after-put consistency, which S3, radosgw and local file systems give.

A holder gives up *before* anyone may call its lock stale, by restic's rule: once its
last successful refresh is older than ``stale_after - 1.5 * refresh interval`` (0.7 of
the stale time) it declares the lock lost, stops refreshing, and the work running under
the lock is cancelled (``hold_async``) and fails with LockError.  The margin (1.5
refresh intervals) absorbs clock skew between machines and a slow last put.  A refresh
is one atomic ``Target.replace`` that never recreates a deleted file, so a holder whose
lock was removed as stale finds out instead of bringing it back.

Staleness compares the ``refreshed`` wall-clock time in the file with the reader's
clock, so the clocks of machines sharing a target must agree to well under the margin.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from drove.backup.errors import BackupError, LockError, NotFoundError
from drove.backup.target import Target

log = logging.getLogger(__name__)

PREFIX = "locks/"
SHARED = "shared"
EXCLUSIVE = "exclusive"

OnWait = Callable[[str], None]
LostCallback = Callable[[str], None]

# Lock ages count time the machine spent suspended (CLOCK_BOOTTIME), unlike
# time.monotonic(): other machines' clocks ran on meanwhile and judge staleness by them.
_clock = functools.partial(time.clock_gettime, getattr(time, "CLOCK_BOOTTIME",
                                                         time.CLOCK_MONOTONIC))


@dataclass(frozen=True)
class LockInfo:
    """Another holder's lock file, as read from the target."""

    key: str
    kind: str
    owner: str
    created: str
    refreshed: float

    def describe(self) -> str:
        """``exclusive lock of <owner> since <created>`` for messages."""
        return f"{self.kind} lock of {self.owner} since {self.created}"


def default_owner(purpose: str, name: str = "drove") -> str:
    """``name@host pid N (purpose)``: who holds a lock, for other holders' messages."""
    return f"{name}@{socket.gethostname()} pid {os.getpid()} ({purpose})"


class Lock:
    """One lock file on ``target``; acquire it with ``acquire``/``acquire_async``.

    While held, two daemon threads keep it: a refresher rewrites the file every
    ``refresh_interval`` seconds (sooner after a failed try), and a watchdog declares the
    lock lost once no refresh has succeeded for ``give_up_after`` seconds, even while a
    refresh hangs.  A refresh that ends past that deadline, or finds the file removed,
    loses the lock too.  Losing it calls every ``on_lost`` callback once.
    """

    def __init__(self, target: Target, kind: str, owner: str, *, stale_after: float = 300,
                 poll: float = 2.0):
        if kind not in (SHARED, EXCLUSIVE):
            raise ValueError(f"lock kind must be {SHARED!r} or {EXCLUSIVE!r}, not {kind!r}")
        if stale_after <= 0:
            raise ValueError("stale_after must be positive")
        self.target = target
        self.kind = kind
        self.owner = owner
        self.stale_after = stale_after
        self.refresh_interval = stale_after / 5
        """Seconds between refreshes."""
        self.give_up_after = stale_after - 1.5 * self.refresh_interval
        """Seconds without a successful refresh after which the holder gives up."""
        self.poll = poll
        self.key = f"{PREFIX}{uuid.uuid4().hex}.json"
        self.created = datetime.now(UTC).isoformat(timespec="seconds")
        # _cond guards the fields below and wakes the threads on every change.
        self._cond = threading.Condition()
        self._held = False
        self._lost: str | None = None
        self._last_refresh = 0.0  # _clock() when the last successful write began
        self._last_error: str | None = None
        self._version: str | None = None  # the target's tag of our last write, if any
        self._callbacks: list[LostCallback] = []

    # -- acquiring ---------------------------------------------------------------------

    def try_acquire(self) -> list[LockInfo]:
        """One attempt: [] when the lock is now held, else the live conflicting locks."""
        self._write()
        try:
            conflicts = self._conflicts()
        except BaseException:
            with contextlib.suppress(BackupError):
                self.target.delete(self.key)
            raise
        if conflicts:
            self.target.delete(self.key)
            return conflicts
        with self._cond:
            self._held = True
            self._lost = self._last_error = self._version = None
        tag = self.key[len(PREFIX):len(PREFIX) + 8]
        for name, loop in (("refresh", self._refresh_loop), ("watch", self._watch_loop)):
            threading.Thread(target=loop, daemon=True, name=f"lock-{name}-{tag}").start()
        return []

    def acquire(self, wait: float = 600, on_wait: OnWait | None = None) -> None:
        """Retry ``try_acquire`` for up to ``wait`` seconds, then raise LockError."""
        waiter = _Waiter(self, wait, on_wait)
        while (delay := waiter.step(self.try_acquire())) is not None:
            time.sleep(delay)

    async def acquire_async(self, wait: float = 600, on_wait: OnWait | None = None) -> None:
        """``acquire`` without blocking the event loop; cancellation leaves no lock behind."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(self, wait, on_wait)
        while True:
            fut = loop.run_in_executor(None, self.try_acquire)
            try:
                conflicts = await asyncio.shield(fut)
            except asyncio.CancelledError:
                # The attempt runs on in its thread and may succeed: undo it when it ends,
                # or its refresh thread would keep a lock alive that nobody releases.
                fut.add_done_callback(
                    lambda _: threading.Thread(target=self.release, daemon=True).start())
                raise
            delay = waiter.step(conflicts)
            if delay is None:
                return
            await asyncio.sleep(delay)

    def _conflicts(self) -> list[LockInfo]:
        """Live locks of others that exclude ours; an exclusive acquirer drops stale ones."""
        conflicts = []
        for other in self._others():
            if time.time() - other.refreshed > self.stale_after:
                if self.kind == EXCLUSIVE:
                    log.warning("removing stale %s", other.describe())
                    self.target.delete(other.key)
                continue
            if self.kind == EXCLUSIVE or other.kind == EXCLUSIVE:
                conflicts.append(other)
        return conflicts

    def _others(self) -> Iterator[LockInfo]:
        """Every lock file on the target but ours."""
        for key in list(self.target.list(PREFIX)):
            if key == self.key or not key.endswith(".json"):
                continue
            try:
                raw = self.target.get(key)
            except NotFoundError:
                continue  # released while we looked
            try:
                doc = json.loads(raw)
                yield LockInfo(key, str(doc["kind"]), str(doc["owner"]), str(doc["created"]),
                               float(doc["refreshed"]))
            except (ValueError, KeyError, TypeError):
                # Puts are atomic, so this is not a half-written lock but a foreign file.
                # Treat it as exclusive and live: safe, and the message says what to remove.
                yield LockInfo(key, EXCLUSIVE, f"an unreadable lock file {key} (delete it if "
                               "no backup is running)", "?", time.time())

    # -- holding -----------------------------------------------------------------------

    def _document(self) -> bytes:
        """Our lock file's contents, ``refreshed`` now."""
        return json.dumps({"kind": self.kind, "owner": self.owner, "created": self.created,
                           "refreshed": time.time()}).encode()

    def _write(self) -> None:
        """Put our lock file (acquiring: it does not exist yet)."""
        started = _clock()
        self.target.put(self.key, self._document())
        with self._cond:
            self._last_refresh = started

    def _active(self) -> bool:
        """Held and not lost (call with ``_cond`` held)."""
        return self._held and self._lost is None

    def _refresh_loop(self) -> None:
        """Refresh every ``refresh_interval`` (a quarter of it after a failure) while active."""
        with self._cond:
            due = self._last_refresh + self.refresh_interval
        while True:
            with self._cond:
                while self._active() and (left := due - _clock()) > 0:
                    self._cond.wait(left)
                if not self._active():
                    return
            started = _clock()
            ok = self._refresh()
            due = started + self.refresh_interval * (1 if ok else 0.25)

    def _refresh(self) -> bool:
        """Rewrite the lock file in one atomic step; False if that failed or lost the lock."""
        with self._cond:
            if not self._active():
                return False
            version = self._version
            age = _clock() - self._last_refresh
        if age > self.give_up_after:  # woken late (a suspended machine): too late to write
            self._lose(self._stale_reason(age))
            return False
        started = _clock()
        try:
            new = self.target.replace(self.key, self._document(), version)
        except Exception as e:
            if isinstance(e, BackupError):
                log.warning("cannot refresh %s lock %s: %s", self.kind, self.key, e)
            else:  # a bug, not an outage: keep the traceback, and let the watchdog decide
                log.exception("cannot refresh %s lock %s", self.kind, self.key)
            with self._cond:
                self._last_error = str(e) or type(e).__name__
            return False
        if new is None:
            self._lose("its lock file was removed (declared stale by another holder?)")
            return False
        with self._cond:
            age = _clock() - self._last_refresh
            in_time = age <= self.give_up_after
            if in_time:
                self._last_refresh, self._version, self._last_error = started, new, None
                self._cond.notify_all()
        if not in_time:
            # It landed, but after the deadline: others may have judged the lock stale
            # before it did, so it proves nothing.
            self._lose(self._stale_reason(age))
        return in_time

    def _watch_loop(self) -> None:
        """Declare the lock lost once no refresh has succeeded for ``give_up_after`` s."""
        with self._cond:
            while True:
                if not self._active():
                    return
                age = _clock() - self._last_refresh
                if age >= self.give_up_after:
                    reason = self._stale_reason(age)
                    break
                self._cond.wait(self.give_up_after - age)
        self._lose(reason)

    def _stale_reason(self, age: float) -> str:
        """Why a lock whose last successful refresh began ``age`` s ago is given up."""
        error = f"; last error: {self._last_error}" if self._last_error else ""
        return (f"could not keep it fresh: no refresh succeeded for {age:.1f} s (a holder "
                f"gives up after {self.give_up_after:g} s, before others may call the lock "
                f"stale after {self.stale_after:g} s){error}")

    def _lose(self, reason: str) -> None:
        """Mark the lock lost (once, while held) and tell the ``on_lost`` callbacks."""
        with self._cond:
            if not self._active():
                return
            self._lost = reason
            callbacks = list(self._callbacks)
            self._cond.notify_all()
        log.warning("%s", self._lost_message(reason))
        for callback in callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("lock-lost callback %r failed", callback)

    def _lost_message(self, reason: str) -> str:
        """The LockError text for a lock lost for ``reason``."""
        return f"lost the {self.kind} lock {self.key} of {self.owner}: {reason}"

    def lost_error(self) -> LockError:
        """A LockError saying why the lock was lost."""
        return LockError(self._lost_message(self.lost or "lost"))

    @property
    def lost(self) -> str | None:
        """Why the lock was lost, None while it is held (or was never lost)."""
        with self._cond:
            return self._lost

    def on_lost(self, callback: LostCallback) -> None:
        """Call ``callback(reason)`` (from a lock thread) when the lock is lost; at once if
        it already is."""
        with self._cond:
            self._callbacks.append(callback)
            reason = self._lost
        if reason is not None:
            callback(reason)

    def check(self) -> None:
        """Raise LockError unless the lock is still ours and was refreshed in time.

        Call right before and after publishing: a holder stalled past its give-up time may
        have had its lock removed and its blocks collected meanwhile.  The lock file is
        looked up too: only its holder ever writes it, and refreshes never recreate it,
        so finding it proves no exclusive holder has removed it as stale.
        """
        with self._cond:
            if not self._held:
                raise LockError(f"lock {self.key} is not held")
            reason = self._lost
            age = _clock() - self._last_refresh
        if reason is None and age > self.give_up_after:
            reason = self._stale_reason(age)
        if reason is None and not self.target.exists(self.key):
            reason = "its lock file was removed (declared stale by another holder?)"
        if reason is not None:
            self._lose(reason)
            raise LockError(self._lost_message(reason))

    def release(self) -> None:
        """Stop refreshing and delete the lock file (safe to call more than once).

        A refresh still in flight is not waited for: it cannot recreate the file.
        """
        with self._cond:
            self._held = False
            self._cond.notify_all()
        try:
            self.target.delete(self.key)
        except BackupError as e:
            log.warning("cannot delete lock %s (it goes stale in %g s): %s",
                        self.key, self.stale_after, e)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Waiter:
    """Backoff, deadline and on_wait messages shared by the sync and async acquire loops."""

    def __init__(self, lock: Lock, wait: float, on_wait: OnWait | None):
        self.lock = lock
        self.deadline = time.monotonic() + wait
        self.on_wait = on_wait
        self.attempt = 0
        self.last_message: str | None = None

    def step(self, conflicts: list[LockInfo]) -> float | None:
        """None when acquired, else seconds to sleep; LockError past the deadline."""
        if not conflicts:
            return None
        message = "backup store is locked by " + "; ".join(c.describe() for c in conflicts)
        now = time.monotonic()
        if now >= self.deadline:
            raise LockError(message)
        if self.on_wait is not None and message != self.last_message:
            self.on_wait(f"waiting: {message}")
        self.last_message = message
        # Exponential backoff with jitter, so two acquirers that keep colliding (each sees
        # the other's fresh lock) drift apart instead of retrying in lockstep.
        delay = min(self.lock.poll, 0.05 * 2 ** self.attempt) * random.uniform(0.5, 1.5)
        self.attempt += 1
        return max(0.0, min(delay, self.deadline - now))


@contextlib.contextmanager
def _hold(kind: str, target: Target, owner: str, wait: float, stale_after: float,
          on_wait: OnWait | None, poll: float) -> Iterator[Lock]:
    """Acquire a lock of ``kind``, yield it, release it.

    Nothing interrupts a synchronous body when the lock is lost: it must ``check()`` the
    lock before anything that needs it (or watch ``on_lost``).
    """
    lock = Lock(target, kind, owner, stale_after=stale_after, poll=poll)
    lock.acquire(wait, on_wait)
    try:
        yield lock
    finally:
        lock.release()


def shared_lock(target: Target, owner: str, *, wait: float = 600, stale_after: float = 300,
                on_wait: OnWait | None = None, poll: float = 2.0):
    """Context manager holding a shared lock (backups, restores, verifies)."""
    return _hold(SHARED, target, owner, wait, stale_after, on_wait, poll)


def exclusive_lock(target: Target, owner: str, *, wait: float = 600, stale_after: float = 300,
                   on_wait: OnWait | None = None, poll: float = 2.0):
    """Context manager holding the exclusive lock (delete, gc)."""
    return _hold(EXCLUSIVE, target, owner, wait, stale_after, on_wait, poll)


def hold_async(target: Target, kind: str, owner: str, *, wait: float = 600,
               stale_after: float = 300, on_wait: OnWait | None = None,
               poll: float = 2.0) -> LockGuard:
    """Async context manager holding a lock of ``kind`` (see ``LockGuard``)."""
    return LockGuard(Lock(target, kind, owner, stale_after=stale_after, poll=poll), wait,
                     on_wait)


class LockGuard:
    """Holds a lock around an ``async with`` body, and stops the body if the lock is lost.

    Like ``asyncio.timeout``: losing the lock cancels the task running the body, and the
    resulting CancelledError leaves the block as LockError saying why the lock was lost
    (any other error the body raised on its way out becomes that LockError's cause).  A
    cancellation from elsewhere stays a cancellation.  The lock is released on every exit,
    and that release is finished before the exit, cancelled or not.  Thread-pool work the
    body had started runs to its end: only its awaiting is cut short.
    """

    def __init__(self, lock: Lock, wait: float, on_wait: OnWait | None) -> None:
        self.lock = lock
        self.wait = wait
        self.on_wait = on_wait
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancelling = 0
        self._cancelled = False  # we cancelled the body because the lock was lost
        self._exited = False

    async def __aenter__(self) -> Lock:
        await self.lock.acquire_async(self.wait, self.on_wait)
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        if self._task is not None:
            self._cancelling = self._task.cancelling()
        self.lock.on_lost(self._lost_in_thread)
        return self.lock

    def _lost_in_thread(self, reason: str) -> None:
        """on_lost callback (a lock thread): cancel the body from its event loop."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed: the body is long over
                self._loop.call_soon_threadsafe(self._cancel_body)

    def _cancel_body(self) -> None:
        """Cancel the task running the body, unless the body is over."""
        if self._exited or self._cancelled or self._task is None:
            return
        self._cancelled = True
        self._task.cancel(f"lost the {self.lock.kind} lock {self.lock.key}")

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        self._exited = True
        # Our own cancel is taken back first, so only someone else's still counts.
        others_cancel = (self._cancelled and self._task is not None
                         and self._task.uncancel() > self._cancelling)
        fut = asyncio.get_running_loop().run_in_executor(None, self.lock.release)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # Finish the release before propagating, so "cancelled" implies "unlocked".
            await asyncio.wait([fut])
            raise
        if not self._cancelled or (others_cancel and exc_type is asyncio.CancelledError):
            return
        error = self.lock.lost_error()
        if exc is None or isinstance(exc, asyncio.CancelledError):
            raise error from None
        raise error from exc
