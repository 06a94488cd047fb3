"""The API's users and login routes: /v1/users (admins) and /v1/session (the web UI)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from drove.manager.authorize import principal
from drove.manager.credentials import MAX_PASSWORD
from drove.manager.errors import ApiError
from drove.manager.loginlimit import LoginLimit
from drove.manager.sessions import COOKIE, Sessions
from drove.manager.users import Users

Role = Literal["viewer", "operator", "admin"]
"""A user's role (drove.manager.roles.USER_ROLES)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionOpen(_Strict):
    """Log in with a token, or with a user's name and password."""

    token: str | None = Field(None, max_length=1024, description="a user's API token")
    user: str | None = Field(None, max_length=63, description="with password")
    password: str | None = Field(None, max_length=MAX_PASSWORD,
                                 description="set by `drove user password NAME`")


class UserCreate(_Strict):
    """A new user; its first token is in the answer, this once only."""

    name: str = Field(description="a-z 0-9 . _ -, up to 63 characters")
    role: Role
    password: str | None = Field(None, max_length=MAX_PASSWORD,
                                 description="to log in to the web UI (also settable later)")


class UserUpdate(_Strict):
    """Change a user's role."""

    role: Role


class TokenCreate(_Strict):
    """A new token for a user."""

    revoke_others: bool = Field(False, description="end its other tokens and its sessions")


class PasswordSet(_Strict):
    """Set a user's password (null: remove it)."""

    password: str | None = Field(max_length=MAX_PASSWORD)


def add_user_routes(app: FastAPI, users: Users, sessions: Sessions) -> None:
    """Add the routes to ``app`` (as its own, so the app's role check runs for them); the
    role each needs is in drove.manager.roles like every other's."""
    limit = LoginLimit()

    # Plain (not async) handlers: FastAPI runs them in threads, so the store's round
    # trips (etcd) and scrypt never hold the event loop.

    @app.post("/v1/session")
    def login(req: SessionOpen, request: Request, response: Response) -> dict[str, Any]:
        """Log in (a token, or user and password): a session cookie and its CSRF token,
        to send in X-CSRF-Token with every change."""
        if req.token is not None and req.user is None and req.password is None:
            user = users.by_token(req.token)
            if user is None:
                raise ApiError(401, "unknown or revoked token")
        elif req.token is None and req.user is not None and req.password is not None:
            limit.check(req.user)
            user = users.by_password(req.user, req.password)
            if user is None:
                limit.failed(req.user)
                raise ApiError(401, "wrong user or password (a user has a password once "
                                    "`drove user password NAME` set one)")
            limit.succeeded(req.user)
        else:
            raise ApiError(422, "give either token, or user and password")
        sid, csrf = sessions.open(user["name"])
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return {"user": user["name"], "role": user["role"], "csrf": csrf}

    @app.get("/v1/session")
    def session(request: Request) -> dict[str, Any]:
        """The caller: user, role and the session's CSRF token (null with a Bearer token)."""
        who = principal(request)
        return {"user": who.user, "role": who.role, "csrf": who.csrf}

    @app.delete("/v1/session")
    def logout(request: Request, response: Response) -> dict[str, Any]:
        """End the session of the cookie (a Bearer token has none: nothing to end)."""
        who = principal(request)
        ended = who.session is not None and sessions.close(who.session)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return {"user": who.user, "logged_out": ended}

    @app.get("/v1/users")
    def list_users() -> list[dict[str, Any]]:
        """Every user: role, tokens (an id, when made and last used), password or not."""
        return users.list()

    @app.post("/v1/users", status_code=201)
    def create_user(req: UserCreate, request: Request) -> dict[str, Any]:
        """Create a user; the answer holds its token, shown this once only."""
        view, token = users.create(req.name, req.role, principal(request).user, req.password)
        return {**view, "token": token}

    @app.get("/v1/users/{name}")
    def get_user(name: str) -> dict[str, Any]:
        """One user."""
        return users.get(name)

    @app.patch("/v1/users/{name}")
    def update_user(name: str, req: UserUpdate, request: Request) -> dict[str, Any]:
        """Change a user's role (409 for the last admin's)."""
        return users.set_role(name, req.role, principal(request).user)

    @app.delete("/v1/users/{name}")
    def delete_user(name: str, request: Request) -> dict[str, Any]:
        """Delete a user, its tokens and sessions (409 for the last admin)."""
        return users.delete(name, principal(request).user)

    @app.post("/v1/users/{name}/tokens", status_code=201)
    def new_token(name: str, request: Request,
                  req: TokenCreate | None = None) -> dict[str, Any]:
        """A new token for the user, shown this once only."""
        return users.new_token(name, principal(request).user,
                               (req or TokenCreate()).revoke_others)

    @app.delete("/v1/users/{name}/tokens")
    def revoke(name: str, request: Request) -> dict[str, Any]:
        """Revoke every token and session of the user (409 for the last admin)."""
        return users.revoke(name, principal(request).user)

    @app.delete("/v1/users/{name}/tokens/{token_id}")
    def revoke_token(name: str, token_id: str, request: Request) -> dict[str, Any]:
        """Revoke one token of the user, by its id (the list shows them); its sessions and
        other tokens stay."""
        return users.revoke_token(name, token_id, principal(request).user)

    @app.put("/v1/users/{name}/password")
    def set_password(name: str, req: PasswordSet, request: Request) -> dict[str, Any]:
        """Set or (null) remove the password the user logs in to the web UI with."""
        return users.set_password(name, req.password, principal(request).user)
