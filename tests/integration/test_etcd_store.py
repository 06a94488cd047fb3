"""The Store contract, run against SQLite and a real etcd; from_url; etcd down."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drove.cluster.etcdstore import EtcdStore, from_url, parse_etcd_url
from drove.manager.store import ConflictError, SqliteStore, Store, StoreError
from etcd import EtcdServer, free_ports


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same tests against each store."""
    if request.param == "sqlite":
        st: Store = SqliteStore(tmp_path / "drove.db")
    else:
        server = request.getfixturevalue("etcd_server")
        st = EtcdStore(server.endpoints, prefix="/test")
    try:
        yield st
    finally:
        st.close()


def test_put_get_list_delete(store: Store) -> None:
    assert store.get("volume", "a") is None
    doc: dict[str, Any] = {"size": 1}
    assert store.put("volume", "b", doc) == 1
    assert doc["_version"] == 1
    assert store.put("volume", "a", {"size": 2, "_version": 99}) == 1  # _version not stored
    assert store.put("volume", "b", {"size": 3}) == 2
    store.put("node", "a", {"n": 1})
    assert store.get("volume", "b") == {"size": 3, "_version": 2}
    assert [d["size"] for d in store.list("volume")] == [2, 3]  # ordered by key
    assert store.list("disk") == []
    assert store.delete("volume", "a") is True
    assert store.delete("volume", "a") is False
    assert store.get("volume", "a") is None
    assert store.get("node", "a") == {"n": 1, "_version": 1}
    # Recreated after a delete: the version starts again at 1, in both stores.
    assert store.put("volume", "a", {}, expect_version=0) == 1


def test_compare_and_set(store: Store) -> None:
    assert store.put("volume", "a", {"v": 1}, expect_version=0) == 1
    with pytest.raises(ConflictError, match="version 1, expected 0"):
        store.put("volume", "a", {"v": 9}, expect_version=0)
    assert store.put("volume", "a", {"v": 2}, expect_version=1) == 2
    with pytest.raises(ConflictError, match="version 2, expected 1"):
        store.put("volume", "a", {"v": 9}, expect_version=1)
    with pytest.raises(ConflictError, match="version 0, expected 3"):
        store.put("volume", "none", {"v": 9}, expect_version=3)
    assert store.get("volume", "a") == {"v": 2, "_version": 2}  # losers changed nothing
    assert store.get("volume", "none") is None


def test_concurrent_cas_exactly_one_wins(store: Store) -> None:
    store.put("volume", "a", {"owner": None})
    wins: list[int] = []
    losses: list[int] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        try:
            store.put("volume", "a", {"owner": i}, expect_version=1)
            wins.append(i)
        except ConflictError:
            losses.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1 and len(losses) == 7
    assert store.get("volume", "a") == {"owner": wins[0], "_version": 2}


def test_events_order_limit_after_volume(store: Store) -> None:
    ids = [store.append_event("info", "made", "a" if i % 2 else None, f"m{i}")
           for i in range(6)]
    store.append_event("warning", "other", "a/b", "not a's")
    assert ids == sorted(ids) and len(set(ids)) == 6
    all_ = store.events(limit=100)
    assert [e["message"] for e in all_] == ["m0", "m1", "m2", "m3", "m4", "m5", "not a's"]
    assert set(all_[0]) == {"id", "time", "level", "kind", "volume", "message"}
    assert all_[0]["time"].endswith("Z") and len(all_[0]["time"]) == len("2026-01-01T00:00:00.000Z")
    assert [e["message"] for e in store.events(limit=2)] == ["m5", "not a's"]  # newest, in order
    assert [e["message"] for e in store.events("a")] == ["m1", "m3", "m5"]
    assert [e["message"] for e in store.events("a", limit=1)] == ["m5"]
    assert [e["message"] for e in store.events(after=ids[3])] == ["m4", "m5", "not a's"]
    assert [e["message"] for e in store.events("a", after=ids[3])] == ["m5"]
    assert store.events(limit=0) == []
    assert store.events("nobody") == []
    assert store.events("a")[0]["id"] == ids[1]


def test_etcd_trims_old_events(etcd_server: EtcdServer) -> None:
    store = EtcdStore(etcd_server.endpoints)
    for i in range(12):
        store.append_event("info", "k", "v" if i % 3 == 0 else None, f"m{i}")
    assert store.trim_events(keep=5) == 7
    assert [e["message"] for e in store.events()] == [f"m{i}" for i in range(7, 12)]
    assert [e["message"] for e in store.events("v")] == ["m9"]  # its volume copy went too


def test_etcd_several_endpoints_skip_a_dead_one(etcd_server: EtcdServer) -> None:
    (dead,) = free_ports(1)
    store = EtcdStore([("127.0.0.1", dead), *etcd_server.endpoints])
    store.put("volume", "a", {"x": 1})
    assert store.get("volume", "a") == {"x": 1, "_version": 1}


def test_etcd_down_is_a_clear_store_error(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "etcd").start()
    store = EtcdStore(server.endpoints)
    store.put("volume", "a", {})
    server.stop()
    with pytest.raises(StoreError, match=f"etcd unreachable at 127.0.0.1:{server.client_port}"):
        store.get("volume", "a")
    (p1, p2) = free_ports(2)
    with pytest.raises(StoreError, match=f"127.0.0.1:{p1},127.0.0.1:{p2}"):
        EtcdStore([("127.0.0.1", p1), ("127.0.0.1", p2)])


def test_etcd_watch_sees_puts_and_deletes(etcd_server: EtcdServer) -> None:
    store = EtcdStore(etcd_server.endpoints)
    changes, cancel = store.watch("volume")
    try:
        store.put("node", "n", {})  # another kind: not seen
        store.put("volume", "a", {"x": 1})
        store.delete("volume", "a")
        assert next(changes) == ("put", "a", {"x": 1, "_version": 1})
        assert next(changes) == ("delete", "a", None)
    finally:
        cancel()


@pytest.mark.parametrize("url, message", [
    ("etcd://", "expected etcd://HOST:PORT"),
    ("http://h:2379", "expected etcd://HOST:PORT"),
    ("etcd://h:notaport", "'h:notaport' is not HOST:PORT"),
    ("etcd://h:2379,:2379", "':2379' is not HOST:PORT"),
    ("etcd://h:99999", "is not HOST:PORT"),
    ("etcd://h:2379?x=1", "no query"),
    ("sqlite://", None),
    ("mysql://x", "expected etcd://"),
])
def test_bad_urls(url: str, message: str | None, tmp_path: Path) -> None:
    if message is None:  # "sqlite://" alone is the default store
        st = from_url(url, tmp_path)
        assert isinstance(st, SqliteStore) and st.path == tmp_path / "drove.db"
        st.close()
        return
    with pytest.raises(StoreError, match=message):
        from_url(url, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_parse_url() -> None:
    assert parse_etcd_url("etcd://h1:2379,h2:12379/drove/prod") == (
        [("h1", 2379), ("h2", 12379)], "/drove/prod")
    assert parse_etcd_url("etcd://h1") == ([("h1", 2379)], "/drove")


def test_serve_keeps_its_state_in_etcd(tmp_path: Path, etcd_server: EtcdServer,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from managertools import ManagerProc

    # ManagerProc starts `drove serve` with this environment: --store's envvar.
    monkeypatch.setenv("DROVE_STORE", etcd_server.url + "/serve-test")
    m = ManagerProc(tmp_path / "data", tmp_path / "manager.log", root=tmp_path)
    try:
        m.start()
        m.cli("volume", "create", "v1", "--size", "16M", "--replicas", "1")
        assert m.volume("v1")["name"] == "v1"
        m.stop()
        assert not (m.data_dir / "drove.db").exists()  # nothing went to SQLite
        seen = EtcdStore(etcd_server.endpoints, prefix="/serve-test")
        assert [v["name"] for v in seen.list("volumes")] == ["v1"]
        assert any(e["volume"] == "v1" for e in seen.events())
        m.start()
        assert m.cli_json("volume", "get", "v1")["name"] == "v1"
    finally:
        m.kill_everything()


def test_serve_refuses_a_bad_store(tmp_path: Path) -> None:
    (dead,) = free_ports(1)
    for url, message in [("etcd://h:x", "'h:x' is not HOST:PORT"),
                         (f"etcd://127.0.0.1:{dead}", f"etcd unreachable at 127.0.0.1:{dead}")]:
        r = subprocess.run([sys.executable, "-m", "drove", "serve", "--data-dir",
                            str(tmp_path / "data"), "--listen", "127.0.0.1:0", "--store", url],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and message in r.stderr + r.stdout, r.stderr
        assert not (tmp_path / "data" / "drove.db").exists()
