"""Users and roles against a real `drove serve`: the CLI with each role's token, the web
UI's session (cookie, CSRF) over HTTP, and every route of the API for every role."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from drove.manager.api import build_app
from drove.manager.app import ManagerApp
from drove.manager.roles import CLUSTER, PUBLIC, USER_ROLES, allows, needed
from drove.manager.store import SqliteStore


def _refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode != 0, r.stdout
    for word in words:
        assert word in r.stderr, r.stderr


def _drove(manager, *args: str, token: str | None = None, stdin: str | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """`drove ARGS` finding the manager through its data dir, as a user would, with
    ``token`` in DROVE_TOKEN (else the data dir's, the first admin's)."""
    env = {**os.environ, "DROVE_DATA_DIR": str(manager.data_dir)}
    env.pop("DROVE_URL", None)
    env.pop("DROVE_TOKEN", None)
    if token is not None:
        env["DROVE_TOKEN"] = token
    r = subprocess.run([sys.executable, "-m", "drove", *args], input=stdin or "",
                       capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert r.returncode == 0, f"drove {' '.join(args)}: {r.stdout}\n{r.stderr}"
    return r


@pytest.mark.slow  # a dozen CLI processes: 17 s on a quiet machine, 34 s on a busy one
def test_users_with_roles_through_the_cli(manager):
    # The data dir's token is the first admin's: the CLI finds it by itself. `user create`
    # prints the token alone on stdout (the note on stderr), or with --json.
    viewer = _drove(manager, "user", "create", "u-viewer", "--role", "viewer").stdout.strip()
    made = json.loads(_drove(manager, "user", "create", "u-operator", "--role", "operator",
                             "--json").stdout)
    operator = made["token"]
    assert made["role"] == "operator" and made["name"] == "u-operator"
    admin = manager.ok("POST", "/v1/users", json={"name": "u-admin", "role": "admin"})["token"]
    listed = json.loads(_drove(manager, "user", "list", "--json").stdout)
    assert {u["name"]: u["role"] for u in listed} == {
        "admin": "admin", "u-admin": "admin", "u-operator": "operator", "u-viewer": "viewer"}
    # The store keeps no token in clear.
    raw = b"".join(p.read_bytes() for p in manager.data_dir.glob("*.db*"))
    assert raw and not any(t.encode() in raw for t in (viewer, operator, admin, manager.token))

    # Each token works with the CLI through DROVE_TOKEN, as far as its role goes.
    me = json.loads(_drove(manager, "user", "whoami", "--json", token=viewer).stdout)
    assert me == {"user": "u-viewer", "role": "viewer", "csrf": None}
    _refused(_drove(manager, "volume", "create", "v1", "--size", "64M", check=False,
                    token=viewer), "operator", "viewer", "HTTP 403")
    _drove(manager, "volume", "create", "v1", "--size", "64M", "--replicas", "1",
           token=operator)
    _refused(_drove(manager, "settings", "set", "default_replicas", "2", check=False,
                    token=operator), "admin", "operator", "HTTP 403")
    assert manager.ok("GET", "/v1/settings")["default_replicas"] != 2
    assert manager.api("GET", "/v1/users", token=admin).status_code == 200

    # Revoked: the token stops working at once.
    _drove(manager, "user", "revoke", "u-viewer")
    _refused(_drove(manager, "volume", "list", check=False, token=viewer), "refused")
    newest = json.loads(_drove(manager, "user", "token", "u-operator", "--revoke-others",
                               "--json").stdout)
    assert newest["tokens_revoked"] == 1
    assert manager.api("GET", "/v1/volumes", token=operator).status_code == 401
    assert manager.api("GET", "/v1/volumes", token=newest["token"]).status_code == 200
    extra = manager.ok("POST", "/v1/users/u-operator/tokens", json={})
    _drove(manager, "user", "revoke", "u-operator", "--token-id", extra["id"])
    assert manager.api("GET", "/v1/volumes", token=extra["token"]).status_code == 401
    assert manager.api("GET", "/v1/volumes", token=newest["token"]).status_code == 200

    # A deleted user's token is dead; the last admin can be neither deleted nor demoted.
    manager.ok("DELETE", "/v1/users/u-admin")
    assert manager.api("GET", "/v1/volumes", token=admin).status_code == 401
    _refused(_drove(manager, "user", "delete", "admin", check=False), "last admin",
             "HTTP 409")
    _refused(_drove(manager, "user", "update", "admin", "--role", "viewer", check=False),
             "last admin", "HTTP 409")
    r = manager.api("DELETE", "/v1/users/admin/tokens")
    assert r.status_code == 409 and "--revoke-others" in r.json()["detail"]
    r = manager.api("POST", "/v1/users", json={"name": "Bad Name", "role": "viewer"})
    assert r.status_code == 422 and "invalid user name" in r.json()["detail"]
    assert manager.api("DELETE", "/v1/users/nobody").status_code == 404
    assert {u["name"] for u in manager.ok("GET", "/v1/users")} == {
        "admin", "u-operator", "u-viewer"}
    manager.ok("DELETE", "/v1/volumes/v1")  # the first admin's token still works


def test_session_login_logout_and_csrf(manager):
    admin = {"Authorization": f"Bearer {manager.token}"}
    made = manager.ok("POST", "/v1/users", json={"name": "op", "role": "operator"})
    viewer = manager.ok("POST", "/v1/users", json={"name": "ro", "role": "viewer"})
    _drove(manager, "user", "password", "op", "--stdin", stdin="correct horse battery\n")

    ui = httpx.Client(base_url=manager.url, timeout=120)
    r = ui.post("/v1/session", json={"user": "op", "password": "wrong horse battery"})
    assert r.status_code == 401 and "drove_session" not in r.headers.get("set-cookie", "")
    assert ui.post("/v1/session", json={"token": "nope"}).status_code == 401
    assert ui.post("/v1/session", json={"token": made["token"], "user": "op"}
                   ).status_code == 422
    r = ui.post("/v1/session", json={"user": "op", "password": "correct horse battery"})
    assert r.status_code == 200, r.text
    me = r.json()
    assert me["user"] == "op" and me["role"] == "operator" and me["csrf"]
    cookie = r.headers["set-cookie"].lower()
    for attr in ("drove_session=", "httponly", "samesite=strict", "path=/"):
        assert attr in cookie, cookie
    assert "secure" not in cookie  # plain HTTP here: a Secure cookie would never come back
    assert ui.get("/v1/session").json() == me
    assert ui.get("/v1/volumes").status_code == 200
    # Guessing a password: after 5 failures in a minute, even the right one waits.
    manager.ok("POST", "/v1/users", json={"name": "guessed", "role": "viewer",
                                          "password": "the right one"})
    guess = httpx.Client(base_url=manager.url, timeout=120)
    for attempt in range(5):
        r = guess.post("/v1/session", json={"user": "guessed", "password": f"try {attempt}"})
        assert r.status_code == 401
    r = guess.post("/v1/session", json={"user": "guessed", "password": "the right one"})
    assert r.status_code == 429 and "try again in" in r.json()["detail"]
    assert "drove_session" not in guess.cookies

    body = {"name": "v-ui", "size": "64M", "replicas": 1}
    r = ui.post("/v1/volumes", json=body)
    assert r.status_code == 403 and "X-CSRF-Token" in r.json()["detail"]
    r = ui.post("/v1/volumes", json=body, headers={"X-CSRF-Token": "not-it"})
    assert r.status_code == 403
    assert manager.api("GET", "/v1/volumes/v-ui").status_code == 404  # nothing was made
    r = ui.post("/v1/volumes", json=body, headers={"X-CSRF-Token": me["csrf"]})
    assert r.status_code == 201, r.text
    r = ui.patch("/v1/settings", json={"default_replicas": 2},
                 headers={"X-CSRF-Token": me["csrf"]})
    assert r.status_code == 403 and "admin" in r.text and "operator" in r.text
    # A Bearer token needs no CSRF header, and wins over a cookie.
    r = ui.delete("/v1/volumes/v-ui", headers=admin)
    assert r.status_code == 200, r.text

    # The session is in the store: it survives a restart of the manager.
    manager.stop()
    manager.start()
    ui = httpx.Client(base_url=manager.url, cookies=ui.cookies, timeout=120)
    assert ui.get("/v1/session").json() == me

    # Logout ends it; a token login works too; revoking the user's tokens ends sessions.
    assert ui.delete("/v1/session").status_code == 403  # without CSRF: refused
    r = ui.delete("/v1/session", headers={"X-CSRF-Token": me["csrf"]})
    assert r.status_code == 200 and r.json()["logged_out"] is True
    assert ui.get("/v1/session").status_code == 401
    stale = httpx.Client(base_url=manager.url, timeout=120)
    r = stale.post("/v1/session", json={"token": viewer["token"]})
    assert r.json()["role"] == "viewer"
    assert stale.get("/v1/volumes").status_code == 200
    manager.ok("DELETE", "/v1/users/ro/tokens")
    r = stale.get("/v1/volumes")
    assert r.status_code == 401 and "session ended" in r.json()["detail"]


def _app_routes(tmp_path) -> list[tuple[str, str]]:
    """(method, path) of every route the manager's app has, from the app itself."""
    tmp_path.mkdir()
    store = SqliteStore(tmp_path / "routes.db")
    try:
        app = build_app(ManagerApp(store, None, tmp_path), "t", cluster_token="c")
        return sorted((m, r.path) for r in app.routes if getattr(r, "dependant", None)
                      for m in r.methods)
    finally:
        store.close()


def test_every_route_for_every_role(manager, tmp_path):
    routes = _app_routes(tmp_path / "app")
    schema = manager.ok("GET", "/openapi.json")["paths"]
    assert {(m, p) for m, p in routes} == {(m.upper(), p) for p, ops in schema.items()
                                           for m in ops}
    tokens = {role: manager.ok("POST", "/v1/users", json={"name": f"walk-{role}",
                                                          "role": role})["token"]
              for role in USER_ROLES}
    cluster = (manager.data_dir / "cluster-token").read_text().strip()
    # One client per caller: a new one per request costs more than the request.
    clients = {who: httpx.Client(base_url=manager.url, timeout=120,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
               for who, token in [*tokens.items(), ("anonymous", ""), ("cluster", cluster)]}
    seen = 0
    for method, path in routes:
        level = needed(method, path)
        url = re.sub(r"\{(\w+)\}", lambda m: f"nosuch-{m[1]}", path)
        body = {} if method in ("POST", "PUT", "PATCH") else None
        for role in USER_ROLES:
            r = clients[role].request(method, url, json=body)
            assert r.status_code < 500, (role, method, path, r.text)
            if level == PUBLIC or (level != CLUSTER and allows(role, level)):
                assert r.status_code != 403, (role, method, path, r.text)
            else:
                assert r.status_code == 403, (role, method, path, r.status_code, r.text)
                if level != CLUSTER:
                    assert level in r.text and role in r.text, r.text
            seen += 1
        anonymous = clients["anonymous"].request(method, url, json=body)
        assert anonymous.status_code == (422 if level == PUBLIC and body is not None else
                                         200 if level == PUBLIC else 401), (method, path)
        if level not in (PUBLIC, CLUSTER):
            assert clients["cluster"].request(method, url, json=body).status_code == 403
    for client in clients.values():
        client.close()
    assert seen == 3 * len(routes) and len(routes) > 50
