"""`drove user ...`: the manager's users, their roles, tokens and passwords (docs/users.md)."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.markup import escape

from drove.cli.client import Manager, local_time, show_table, with_manager
from drove.cli.output import JsonOpt, console, emit, err_console, fail

app = typer.Typer(help="Users of the API and the web UI: roles, tokens, passwords.",
                  no_args_is_help=True)


class Role(StrEnum):
    """A user's role."""

    viewer = "viewer"
    operator = "operator"
    admin = "admin"


NameArg = Annotated[str, typer.Argument(help="the user's name", show_default=False)]
"""A user's name, as an argument."""
RoleOpt = Annotated[Role, typer.Option(
    "--role", show_default=False,
    help="viewer: reads only; operator: also volumes, snapshots, backups, jobs, tasks; "
         "admin: everything, settings, nodes, disks and users included")]
"""The --role option."""


def _path(name: str) -> str:
    from urllib.parse import quote

    return f"/v1/users/{quote(name, safe='')}"


def _show_token(note: str, token: str) -> None:
    """The token alone on stdout (``T=$(drove user ...)`` keeps it), the note on stderr."""
    err_console.print(note, highlight=False)
    typer.echo(token)


@app.command()
@with_manager
def create(mgr: Manager, name: NameArg, role: RoleOpt, json_out: JsonOpt = False) -> None:
    """Create user NAME with --role; print its token, this once only (it is stored hashed).

    Example: drove user create alice --role operator
    """
    user = mgr.post("/v1/users", {"name": name, "role": role.value})
    if not emit(user, json_out):
        _show_token(f"user {escape(name)} ({user['role']}) created; its token, shown this "
                    "once only (DROVE_TOKEN=... or --token):", user["token"])


@app.command("list")
@with_manager
def list_(mgr: Manager, json_out: JsonOpt = False) -> None:
    """List the users with their role, tokens and last use."""
    users = mgr.get("/v1/users")
    if emit(users, json_out):
        return
    show_table("users", ["name", "role", "tokens>", "password", "sessions>", "created",
                         "last used"],
               [[escape(u["name"]), u["role"], len(u["tokens"]), "yes" if u["password"] else "",
                 u["sessions"], local_time(u["created"]), local_time(u["last_used"])]
                for u in users])


@app.command()
@with_manager
def update(mgr: Manager, name: NameArg, role: RoleOpt, json_out: JsonOpt = False) -> None:
    """Give user NAME another role (the last admin keeps its role)."""
    user = mgr.patch(_path(name), {"role": role.value})
    if not emit(user, json_out):
        console.print(f"user {escape(name)} is now {user['role']}", highlight=False)


@app.command()
@with_manager
def delete(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Delete user NAME with its tokens and sessions (never the last admin)."""
    res = mgr.delete(_path(name))
    if not emit(res, json_out):
        console.print(f"user {escape(name)} deleted ({res['tokens_revoked']} token(s), "
                      f"{res['sessions_ended']} session(s) ended)", highlight=False)


@app.command()
@with_manager
def token(
    mgr: Manager,
    name: NameArg,
    revoke_others: Annotated[bool, typer.Option(
        "--revoke-others", help="revoke its other tokens and end its sessions")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Make a new token for user NAME and print it, this once only."""
    res = mgr.post(_path(name) + "/tokens", {"revoke_others": revoke_others})
    if emit(res, json_out):
        return
    revoked = (f"; {res['tokens_revoked']} other token(s) revoked" if revoke_others else "")
    _show_token(f"new token for user {escape(name)}{revoked}, shown this once only:",
                res["token"])


@app.command()
@with_manager
def revoke(
    mgr: Manager,
    name: NameArg,
    token_id: Annotated[str | None, typer.Option(
        "--token-id", show_default=False,
        help="revoke only this token (its id, from `drove user list --json`)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Revoke every token of user NAME and end its sessions (`drove user token` makes one)."""
    from urllib.parse import quote

    tokens = _path(name) + "/tokens"
    res = mgr.delete(tokens if token_id is None else f"{tokens}/{quote(token_id, safe='')}")
    if not emit(res, json_out):
        console.print(f"user {escape(name)}: {res['tokens_revoked']} token(s) revoked, "
                      f"{res['sessions_ended']} session(s) ended", highlight=False)


@app.command()
@with_manager
def password(
    mgr: Manager,
    name: NameArg,
    stdin: Annotated[bool, typer.Option(
        "--stdin", help="read the password from the first line of stdin (also when stdin "
                        "is not a terminal)")] = False,
    clear: Annotated[bool, typer.Option("--clear", help="remove the password")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Set the password user NAME logs in to the web UI with (prompted, or from stdin)."""
    secret = None if clear else _read_password(stdin)
    user = mgr.request("PUT", _path(name) + "/password", json={"password": secret})
    if not emit(user, json_out):
        console.print(f"password of user {escape(name)} {'removed' if clear else 'set'}",
                      highlight=False)


@app.command()
@with_manager
def whoami(mgr: Manager, json_out: JsonOpt = False) -> None:
    """Show the user the token belongs to, and its role."""
    me: dict[str, Any] = mgr.get("/v1/session")
    if not emit(me, json_out):
        console.print(f"{escape(me['user'])} ({me['role']})", highlight=False)


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        secret = sys.stdin.readline().rstrip("\r\n")
    else:
        secret = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if not secret:
        fail("no password given (give it on stdin with --stdin, or at the prompt)")
    return secret
