"""The web UI's login sessions, kept in the manager's store (so they outlive a restart
and every manager of a cluster knows them).

A session is named by a random id the browser holds in an HttpOnly cookie; the store
keeps only its SHA-256, the user's name, a CSRF token (sent back in ``X-CSRF-Token`` on
every change, which another site's page cannot read nor set) and when it was last
used. It ends after :data:`IDLE` seconds unused, at logout, and when the user's tokens
are revoked or the user is deleted.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import Any

from drove.manager.credentials import token_hash
from drove.manager.store import ConflictError, Store

KIND = "sessions"
"""The store's kind of session documents (keyed by the SHA-256 of the id)."""
COOKIE = "drove_session"
"""The cookie holding the session id."""
CSRF_HEADER = "X-CSRF-Token"
"""The header a change made with the cookie carries: the session's csrf value."""
IDLE = 12 * 3600.0
"""Seconds a session lives unused."""
TOUCH_EVERY = 60.0
"""Seconds between two writes of a session's last use (not a store write per request)."""


class Sessions:
    """Login sessions in the store."""

    def __init__(self, store: Store, idle: float = IDLE) -> None:
        self._store = store
        self.idle = idle

    def open(self, user: str) -> tuple[str, str]:
        """A new session of ``user``: (its id, for the cookie; its CSRF token)."""
        self._sweep()
        sid, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(24), time.time()
        key = token_hash(sid)
        self._store.put(KIND, key, {"key": key, "user": user, "csrf": csrf, "created": now,
                                    "seen": now}, expect_version=0)
        return sid, csrf

    def find(self, sid: str) -> dict[str, Any] | None:
        """The live session ``sid`` ({key, user, csrf, created, seen}), or None."""
        key = token_hash(sid)
        doc = self._store.get(KIND, key)
        if doc is None:
            return None
        now = time.time()
        if now - float(doc.get("seen", 0)) > self.idle:
            self._store.delete(KIND, key)
            return None
        if now - float(doc.get("seen", 0)) > TOUCH_EVERY:
            # Compare-and-set: a logout or a revoke in between is never undone.
            with contextlib.suppress(ConflictError):
                self._store.put(KIND, key, {**doc, "seen": now},
                                expect_version=doc["_version"])
        return doc

    def close(self, sid: str) -> bool:
        """End session ``sid``; False if there was none."""
        return self._store.delete(KIND, token_hash(sid))

    def of(self, user: str) -> list[dict[str, Any]]:
        """The live sessions of ``user``."""
        now = time.time()
        return [d for d in self._store.list(KIND)
                if d.get("user") == user and now - float(d.get("seen", 0)) <= self.idle]

    def revoke(self, user: str) -> int:
        """End every session of ``user``; how many there were."""
        keys = [d["key"] for d in self._store.list(KIND) if d.get("user") == user]
        return sum(self._store.delete(KIND, key) for key in keys)

    def _sweep(self) -> None:
        """Forget the sessions that expired (so the store does not grow with logins)."""
        now = time.time()
        for d in self._store.list(KIND):
            if now - float(d.get("seen", 0)) > self.idle:
                self._store.delete(KIND, d["key"])
