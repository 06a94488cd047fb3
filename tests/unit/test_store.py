"""The manager's SQLite store: documents with versions, compare-and-set, events, schema."""

from __future__ import annotations

import sqlite3

import pytest

from drove.manager.store import SCHEMA_VERSION, ConflictError, SqliteStore, StoreError


def test_documents_versions_and_compare_and_set(tmp_path):
    s = SqliteStore(tmp_path / "db")
    doc = {"name": "v", "size": 1}
    assert s.put("volumes", "v", doc, expect_version=0) == 1
    with pytest.raises(ConflictError):
        s.put("volumes", "v", {"name": "v"}, expect_version=0)
    got = s.get("volumes", "v")
    assert got == {"name": "v", "size": 1, "_version": 1}
    got["size"] = 2
    assert s.put("volumes", "v", got, expect_version=1) == 2
    with pytest.raises(ConflictError):
        s.put("volumes", "v", got, expect_version=1)
    s.put("volumes", "a", {"name": "a"})
    assert [d["name"] for d in s.list("volumes")] == ["a", "v"]
    assert s.delete("volumes", "a") and not s.delete("volumes", "a")
    assert s.get("volumes", "a") is None
    s.close()
    # Durable across reopen; the WAL journal is on.
    s2 = SqliteStore(tmp_path / "db")
    assert s2.get("volumes", "v")["size"] == 2
    assert s2._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s2.close()


def test_events_newest_window_oldest_first(tmp_path):
    s = SqliteStore(tmp_path / "db")
    for i in range(10):
        s.append_event("info", "k", "v" if i % 2 else None, f"m{i}")
    ev = s.events(limit=3)
    assert [e["message"] for e in ev] == ["m7", "m8", "m9"]
    assert [e["message"] for e in s.events("v", limit=2)] == ["m7", "m9"]
    assert [e["message"] for e in s.events(after=ev[1]["id"])] == ["m9"]
    assert ev[0]["time"].endswith("Z")


def test_schema_version_newer_than_code_is_refused(tmp_path):
    SqliteStore(tmp_path / "db").close()
    db = sqlite3.connect(tmp_path / "db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="upgrade drove"):
        SqliteStore(tmp_path / "db")
