"""Routing and the application: routes, their handlers, errors as answers, OpenAPI.

The behaviour clients of the control APIs rely on (FastAPI's) is kept --

* JSON in and out; a handler's value is the response body (``null`` included);
* bad bodies and query parameters answer 422 with ``{"detail": [{"type",
  "loc", "msg", "input"}, ...]}`` (see drove.web.validation), unknown paths 404
  and wrong methods 405 with ``{"detail": "..."}``; exception handlers map errors
  to status codes by the exception's MRO, as Starlette's do;
* ``/openapi.json`` and ``/docs`` (Swagger UI) describe the routes.

An :class:`App` answers one request at a time through :meth:`App.handle`;
drove.web.server serves it over HTTP/1.1.  It is also an ASGI application, so it
can be mounted elsewhere.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import PurePath
from typing import Any
from urllib.parse import parse_qsl, unquote

from drove.web.validation import MISSING, Body, Field, ValidationError, invalid

log = logging.getLogger("drove.web")

MAX_BODY = 64 * 1024
"""A route's largest request body unless it sets its own ``max_body``."""


class HTTPError(Exception):
    """Answer ``status`` with ``{"detail": detail}``."""

    def __init__(self, status: int, detail: Any, headers: Mapping[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


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
                errors.append(invalid("missing", ("query", name), "Field required", None))
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
    """The request's JSON value (MISSING when empty); ValidationError when not JSON."""
    if not body:
        return MISSING
    ctype = headers.get("content-type")
    if ctype is not None:
        main = ctype.split(";", 1)[0].strip().lower()
        if not (main == "application/json" or (main.startswith("application/")
                                               and main.endswith("+json"))):
            raise ValidationError([invalid("model_attributes_type", ("body",),
                                           "Input should be a valid dictionary or object to "
                                           "extract fields from", body.decode(errors="replace"))])
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        pos = getattr(exc, "pos", 0)
        why = getattr(exc, "msg", None) or str(exc)
        raise ValidationError([invalid("json_invalid", ("body", pos), "JSON decode error", {},
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
