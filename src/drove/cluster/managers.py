"""One manager among several on one etcd: it campaigns, does the leader's work while it
leads, and says it is alive.

Every manager campaigns for the leadership (:class:`~drove.cluster.leader.Leadership`,
under its API URL). Only the leader runs the healer, the node sweep, the job scheduler,
task recovery and restore settling; when it loses the lease it stops them and leaves
every volume attached and serving, and a follower that wins starts them (adopting the
running engines). Each manager also keeps a document ``managers/<url>`` fresh so that
``GET /v1/cluster`` lists them all, and the leader writes ``cluster/leader`` (since when).

The election thread's callback never runs manager code: it wakes the event loop, which
starts or stops the work there, one change at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any, Protocol
from urllib.parse import quote

from drove import __version__
from drove.cluster.etcdstore import EtcdStore
from drove.cluster.leader import Leadership
from drove.manager.events import EventFn
from drove.manager.store import StoreError, now_iso

log = logging.getLogger("drove.cluster.managers")

ALIVE_EVERY = 2.0
"""Seconds between two refreshes of a manager's own document."""
MANAGER_DOWN_AFTER = 10.0
"""A manager whose document is older than this is listed as down."""
CHECK_EVERY = 0.5
"""Seconds between two looks at whether this manager still leads."""
LEADER_TTL = 5
"""Seconds of the leader's lease: a dead leader is replaced within about twice this."""


class Duties(Protocol):
    """The leader's work (:class:`drove.manager.app.ManagerApp`)."""

    async def lead(self) -> None:
        """Start the leader's work."""

    async def step_down(self) -> None:
        """Stop it, leaving volumes attached."""


class ClusterRole:
    """This manager's place in the cluster: campaign, lead or follow, stay listed."""

    def __init__(self, store: EtcdStore, duties: Duties, *, event: EventFn,
                 node: str | None = None, ttl: int = LEADER_TTL) -> None:
        self._store = store
        self._duties = duties
        self._event = event
        self._node = node
        self._ttl = ttl
        self.url = ""
        self._started = now_iso()
        self._leadership: Leadership | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._follow_task: asyncio.Task[None] | None = None
        self._alive_task: asyncio.Task[None] | None = None
        self._work: asyncio.Task[None] | None = None
        self._active = False
        self._closing = False

    @property
    def leading(self) -> bool:
        """True while this manager holds the leader's lease."""
        return self._leadership is not None and self._leadership.is_leader

    def leader_url(self) -> str | None:
        """The leader's API URL as last seen (None: nobody leads, as far as is known)."""
        return self._leadership.known_leader if self._leadership else None

    async def start(self, url: str) -> None:
        """Campaign as the manager serving at ``url`` (its API must answer already)."""
        self.url = url
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._alive)
        except StoreError as exc:  # listed at the next refresh; the election waits for etcd
            log.warning("cannot list this manager yet: %s", exc)
        self._follow_task = asyncio.create_task(self._follow(), name="leadership")
        self._alive_task = asyncio.create_task(self._keep_alive(), name="manager-alive")
        self._leadership = Leadership(self._store.etcd, url, prefix=self._store.prefix,
                                      ttl=self._ttl, on_change=self._changed).start()

    async def close(self) -> None:
        """Stop the leader's work, then campaigning (a leader hands over at once, and no
        two managers' work overlaps); volumes stay attached and serving."""
        # The follower loop ends by itself after the change under way: a cancel could land
        # inside the leader's work stopping (which swallows cancels of its own tasks).
        self._closing = True
        self._wake.set()
        if self._alive_task is not None:
            self._alive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._alive_task
        if self._follow_task is not None:
            await self._follow_task
        await self._stop_work()
        if self._leadership is not None:
            await asyncio.to_thread(self._leadership.close)
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self._store.delete, "managers", self._key)

    # ------------------------------------------------------------ leading

    def _changed(self, leading: bool) -> None:
        """The election thread's callback: wake the loop, nothing more."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _follow(self) -> None:
        """Start or stop the leader's work as the election goes, one change at a time.

        Woken by the election thread, and every ``CHECK_EVERY`` s anyway: a leader whose
        lease went unrefreshed too long stops its work at once, by the clock, even while
        the thread still waits for etcd to answer (a new leader may start at lease expiry).
        """
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_EVERY)
            self._wake.clear()
            if self._closing:
                break
            want = self.leading
            if want and not self._active:
                self._active = True
                self._work = asyncio.create_task(self._take_over(), name="take-over")
            elif not want and self._active:
                log.warning("%s no longer leads: stopping the leader's work", self.url)
                await self._stop_work()

    async def _take_over(self) -> None:
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self._note_leading)
        except StoreError as exc:  # the lease holds: lead anyway, the listing is only news
            log.warning("%s leads but cannot record it: %s", self.url, exc)
        try:
            await self._duties.lead()
        except Exception:
            log.exception("%s leads but could not start all of the leader's work", self.url)
            return
        log.info("%s leads; its work started in %.2f s", self.url, time.monotonic() - t0)

    def _note_leading(self) -> None:
        """Record since when this manager leads, and say so (blocking: run in a thread)."""
        previous = (self._store.get("cluster", "leader") or {}).get("name")
        self._store.put("cluster", "leader",
                        {"name": self.url, "since": now_iso(), "node": self._node})
        after = f" (after {previous})" if previous and previous != self.url else ""
        self._event("manager-leads", f"manager {self.url} leads{after}")

    async def _stop_work(self) -> None:
        if not self._active:
            return
        self._active = False
        if self._work is not None and not self._work.done():
            self._work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._work
        self._work = None
        try:
            await self._duties.step_down()
        except Exception:  # etcd away, say: what could stop has stopped; keep following
            log.exception("%s: stopping the leader's work", self.url)

    # ------------------------------------------------------------ listing

    @property
    def _key(self) -> str:
        return quote(self.url, safe="")

    def _alive(self) -> None:
        """Write this manager's document (blocking: run in a thread)."""
        self._store.put("managers", self._key, {
            "url": self.url, "pid": os.getpid(), "host": socket.gethostname(),
            "node": self._node, "version": __version__, "started": self._started,
            "last_seen": now_iso(), "last_seen_ts": time.time()})

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(ALIVE_EVERY)
            try:
                await asyncio.to_thread(self._alive)
            except StoreError as exc:
                log.warning("cannot refresh this manager's document: %s", exc)

    def status(self) -> dict[str, Any]:
        """The managers, which one leads and since when (blocking: run in a thread)."""
        leader = self._leadership.leader() if self._leadership else None
        current = self._store.get("cluster", "leader") or {}
        since = current.get("since") if current.get("name") == leader else None
        now = time.time()
        managers = []
        for m in self._store.list("managers"):
            m.pop("_version", None)
            seen = m.pop("last_seen_ts", 0)
            managers.append({**m, "state": "up" if now - seen <= MANAGER_DOWN_AFTER else "down",
                             "leader": m["url"] == leader,
                             "since": since if m["url"] == leader else None})
        return {"store": "etcd", "leader": leader, "since": since, "self": self.url,
                "managers": sorted(managers, key=lambda m: m["url"])}
