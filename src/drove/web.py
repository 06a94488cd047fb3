"""A small HTTP/1.1 JSON API: routes, body and query validation, OpenAPI, and a server.

The replica and engine processes each serve a control API of a dozen calls.
FastAPI, pydantic, starlette and uvicorn together cost each such process
~19 MiB of resident memory, about as much as the rest of it, so those APIs
use this module instead: plain routes on asyncio streams, with the behaviour
clients rely on kept --

* JSON in and out; a handler's value is the response body (``null`` included);
* bad bodies and query parameters answer 422 with ``{"detail": [{"type",
  "loc", "msg", "input"}, ...]}``, unknown paths 404 and wrong methods 405
  with ``{"detail": "..."}``; exception handlers map errors to status codes
  by the exception's MRO, as Starlette's do;
* ``/openapi.json`` and ``/docs`` (Swagger UI) describe the routes;
* keep-alive, ``Content-Length`` and chunked request bodies, ``Expect:
  100-continue``; idle connections close after :data:`KEEP_ALIVE` seconds.

An :class:`App` is also an ASGI application, so it can be mounted elsewhere.
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
from collections.abc import Awaitable, Callable, Mapping
from pathlib import PurePath
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, unquote

log = logging.getLogger("drove.web")

KEEP_ALIVE = 10.0
"""Seconds an idle keep-alive connection stays open: longer than clients keep idle ones
for reuse (httpx 5 s, drove.webclient 2 s), so none sends on a connection being closed."""

BODY_TIMEOUT = 60.0
"""Seconds a request body may take to arrive once its headers have."""

MAX_HEAD = 64 * 1024
"""Largest request line plus headers."""

MAX_BODY = 64 * 1024 * 1024
"""Largest request body (a rebuild's layer tree is the biggest one sent)."""

_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
            307: "Temporary Redirect", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
            422: "Unprocessable Content", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            507: "Insufficient Storage"}


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
              query: dict[str, Field] | None = None, hidden: bool = False, raw: bool = False
              ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """Register ``handler(**path_params, **query_params[, body])`` for METHOD PATH."""
        parts = re.split(r"{(\w+)}", path)  # literal, param, literal, ...
        params = parts[1::2]
        regex = re.compile("".join(f"(?P<{p}>[^/]+)" if i % 2 else re.escape(p)
                                   for i, p in enumerate(parts)))

        def register(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            self.routes.append(Route(method, path, handler, status, body, dict(query or {}),
                                     regex, params, hidden, raw))
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
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        target = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        resp = await self.handle(scope["method"], target, headers, b"".join(chunks))
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


class _BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class HttpServer:
    """Serves an :class:`App` over HTTP/1.1 on an already-bound socket."""

    def __init__(self, app: App, sock: socket.socket) -> None:
        self.app = app
        self.sock = sock
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.Task[Any], bool] = {}  # task -> handling a request
        self._closing = False

    async def start(self) -> None:
        """Listen; returns once connections are accepted."""
        self._server = await asyncio.start_server(self._connection, sock=self.sock,
                                                  limit=MAX_HEAD)

    async def stop(self) -> None:
        """Stop accepting, close idle connections, let running requests finish."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task, busy in list(self._conns.items()):
            if not busy:
                task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = False
        try:
            while not self._closing:
                try:
                    async with asyncio.timeout(KEEP_ALIVE):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self._reject(writer, 431, "Request Header Fields Too Large")
                    return
                self._conns[task] = True
                try:
                    keep = await self._request(head, reader, writer)
                except _BadRequest as exc:
                    await self._reject(writer, exc.status, exc.detail)
                    return
                except TimeoutError:
                    return  # the body did not arrive in time
                finally:
                    self._conns[task] = False
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._conns.pop(task, None)
            writer.close()

    async def _request(self, head: bytes, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open."""
        try:
            lines = head[:-4].decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise _BadRequest(400, "Invalid HTTP request line") from None
        if not version.startswith("HTTP/1."):
            raise _BadRequest(400, "Unsupported HTTP version")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _BadRequest(400, "Invalid HTTP header")
            name = name.lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        conn = headers.get("connection", "").lower()
        keep = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        async with asyncio.timeout(BODY_TIMEOUT):
            body = await self._body(headers, reader)
        resp = await self.app.handle(method, target, headers, body)
        out = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, '')}"]
        out += [f"{k}: {v}" for k, v in resp.headers.items() if k != "content-length"]
        out.append(f"content-length: {resp.headers.get('content-length', len(resp.body))}")
        if not keep or self._closing:
            out.append("connection: close")
            keep = False
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + resp.body)
        await writer.drain()
        return keep

    @staticmethod
    async def _body(headers: dict[str, str], reader: asyncio.StreamReader) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts, total = [], 0
            while True:
                line = await reader.readline()
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest(400, "Invalid chunk size") from None
                if size == 0:
                    while (await reader.readline()).strip():  # trailers
                        pass
                    return b"".join(parts)
                total += size
                if total > MAX_BODY:
                    raise _BadRequest(413, "Request body too large")
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
        length = headers.get("content-length")
        if length is None:
            return b""
        try:
            n = int(length)
        except ValueError:
            raise _BadRequest(400, "Invalid Content-Length") from None
        if n < 0:
            raise _BadRequest(400, "Invalid Content-Length")
        if n > MAX_BODY:
            raise _BadRequest(413, "Request body too large")
        return await reader.readexactly(n)

    @staticmethod
    async def _reject(writer: asyncio.StreamWriter, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        with contextlib.suppress(ConnectionError):
            writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                         f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                         "connection: close\r\n\r\n".encode() + body)
            await writer.drain()
