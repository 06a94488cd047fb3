"""A small HTTP/1.1 JSON API: routes, body and query validation, OpenAPI, and a server.

The code is in drove.web.app; the names here are re-exported from it.
"""

from drove.web.app import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    KEEP_ALIVE,
    LINGER,
    MAX_BODY,
    MAX_BUFFERED,
    MAX_CONNECTIONS,
    MAX_HEAD,
    SHUTDOWN_GRACE,
    WRITE_TIMEOUT,
    App,
    Body,
    Field,
    HTTPError,
    HttpServer,
    Request,
    Response,
    Route,
    ValidationError,
    json_response,
)

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
