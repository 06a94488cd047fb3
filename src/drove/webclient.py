"""A small asyncio HTTP/1.1 client for JSON control APIs (the engine calling its replicas).

httpx costs an engine ~9 MiB of resident memory (httpcore, anyio, h11, and a
certifi CA bundle loaded per client); the engine only makes a handful of JSON
calls to replicas it knows.  This client keeps what those calls need: one
deadline per request, keep-alive connections reused while fresh, JSON bodies,
query parameters, ``http`` and ``https`` (system CAs), responses with
``Content-Length``, chunked or read-to-close bodies.  Failures to get an answer
raise :class:`RequestError` (its subclasses name what failed, as httpx's do).
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from drove import __version__

MAX_HEAD = 64 * 1024
"""Largest status line plus headers accepted."""

IDLE_REUSE = 2.0
"""Seconds an idle connection is reused for (servers close idle ones after ~5 s)."""

MAX_IDLE = 4
"""Idle connections kept per client."""


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
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
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
        head = [f"{method} {target} HTTP/1.1", f"host: {self.host_header}",
                "accept: application/json", f"user-agent: drove/{__version__}"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        if json is not None:
            head.append("content-type: application/json")
        if json is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"content-length: {len(body)}")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        limit = self.timeout if timeout is None else timeout
        conn = None
        try:
            async with asyncio.timeout(limit):
                conn = self._reuse() or await self._connect()
                reader, writer = conn
                writer.write(data)
                await writer.drain()
                resp, reusable = await _read_response(reader, method)
        except BaseException as exc:
            self._discard(conn)  # in an unknown state: never reused
            if isinstance(exc, TimeoutError):
                raise Timeout(f"no answer to {method} {self.base_url}{target} within "
                              f"{limit:g} s") from None
            if isinstance(exc, (OSError, asyncio.IncompleteReadError)):
                raise RemoteProtocolError(f"{method} {self.base_url}{target}: "
                                          f"{_describe(exc)}") from exc
            raise
        if reusable and not self._closed and len(self._idle) < MAX_IDLE:
            self._idle.append((*conn, time.monotonic()))
        else:
            self._discard(conn)
        return resp

    def _reuse(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        now = time.monotonic()
        while self._idle:
            reader, writer, since = self._idle.pop()
            if (now - since > IDLE_REUSE or reader.at_eof() or writer.is_closing()
                    or reader.exception() is not None):
                writer.close()
                continue
            return reader, writer
        return None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_connection(
                self.host, self.port, limit=MAX_HEAD,
                ssl=_tls() if self.tls else None,
                server_hostname=self.host if self.tls else None)
        except OSError as exc:
            raise ConnectError(f"{self.base_url}: {_describe(exc)}") from exc

    @staticmethod
    def _discard(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        if conn is not None:
            conn[1].close()

    async def aclose(self) -> None:
        """Close idle connections; the client cannot be used after."""
        self._closed = True
        idle, self._idle = self._idle, []
        for _, writer, _ in idle:
            writer.close()


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "server closed the connection before answering in full"
    return str(exc) or type(exc).__name__


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[Response, bool]:
    """The next final response on ``reader``, and whether the connection may be reused."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise RemoteProtocolError("response headers too large") from None
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest.partition(" ")[0]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise RemoteProtocolError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise RemoteProtocolError(f"malformed response header: {line[:80]!r}")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if 100 <= status < 200:
            continue  # an interim answer (100 Continue): the final one follows
        break
    conn = headers.get("connection", "").lower()
    reusable = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
    if method == "HEAD" or status in (204, 304):
        return Response(status, headers, b""), reusable
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise RemoteProtocolError("malformed chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")).strip():  # trailers
                    pass
                return Response(status, headers, b"".join(parts)), reusable
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise RemoteProtocolError(f"malformed content-length {length!r}") from None
        return Response(status, headers, await reader.readexactly(n)), reusable
    return Response(status, headers, await reader.read()), False
