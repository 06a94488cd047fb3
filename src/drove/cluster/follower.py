"""A follower manager's API: what needs the leader is forwarded to it, the rest served here.

Every manager answers the API. A follower serves the reads that come straight from the
store (nodes, disks, events, settings, the backup target, the cluster's state) and the
agents' heartbeats (they only write their node's document). Everything else goes to the
leader as it came (method, path, query, body, token) and the leader's answer comes back
as it is: every write, and the reads that need the leader's own state (what each engine
reported last, running tasks and jobs, metrics).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import httpx

log = logging.getLogger("drove.cluster.follower")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LOCAL_READS = ("/v1/health", "/v1/cluster", "/v1/nodes", "/v1/disks", "/v1/events",
               "/v1/settings", "/v1/backup-target", "/v1/agents", "/docs", "/redoc",
               "/openapi.json", "/", "/ui")
"""GET paths (and those below them) a follower answers from the store itself (the agents'
long-polls too: every manager follows the store's changes); the web UI's page and assets
(``/``, ``/ui/...``) ship with every manager, so a follower serves them while no leader is
known, with their own headers (CSP)."""
LOCAL_WRITES = ("/v1/cluster/heartbeat",)
"""Non-GET paths every manager serves itself."""
LOCAL_POLLS = "/v1/agents/"
"""Below it, the agents' long-polls (GET, or POST with the engines in the body): every
manager serves them from the store's changes."""
FORWARDED = "x-drove-forwarded-by"
"""Header naming the manager that forwarded a request (a request is forwarded once)."""
RETRY_AFTER = 1
"""Seconds a client is told to wait before it sends again a request that was not done."""
FORWARD_TIMEOUT = httpx.Timeout(600.0, connect=3.0)
"""As long as the CLI waits for an answer (an attach may take minutes)."""
# The web UI's session travels as a cookie, its changes with the session's CSRF header.
_PASS_REQUEST = (b"authorization", b"content-type", b"accept", b"cookie", b"x-csrf-token")
_PASS_RESPONSE = ("content-type", "www-authenticate", "set-cookie")


class Leaders(Protocol):
    """What the proxy asks of this manager's place in the cluster."""

    url: str

    @property
    def leading(self) -> bool:
        """True while this manager leads."""

    def leader_url(self) -> str | None:
        """The leader's API URL as last seen (None: no leader known)."""


def served_here(method: str, path: str) -> bool:
    """Whether a follower answers ``method path`` itself rather than the leader."""
    under = tuple(p + "/" for p in LOCAL_READS)
    if method in ("GET", "HEAD"):
        return path in LOCAL_READS or path.startswith(under)
    return path in LOCAL_WRITES or (method == "POST" and path.startswith(LOCAL_POLLS))


class FollowerProxy:
    """ASGI middleware over the manager's API: forwards to the leader while following."""

    def __init__(self, app: Any, cluster: Leaders) -> None:
        self._app = app
        self._cluster = cluster
        self._http: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve here, or forward to the leader (503 when none is known or it is away)."""
        if (scope["type"] != "http" or self._cluster.leading
                or served_here(scope["method"], scope["path"])):
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        leader = self._cluster.leader_url()
        if leader is None or leader == self._cluster.url:
            await _answer(send, 503, "no manager leads right now (an election is under way, "
                                     "it takes up to 10 s); try again", retry=True)
            return
        if FORWARDED.encode() in headers:
            # Sent here by a manager that thought this one led: do not bounce it on.
            await _answer(send, 503, f"manager {self._cluster.url} does not lead (any more); "
                                     f"the leader is {leader}: try again", retry=True)
            return
        body = await _read_body(receive)
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=FORWARD_TIMEOUT)
        query = scope.get("query_string", b"").decode("latin-1")
        url = leader.rstrip("/") + scope["path"] + (f"?{query}" if query else "")
        pass_on = {k.decode(): v.decode("latin-1") for k, v in headers.items()
                   if k in _PASS_REQUEST}
        pass_on[FORWARDED] = self._cluster.url
        try:
            resp = await self._http.request(scope["method"], url, content=body,
                                            headers=pass_on)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Not sent: the request can go again, to whoever leads by then.
            log.warning("forwarding %s %s to %s: %r", scope["method"], scope["path"], leader,
                        exc)
            await _answer(send, 503, f"the leader manager {leader} does not answer ({exc!r}); "
                                     "a new one is elected within 10 s of its death: try again",
                          retry=True)
            return
        except httpx.HTTPError as exc:
            # Sent, then the leader stopped answering: it may have done it, so no retry hint.
            log.warning("forwarding %s %s to %s: %r", scope["method"], scope["path"], leader,
                        exc)
            await _answer(send, 502, f"the leader manager {leader} stopped answering after it "
                                     f"got the request ({exc!r}): it may or may not have been "
                                     "done; look (e.g. `drove volume get`, `drove task list`) "
                                     "before you try again")
            return
        out = [(k.encode(), resp.headers[k].encode("latin-1")) for k in _PASS_RESPONSE
               if k in resp.headers]
        out.append((b"x-drove-leader", leader.encode()))
        await _respond(send, resp.status_code, out, resp.content)

    async def aclose(self) -> None:
        """Release the connections to the leader."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _answer(send: Send, status: int, detail: str, *, retry: bool = False) -> None:
    """An error of this manager's own; ``retry``: nothing was done, send it again soon."""
    headers = [(b"content-type", b"application/json")]
    if retry:
        headers.append((b"retry-after", str(RETRY_AFTER).encode()))
    await _respond(send, status, headers, json.dumps({"detail": detail}).encode())
