"""Every route of the manager's API declares the role it needs, in one table that
docs/users.md shows; a route that does not is refused to everyone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from drove.manager.api import build_app
from drove.manager.app import ManagerApp
from drove.manager.roles import (
    ADMIN,
    OPERATOR,
    PUBLIC,
    ROUTES,
    VIEWER,
    allows,
    undeclared,
)
from drove.manager.store import SqliteStore

DOC = Path(__file__).resolve().parents[2] / "docs" / "users.md"
ROW = re.compile(r"^\| (GET|POST|PUT|PATCH|DELETE) \| `([^`]+)` \| (\w+) \|$")


@pytest.fixture
def app(tmp_path):
    """The manager's real app over a real SQLite store (not started: no processes); the
    token it is built with is the first admin's."""
    store = SqliteStore(tmp_path / "drove.db")
    yield build_app(ManagerApp(store, None, tmp_path), "api-token",
                    cluster_token="cluster-token")
    store.close()


def test_every_route_declares_its_role(app):
    assert undeclared(app.routes) == []


def test_an_undeclared_route_is_caught_and_refused_to_everyone(app):
    @app.get("/v1/new-thing")
    async def new_thing() -> dict[str, str]:
        return {"open": "yes"}

    assert undeclared(app.routes) == ["GET /v1/new-thing"]
    admin = {"Authorization": "Bearer api-token"}
    client = TestClient(app)
    r = client.get("/v1/new-thing", headers=admin)
    assert r.status_code == 403 and "declares no role" in r.json()["detail"]
    assert client.get("/v1/settings", headers=admin).status_code == 200
    assert client.get("/v1/settings").status_code == 401


def test_docs_users_md_shows_the_table():
    rows = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows[(m[1], m[2])] = m[3]
    assert rows == ROUTES


def test_a_viewer_only_reads():
    changes = {k: v for k, v in ROUTES.items() if k[0] != "GET" and v == VIEWER}
    assert changes == {("DELETE", "/v1/session"): VIEWER}  # its own logout only


def test_roles_rank():
    assert allows(ADMIN, OPERATOR) and allows(OPERATOR, VIEWER) and allows(VIEWER, PUBLIC)
    assert not allows(VIEWER, OPERATOR) and not allows(OPERATOR, ADMIN)
    assert not allows(ADMIN, "cluster") and not allows("nobody", VIEWER)
