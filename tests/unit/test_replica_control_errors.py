"""The replica's control API answers 4xx only for what the request got wrong; bugs are 500."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from drove.replica import Replica
from drove.replica.control import ReplicaControl, build_app
from drove.replica.exports import FlushGate
from drove.replica.fence import Fence
from drove.web import App

BS = 4096


@pytest.fixture
def app(tmp_path: Path):
    replica = Replica.create(tmp_path / "r", 64 * BS)
    control = ReplicaControl(replica, FlushGate(), Fence(replica))
    yield build_app(control), replica
    replica.close()


def call(app: App, method: str, path: str, body: object = None,
         headers: dict[str, str] | None = None) -> tuple[int, object]:
    raw = b"" if body is None else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    resp = asyncio.run(app.handle(method, path, hdrs, raw))
    try:
        return resp.status, json.loads(resp.body)
    except ValueError:
        return resp.status, resp.body.decode()


def test_caller_mistakes_are_4xx(app) -> None:
    a, _ = app
    assert call(a, "DELETE", "/v1/snapshots/nope")[0] == 404
    assert call(a, "GET", "/v1/layers/nope.img/checksum")[0] == 404
    assert call(a, "POST", "/v1/snapshots", {"name": "bad name!"})[0] == 400
    assert call(a, "POST", "/v1/expand", {"size": 4097})[0] == 400
    assert call(a, "POST", "/v1/snapshots", {"name": "s"})[0] == 201
    assert call(a, "POST", "/v1/snapshots", {"name": "s"})[0] == 409
    assert call(a, "PUT", "/v1/engine-state", {"generation": 4})[0] == 200
    status, answer = call(a, "PUT", "/v1/engine-state", {"generation": 3})
    assert status == 409 and answer["error"] == "StaleGenerationError"


def test_epoch_rules(app) -> None:
    a, _ = app
    assert call(a, "POST", "/v1/epoch", {"epoch": 2})[0] == 200
    assert call(a, "POST", "/v1/epoch", {"epoch": 2})[0] == 409  # a claim must be newer
    status, answer = call(a, "POST", "/v1/snapshots", {"name": "s"}, {"drove-epoch": "1"})
    assert status == 409 and answer["epoch"] == 2 and "stale" in answer["detail"]
    assert call(a, "POST", "/v1/snapshots", {"name": "s"})[0] == 409  # mutating, no epoch
    assert call(a, "GET", "/v1/info")[0] == 200  # reading needs none
    assert call(a, "GET", "/v1/info", headers={"drove-epoch": "1"})[0] == 409
    assert call(a, "POST", "/v1/snapshots", {"name": "s"}, {"drove-epoch": "zero"})[0] == 400
    assert call(a, "POST", "/v1/snapshots", {"name": "s"}, {"drove-epoch": "2"})[0] == 201
    # A higher epoch in a call takes the replica over as a claim would.
    assert call(a, "GET", "/v1/info", headers={"drove-epoch": "3"})[1]["epoch"] == 3


def test_a_bug_is_a_500_logged_with_its_traceback(app, monkeypatch, caplog) -> None:
    a, replica = app

    def broken() -> None:
        raise KeyError("volume-head-001.img")  # a LookupError from a bug, not a 404

    monkeypatch.setattr(replica, "layers", broken)
    with caplog.at_level(logging.ERROR):
        status, _ = call(a, "GET", "/v1/layers")
    assert status == 500
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)
