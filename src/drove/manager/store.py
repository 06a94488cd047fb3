"""The manager's state: a narrow document store (SQLite here; etcd in drove.cluster).

Everything the manager keeps is a JSON document under ``(kind, key)`` with a
version number, plus an append-only event log.  That is all the rest of the
manager may use, so another store only has to offer the same few calls:
``get``, ``list``, ``put`` (optionally compare-and-set on the version),
``delete``, ``append_event``, ``events`` and ``subscribe`` (follow a kind's
changes: in-process for SQLite, an etcd watch for etcd).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

SCHEMA_VERSION = 1
"""Bump with a migration in ``_MIGRATIONS`` whenever the tables change."""

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE objects (
               kind TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL,
               doc TEXT NOT NULL, PRIMARY KEY (kind, key))""",
        """CREATE TABLE events (
               id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL,
               level TEXT NOT NULL, kind TEXT NOT NULL, volume TEXT,
               message TEXT NOT NULL)""",
        "CREATE INDEX events_volume ON events (volume, id)",
    ],
}


class StoreError(Exception):
    """The store cannot do what was asked."""


class ConflictError(StoreError):
    """A compare-and-set lost: the document changed since it was read."""


OnReset = Callable[[int | None, dict[str, dict[str, Any]]], None]
"""Told every document of a kind (by key) as of a revision (None: the store has none)."""
OnChange = Callable[[int | None, str, dict[str, Any] | None], None]
"""Told one change: (revision or None, key, the document or None when deleted)."""


class Store(Protocol):
    """What the manager needs from a state store."""

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        """The document, or None."""

    def list(self, kind: str) -> list[dict[str, Any]]:
        """Every document of ``kind``, ordered by key."""

    def put(self, kind: str, key: str, doc: dict[str, Any],
            expect_version: int | None = None) -> int:
        """Store ``doc``; with ``expect_version`` only if the stored version matches."""

    def delete(self, kind: str, key: str) -> bool:
        """Remove the document; False if there was none."""

    def append_event(self, level: str, kind: str, volume: str | None, message: str) -> int:
        """Append one event; its id."""

    def events(self, volume: str | None = None, limit: int = 100,
               after: int = 0) -> list[dict[str, Any]]:
        """The newest ``limit`` events (of ``volume``), oldest first."""

    def subscribe(self, kind: str, on_reset: OnReset, on_change: OnChange
                  ) -> Callable[[], None]:
        """Follow the documents of ``kind``: ``on_reset`` with all of them first (and again
        whenever changes may have been missed), then ``on_change`` for each change, in
        order; both are called from any thread and must be quick. The cancel function."""

    def close(self) -> None:
        """Release the store."""


class SqliteStore:
    """The store in one SQLite file (WAL; every put is its own durable transaction)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection shared by the manager's loop and its worker threads.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._lock = threading.Lock()
        self._listeners: dict[str, list[OnChange]] = {}  # kind: told each put and delete
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def _migrate(self) -> None:
        (current,) = self._db.execute("PRAGMA user_version").fetchone()
        if current > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema {current}, newer than this drove "
                             f"({SCHEMA_VERSION}): upgrade drove")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self._tx() as db:
                for sql in _MIGRATIONS[version]:
                    db.execute(sql)
                db.execute(f"PRAGMA user_version={version}")

    @contextmanager
    def _tx(self, kind: str | None = None, key: str = "",
            doc: dict[str, Any] | None = None) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            # Under the lock: listeners hear the changes in the order they were committed.
            for listener in self._listeners.get(kind or "", ()):
                listener(None, key, doc)

    def subscribe(self, kind: str, on_reset: OnReset, on_change: OnChange
                  ) -> Callable[[], None]:
        """Follow the documents of ``kind`` in this process (see :class:`Store`)."""
        with self._lock:
            rows = self._db.execute("SELECT key, doc, version FROM objects WHERE kind=?",
                                    (kind,)).fetchall()
            on_reset(None, {key: _doc((doc, version)) for key, doc, version in rows})
            self._listeners.setdefault(kind, []).append(on_change)

        def cancel() -> None:
            with self._lock:
                listeners = self._listeners.get(kind, [])
                if on_change in listeners:
                    listeners.remove(on_change)
        return cancel

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        """The document, or None."""
        with self._lock:
            row = self._db.execute("SELECT doc, version FROM objects WHERE kind=? AND key=?",
                                   (kind, key)).fetchone()
        return _doc(row) if row else None

    def list(self, kind: str) -> list[dict[str, Any]]:
        """Every document of ``kind``, ordered by key."""
        with self._lock:
            rows = self._db.execute("SELECT doc, version FROM objects WHERE kind=? ORDER BY key",
                                    (kind,)).fetchall()
        return [_doc(r) for r in rows]

    def put(self, kind: str, key: str, doc: dict[str, Any],
            expect_version: int | None = None) -> int:
        """Store ``doc``; with ``expect_version`` (0: must not exist) only if it still matches."""
        body = {k: v for k, v in doc.items() if k != "_version"}
        text = json.dumps(body, sort_keys=True)
        with self._tx(kind, key, body) as db:  # listeners are told ``body``
            row = db.execute("SELECT version FROM objects WHERE kind=? AND key=?",
                             (kind, key)).fetchone()
            have = row[0] if row else 0
            if expect_version is not None and have != expect_version:
                raise ConflictError(f"{kind} {key!r} changed (version {have}, "
                                    f"expected {expect_version})")
            db.execute("INSERT OR REPLACE INTO objects (kind, key, version, doc) "
                       "VALUES (?, ?, ?, ?)", (kind, key, have + 1, text))
            body["_version"] = have + 1
        doc["_version"] = have + 1
        return have + 1

    def delete(self, kind: str, key: str) -> bool:
        """Remove the document; False if there was none."""
        with self._tx(kind, key) as db:
            cur = db.execute("DELETE FROM objects WHERE kind=? AND key=?", (kind, key))
            return cur.rowcount > 0

    def append_event(self, level: str, kind: str, volume: str | None, message: str) -> int:
        """Append one event; its id."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO events (time, level, kind, volume, message) "
                             "VALUES (?, ?, ?, ?, ?)", (time.time(), level, kind, volume, message))
            return int(cur.lastrowid or 0)

    def events(self, volume: str | None = None, limit: int = 100,
               after: int = 0) -> list[dict[str, Any]]:
        """The newest ``limit`` events (of ``volume``) with id > ``after``, oldest first."""
        sql = "SELECT id, time, level, kind, volume, message FROM events WHERE id > ?"
        args: list[Any] = [after]
        if volume is not None:
            sql += " AND volume = ?"
            args.append(volume)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(max(0, limit))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [{"id": i, "time": _iso(t), "level": lv, "kind": k, "volume": v, "message": m}
                for i, t, lv, k, v, m in reversed(rows)]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


def _doc(row: tuple[str, int]) -> dict[str, Any]:
    doc = json.loads(row[0])
    doc["_version"] = row[1]
    return doc


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def now_iso() -> str:
    """The current time as the store writes it (UTC, ISO 8601)."""
    return _iso(time.time())
