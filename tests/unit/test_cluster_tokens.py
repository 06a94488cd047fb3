"""The cluster's two tokens agreed through a store, and what a follower serves itself."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from drove.cluster.follower import served_here
from drove.cluster.tokens import cluster_tokens
from drove.manager.store import SqliteStore


@pytest.fixture
def store(tmp_path: Path):
    st = SqliteStore(tmp_path / "shared.db")
    yield st
    st.close()


def test_managers_starting_together_agree_on_two_distinct_tokens(store, tmp_path: Path) -> None:
    dirs = [tmp_path / f"m{i}" for i in range(6)]
    got: list[tuple[str, str]] = []
    barrier = threading.Barrier(len(dirs))

    def start(d: Path) -> None:
        d.mkdir()
        barrier.wait()
        got.append(cluster_tokens(store, d))

    threads = [threading.Thread(target=start, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 6 and len(set(got)) == 1
    api, cluster = got[0]
    assert api != cluster and len(api) >= 32 and len(cluster) >= 32
    for d in dirs:
        assert (d / "token").read_text().strip() == api
        assert (d / "cluster-token").read_text().strip() == cluster
        for name in ("token", "cluster-token"):
            assert stat.S_IMODE((d / name).stat().st_mode) == 0o600


def test_the_first_manager_keeps_its_api_token_but_never_shares_it_with_agents(
        store, tmp_path: Path) -> None:
    first = tmp_path / "old"
    first.mkdir()
    (first / "token").write_text("the-token-users-already-have\n")
    (first / "cluster-token").write_text("the-token-users-already-have\n")  # a careless copy
    api, cluster = cluster_tokens(store, first)
    assert api == "the-token-users-already-have"
    assert cluster != api and (first / "cluster-token").read_text().strip() == cluster
    # A later manager's own old token loses to the one in the store.
    later = tmp_path / "later"
    later.mkdir()
    (later / "token").write_text("stale\n")
    assert cluster_tokens(store, later) == (api, cluster)
    assert (later / "token").read_text().strip() == api


@pytest.mark.parametrize("method, path, here", [
    ("GET", "/v1/health", True), ("GET", "/v1/cluster", True), ("GET", "/v1/nodes", True),
    ("GET", "/v1/disks/d1", True), ("GET", "/v1/events", True), ("GET", "/v1/settings", True),
    ("GET", "/v1/backup-target", True), ("GET", "/openapi.json", True),
    # The web UI's page and assets ship with every manager.
    ("GET", "/", True), ("GET", "/ui/js/app.js", True), ("HEAD", "/ui/app.css", True),
    ("POST", "/v1/cluster/heartbeat", True),
    # Agents' long-polls: any manager follows the store's changes.
    ("GET", "/v1/agents/n2/changes", True), ("POST", "/v1/agents/n2/changes", True),
    # The leader's live state: what engines reported, running tasks and jobs, metrics.
    ("GET", "/v1/volumes", False), ("GET", "/v1/volumes/v", False),
    ("GET", "/v1/tasks", False), ("GET", "/v1/jobs", False), ("GET", "/metrics", False),
    ("GET", "/v1/backups", False),
    # Every write.
    ("POST", "/v1/volumes", False), ("PATCH", "/v1/settings", False),
    ("DELETE", "/v1/disks/d1", False), ("POST", "/v1/nodes/n/cordon", False),
    ("PUT", "/v1/backup-target", False),
    # A prefix is a path segment, not a string prefix.
    ("GET", "/v1/nodesx", False), ("GET", "/v1/healthz", False), ("GET", "/uix", False),
])
def test_what_a_follower_serves_itself(method: str, path: str, here: bool) -> None:
    assert served_here(method, path) is here
