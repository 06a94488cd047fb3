"""The feed of volume changes agents' long-polls wait on, on SQLite and on a real etcd.

What the store tells (``Store.subscribe``: in-process on SQLite, an etcd watch from a
revision on etcd) must reach the feed in order, wake only the waiters it concerns, and
never be missed: across an etcd restart the watch resumes from where it was, and after a
compaction it reads everything again (a reset: a revision from before is unknown).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from backuptools import wait_for
from drove.cluster import etcdstore
from drove.cluster.etcdstore import EtcdStore
from drove.manager.changes import ChangeFeed
from drove.manager.store import SqliteStore, Store
from etcd import EtcdServer


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same tests against each store."""
    if request.param == "sqlite":
        st: Store = SqliteStore(tmp_path / "drove.db")
    else:
        server = request.getfixturevalue("etcd_server")
        st = EtcdStore(server.endpoints, prefix="/feed")
    try:
        yield st
    finally:
        st.close()


def test_the_feed_follows_the_volumes_and_wakes_only_the_waiters_concerned(store: Store):
    store.put("volumes", "a", {"node": "n1"})
    store.put("volumes", "b", {"node": "n2"})
    feed = ChangeFeed(store)
    feed.start()
    assert feed.wait_ready(10)
    r0 = feed.revision
    assert feed.known(r0) and not feed.known(r0 - 1) and not feed.known(r0 + 1)
    assert feed.touched(r0, "n1", frozenset({"a"})) == set()

    async def scenario() -> None:
        with feed.waiter("n1", frozenset()) as n1, feed.waiter("n2", frozenset({"c"})) as n2:
            # Another node's volume: n1's waiter sleeps on (its deadline passes).
            await asyncio.to_thread(store.put, "volumes", "b", {"node": "n2", "epoch": 2})
            assert await n2.wait(10)
            assert not await n1.wait(0.3)
            # Volume a moves off n1: that concerns n1 (its engine there must stop).
            await asyncio.to_thread(store.put, "volumes", "a", {"node": "n3"})
            assert await n1.wait(10)
            # A volume named by the poll concerns it wherever it is; so does a deletion.
            await asyncio.to_thread(store.put, "volumes", "c", {"node": "n9"})
            assert await n2.wait(10)
            await asyncio.to_thread(store.delete, "volumes", "b")
            assert await n2.wait(10)
            # Other kinds are not followed.
            await asyncio.to_thread(store.put, "nodes", "n1", {"name": "n1"})
            assert not await n1.wait(0.3)

    asyncio.run(scenario())
    r1 = feed.revision
    assert r1 > r0 and feed.known(r1) and feed.known(r0)
    assert feed.touched(r0, "n1", frozenset()) == {"a"}
    assert feed.touched(r0, "n2", frozenset()) == {"b"}
    assert feed.touched(r0, "n7", frozenset({"c"})) == {"c"}
    assert feed.touched(r1, "n1", frozenset({"a", "b", "c"})) == set()
    feed.close()


def test_the_etcd_watch_resumes_after_a_restart_and_reads_all_again_after_a_compaction(
        etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch):
    # The stream is made again after 1 s of silence, not 10: the compaction is met sooner.
    monkeypatch.setattr(etcdstore, "WATCH_IDLE", 1.0)
    store = EtcdStore(etcd_server.endpoints, prefix="/feed")
    heard: list[tuple[str, int | None, str]] = []
    cancel = store.subscribe(
        "volumes", lambda rev, docs: heard.append(("reset", rev, ",".join(sorted(docs)))),
        lambda rev, key, doc: heard.append(("put" if doc else "delete", rev, key)))
    try:
        wait_for(lambda: heard, 10, "the first snapshot")
        store.put("volumes", "a", {"node": "n1"})
        wait_for(lambda: ("put", heard[-1][1], "a") == heard[-1], 10, "a's put")

        # etcd dies and comes back: what was written meanwhile is told, once, in order.
        etcd_server.stop()
        etcd_server.start()
        store.put("volumes", "b", {"node": "n2"})
        store.delete("volumes", "a")
        wait_for(lambda: heard[-1][0] == "delete", 30, "a's deletion after the restart")
        kinds = [(k, key) for k, _, key in heard]
        assert kinds == [("reset", ""), ("put", "a"), ("put", "b"), ("delete", "a")], heard
        revisions = [rev for _, rev, _ in heard]
        assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)

        # The history the watch would resume from is compacted away (the stream is made
        # again after each second of silence): it reads every document again (a reset)
        # rather than miss a change, and goes on from there.
        seen = len(heard)
        store.put("nodes", "x", {})  # later revisions: the one to compact up to is after
        store.put("nodes", "x", {})  # the one the watch resumes from
        revision = int(store.etcd.post("kv/range", {"key": base64.b64encode(b"/").decode()})
                       ["header"]["revision"])
        store.etcd.post("kv/compaction", {"revision": revision})
        wait_for(lambda: any(h[0] == "reset" for h in heard[seen:]), 15, "a reset")
        (reset,) = [h for h in heard[seen:] if h[0] == "reset"]
        assert reset[1] is not None and reset[1] >= revision and reset[2] == "b", reset
        store.put("volumes", "c", {"node": "n3"})
        wait_for(lambda: heard[-1][::2] == ("put", "c"), 10, "c's put after the reset")
    finally:
        cancel()
        store.close()
