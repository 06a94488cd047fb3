"""Users, tokens, passwords and sessions over a real SQLite store."""

from __future__ import annotations

import pytest

from drove.manager.credentials import token_hash
from drove.manager.errors import ApiError
from drove.manager.events import EventLog
from drove.manager.sessions import Sessions
from drove.manager.store import SqliteStore
from drove.manager.users import Users


@pytest.fixture
def users(tmp_path):
    store = SqliteStore(tmp_path / "drove.db")
    u = Users(store, Sessions(store), EventLog(store))
    assert u.bootstrap("first-token")
    yield u
    store.close()


def test_bootstrap_makes_the_file_token_the_first_admins_once(users):
    assert users.by_token("first-token")["role"] == "admin"
    assert not users.bootstrap("another-token")  # users exist: nothing changes
    assert users.by_token("another-token") is None


def test_tokens_are_stored_hashed_and_revocable(tmp_path, users):
    view, token = users.create("bob", "viewer", by="admin")
    assert view["role"] == "viewer" and len(view["tokens"]) == 1
    assert users.by_token(token)["name"] == "bob"
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("drove.db*"))
    assert token.encode() not in raw and token_hash(token).encode() in raw
    second = users.new_token("bob", by="admin")["token"]
    assert users.by_token(second)["name"] == "bob" and users.by_token(token) is not None
    third = users.new_token("bob", by="admin", revoke_others=True)
    assert third["tokens_revoked"] == 2 and users.by_token(token) is None
    assert users.revoke("bob", by="admin")["tokens_revoked"] == 1
    assert users.by_token(third["token"]) is None


def test_one_token_is_revoked_by_its_id(users):
    _, first = users.create("hal", "operator", by="admin")
    second = users.new_token("hal", by="admin")
    assert users.revoke_token("hal", second["id"], by="admin")["tokens_revoked"] == 1
    assert users.by_token(second["token"]) is None and users.by_token(first) is not None
    with pytest.raises(ApiError) as err:
        users.revoke_token("hal", second["id"], by="admin")
    assert err.value.status == 404 and token_hash(first)[:12] in str(err.value)
    # The last admin keeps its last token, not its others.
    only = users.get("admin")["tokens"][0]["id"]
    with pytest.raises(ApiError) as err:
        users.revoke_token("admin", only, by="admin")
    assert err.value.status == 409 and users.by_token("first-token") is not None
    users.new_token("admin", by="admin")
    users.revoke_token("admin", only, by="admin")
    assert users.by_token("first-token") is None


def test_bad_input_is_refused_and_changes_nothing(users):
    for name, role, password in (("Bad Name", "viewer", None), ("carol", "root", None),
                                 ("carol", "viewer", "short")):
        with pytest.raises(ApiError) as err:
            users.create(name, role, by="admin", password=password)
        assert err.value.status == 422
    assert [u["name"] for u in users.list()] == ["admin"]
    users.create("dave", "viewer", by="admin")
    with pytest.raises(ApiError) as err:
        users.create("dave", "admin", by="admin")
    assert err.value.status == 409 and users.get("dave")["role"] == "viewer"


def test_the_last_admin_stays(users):
    for change in (lambda: users.delete("admin", by="admin"),
                   lambda: users.set_role("admin", "operator", by="admin"),
                   lambda: users.revoke("admin", by="admin")):
        with pytest.raises(ApiError) as err:
            change()
        assert err.value.status == 409 and "last admin" in str(err.value)
    assert users.by_token("first-token")["role"] == "admin"
    users.create("eve", "admin", by="admin")
    users.set_role("admin", "viewer", by="eve")
    with pytest.raises(ApiError):
        users.delete("eve", by="eve")
    assert users.delete("admin", by="eve")["tokens_revoked"] == 1
    assert users.by_token("first-token") is None


def test_passwords(users):
    users.create("frank", "operator", by="admin")
    assert users.by_password("frank", "anything-long") is None  # none set yet
    assert users.set_password("frank", "correct horse", by="admin")["password"] is True
    assert users.by_password("frank", "correct horse")["name"] == "frank"
    assert users.by_password("frank", "wrong horse!") is None
    assert users.by_password("nobody", "correct horse") is None
    users.set_password("frank", None, by="admin")
    assert users.by_password("frank", "correct horse") is None


def test_sessions_end_when_idle_and_with_revocation(tmp_path):
    store = SqliteStore(tmp_path / "drove.db")
    sessions = Sessions(store, idle=3600)
    users = Users(store, sessions, EventLog(store))
    users.bootstrap("first-token")
    users.create("gina", "viewer", by="admin")
    sid, csrf = sessions.open("gina")
    assert sessions.find(sid)["csrf"] == csrf and users.get("gina")["sessions"] == 1
    users.revoke("gina", by="admin")
    assert sessions.find(sid) is None
    sid, _ = sessions.open("gina")
    sessions.idle = 0.0  # every session is now older than the idle limit
    assert sessions.find(sid) is None and store.list("sessions") == []
    store.close()
