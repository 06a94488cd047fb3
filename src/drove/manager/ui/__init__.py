"""The web UI: static assets shipped in this package, served by the manager at ``/``.

No build step: ``static/`` holds the page, its stylesheet and plain JavaScript modules,
sent as they are. They hold no data and need no token; the page calls the API with the
user's session (or token) like any other client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
"""The UI's files (index.html, app.css, js/*.js)."""

# The page loads nothing from anywhere but this manager, runs no inline script or style,
# and may not be framed (clickjacking of its destructive buttons).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated every load, so an upgraded manager never runs last version's scripts.
    "Cache-Control": "no-cache",
}


class _Assets(StaticFiles):
    """Static files with the page's headers."""

    def file_response(self, *args: Any, **kwargs: Any) -> Any:
        """The file, with the headers above."""
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


async def _index(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


def mount(app: FastAPI) -> None:
    """Serve the UI on ``app``: the page at ``/``, its assets under ``/ui/``.

    Plain routes, not API routes: no API dependency (authorization) runs for them (so
    drove.manager.roles lists both paths in PUBLIC_PATHS), they are not in the OpenAPI
    schema, and an exact ``/`` and a ``/ui`` prefix cannot shadow any API route (no
    catch-all mount at ``/``).
    """
    app.router.routes.append(Route("/", _index, methods=["GET", "HEAD"], name="ui-index"))
    app.router.routes.append(Mount("/ui", _Assets(directory=STATIC), name="ui"))
