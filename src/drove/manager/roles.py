"""Which role each API route needs: the one table every request is checked against.

Users have one of three roles, each allowed what the one below it is: ``viewer``
(reads), ``operator`` (volumes, snapshots, backups, jobs, tasks) and ``admin``
(everything: settings, users, nodes, disks, the backup target). Two more levels
are not users' roles: ``public`` routes need no credentials, ``cluster`` routes
(the agents') need the cluster token. docs/users.md shows the same table, and a
unit test holds the two equal and fails for any route of the app missing here,
so a new endpoint is never open by accident.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

VIEWER = "viewer"
"""Reads everything but the users."""
OPERATOR = "operator"
"""Also works with volumes, snapshots, backups, jobs and tasks."""
ADMIN = "admin"
"""Everything."""
USER_ROLES = (VIEWER, OPERATOR, ADMIN)
"""Users' roles, each allowed everything the ones before it are."""
PUBLIC = "public"
"""A route anyone may call."""
CLUSTER = "cluster"
"""A route for the agents, with the cluster token."""

ROUTES: dict[tuple[str, str], str] = {
    # Anyone: liveness, and logging in (which checks the credentials it is given).
    ("GET", "/v1/health"): PUBLIC,
    ("POST", "/v1/session"): PUBLIC,
    # Any user: who am I, log out.
    ("GET", "/v1/session"): VIEWER,
    ("DELETE", "/v1/session"): VIEWER,
    # The agents, with the cluster token.
    ("POST", "/v1/cluster/heartbeat"): CLUSTER,
    ("GET", "/v1/agents/{node}/changes"): CLUSTER,
    ("POST", "/v1/agents/{node}/changes"): CLUSTER,
    # Reading the system's state.
    ("GET", "/v1/cluster"): VIEWER,
    ("GET", "/v1/nodes"): VIEWER,
    ("GET", "/v1/disks"): VIEWER,
    ("GET", "/v1/volumes"): VIEWER,
    ("GET", "/v1/volumes/{name}"): VIEWER,
    ("GET", "/v1/volumes/{name}/snapshots"): VIEWER,
    ("GET", "/v1/volumes/{name}/diff"): VIEWER,
    ("GET", "/v1/events"): VIEWER,
    ("GET", "/v1/settings"): VIEWER,
    ("GET", "/v1/backup-target"): VIEWER,
    ("GET", "/v1/backups"): VIEWER,
    ("GET", "/v1/backups/{name}"): VIEWER,
    ("GET", "/v1/tasks"): VIEWER,
    ("GET", "/v1/tasks/{tid}"): VIEWER,
    ("GET", "/v1/jobs"): VIEWER,
    ("GET", "/v1/jobs/{name}"): VIEWER,
    ("GET", "/metrics"): VIEWER,
    # Volumes and what is done with them.
    ("POST", "/v1/volumes"): OPERATOR,
    ("PATCH", "/v1/volumes/{name}"): OPERATOR,
    ("DELETE", "/v1/volumes/{name}"): OPERATOR,
    ("POST", "/v1/volumes/{name}/activate"): OPERATOR,
    ("POST", "/v1/volumes/{name}/clone"): OPERATOR,
    ("POST", "/v1/volumes/{name}/flatten"): OPERATOR,
    ("POST", "/v1/volumes/{name}/scrub"): OPERATOR,
    ("POST", "/v1/volumes/{name}/trim"): OPERATOR,
    ("POST", "/v1/volumes/{name}/expand"): OPERATOR,
    ("POST", "/v1/volumes/{name}/attach"): OPERATOR,
    ("POST", "/v1/volumes/{name}/detach"): OPERATOR,
    ("POST", "/v1/volumes/{name}/upgrade-engine"): OPERATOR,
    ("POST", "/v1/volumes/{name}/snapshots"): OPERATOR,
    ("DELETE", "/v1/volumes/{name}/snapshots/{snapshot}"): OPERATOR,
    ("POST", "/v1/volumes/{name}/snapshots/{snapshot}/export"): OPERATOR,
    ("POST", "/v1/volumes/{name}/revert"): OPERATOR,
    ("POST", "/v1/volumes/{name}/backups"): OPERATOR,
    ("POST", "/v1/backups/{name}/restore"): OPERATOR,
    ("POST", "/v1/backups/{name}/verify"): OPERATOR,
    ("DELETE", "/v1/backups/{name}"): OPERATOR,
    ("POST", "/v1/tasks/{tid}/cancel"): OPERATOR,
    ("POST", "/v1/jobs"): OPERATOR,
    ("DELETE", "/v1/jobs/{name}"): OPERATOR,
    ("POST", "/v1/jobs/{name}/run"): OPERATOR,
    # The cluster's shape and policy.
    ("PATCH", "/v1/nodes/{name}"): ADMIN,
    ("POST", "/v1/nodes/{name}/cordon"): ADMIN,
    ("POST", "/v1/nodes/{name}/uncordon"): ADMIN,
    ("POST", "/v1/nodes/{name}/drain"): ADMIN,
    ("DELETE", "/v1/nodes/{name}"): ADMIN,
    ("POST", "/v1/disks"): ADMIN,
    ("DELETE", "/v1/disks/{name}"): ADMIN,
    ("PATCH", "/v1/settings"): ADMIN,
    ("PUT", "/v1/backup-target"): ADMIN,
    # Users.
    ("GET", "/v1/users"): ADMIN,
    ("POST", "/v1/users"): ADMIN,
    ("GET", "/v1/users/{name}"): ADMIN,
    ("PATCH", "/v1/users/{name}"): ADMIN,
    ("DELETE", "/v1/users/{name}"): ADMIN,
    ("POST", "/v1/users/{name}/tokens"): ADMIN,
    ("DELETE", "/v1/users/{name}/tokens"): ADMIN,
    ("DELETE", "/v1/users/{name}/tokens/{token_id}"): ADMIN,
    ("PUT", "/v1/users/{name}/password"): ADMIN,
}
"""(method, path as the app declares it): the role it needs, or public, or cluster."""

PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/", "/ui"})  # the web UI's page and assets (drove.manager.ui)
"""Paths served outside the API's routes (no dependency runs there): open to anyone."""


def needed(method: str, path: str) -> str | None:
    """The level ``method path`` needs (HEAD as GET); None: the route declares none."""
    return ROUTES.get(("GET" if method == "HEAD" else method, path))


def allows(role: str, level: str) -> bool:
    """Whether a user of ``role`` may call a route that needs ``level``."""
    if level == PUBLIC:
        return True
    if level not in USER_ROLES or role not in USER_ROLES:
        return False  # cluster routes are for the cluster token, never a user
    return USER_ROLES.index(role) >= USER_ROLES.index(level)


def undeclared(routes: Iterable[Any]) -> list[str]:
    """``METHOD PATH`` of each of an app's ``routes`` this table does not declare."""
    missing = []
    for route in routes:
        path = getattr(route, "path", "")
        methods = getattr(route, "methods", None)
        if not path:  # e.g. FastAPI's include_router: its routes escape this check
            missing.append(f"{type(route).__name__} (add its routes to the app itself)")
            continue
        if getattr(route, "dependant", None) is None:  # not an API route: public or absent
            if path not in PUBLIC_PATHS:
                missing.append(f"{'|'.join(sorted(methods or ['*']))} {path}")
            continue
        missing += [f"{m} {path}" for m in sorted(methods or ())
                    if m != "HEAD" and needed(m, path) is None]
    return missing
