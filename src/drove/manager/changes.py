"""What changed in the volume documents, and when: the feed agents' long-polls wait on.

The store tells every change to a volume's document (SQLite in-process, etcd through a
watch: :meth:`drove.manager.store.Store.subscribe`). The feed keeps the recent ones with
their revision and the nodes each concerns (the volume's node before and after: an
engine moved off a node concerns that node), and wakes the waiters it concerns.

Revisions: etcd's own on etcd (every manager of a cluster counts alike, so an agent can
move between managers); on SQLite a counter that starts at the start time in
microseconds, so a revision from before a manager's restart is older than any it knows
(each change takes a durable SQLite commit, far longer than a microsecond).
A revision the feed cannot vouch for (before its first snapshot or its oldest kept change,
or ahead of it) is ``unknown``: the caller then looks at everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from drove.manager.store import Store

KEEP = 10_000
"""Changes remembered; a revision older than the oldest kept one is unknown."""


@dataclass(frozen=True)
class Change:
    """One change of a volume's document: its revision, the volume, the nodes it concerns."""

    revision: int
    volume: str
    nodes: frozenset[str]


@dataclass(eq=False)
class Waiter:
    """One long-poll waiting for changes that concern ``node`` or its ``volumes``."""

    node: str
    volumes: frozenset[str]
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def concerned(self, change: Change | None) -> bool:
        """Whether ``change`` (None: anything may have changed) concerns this waiter."""
        return (change is None or change.volume in self.volumes
                or self.node in change.nodes)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a change that concerns it; False on timeout."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        self.event.clear()
        return True


class ChangeFeed:
    """The recent changes of the volume documents, fed by the store (started at first use)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._changes: deque[Change] = deque(maxlen=KEEP)
        self._node_of: dict[str, str | None] = {}  # volume: the node of its engine
        self._floor: int | None = None  # revisions up to here are unknown
        self._revision = 0
        self._waiters: set[Waiter] = set()
        self._cancel: Any = None
        self._started = threading.Lock()
        self._ready = threading.Event()  # the first snapshot was told
        self.closed = False  # closed: no more waiting here (the manager stops)

    def start(self) -> None:
        """Subscribe to the store's volume documents (once; StoreError if it cannot)."""
        with self._started:
            if self._cancel is None and not self.closed:
                self._cancel = self._store.subscribe("volumes", self._reset, self._changed)

    def wait_ready(self, timeout: float) -> bool:
        """Wait (blocking) until the store told the first snapshot; False on timeout."""
        return self._ready.wait(timeout)

    def close(self) -> None:
        """Stop following the store; every waiter is woken (and sees ``closed``)."""
        with self._started:
            cancel, self._cancel = self._cancel, None
            self.closed = True
        if cancel is not None:
            cancel()
        with self._lock:
            self._wake(None)

    @property
    def revision(self) -> int:
        """The newest revision the feed knows every change up to."""
        with self._lock:
            return self._revision

    def known(self, since: int) -> bool:
        """Whether every change after ``since`` is known here (see the module docstring)."""
        with self._lock:
            return self._floor is not None and self._floor <= since <= self._revision

    def touched(self, since: int, node: str, volumes: frozenset[str]) -> set[str]:
        """The volumes whose changes after ``since`` concern ``node`` or ``volumes``."""
        with self._lock:
            found = set()
            for change in reversed(self._changes):
                if change.revision <= since:
                    break
                if change.volume in volumes or node in change.nodes:
                    found.add(change.volume)
            return found

    @contextlib.contextmanager
    def waiter(self, node: str, volumes: frozenset[str]) -> Iterator[Waiter]:
        """A waiter woken by each change that concerns ``node`` or ``volumes`` from now on
        (registered before the caller looks, so no change falls between)."""
        w = Waiter(node, volumes, asyncio.get_running_loop())
        with self._lock:
            self._waiters.add(w)
        try:
            yield w
        finally:
            with self._lock:
                self._waiters.discard(w)

    # ------------------------------------------------ told by the store (any thread)

    def _reset(self, revision: int | None, docs: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            if revision is None:  # SQLite: a clock-based counter (see the module docstring)
                revision = max(self._revision + 1, int(time.time() * 1_000_000))
            self._node_of = {key: doc.get("node") for key, doc in docs.items()}
            self._changes.clear()
            self._floor = self._revision = max(self._revision, revision)
            self._wake(None)
        self._ready.set()

    def _changed(self, revision: int | None, key: str, doc: dict[str, Any] | None) -> None:
        with self._lock:
            revision = self._revision + 1 if revision is None else revision
            if revision < self._revision:
                return  # heard again after a watch was made again
            before = self._node_of.pop(key, None)
            after = None if doc is None else doc.get("node")
            if doc is not None:
                self._node_of[key] = after
            nodes = frozenset(n for n in (before, after) if n)
            if len(self._changes) == self._changes.maxlen:
                self._floor = self._changes[0].revision  # it is forgotten now
            change = Change(revision, key, nodes)
            self._changes.append(change)
            self._revision = revision
            self._wake(change)

    def _wake(self, change: Change | None) -> None:
        """Wake the waiters ``change`` concerns (all for None); the lock is held."""
        for w in self._waiters:
            if w.concerned(change):
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                    w.loop.call_soon_threadsafe(w.event.set)
