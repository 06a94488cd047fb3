"""A small asyncio HTTP/1.1 client for JSON control APIs (the engine calling its replicas).

httpx costs an engine ~9 MiB of resident memory (httpcore, anyio, and a
certifi CA bundle loaded per client); the engine only makes a handful of JSON
calls to replicas it knows.  This client keeps what those calls need: one
deadline per request (connecting, sending and the whole answer), keep-alive
connections reused while fresh, JSON bodies, query parameters, default
headers per client, ``http`` and ``https`` (system CAs).  h11 parses and
frames the wire (``Content-Length``, chunked or read-to-close answers).

A server may close an idle keep-alive connection at any time (drove.web does
when it is at its connection cap); a request sent on a reused connection that
closes before any byte of an answer is therefore sent once more, on a new
connection: the server closed it before reading the request.  Failures to get
an answer raise :class:`RequestError` (its subclasses name what failed, as
httpx's do).
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11

from drove import __version__

MAX_HEAD = 64 * 1024
"""Largest status line plus headers accepted."""

IDLE_REUSE = 2.0
"""Seconds an idle connection is reused for (servers close idle ones after ~5 s)."""

MAX_IDLE = 4
"""Idle connections kept per client."""

READ_SIZE = 64 * 1024
"""Bytes read from the socket at a time."""


class RequestError(Exception):
    """No (complete) answer to a request."""


class ConnectError(RequestError):
    """The connection could not be made."""


class Timeout(RequestError):
    """No complete answer within the request's timeout."""


class RemoteProtocolError(RequestError):
    """The server broke the connection or answered something that is not HTTP/1.x."""


class Response:
    """A complete answer."""

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        """The body as text."""
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON (ValueError if it is not)."""
        return jsonlib.loads(self.content)

    def __repr__(self) -> str:
        return f"<Response [{self.status_code}]>"


class _Unanswered(Exception):
    """A reused connection closed before any byte of an answer: the request was not read."""


class _Conn:
    """One connection to the server and its h11 state."""

    __slots__ = ("h11", "reader", "since", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.since = 0.0  # went idle

    def fresh(self, now: float) -> bool:
        """Whether the idle connection may carry another request."""
        return (now - self.since <= IDLE_REUSE and not self.reader.at_eof()
                and not self.writer.is_closing() and self.reader.exception() is None)

    def close(self) -> None:
        """Close the socket."""
        self.writer.close()

    async def roundtrip(self, request: h11.Request, body: bytes, reused: bool) -> Response:
        """Send ``request`` and read its whole answer.

        _Unanswered when a ``reused`` connection closes before any byte of it.
        """
        events: list[h11.Event] = [request]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        data = b"".join(self.h11.send(e) or b"" for e in events)
        answered = False
        try:
            self.writer.write(data)
            await self.writer.drain()
            status, headers, parts = 0, {}, []
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await self.reader.read(READ_SIZE)
                    answered = answered or bool(data)
                    self.h11.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    for name, value in event.headers:
                        key, text = name.decode("latin-1"), value.decode("latin-1")
                        headers[key] = f"{headers[key]}, {text}" if key in headers else text
                elif isinstance(event, h11.Data):
                    parts.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return Response(status, headers, b"".join(parts))
                elif isinstance(event, h11.ConnectionClosed):
                    raise RemoteProtocolError("server closed the connection before answering")
                # InformationalResponse (100 Continue): the final answer follows
        except (OSError, h11.RemoteProtocolError, RemoteProtocolError) as exc:
            if reused and not answered:
                raise _Unanswered() from exc
            if isinstance(exc, h11.RemoteProtocolError):
                raise RemoteProtocolError(f"not a valid HTTP/1.1 answer: {exc}") from exc
            raise

    def reusable(self) -> bool:
        """After an answer: ready for the next request (else it must be closed)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.since = time.monotonic()
            return True
        return False


_ssl_context: Any = None


def _tls() -> Any:
    global _ssl_context
    if _ssl_context is None:
        import ssl

        _ssl_context = ssl.create_default_context()
    return _ssl_context


class HttpClient:
    """Requests to one base URL, e.g. ``http://127.0.0.1:10810``."""

    def __init__(self, base_url: str, timeout: float = 5.0,
                 headers: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = dict(headers or {})  # sent with every request (e.g. the engine's epoch)
        self._invalid: str | None = None  # why requests fail at once (as httpx's would)
        try:
            url = urlsplit(base_url)
            port = url.port
        except ValueError as exc:
            url, port, self._invalid = urlsplit("http://invalid"), None, f"{base_url!r}: {exc}"
        if url.scheme not in ("http", "https") or not url.hostname:
            self._invalid = self._invalid or f"{base_url!r} is not an http:// or https:// URL"
        self.tls = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = port or (443 if self.tls else 80)
        self.prefix = url.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if port is None else f"{host}:{port}"
        self._idle: list[_Conn] = []
        self._closed = False

    async def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                      json: Any = None, timeout: float | None = None) -> Response:
        """``method path`` with optional query ``params`` and ``json`` body; the answer.

        Any answer counts, 4xx and 5xx included; RequestError when there is none
        within ``timeout`` seconds (the client's default when None).
        """
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._invalid is not None:
            raise ConnectError(self._invalid)
        target = self.prefix + path
        if params:
            target += "?" + urlencode({k: _param(v) for k, v in params.items()})
        body = b"" if json is None else jsonlib.dumps(json, ensure_ascii=False).encode()
        headers = [("host", self.host_header), ("accept", "application/json"),
                   ("user-agent", f"drove/{__version__}"), *self.headers.items()]
        if json is not None:
            headers.append(("content-type", "application/json"))
        if json is not None or method in ("POST", "PUT", "PATCH"):
            headers.append(("content-length", str(len(body))))
        limit = self.timeout if timeout is None else timeout
        conn = None
        try:
            async with asyncio.timeout(limit):
                conn = self._reuse()
                if conn is not None:
                    try:
                        resp = await conn.roundtrip(self._head(method, target, headers), body,
                                                    reused=True)
                    except _Unanswered:
                        conn.close()
                        conn = None
                if conn is None:
                    conn = await self._connect()
                    resp = await conn.roundtrip(self._head(method, target, headers), body,
                                                reused=False)
        except BaseException as exc:
            if conn is not None:
                conn.close()  # in an unknown state: never reused
            if isinstance(exc, TimeoutError):
                raise Timeout(f"no answer to {method} {self.base_url}{target} within "
                              f"{limit:g} s") from None
            if isinstance(exc, OSError):
                raise RemoteProtocolError(f"{method} {self.base_url}{target}: "
                                          f"{exc or type(exc).__name__}") from exc
            if isinstance(exc, RemoteProtocolError):
                raise RemoteProtocolError(f"{method} {self.base_url}{target}: {exc}") from exc
            raise
        if conn.reusable() and not self._closed and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()
        return resp

    @property
    def idle_connections(self) -> int:
        """Connections kept open for the next requests."""
        return len(self._idle)

    @staticmethod
    def _head(method: str, target: str, headers: list[tuple[str, str]]) -> h11.Request:
        return h11.Request(method=method, target=target.encode(), headers=headers)

    def _reuse(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.fresh(now):
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.open_connection(
                self.host, self.port, limit=READ_SIZE,
                ssl=_tls() if self.tls else None,
                server_hostname=self.host if self.tls else None)
        except OSError as exc:
            raise ConnectError(f"{self.base_url}: {exc or type(exc).__name__}") from exc
        return _Conn(reader, writer)

    async def aclose(self) -> None:
        """Close idle connections; the client cannot be used after."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
