"""A small HTTP/1.1 JSON API: routes, body and query validation, OpenAPI, and a server.

The replica and engine processes each serve a control API of a dozen calls.
FastAPI, pydantic, starlette and uvicorn together cost each such process
~19 MiB of resident memory, about as much as the rest of it, so those APIs
use this package instead, which keeps the behaviour their clients rely on:

* drove.web.validation -- JSON bodies and query parameters (:class:`Field`,
  :class:`Body`), answered 422 as FastAPI would when they do not fit;
* drove.web.app -- routes and the :class:`App` that answers requests (errors,
  OpenAPI and ``/docs``, ASGI);
* drove.web.server -- :class:`HttpServer`, the HTTP/1.1 server on h11 that no
  client can stall or make hold unbounded memory (its docstring says how).

The names here are re-exported from those modules.  The limits and timeouts are
read by drove.web.server (MAX_BODY by drove.web.app): to change one, in a test
say, set it there; setting it here changes nothing.
"""

from drove.web.app import MAX_BODY, App, HTTPError, Request, Response, Route, json_response
from drove.web.server import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    KEEP_ALIVE,
    LINGER,
    MAX_BUFFERED,
    MAX_CONNECTIONS,
    MAX_HEAD,
    SHUTDOWN_GRACE,
    WRITE_TIMEOUT,
    HttpServer,
)
from drove.web.validation import Body, Field, ValidationError

__all__ = [
    "BODY_TIMEOUT",
    "HEADER_TIMEOUT",
    "KEEP_ALIVE",
    "LINGER",
    "MAX_BODY",
    "MAX_BUFFERED",
    "MAX_CONNECTIONS",
    "MAX_HEAD",
    "SHUTDOWN_GRACE",
    "WRITE_TIMEOUT",
    "App",
    "Body",
    "Field",
    "HTTPError",
    "HttpServer",
    "Request",
    "Response",
    "Route",
    "ValidationError",
    "json_response",
]
