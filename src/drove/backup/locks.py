"""Lock files on the target, so deletion never removes blocks a running backup uses.

A backup, restore or verify holds a *shared* lock; delete and gc hold the *exclusive*
lock.  Each holder keeps ``locks/<uuid>.json`` on the target and rewrites it every
``stale_after / 5`` seconds; a lock not refreshed for ``stale_after`` seconds is stale
(its holder died or stalled) and is ignored, and deleted by exclusive acquirers.  The
scheme is restic's: put your own lock, then list the others, and back off on conflict.
It relies on list-after-put consistency, which S3, radosgw and local file systems give.

Staleness compares the ``refreshed`` wall-clock time in the file with the reader's
clock, so the clocks of machines sharing a target must agree to well under
``stale_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from drove.backup.errors import BackupError, LockError, NotFoundError
from drove.backup.target import Target

log = logging.getLogger(__name__)

PREFIX = "locks/"
SHARED = "shared"
EXCLUSIVE = "exclusive"

OnWait = Callable[[str], None]


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
    """One lock file on ``target``; acquire it with ``acquire``/``acquire_async``."""

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
        self.poll = poll
        self.key = f"{PREFIX}{uuid.uuid4().hex}.json"
        self.created = datetime.now(UTC).isoformat(timespec="seconds")
        self._held = False
        self._lost: str | None = None
        self._last_refresh = 0.0  # time.monotonic() of the last successful write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # orders refresh writes against release

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
        self._held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True,
                                        name=f"lock-refresh-{self.key[6:14]}")
        self._thread.start()
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

    def _write(self) -> None:
        """Put our lock file with a fresh ``refreshed`` time."""
        doc = {"kind": self.kind, "owner": self.owner, "created": self.created,
               "refreshed": time.time()}
        started = time.monotonic()
        self.target.put(self.key, json.dumps(doc).encode())
        self._last_refresh = started

    def _refresh_loop(self) -> None:
        """Rewrite the lock file every stale_after/5 s until released or lost."""
        interval = self.stale_after / 5
        while not self._stop.wait(interval):
            with self._mutex:
                if self._stop.is_set():
                    return
                if time.monotonic() - self._last_refresh > self.stale_after:
                    # Others may already have judged us stale and run a gc: rewriting the
                    # file now would hide that, so give the lock up for good.
                    self._lost = f"not refreshed for over {self.stale_after:g} s"
                    return
                try:
                    if not self.target.exists(self.key):
                        self._lost = "its lock file was removed (declared stale by another holder?)"
                        return
                    self._write()
                except BackupError as e:
                    log.warning("cannot refresh lock %s: %s", self.key, e)

    def check(self) -> None:
        """Raise LockError unless the lock is still ours and was refreshed in time.

        Call right before publishing: a holder stalled for longer than the stale time may
        have had its lock removed and its blocks collected meanwhile.
        """
        if not self._held:
            raise LockError(f"lock {self.key} is not held")
        if self._lost:
            raise LockError(f"lost the {self.kind} lock {self.key}: {self._lost}")
        age = time.monotonic() - self._last_refresh
        if age > self.stale_after:
            raise LockError(f"lost the {self.kind} lock {self.key}: not refreshed for "
                            f"{age:.0f} s (stale after {self.stale_after:g} s)")
        if not self.target.exists(self.key):
            raise LockError(f"lost the {self.kind} lock {self.key}: its lock file was removed "
                            "(declared stale by another holder?)")

    def release(self) -> None:
        """Stop refreshing and delete the lock file (safe to call more than once)."""
        self._stop.set()
        with self._mutex:
            self._held = False
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
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
    """Acquire a lock of ``kind``, yield it, release it."""
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


@contextlib.asynccontextmanager
async def hold_async(target: Target, kind: str, owner: str, *, wait: float = 600,
                     stale_after: float = 300, on_wait: OnWait | None = None,
                     poll: float = 2.0) -> AsyncIterator[Lock]:
    """Async context manager holding a lock of ``kind``; released even on cancellation."""
    lock = Lock(target, kind, owner, stale_after=stale_after, poll=poll)
    await lock.acquire_async(wait, on_wait)
    try:
        yield lock
    finally:
        fut = asyncio.get_running_loop().run_in_executor(None, lock.release)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # Finish the release before propagating, so "cancelled" implies "unlocked".
            await asyncio.wait([fut])
            raise
