"""Users and sessions across two managers on one real etcd: the store holds them, so a
token or a session works on either, and a follower forwards a login and its cookie."""

from __future__ import annotations

from pathlib import Path

import httpx
from test_managers import ClusterManager, cleanup, leader_of  # noqa: F401 (cleanup: a fixture)

from backuptools import wait_for
from etcd import EtcdServer


def test_users_and_sessions_are_the_clusters(tmp_path: Path, etcd_server: EtcdServer,
                                             cleanup: None) -> None:  # noqa: F811
    managers = [ClusterManager(tmp_path, name, etcd_server.url) for name in ("m1", "m2")]
    for m in managers:
        m.launch()
    for m in managers:
        m.ready()
    wait_for(lambda: leader_of(managers[0]) is not None
             and leader_of(managers[1]) == leader_of(managers[0]), 30, "one leader")
    leader = next(m for m in managers if m.url == leader_of(m))
    follower = next(m for m in managers if m is not leader)
    # Both managers started on an empty store: one made the shared token the first admin's.
    for m in managers:
        assert m.ok("GET", "/v1/session") == {"user": "admin", "role": "admin", "csrf": None}

    # Made through the follower (forwarded to the leader), known to both at once.
    op = follower.ok("POST", "/v1/users", json={"name": "op", "role": "operator",
                                                 "password": "correct horse battery"})
    for m in managers:
        for path in ("/v1/nodes", "/v1/volumes"):  # served by the follower / the leader
            assert m.api("GET", path, token=op["token"]).status_code == 200

    # A login through the follower: its cookie and CSRF header pass through both ways.
    ui = httpx.Client(timeout=60)
    r = ui.post(follower.url + "/v1/session",
                json={"user": "op", "password": "correct horse battery"})
    assert r.status_code == 200, r.text
    csrf = r.json()["csrf"]
    for m in managers:
        assert ui.get(m.url + "/v1/session").json()["user"] == "op"
        assert ui.get(m.url + "/v1/nodes").status_code == 200
    job = {"kind": "snapshot", "cron": "0 3 * * *", "name": "nightly", "selector": {"a": "b"}}
    assert ui.post(follower.url + "/v1/jobs", json=job).status_code == 403  # no CSRF header
    r = ui.post(follower.url + "/v1/jobs", json=job, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    r = ui.patch(follower.url + "/v1/settings", json={}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 403 and "admin" in r.text and "operator" in r.text

    # Revoked on the leader: refused by the follower at once, session included.
    leader.ok("DELETE", "/v1/users/op/tokens")
    assert follower.api("GET", "/v1/nodes", token=op["token"]).status_code == 401
    assert ui.get(follower.url + "/v1/nodes").status_code == 401
    ui.close()
