"""Who is calling, and may they: the one check every route of the manager's API passes.

It runs app-wide (a FastAPI dependency of the app, so no route can leave it out) and
looks the route up in :data:`drove.manager.roles.ROUTES`: a route missing there is
refused to everyone. A caller is a user, known by a Bearer token or by the UI's
session cookie; a change made with the cookie must carry the session's CSRF token in
``X-CSRF-Token`` (a Bearer token needs none: no browser sends it by itself). The
agents' routes want the cluster token instead, as they always did.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from drove.manager.errors import ApiError
from drove.manager.roles import CLUSTER, PUBLIC, allows, needed
from drove.manager.sessions import COOKIE, CSRF_HEADER, Sessions
from drove.manager.users import Users

_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
"""A request's Bearer token, if any."""
SAFE_METHODS = ("GET", "HEAD")
"""Methods that change nothing: no CSRF token needed with the cookie."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user and its role (with its session, if by cookie)."""

    user: str
    role: str
    session: str | None = None
    csrf: str | None = None


def principal(request: Request) -> Principal:
    """The caller :func:`authorize` let through (a route that needs a user only)."""
    who = getattr(request.state, "principal", None)
    if not isinstance(who, Principal):  # a route declared public has no caller
        raise ApiError(401, "this call needs a user: send 'Authorization: Bearer TOKEN' "
                            "or log in (POST /v1/session)")
    return who


def authorize(request: Request, creds: Credentials) -> None:
    """Let the request through if its caller has the role its route declares, else 401
    (no or unknown credentials) or 403 (not allowed: the message names both roles)."""
    route = request.scope.get("route")
    path = str(getattr(route, "path", request.url.path))
    method = request.method
    level = needed(method, path)
    if level is None:
        raise ApiError(403, f"{method} {path} declares no role, so no one may call it (a "
                            "bug: declare it in drove/manager/roles.py)")
    if level == PUBLIC:
        return
    state: Any = request.app.state
    if level == CLUSTER:
        _cluster(state, creds)
        return
    who = _identify(request, state, creds)
    if not allows(who.role, level):
        raise ApiError(403, f"{method} {path} needs the {level} role (or a higher one); "
                            f"user {who.user} has the {who.role} role")
    if who.session is not None and method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER) or ""
        if not who.csrf or not secrets.compare_digest(sent.encode(), who.csrf.encode()):
            raise ApiError(403, f"a change made with the session cookie needs the header "
                                f"{CSRF_HEADER} holding the session's csrf value (given by "
                                "POST and GET /v1/session)")
    request.state.principal = who


def _identify(request: Request, state: Any, creds: HTTPAuthorizationCredentials | None
              ) -> Principal:
    users: Users = state.users
    if creds is not None:
        user = users.by_token(creds.credentials)
        if user is not None:
            return Principal(user["name"], user["role"])
        if _same(creds.credentials, state.cluster_token):
            raise ApiError(403, "this is the cluster token: it opens only the cluster "
                                "endpoints (agents' heartbeats); call the API with a user's "
                                "token (the first admin's is in DATA_DIR/token)")
        raise ApiError(401, "unknown or revoked API token: send 'Authorization: Bearer "
                            "TOKEN' with a user's token (the first admin's is in "
                            "DATA_DIR/token; `drove user token NAME` makes a new one)")
    sid = request.cookies.get(COOKIE)
    if sid:
        sessions: Sessions = state.sessions
        session = sessions.find(sid)
        user = users.get_doc(str(session["user"])) if session else None
        if session is None or user is None:
            raise ApiError(401, "the session ended (logged out, unused for 12 hours, or its "
                                "user's tokens were revoked): log in again")
        return Principal(user["name"], user["role"], sid, str(session["csrf"]))
    raise ApiError(401, "missing API token: send 'Authorization: Bearer TOKEN' with a user's "
                        "token (the first admin's is in DATA_DIR/token), or log in "
                        "(POST /v1/session)")


def _cluster(state: Any, creds: HTTPAuthorizationCredentials | None) -> None:
    """Refuse a cluster call (an agent's) without the cluster token (401; 403 for a
    user's token)."""
    if creds is not None and _same(creds.credentials, state.cluster_token):
        return
    users: Users = state.users
    if creds is not None and users.by_token(creds.credentials) is not None:
        raise ApiError(403, "this is a user's API token: agents call the managers with the "
                            "cluster token (the manager's DATA_DIR/cluster-token)")
    raise ApiError(401, "missing or wrong cluster token: an agent sends 'Authorization: "
                        "Bearer TOKEN' with the manager's DATA_DIR/cluster-token")


def _same(given: str, token: str) -> bool:
    return secrets.compare_digest(given.encode(), token.encode())
