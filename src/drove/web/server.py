"""The HTTP/1.1 server on h11 that serves an :class:`~drove.web.app.App`.

It takes keep-alive, pipelining, ``Content-Length`` and chunked request bodies,
and ``Expect: 100-continue``.

:class:`HttpServer` serves an App; h11 parses and frames the HTTP/1.1 wire.
No client can stall it or make it hold unbounded memory:

* at most :data:`MAX_CONNECTIONS` connections.  A connection beyond it closes
  the one idle the longest (no request in progress: the HTTP/1.1 way for a
  server to drop a keep-alive connection; our client retries a request that
  met such a close before any answer); when every connection is in the middle
  of a request, the newcomer is answered 503 and closed, at once rather than
  left unaccepted in the kernel's backlog where its client would only time out;
* the request line and headers are at most :data:`MAX_HEAD` bytes (431); a body
  at most its route's ``max_body`` (:data:`~drove.web.app.MAX_BODY` unless the route says
  otherwise; 413, checked against ``Content-Length`` before reading and while
  reading a chunked body); the bodies held at once, received or being
  handled, at most :data:`MAX_BUFFERED` bytes (503); a malformed request
  (request line, header, chunk framing, a truncated body) gets 400; all of
  these close the connection;
* read timeouts: an idle connection closes after :data:`KEEP_ALIVE` seconds,
  a request's headers must arrive within :data:`HEADER_TIMEOUT` of its first
  byte and its body within :data:`BODY_TIMEOUT` of its headers;
* write timeout: a response must be taken by the client within
  :data:`WRITE_TIMEOUT`, else the connection is cut; the next request on a
  connection is read only once the previous answer was sent in full, so a
  client that does not read cannot make the server buffer more than one answer;
* bounded shutdown: :meth:`HttpServer.stop` stops accepting, closes at once every
  connection not running a request (idle, or still sending its request), lets
  running requests finish and send their answers (then closes those connections)
  for at most :data:`SHUTDOWN_GRACE` seconds, then cuts the rest and cancels
  their handlers.

A handler's own running time is not bounded here: the control operations bound
their work themselves, and a client that gives up leaves the handler to finish
(its answer is dropped) rather than stopping a chain operation midway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable
from typing import cast

import h11

from drove.web.app import MAX_BODY, App, Response

log = logging.getLogger("drove.web")

MAX_CONNECTIONS = 256
"""Connections served at once; see the module docstring for what happens beyond."""

KEEP_ALIVE = 10.0
"""Seconds an idle connection stays open: longer than clients keep idle ones
for reuse (httpx 5 s, drove.webclient 2 s), so none sends on a connection being closed."""

HEADER_TIMEOUT = 10.0
"""Seconds a request's line and headers may take to arrive once its first byte has."""

BODY_TIMEOUT = 30.0
"""Seconds a request body may take to arrive once its headers have."""

WRITE_TIMEOUT = 10.0
"""Seconds the client has to take a whole response before the connection is cut."""

SHUTDOWN_GRACE = 2.0
"""Seconds :meth:`HttpServer.stop` lets running requests finish before cutting them."""

LINGER = 1.0
"""Seconds an error answer is given to reach the client before its connection closes."""

MAX_HEAD = 64 * 1024
"""Largest request line plus headers."""


MAX_BUFFERED = 64 * 1024 * 1024
"""Request bodies one server holds at once, all connections together (503 beyond)."""

_REASONS = {100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
            307: "Temporary Redirect", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
            422: "Unprocessable Content", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 507: "Insufficient Storage"}


# A connection's states.  Only _IDLE and _CLOSING ones give way to a newcomer at the
# cap; only _BUSY and _WRITING ones are let finish when the server stops.
_IDLE = 0  # between requests (or before the first): KEEP_ALIVE
_HEAD = 1  # a request's line and headers are arriving: HEADER_TIMEOUT
_BODY = 2  # its body is arriving: BODY_TIMEOUT
_BUSY = 3  # the App answers it (reading paused)
_WRITING = 4  # the answer is going out (reading paused): WRITE_TIMEOUT
_CLOSING = 5  # an error answer went out, the rest of the input is discarded: LINGER
_CLOSED = 6


def _reason(status: int) -> bytes:
    return _REASONS.get(status, "").encode()


class _Pool:
    """A server's open connections and running handlers: the cap, and shutting down."""

    def __init__(self, app: App, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.open: dict[_Connection, None] = {}  # insertion-ordered set
        self.tasks: set[asyncio.Task[None]] = set()
        self.buffered = 0  # bytes of request bodies held (see MAX_BUFFERED)
        self.closing = False
        self._emptied: asyncio.Event | None = None

    def admit(self, conn: _Connection) -> bool:
        """Count ``conn`` in; False when it must be refused (it counts while it is answered)."""
        ok = True
        if len(self.open) >= self.limit:
            victim = self._victim()
            if victim is None:
                ok = False
            else:
                victim.close()
        self.open[conn] = None
        return ok

    def _victim(self) -> _Connection | None:
        """The connection to close for a newcomer: a closing one, else the longest idle."""
        best = None
        for conn in self.open:
            if conn.state == _CLOSING:
                return conn
            if conn.state == _IDLE and (best is None or conn.since < best.since):
                best = conn
        return best

    def forget(self, conn: _Connection) -> None:
        """``conn`` is closed."""
        self.open.pop(conn, None)
        if not self.open and self._emptied is not None:
            self._emptied.set()

    def run(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        """Run a request's handler as a task the pool can cancel at shutdown."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def shutdown(self, grace: float) -> None:
        """Close idle and half-received connections now, the rest after ``grace`` at most."""
        self.closing = True
        self._emptied = asyncio.Event()
        for conn in list(self.open):
            conn.shutdown()
        if self.open:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._emptied.wait()
        for conn in list(self.open):
            conn.cut()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:  # let cancelled handlers unwind (a handler ignoring cancellation is left)
            await asyncio.wait(tasks, timeout=grace)


class _Connection(asyncio.Protocol):
    """One client connection: h11 parses its requests, the pool's App answers them."""

    __slots__ = ("chunks", "drained", "h11", "limit", "loop", "pool", "request", "since",
                 "size", "state", "timer", "transport")

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.state = _IDLE
        self.since = time.monotonic()  # went idle
        self.timer: asyncio.TimerHandle | None = None
        self.request: h11.Request | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = MAX_BODY
        self.drained: asyncio.Future[None] | None = None  # set while output is pending

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection in (or refuse it) and wait for a request."""
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        # pause_writing as soon as any byte waits in our buffer, resume_writing once none
        # does: an answer is sent when the kernel has all of it, and nothing piles up here
        transport.set_write_buffer_limits(high=0, low=0)
        if self.pool.closing:
            transport.abort()
        elif not self.pool.admit(self):
            self._refuse(503, "Too many connections")
        else:
            self._wait(KEEP_ALIVE)

    def data_received(self, data: bytes) -> None:
        """Feed h11; act on the request once it has arrived."""
        if self.state >= _CLOSING:
            return  # discarded
        if self.state == _IDLE:
            self.state = _HEAD
            self._wait(HEADER_TIMEOUT)
        self.h11.receive_data(data)
        if self.state in (_HEAD, _BODY):
            self._read()

    def eof_received(self) -> bool:
        """The client will send no more; answer what it sent (a truncated request: 400)."""
        if self.state == _CLOSING:
            self.close()
        elif self.state < _CLOSING:
            self.h11.receive_data(b"")
            if self.state != _BUSY and self.state != _WRITING:
                self._read()
        return True  # keep the transport open for our answer; we close it ourselves

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; a running handler finishes (its answer is dropped)."""
        self._drop_body()
        self.state = _CLOSED
        self._wait(None)
        self.pool.forget(self)
        self.resume_writing()

    def pause_writing(self) -> None:
        """Output is pending."""
        if self.drained is None:
            self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        """Output was all sent (or the connection is gone)."""
        fut, self.drained = self.drained, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    # the server's side
    def shutdown(self) -> None:
        """The server stops: close now unless a request is running (it answers, then closes)."""
        if self.state not in (_BUSY, _WRITING):
            self.close()

    def close(self) -> None:
        """Close the connection (dropping unsent output)."""
        self._drop_body()
        self.state = _CLOSED
        self._wait(None)
        self.pool.forget(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if transport.get_write_buffer_size():
                transport.abort()  # close() would wait for a client that does not read
            else:
                transport.close()

    def cut(self) -> None:
        """Drop the connection at once."""
        self.close()
        if self.transport is not None:
            self.transport.abort()

    # requests
    def _wait(self, seconds: float | None) -> None:
        """(Re)arm the one timer: when it fires, the connection closes."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if seconds is None else self.loop.call_later(seconds, self.close)

    def _read(self) -> None:
        """Act on what h11 parsed: check limits, collect the body, start the handler."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint, str(exc) or "Bad request")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if not self._begin(event):
                    return
            elif isinstance(event, h11.Data):
                if self.size + len(event.data) > self.limit:
                    self._refuse(413, "Request body too large")
                    return
                if self.pool.buffered + len(event.data) > MAX_BUFFERED:
                    self._refuse(503, "Too many request bodies in flight")
                    return
                self.size += len(event.data)
                self.pool.buffered += len(event.data)
                self.chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.state = _BUSY
                self._wait(None)
                assert self.transport is not None and self.request is not None
                self.transport.pause_reading()  # one request at a time: pipelined ones wait
                # the handler holds the body now, and releases it from MAX_BUFFERED
                body, held = b"".join(self.chunks), self.size
                self.chunks, self.size = [], 0
                self.pool.run(self._respond(self.request, body, held))
                self.request = None
                return
            else:  # ConnectionClosed: the client left between requests
                self.close()
                return

    def _begin(self, request: h11.Request) -> bool:
        """A request's head arrived: whether its body may follow."""
        self.request = request
        # h11 bounds a head that arrives in pieces; one that came whole in a read is counted here
        if len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers) > MAX_HEAD:
            self._refuse(431, "Request header fields too large")
            return False
        self.limit = self.pool.app.body_limit(request.method.decode("ascii"),
                                              request.target.decode("latin-1"))
        length = next((int(v) for k, v in request.headers if k == b"content-length"), 0)
        if length > self.limit:
            self._refuse(413, "Request body too large")
            return False
        if self.pool.buffered + length > MAX_BUFFERED:
            self._refuse(503, "Too many request bodies in flight")
            return False
        if self.h11.they_are_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[],
                                                 reason=_reason(100)))
        self.state = _BODY
        self._wait(BODY_TIMEOUT)
        return True

    async def _respond(self, request: h11.Request, body: bytes, held: int) -> None:
        """Answer ``request``, send the answer, then read the next request.

        ``held`` bytes of the server's MAX_BUFFERED are released once the handler is done.
        """
        assert self.transport is not None
        headers: dict[str, str] = {}
        for name, value in request.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        try:
            resp = await self.pool.app.handle(request.method.decode("ascii"),
                                              request.target.decode("latin-1"), headers, body)
            del body
            self.pool.buffered -= held
            held = 0
            if self.state == _CLOSED:
                return  # the client left, or the server cut the connection
            close = self.pool.closing
            self.state = _WRITING
            self._wait(WRITE_TIMEOUT)
            self._answer(resp, close)
            while self.drained is not None and self.state == _WRITING:
                await self.drained
        except Exception:
            log.exception("answering %s %s failed", request.method, request.target)
            self.cut()
            return
        finally:
            self.pool.buffered -= held
        if self.state != _WRITING:
            return  # cut: WRITE_TIMEOUT, or shutdown
        if close or self.h11.our_state is not h11.DONE:
            self.close()
            return
        self.h11.start_next_cycle()
        self.state = _IDLE
        self.since = time.monotonic()
        self._wait(KEEP_ALIVE)
        if self.h11.trailing_data[0]:  # a pipelined request is here already
            self.state = _HEAD
            self._wait(HEADER_TIMEOUT)
        self.transport.resume_reading()
        self._read()

    def _answer(self, resp: Response, close: bool) -> None:
        """Frame ``resp`` with h11 and write it."""
        status = resp.status
        headers = [(k, v.encode()) for k, v in resp.headers.items() if k != "content-length"]
        body = resp.body
        if status in (204, 304):
            body = b""
        else:
            headers.append(("content-length",
                            resp.headers.get("content-length", str(len(body))).encode()))
        if close:
            headers.append(("connection", b"close"))
        self._send(h11.Response(status_code=status, headers=headers, reason=_reason(status)),
                   h11.Data(data=body) if body else None, h11.EndOfMessage())

    def _send(self, *events: h11.Event | None) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(self.h11.send(e) or b"" for e in events if e))

    def _drop_body(self) -> None:
        """The request body is no longer held."""
        self.pool.buffered -= self.size
        self.chunks, self.size = [], 0

    def _refuse(self, status: int, detail: str) -> None:
        """Answer an error and close; what else the client sends is not read."""
        assert self.transport is not None
        self.state = _CLOSING
        self._drop_body()
        body = json.dumps({"detail": detail}).encode()
        head = [("content-type", b"application/json"),
                ("content-length", str(len(body)).encode()), ("connection", b"close")]
        try:
            self._send(h11.Response(status_code=status, headers=head, reason=_reason(status)),
                       h11.Data(data=body), h11.EndOfMessage())
        except h11.LocalProtocolError:  # h11 is past answering (never expected)
            self.transport.write(b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
                                 + b"".join(b"%s: %s\r\n" % (k.encode(), v) for k, v in head)
                                 + b"\r\n" + body)
        # Half-close and discard input for a moment before closing: closing with unread
        # input resets the connection, and the client could lose the answer with it.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self._wait(LINGER)


class HttpServer:
    """Serves an :class:`App` over HTTP/1.1 on an already-bound socket (see the module doc)."""

    def __init__(self, app: App, sock: socket.socket,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.app = app
        self.sock = sock
        self._pool = _Pool(app, max_connections)
        self._server: asyncio.AbstractServer | None = None

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._pool.open)

    async def start(self) -> None:
        """Listen; returns once connections are accepted."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self._pool), sock=self.sock)

    async def stop(self) -> None:
        """Stop accepting; close idle connections at once, cut running ones after a grace.

        Returns within :data:`SHUTDOWN_GRACE` (twice that if a handler must be cancelled).
        """
        if self._server is not None:
            self._server.close()
        await self._pool.shutdown(SHUTDOWN_GRACE)
