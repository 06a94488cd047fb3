"""The manager's users: a name, a role, API tokens and an optional password, in the store.

Tokens and passwords are stored hashed only (:mod:`drove.manager.credentials`): a token
is shown once, when it is made. Each token is its own document, keyed by its hash, so
checking a request's token is one store read. The last admin can be neither deleted,
demoted nor stripped of every token: someone must always be able to manage the rest.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from drove.manager.credentials import (
    check_password_text,
    hash_password,
    new_token,
    token_hash,
    verify_password,
)
from drove.manager.errors import ApiError, validate_name
from drove.manager.events import EventFn
from drove.manager.roles import ADMIN, USER_ROLES
from drove.manager.sessions import Sessions
from drove.manager.store import ConflictError, Store

USERS = "users"
"""The store's kind of user documents (keyed by name)."""
TOKENS = "tokens"
"""The store's kind of token documents (keyed by the token's SHA-256)."""
FIRST_ADMIN = "admin"
"""The user the token of DATA_DIR/token belongs to, made at the first start."""
TOUCH_EVERY = 60.0
"""Seconds between two writes of a token's last use (not a store write per request)."""


def iso(t: float | None) -> str | None:
    """A time as the API shows it (UTC, ISO 8601), None for None."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Users:
    """Users, their tokens and passwords; every change is recorded as an event."""

    def __init__(self, store: Store, sessions: Sessions, event: EventFn) -> None:
        self._store = store
        self.sessions = sessions
        self._event = event
        # Changes that count admins are serialised, so two demotions at once cannot both
        # see another admin left. (In a cluster, every change goes to the leader.)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ start

    def bootstrap(self, token: str) -> bool:
        """Make ``token`` (DATA_DIR/token) the first admin's when there is no user yet (a
        new data directory, or one from before users existed); whether it did."""
        if self._store.list(USERS):
            return False
        # Managers of a cluster starting together: the first put wins, the others' fail.
        with contextlib.suppress(ConflictError):
            self._store.put(USERS, FIRST_ADMIN, _user(FIRST_ADMIN, ADMIN), expect_version=0)
        with contextlib.suppress(ConflictError):
            self._put_token(FIRST_ADMIN, token, note="DATA_DIR/token")
        self._event("user-created", f"user {FIRST_ADMIN} (admin) holds the token of "
                                    "DATA_DIR/token")
        return True

    # ------------------------------------------------------------ checking credentials

    def by_token(self, token: str) -> dict[str, Any] | None:
        """The user holding ``token``, or None (unknown or revoked)."""
        doc = self._store.get(TOKENS, token_hash(token))
        if doc is None:
            return None
        user = self._store.get(USERS, str(doc.get("user")))
        if user is None:
            return None
        if time.time() - float(doc.get("used") or 0) > TOUCH_EVERY:
            # Compare-and-set: a revoke meanwhile is never undone by this write.
            with contextlib.suppress(ConflictError):
                self._store.put(TOKENS, doc["key"], {**doc, "used": time.time()},
                                expect_version=doc["_version"])
        return user

    def by_password(self, name: str, password: str) -> dict[str, Any] | None:
        """The user ``name`` if ``password`` is its password, else None (slow: scrypt)."""
        user = self._store.get(USERS, name) if isinstance(name, str) else None
        if not verify_password(password, (user or {}).get("password")):
            return None
        return user

    def get_doc(self, name: str) -> dict[str, Any] | None:
        """The stored user ``name`` (for the role of a session's user), or None."""
        return self._store.get(USERS, name)

    # ------------------------------------------------------------ reading

    def list(self) -> list[dict[str, Any]]:
        """Every user as the API shows it."""
        tokens = self._store.list(TOKENS)
        return [self._view(u, tokens) for u in self._store.list(USERS)]

    def get(self, name: str) -> dict[str, Any]:
        """One user as the API shows it (404 if none)."""
        return self._view(self._existing(name), self._store.list(TOKENS))

    # ------------------------------------------------------------ changes

    def create(self, name: str, role: str, by: str,
               password: str | None = None) -> tuple[dict[str, Any], str]:
        """A new user and its first token: (its view, the token, shown this once only)."""
        validate_name("user", name)
        _check_role(role)
        doc = _user(name, role)
        if password is not None:
            doc["password"] = _password(password)
        try:
            self._store.put(USERS, name, doc, expect_version=0)
        except ConflictError as exc:
            raise ApiError(409, f"user {name!r} exists: `drove user list` shows the users; "
                                f"`drove user token {name}` makes it a new token") from exc
        token = self._put_token(name)
        self._event("user-created", f"user {name} ({role}) created by {by}")
        return self.get(name), token

    def set_role(self, name: str, role: str, by: str) -> dict[str, Any]:
        """Give user ``name`` another role (never the last admin's away)."""
        _check_role(role)
        with self._lock:
            user = self._existing(name)
            if user["role"] == ADMIN and role != ADMIN:
                self._keep_an_admin(name, "demoted")
            self._store.put(USERS, name, {**user, "role": role},
                            expect_version=user["_version"])
        self._event("user-changed", f"user {name} is now {role} (was {user['role']}), "
                                    f"by {by}")
        return self.get(name)

    def delete(self, name: str, by: str) -> dict[str, Any]:
        """Delete user ``name`` with its tokens and sessions (never the last admin)."""
        with self._lock:
            user = self._existing(name)
            if user["role"] == ADMIN:
                self._keep_an_admin(name, "deleted")
            tokens = self._drop_tokens(name)
            sessions = self.sessions.revoke(name)
            self._store.delete(USERS, name)
        self._event("user-deleted", f"user {name} ({user['role']}) deleted by {by}, with "
                                    f"{tokens} token(s) and {sessions} session(s)")
        return {"name": name, "deleted": True, "tokens_revoked": tokens,
                "sessions_ended": sessions}

    def new_token(self, name: str, by: str, revoke_others: bool = False) -> dict[str, Any]:
        """A new token for ``name`` (shown this once); ``revoke_others``: its others end,
        sessions included."""
        with self._lock:
            self._existing(name)
            revoked = self._drop_tokens(name) if revoke_others else 0
            sessions = self.sessions.revoke(name) if revoke_others else 0
            token = self._put_token(name)
        what = f", {revoked} other(s) and {sessions} session(s) revoked" if revoke_others else ""
        self._event("user-token", f"new token for user {name}{what}, by {by}")
        return {"name": name, "token": token, "id": token_hash(token)[:12],
                "tokens_revoked": revoked, "sessions_ended": sessions}

    def revoke(self, name: str, by: str) -> dict[str, Any]:
        """End every token and session of ``name`` (not the last admin's: none could
        manage users then)."""
        with self._lock:
            user = self._existing(name)
            if user["role"] == ADMIN:
                self._keep_an_admin(name, "left without a token",
                                    f"; `drove user token {name} --revoke-others` replaces "
                                    "its tokens with a new one")
            tokens = self._drop_tokens(name)
            sessions = self.sessions.revoke(name)
        self._event("user-revoked", f"every token ({tokens}) and session ({sessions}) of "
                                    f"user {name} revoked by {by}")
        return {"name": name, "tokens_revoked": tokens, "sessions_ended": sessions}

    def revoke_token(self, name: str, token_id: str, by: str) -> dict[str, Any]:
        """End one token of ``name``, by the id `drove user list --json` shows (never the
        last admin's last token)."""
        with self._lock:
            user = self._existing(name)
            own = [t for t in self._store.list(TOKENS) if t.get("user") == name]
            doc = next((t for t in own if t["key"][:12] == token_id), None)
            if doc is None:
                ids = ", ".join(t["key"][:12] for t in own) or "none"
                raise ApiError(404, f"user {name} has no token {token_id!r} (its tokens: "
                                    f"{ids}; `drove user list --json` shows them)")
            if user["role"] == ADMIN and len(own) == 1:
                self._keep_an_admin(name, "left without a token",
                                    f"; `drove user token {name} --revoke-others` replaces "
                                    "its token with a new one")
            self._store.delete(TOKENS, doc["key"])
        self._event("user-revoked", f"token {token_id} of user {name} revoked by {by}")
        return {"name": name, "tokens_revoked": 1, "sessions_ended": 0}

    def set_password(self, name: str, password: str | None, by: str) -> dict[str, Any]:
        """Set (None: remove) the password ``name`` logs in to the UI with."""
        stored = None if password is None else _password(password)
        with self._lock:
            user = self._existing(name)
            self._store.put(USERS, name, {**user, "password": stored},
                            expect_version=user["_version"])
        self._event("user-password", f"password of user {name} "
                                     f"{'removed' if password is None else 'set'} by {by}")
        return self.get(name)

    # ------------------------------------------------------------ inside

    def _existing(self, name: str) -> dict[str, Any]:
        user = self._store.get(USERS, name) if isinstance(name, str) else None
        if user is None:
            raise ApiError(404, f"no user {name!r}; `drove user list` shows the users")
        return user

    def _keep_an_admin(self, name: str, what: str, hint: str = "") -> None:
        admins = [u["name"] for u in self._store.list(USERS) if u.get("role") == ADMIN]
        if admins == [name]:
            raise ApiError(409, f"user {name} is the last admin and cannot be {what}: make "
                                "another admin first (`drove user create NAME --role admin`)"
                                + hint)

    def _put_token(self, name: str, token: str | None = None, note: str | None = None) -> str:
        token = token or new_token()
        key = token_hash(token)
        self._store.put(TOKENS, key, {"key": key, "user": name, "created": time.time(),
                                      "used": None, "note": note}, expect_version=0)
        return token

    def _drop_tokens(self, name: str) -> int:
        keys = [t["key"] for t in self._store.list(TOKENS) if t.get("user") == name]
        return sum(self._store.delete(TOKENS, key) for key in keys)

    def _view(self, user: dict[str, Any], tokens: list[dict[str, Any]]) -> dict[str, Any]:
        own = [t for t in tokens if t.get("user") == user["name"]]
        sessions = self.sessions.of(user["name"])
        used = [t["used"] for t in own if t.get("used")] + [s["seen"] for s in sessions]
        return {
            "name": user["name"],
            "role": user["role"],
            "created": iso(user.get("created")),
            "last_used": iso(max(used)) if used else None,
            "password": bool(user.get("password")),
            "tokens": [{"id": t["key"][:12], "created": iso(t.get("created")),
                        "last_used": iso(t.get("used")), "note": t.get("note")}
                       for t in sorted(own, key=lambda t: t.get("created") or 0)],
            "sessions": len(sessions),
        }


def _user(name: str, role: str) -> dict[str, Any]:
    return {"name": name, "role": role, "created": time.time(), "password": None}


def _check_role(role: str) -> None:
    if role not in USER_ROLES:
        raise ApiError(422, f"unknown role {role!r}: a user is one of {', '.join(USER_ROLES)}")


def _password(password: str) -> dict[str, Any]:
    why = check_password_text(password)
    if why:
        raise ApiError(422, f"{why}; nothing was changed")
    return hash_password(password)
