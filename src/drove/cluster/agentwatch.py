"""The agent's long-poll: it learns at once what its node must act on, not at a heartbeat.

The agent keeps one ``POST /v1/agents/{node}/changes`` (the long-poll, with the engines in
the body) open to the first manager that answers (any manager serves it, followers too:
each follows the store's changes). It names the engines running here and the revision
of its last answer; the manager answers
as soon as one of them must stop, or after ``POLL`` s with nothing to do, and the agent
asks again at once. When that manager stops answering (killed, restarted, its host cut
off, or the heartbeat found it gone), the poll moves on to the next manager, as the
heartbeat does. The revision of the last answer goes with the next poll only to the
manager that gave it, over a connection that did not fail: a manager polled anew (another
one, or the same one restarted) looks at everything once, so no change can fall between
two managers' revisions (etcd's are shared; a SQLite manager's start at its clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx

from drove.cluster.hostengines import EngineStops

log = logging.getLogger(__name__)

POLL = 20.0
"""Seconds a manager holds a long-poll with nothing to say."""
GRACE = 10.0
"""Seconds beyond ``POLL`` the agent waits for the answer before it tries another manager."""
RETRY = 1.0
"""Seconds between two rounds of the managers while none answers."""


class ChangeWatch:
    """One long-poll at a time to the managers; the engines they name are stopped."""

    def __init__(self, managers: list[str], node: str, token: str, stops: EngineStops) -> None:
        self._managers = managers
        self._node = node
        self._stops = stops
        self._http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                       timeout=httpx.Timeout(POLL + GRACE, connect=3.0))
        self._since: int | None = None
        self._moved = asyncio.Event()  # the manager polled now was found gone elsewhere
        self.manager: str | None = None  # the manager that answered the last poll
        self.answered_at: float | None = None  # time.monotonic() of the last answer

    @property
    def healthy(self) -> bool:
        """Whether a poll was answered within the longest a poll takes (the watch works)."""
        return (self.answered_at is not None
                and time.monotonic() - self.answered_at < POLL + GRACE)

    def manager_gone(self, url: str) -> None:
        """``url`` did not answer a heartbeat: a poll open to it moves on now."""
        if url == self.manager:
            self._moved.set()

    async def run(self) -> None:
        """Poll forever."""
        while True:
            if not await self.once():
                await asyncio.sleep(RETRY)

    async def once(self) -> bool:
        """One long-poll, to the first manager that answers; False if none did."""
        order = ([self.manager] if self.manager else []) + [
            m for m in self._managers if m != self.manager]
        for url in order:
            if url != self.manager:
                self._since = None  # polled anew: it looks at everything once
            seen = await self._stops.running()
            answer = await self._poll(url, seen)
            if answer is None:
                continue
            self.manager, self.answered_at = url, time.monotonic()
            self._since = int(answer["revision"])
            if self._stops.stop(seen, answer.get("stop_engines") or []):
                log.info("manager %s named engines to stop (revision %s)", url,
                         answer["revision"])
            return True
        self.manager = None
        return False

    async def _poll(self, url: str, seen: list[Any]) -> dict[str, Any] | None:
        """Ask ``url``; its answer, or None (it did not answer, refused, or was found gone)."""
        # POSTed: a node may run more engines than a URL holds.
        body = {"since": self._since, "timeout": POLL,
                "engines": [{"volume": e.volume, "epoch": e.epoch} for e in seen]}
        self._moved.clear()
        request = asyncio.ensure_future(self._http.post(
            f"{url.rstrip('/')}/v1/agents/{self._node}/changes", json=body))
        moved = asyncio.ensure_future(self._moved.wait())
        try:
            await asyncio.wait({request, moved}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (request, moved):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        await task
        if not request.done() or request.cancelled():
            log.info("manager %s is gone: polling the next one", url)
            self._since = None
            return None
        try:
            resp = request.result()
        except httpx.HTTPError as exc:
            log.debug("manager %s: %r", url, exc)
            self._since = None  # it may come back restarted
            return None
        if resp.status_code != 200:
            log.warning("manager %s refused the long-poll: %s %s", url, resp.status_code,
                        resp.text[:200])
            return None
        answer: dict[str, Any] = resp.json()
        return answer

    async def close(self) -> None:
        """Release the HTTP client."""
        await self._http.aclose()
