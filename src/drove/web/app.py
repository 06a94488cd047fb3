"""A small HTTP/1.1 JSON API: routes, body and query validation, OpenAPI, and a server.

The replica and engine processes each serve a control API of a dozen calls.
FastAPI, pydantic, starlette and uvicorn together cost each such process
~19 MiB of resident memory, about as much as the rest of it, so those APIs
use this module instead: plain routes, with the behaviour clients rely on kept --

* JSON in and out; a handler's value is the response body (``null`` included);
* bad bodies and query parameters answer 422 with ``{"detail": [{"type",
  "loc", "msg", "input"}, ...]}``, unknown paths 404 and wrong methods 405
  with ``{"detail": "..."}``; exception handlers map errors to status codes
  by the exception's MRO, as Starlette's do;
* ``/openapi.json`` and ``/docs`` (Swagger UI) describe the routes;
* keep-alive, pipelining, ``Content-Length`` and chunked request bodies,
  ``Expect: 100-continue``.

An :class:`App` is also an ASGI application, so it can be mounted elsewhere.

:class:`HttpServer` serves an App; h11 parses and frames the HTTP/1.1 wire.
No client can stall it or make it hold unbounded memory:

* at most :data:`MAX_CONNECTIONS` connections.  A connection beyond it closes
  the one idle the longest (no request in progress: the HTTP/1.1 way for a
  server to drop a keep-alive connection; our client retries a request that
  met such a close before any answer); when every connection is in the middle
  of a request, the newcomer is answered 503 and closed, at once rather than
  left unaccepted in the kernel's backlog where its client would only time out;
* the request line and headers are at most :data:`MAX_HEAD` bytes (431); a body
  at most its route's ``max_body`` (:data:`MAX_BODY` unless the route says
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
import dataclasses
import datetime
import enum
import json
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import PurePath
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

import h11

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

MAX_BODY = 64 * 1024
"""A route's largest request body unless it sets its own ``max_body``."""

MAX_BUFFERED = 64 * 1024 * 1024
"""Request bodies one server holds at once, all connections together (503 beyond)."""

_REASONS = {100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
            307: "Temporary Redirect", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
            422: "Unprocessable Content", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
            503: "Service Unavailable", 507: "Insufficient Storage"}


class HTTPError(Exception):
    """Answer ``status`` with ``{"detail": detail}``."""

    def __init__(self, status: int, detail: Any, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


class ValidationError(Exception):
    """A request's body or query failed validation: 422 with the list of errors."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


# ------------------------------------------------------------------ validation

_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))


def _err(kind: str, loc: tuple[Any, ...], msg: str, value: Any, **ctx: Any) -> dict[str, Any]:
    err = {"type": kind, "loc": list(loc), "msg": msg, "input": value}
    if ctx:
        err["ctx"] = ctx
    return err


class Field:
    """One field of a JSON body, or one query parameter.

    ``kind`` is one of ``str``, ``int``, ``bool``, ``dict[str,str]``,
    ``dict`` (any JSON object), ``list[dict]`` (objects), ``list[list[int]]``.
    """

    _SCHEMAS: dict[str, dict[str, Any]] = {
        "str": {"type": "string"},
        "int": {"type": "integer"},
        "bool": {"type": "boolean"},
        "dict[str,str]": {"type": "object", "additionalProperties": {"type": "string"}},
        "dict": {"type": "object", "additionalProperties": True},
        "list[dict]": {"type": "array",
                       "items": {"type": "object", "additionalProperties": True}},
        "list[list[int]]": {"type": "array",
                            "items": {"type": "array", "items": {"type": "integer"}}},
    }

    def __init__(self, kind: str, *, default: Any = ..., default_factory: Callable[[], Any]
                 | None = None, nullable: bool = False, gt: int | None = None,
                 pattern: str | None = None, description: str = "") -> None:
        if kind not in self._SCHEMAS:
            raise ValueError(f"unknown field kind {kind!r}")
        self.kind = kind
        self.default = default
        self.default_factory = default_factory
        self.nullable = nullable
        self.gt = gt
        self.pattern = re.compile(pattern) if pattern else None
        self.description = description

    @property
    def required(self) -> bool:
        """Whether the field must be given."""
        return self.default is ... and self.default_factory is None

    def missing(self) -> Any:
        """The value of an absent optional field."""
        return self.default_factory() if self.default_factory is not None else self.default

    def schema(self) -> dict[str, Any]:
        """The field's JSON Schema."""
        s: dict[str, Any] = dict(self._SCHEMAS[self.kind])
        if self.gt is not None:
            s["exclusiveMinimum"] = self.gt
        if self.pattern is not None:
            s["pattern"] = self.pattern.pattern
        if self.nullable:
            s = {"anyOf": [s, {"type": "null"}]}
        if self.description:
            s["description"] = self.description
        if not self.required and self.default_factory is None:
            s["default"] = self.default
        return s

    # JSON values (bodies)
    def validate(self, value: Any, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
        """The value as the handler gets it; appends to ``errors`` when invalid."""
        if value is None and self.nullable:
            return None
        kind = self.kind
        if kind == "str":
            if not isinstance(value, str):
                errors.append(_err("string_type", loc, "Input should be a valid string", value))
            elif self.pattern is not None and not self.pattern.fullmatch(value):
                errors.append(_err("string_pattern_mismatch", loc,
                                   f"String should match pattern '{self.pattern.pattern}'",
                                   value, pattern=self.pattern.pattern))
            return value
        if kind == "int":
            return self._check_int(_json_int(value, loc, errors), loc, errors)
        if kind == "bool":
            return _json_bool(value, loc, errors)
        if kind in ("dict", "dict[str,str]"):
            if not isinstance(value, dict):
                errors.append(_err("dict_type", loc, "Input should be a valid dictionary",
                                   value))
            elif kind == "dict[str,str]":
                for key, item in value.items():
                    if not isinstance(item, str):
                        errors.append(_err("string_type", (*loc, key),
                                           "Input should be a valid string", item))
            return value
        if not isinstance(value, list):
            errors.append(_err("list_type", loc, "Input should be a valid list", value))
            return value
        if kind == "list[dict]":
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    errors.append(_err("dict_type", (*loc, i),
                                       "Input should be a valid dictionary", item))
            return value
        out = []  # list[list[int]]
        for i, item in enumerate(value):
            if not isinstance(item, list):
                errors.append(_err("list_type", (*loc, i), "Input should be a valid list", item))
                continue
            out.append([_json_int(x, (*loc, i, j), errors) for j, x in enumerate(item)])
        return out

    # strings (query parameters)
    def parse(self, text: str, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
        """A query parameter's value; appends to ``errors`` when invalid."""
        if self.kind == "bool":
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            errors.append(_err("bool_parsing", loc, "Input should be a valid boolean, unable "
                               "to interpret input", text))
            return None
        if self.kind == "int":
            try:
                value = int(text.strip())
            except ValueError:
                errors.append(_err("int_parsing", loc, "Input should be a valid integer, unable "
                                   "to parse string as an integer", text))
                return None
            return self._check_int(value, loc, errors)
        if self.kind == "str":
            return self.validate(text, loc, errors)
        raise TypeError(f"a query parameter cannot be {self.kind}")

    def _check_int(self, value: Any, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
        if isinstance(value, int) and self.gt is not None and not value > self.gt:
            errors.append(_err("greater_than", loc, f"Input should be greater than {self.gt}",
                               value, gt=self.gt))
        return value


def _json_bool(value: Any, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
    """A boolean from JSON: true, false, 0, 1 and the strings pydantic takes ("yes", "off")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, str | int | float):
        errors.append(_err("bool_parsing", loc, "Input should be a valid boolean, unable to "
                           "interpret input", value))
    else:
        errors.append(_err("bool_type", loc, "Input should be a valid boolean", value))
    return value


def _json_int(value: Any, loc: tuple[Any, ...], errors: list[dict[str, Any]]) -> Any:
    """An integer from JSON: ints, floats without a fractional part and integer strings.

    Booleans are refused (pydantic would take them as 0 and 1).
    """
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            errors.append(_err("int_parsing", loc, "Input should be a valid integer, unable "
                               "to parse string as an integer", value))
            return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        errors.append(_err("int_type", loc, "Input should be a valid integer", value))
        return value
    if isinstance(value, float):
        if not value.is_integer():
            errors.append(_err("int_from_float", loc, "Input should be a valid integer, got a "
                               "number with a fractional part", value))
            return value
        return int(value)
    return value


class Body:
    """A JSON object body with named fields (extra fields are ignored), or any object.

    The handler gets the fields as attributes of a namespace (``model``), or the
    object itself when ``fields`` is None.
    """

    def __init__(self, name: str, fields: dict[str, Field] | None = None,
                 description: str = "") -> None:
        self.name = name
        self.fields = fields
        self.description = description

    def schema(self) -> dict[str, Any]:
        """The body's JSON Schema."""
        if self.fields is None:
            s: dict[str, Any] = {"type": "object", "additionalProperties": True}
        else:
            s = {"type": "object",
                 "properties": {k: f.schema() for k, f in self.fields.items()},
                 "required": [k for k, f in self.fields.items() if f.required]}
        s["title"] = self.name
        if self.description:
            s["description"] = self.description
        return s

    def validate(self, value: Any) -> Any:
        """The handler's argument; ValidationError when the body does not fit."""
        loc = ("body",)
        if value is _MISSING:
            raise ValidationError([_err("missing", loc, "Field required", None)])
        if not isinstance(value, dict):
            if self.fields is None:
                raise ValidationError([_err("dict_type", loc,
                                            "Input should be a valid dictionary", value)])
            raise ValidationError([_err("model_attributes_type", loc, "Input should be a valid "
                                        "dictionary or object to extract fields from", value)])
        if self.fields is None:
            return value
        errors: list[dict[str, Any]] = []
        out = {}
        for key, field in self.fields.items():
            if key in value:
                out[key] = field.validate(value[key], (*loc, key), errors)
            elif field.required:
                errors.append(_err("missing", (*loc, key), "Field required", value))
            else:
                out[key] = field.missing()
        if errors:
            raise ValidationError(errors)
        return SimpleNamespace(**out)


_MISSING = object()


# ------------------------------------------------------------------ routing


@dataclasses.dataclass
class Request:
    """What a route handler may look at besides its parameters."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    query_string: str = ""


@dataclasses.dataclass
class Response:
    """An answer: status, headers, encoded body."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Route:
    """One method and path, and the handler answering it."""

    method: str
    path: str
    handler: Callable[..., Awaitable[Any]]
    status: int
    body: Body | None
    query: dict[str, Field]
    regex: re.Pattern[str]
    params: list[str]
    hidden: bool = False  # not in the OpenAPI description
    raw: bool = False  # the handler takes the Request and returns a Response
    max_body: int = MAX_BODY  # largest request body accepted (413 beyond)


def _default(obj: Any) -> Any:
    """JSON for the few non-JSON types handlers return (as FastAPI's encoder would)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, set | frozenset):
        return list(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, datetime.datetime | datetime.date):
        return obj.isoformat()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def json_response(status: int, content: Any, headers: Mapping[str, str] | None = None
                  ) -> Response:
    """``content`` as a JSON response (compact, UTF-8, no NaN: as Starlette's)."""
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                      default=_default).encode()
    return Response(status, body, {"content-type": "application/json", **(headers or {})})


class App:
    """Routes plus exception handlers; ``await app.handle(...)`` answers one request."""

    def __init__(self, title: str, version: str, description: str = "") -> None:
        self.title = title
        self.version = version
        self.description = description
        self.routes: list[Route] = []
        self.handlers: dict[type[BaseException], Callable[[Request, Any], Response]] = {}
        self.guards: list[Callable[[Request], Awaitable[None]]] = []
        self._openapi: bytes | None = None
        self.route("GET", "/openapi.json", hidden=True, raw=True)(self._openapi_route)
        self.route("GET", "/docs", hidden=True, raw=True)(self._docs_route)

    # registration
    def route(self, method: str, path: str, *, status: int = 200, body: Body | None = None,
              query: dict[str, Field] | None = None, hidden: bool = False, raw: bool = False,
              max_body: int = MAX_BODY
              ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Register ``handler(**path_params, **query_params[, body])`` for METHOD PATH.

        A request body larger than ``max_body`` bytes is refused (413) unread.
        """
        parts = re.split(r"{(\w+)}", path)  # literal, param, literal, ...
        params = parts[1::2]
        regex = re.compile("".join(f"(?P<{p}>[^/]+)" if i % 2 else re.escape(p)
                                   for i, p in enumerate(parts)))

        def register(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            self.routes.append(Route(method, path, handler, status, body, dict(query or {}),
                                     regex, params, hidden, raw, max_body))
            self._openapi = None
            return handler

        return register

    def get(self, path: str, **kw: Any) -> Any:
        """Register a GET route."""
        return self.route("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        """Register a POST route."""
        return self.route("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> Any:
        """Register a PUT route."""
        return self.route("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        """Register a DELETE route."""
        return self.route("DELETE", path, **kw)

    def exception_handler(self, exc_type: type[BaseException]) -> Any:
        """Register ``handler(request, exc) -> Response`` for ``exc_type`` and subclasses."""

        def register(handler: Callable[[Request, Any], Response]) -> Any:
            self.handlers[exc_type] = handler
            return handler

        return register

    def guard(self, func: Callable[[Request], Awaitable[None]]
              ) -> Callable[[Request], Awaitable[None]]:
        """Register ``await func(request)``, run before every matched route's handler.

        A guard refuses a request by raising (the exception handlers answer);
        the replica's epoch fence is one.
        """
        self.guards.append(func)
        return func

    # answering
    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        allowed: list[str] = []
        for route in self.routes:
            m = route.regex.fullmatch(path)
            if m is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, m.groupdict(), allowed
            allowed.append(route.method)
        return None, {}, allowed

    def body_limit(self, method: str, target: str) -> int:
        """The largest request body ``method target`` takes (:data:`MAX_BODY` if unrouted)."""
        route = self._match(method, unquote(target.partition("?")[0]))[0]
        return MAX_BODY if route is None else route.max_body

    async def handle(self, method: str, target: str, headers: dict[str, str],
                     body: bytes) -> Response:
        """Answer one request; ``headers`` have lower-case names."""
        raw_path, _, qs = target.partition("?")
        path = unquote(raw_path)
        query = dict(parse_qsl(qs, keep_blank_values=True))
        request = Request(method, path, query, headers, qs)
        try:
            resp = await self._dispatch(request, body)
        except Exception as exc:
            resp = self._error_response(request, exc)
        if method == "HEAD":  # the GET answer's headers, without its body
            resp.headers["content-length"] = str(len(resp.body))
            resp.body = b""
        return resp

    def _error_response(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPError):
            return json_response(exc.status, {"detail": exc.detail}, exc.headers)
        if isinstance(exc, ValidationError):
            return json_response(422, {"detail": exc.errors})
        for cls in type(exc).__mro__:
            handler = self.handlers.get(cls)
            if handler is not None:
                try:
                    return handler(request, exc)
                except Exception:
                    log.exception("exception handler for %s failed", cls.__name__)
                    break
        log.error("%s %s failed", request.method, request.path, exc_info=exc)
        return Response(500, b"Internal Server Error", {"content-type": "text/plain"})

    async def _dispatch(self, request: Request, body: bytes) -> Response:
        route, params, allowed = self._match(request.method, request.path)
        if route is None:
            if allowed:
                raise HTTPError(405, "Method Not Allowed", {"allow": ", ".join(allowed)})
            other = (request.path[:-1] if request.path.endswith("/")
                     else request.path + "/")
            if other and self._match(request.method, other)[0] is not None:
                qs = f"?{request.query_string}" if request.query_string else ""
                return Response(307, b"", {"location": other + qs})
            raise HTTPError(404, "Not Found")
        errors: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = dict(params)
        for name, field in route.query.items():
            if name in request.query:
                kwargs[name] = field.parse(request.query[name], ("query", name), errors)
            elif field.required:
                errors.append(_err("missing", ("query", name), "Field required", None))
            else:
                kwargs[name] = field.missing()
        if route.body is not None:
            try:
                kwargs["body"] = route.body.validate(_decode_body(body, request.headers))
            except ValidationError as exc:
                errors.extend(exc.errors)
        if errors:
            raise ValidationError(errors)
        for guard in self.guards:
            await guard(request)
        if route.raw:
            return await route.handler(request)
        result = await route.handler(**kwargs)
        if isinstance(result, Response):
            return result
        return json_response(route.status, result)

    # documentation
    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 description of the routes."""
        paths: dict[str, Any] = {}
        for route in self.routes:
            if route.hidden:
                continue
            doc = (route.handler.__doc__ or "").strip()
            summary, _, description = doc.partition("\n")
            op: dict[str, Any] = {"summary": summary.strip(),
                                  "operationId": f"{route.handler.__name__}_"
                                                 f"{route.method.lower()}"}
            if description.strip():
                op["description"] = description.strip()
            parameters = [{"name": p, "in": "path", "required": True,
                           "schema": {"type": "string"}} for p in route.params]
            parameters += [{"name": n, "in": "query", "required": f.required,
                            "schema": f.schema()} for n, f in route.query.items()]
            if parameters:
                op["parameters"] = parameters
            if route.body is not None:
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": route.body.schema()}}}
            op["responses"] = {str(route.status): {
                "description": "Successful Response",
                "content": {"application/json": {"schema": {}}}}}
            if route.body is not None or route.query:
                op["responses"]["422"] = {"description": "Validation Error"}
            paths.setdefault(route.path, {})[route.method.lower()] = op
        return {"openapi": "3.1.0",
                "info": {"title": self.title, "version": self.version,
                         "description": self.description},
                "paths": paths}

    async def _openapi_route(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = json.dumps(self.openapi(), separators=(",", ":")).encode()
        return Response(200, self._openapi, {"content-type": "application/json"})

    async def _docs_route(self, request: Request) -> Response:
        html = _SWAGGER.replace("TITLE", f"{self.title} - Swagger UI")
        return Response(200, html.encode(), {"content-type": "text/html; charset=utf-8"})

    # ASGI, so that the app can run under any ASGI server too
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGI entry (http only)."""
        if scope["type"] != "http":
            return
        target = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        limit = self.body_limit(scope["method"], target)
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                resp = json_response(413, {"detail": "Request body too large"})
                break
            chunks.append(chunk)
            if not message.get("more_body"):
                resp = await self.handle(scope["method"], target, headers, b"".join(chunks))
                break
        hdrs = [(k.encode(), v.encode()) for k, v in resp.headers.items()]
        if "content-length" not in resp.headers:
            hdrs.append((b"content-length", str(len(resp.body)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": hdrs})
        await send({"type": "http.response.body", "body": resp.body})


def _decode_body(body: bytes, headers: Mapping[str, str]) -> Any:
    """The request's JSON value (_MISSING when empty); ValidationError when not JSON."""
    if not body:
        return _MISSING
    ctype = headers.get("content-type")
    if ctype is not None:
        main = ctype.split(";", 1)[0].strip().lower()
        if not (main == "application/json" or (main.startswith("application/")
                                               and main.endswith("+json"))):
            raise ValidationError([_err("model_attributes_type", ("body",),
                                        "Input should be a valid dictionary or object to "
                                        "extract fields from", body.decode(errors="replace"))])
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        pos = getattr(exc, "pos", 0)
        why = getattr(exc, "msg", None) or str(exc)
        raise ValidationError([_err("json_invalid", ("body", pos), "JSON decode error", {},
                                    error=why)]) from None


_SWAGGER = """<!doctype html>
<html><head><title>TITLE</title>
<link type="text/css" rel="stylesheet"
 href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"})</script>
</body></html>
"""


# ------------------------------------------------------------------ server

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
