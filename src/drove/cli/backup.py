"""`drove backup ...`: back volumes up to a file or S3 target, restore, verify (via the manager)."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from drove.cli import task as tasks
from drove.cli.client import (
    Manager,
    ManagerError,
    labels_text,
    local_time,
    show_table,
    with_manager,
)
from drove.cli.output import JsonOpt, PoolOpt, console, emit, fail, parse_labels
from drove.units import format_size, parse_size

app = typer.Typer(help="Backups: copy volumes to a backup target (a directory or S3), list, "
                       "restore, verify, delete.", no_args_is_help=True)
target_app = typer.Typer(help="The backup target: where backups go (file:///dir or "
                              "s3://bucket/prefix).", no_args_is_help=True)
app.add_typer(target_app, name="target")

BackupArg = Annotated[str, typer.Argument(help="backup name (backup-...)", show_default=False)]
WaitOpt = Annotated[bool, typer.Option(
    help="follow the task with a progress bar (Ctrl-C cancels it); --no-wait returns at once "
         "(`drove task wait ID` follows it later)")]

SECRET_ENV = "DROVE_S3_SECRET_KEY"


class Compression(StrEnum):
    """How the backup target compresses blocks."""

    zstd = "zstd"
    lz4 = "lz4"
    none = "none"


def _path(name: str, rest: str = "") -> str:
    return f"/v1/backups/{name}{rest}"


def _started(task: dict[str, Any], json_out: bool, **ids: Any) -> None:
    """What --no-wait prints: the task's id (and what it works on) for scripts or people."""
    if emit({"task": task["id"], **ids}, json_out):
        return
    console.print(f"{escape(tasks.describe(task))} started: task {escape(task['id'])}; "
                  f"`drove task wait {escape(task['id'])}` follows it", highlight=False)


def _follow(mgr: Manager, task: dict[str, Any], wait: bool, json_out: bool,
            **ids: Any) -> dict[str, Any] | None:
    """Follow ``task`` to its end, or with --no-wait print its id (and ``ids``).

    Returns the task's result for the caller's human-readable line, or None
    once everything is printed (--no-wait, or --json).
    """
    if not wait:
        _started(task, json_out, **ids)
        return None
    res = tasks.check(tasks.wait(mgr, task, quiet=json_out)) or {}
    return None if emit(res, json_out) else res


# ------------------------------------------------------------------ the target


@target_app.command("set")
@with_manager
def target_set(
    mgr: Manager,
    url: Annotated[str, typer.Argument(
        help="file:///absolute/dir (a directory or an NFS mount on the manager's host) or "
             "s3://bucket/prefix", show_default=False)],
    endpoint: Annotated[str | None, typer.Option(
        show_default=False, help="S3 endpoint URL, e.g. http://minio:9000 (default: AWS, "
                                 "or AWS_ENDPOINT_URL on the manager's host)")] = None,
    region: Annotated[str | None, typer.Option(
        show_default=False, help="S3 region, e.g. us-east-1")] = None,
    access_key: Annotated[str | None, typer.Option(
        show_default=False, help="S3 access key id (default: the manager's AWS environment)")]
        = None,
    secret_key: Annotated[str | None, typer.Option(
        show_default=False, help=f"S3 secret key (default: env {SECRET_ENV}); better "
                                 "--secret-key-file or the env: an option shows in `ps`")] = None,
    secret_key_file: Annotated[Path | None, typer.Option(
        show_default=False, help="read the S3 secret key from this file")] = None,
    compression: Annotated[Compression | None, typer.Option(
        show_default=False, help="how blocks are compressed on the target "
                                 "(default: the manager's, zstd)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Set the backup target to URL (the manager checks that it can reach it).

    Each call sets the whole target: options left out go back to their
    defaults, so give the S3 options (and the secret) again when changing one.
    The secret key is never printed, and the manager never returns it.

    Examples:

        drove backup target set file:///mnt/nfs/drove-backups

        DROVE_S3_SECRET_KEY=... drove backup target set s3://backups/drove \\
            --endpoint http://minio:9000 --region us-east-1 --access-key drove
    """
    if secret_key is not None and secret_key_file is not None:
        fail("give the S3 secret key once: --secret-key or --secret-key-file, not both")
    if secret_key_file is not None:
        try:
            secret_key = secret_key_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read the secret key file {escape(str(secret_key_file))}: "
                 f"{escape(exc.strerror or str(exc))}")
        if not secret_key:
            fail(f"the secret key file {escape(str(secret_key_file))} is empty")
    elif secret_key is None:
        secret_key = os.environ.get(SECRET_ENV) or None
    body: dict[str, Any] = {"url": url}
    for key, value in (("endpoint", endpoint), ("region", region), ("access_key", access_key),
                       ("secret_key", secret_key),
                       ("compression", compression.value if compression else None)):
        if value is not None:
            body[key] = value
    try:
        target = mgr.request("PUT", "/v1/backup-target", json=body)
    except ManagerError as exc:
        if not secret_key:
            raise
        # An error may quote the request (a 422 echoes its input): never show the secret.
        raise ManagerError(str(exc).replace(secret_key, "<secret key>"), exc.status) from None
    if emit(target, json_out):
        return
    console.print(f"backup target set to [bold]{escape(target.get('url') or '')}[/]",
                  highlight=False)
    _show_target(target)


@target_app.command("get")
@with_manager
def target_get(mgr: Manager, json_out: JsonOpt = False) -> None:
    """Show the backup target: URL, S3 settings (not the secret), whether it is usable."""
    target = mgr.get("/v1/backup-target")
    if emit(target, json_out):
        return
    if not target.get("url"):
        console.print("no backup target: set one with `drove backup target set URL` "
                      "(file:///dir or s3://bucket/prefix)", highlight=False)
        return
    _show_target(target)


target_app.command("show", help="Same as `drove backup target get`.")(target_get)


@target_app.command("clear")
@with_manager
def target_clear(mgr: Manager, json_out: JsonOpt = False) -> None:
    """Unset the backup target (backups already on it stay there)."""
    target = mgr.request("PUT", "/v1/backup-target", json={"url": ""})
    if not emit(target, json_out):
        console.print("backup target cleared", highlight=False)


def _show_target(t: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    grid.add_row("url", escape(t.get("url") or ""))
    for key, label in (("endpoint", "endpoint"), ("region", "region"),
                       ("access_key", "access key")):
        if t.get(key):
            grid.add_row(label, escape(t[key]))
    if (t.get("url") or "").startswith("s3:"):
        grid.add_row("secret key", "set" if t.get("secret_key_set") else
                     "not set (the manager's AWS environment is used)")
    grid.add_row("compression", escape(t.get("compression") or ""))
    if t.get("available"):
        grid.add_row("available", "[green]yes[/]")
    else:
        grid.add_row("available", f"[red]no[/]: {escape(t.get('error') or 'unknown reason')}")
    console.print(grid)


# -------------------------------------------------------------------- backups


@app.command()
@with_manager
def create(
    mgr: Manager,
    volume: Annotated[str, typer.Argument(help="volume to back up (it must be attached)",
                                          show_default=False)],
    snapshot: Annotated[str | None, typer.Option(
        show_default=False, help="back up this snapshot (default: take a new one)")] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label", "-l", help="KEY=VALUE put on the backup, repeatable", show_default=False)]
        = None,
    compression: Annotated[Compression | None, typer.Option(
        show_default=False, help="compression for this backup (default: the target's)")]
        = None,
    wait: WaitOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Back up VOLUME to the backup target: only blocks the target lacks are uploaded.

    Waits with a progress bar; Ctrl-C cancels the backup. With --json prints
    the Backup object (its "name" names it); with --no-wait --json prints
    {"task": ID, "name": BACKUP}.

    Examples:

        drove backup create db --label reason=nightly

        name=$(drove backup create db --json | jq -r .name)
    """
    body = {"snapshot": snapshot, "labels": parse_labels(label),
            "compression": compression.value if compression else None}
    task = mgr.post(f"/v1/volumes/{volume}/backups", body)
    b = _follow(mgr, task, wait, json_out, name=task.get("backup"))
    if b is None:
        return
    console.print(f"backup [bold]{escape(b['name'])}[/] of {escape(b.get('volume') or volume)} "
                  f"(snapshot {escape(b.get('snapshot') or '')}): "
                  f"{format_size(b.get('bytes_new') or 0)} new, "
                  f"{format_size(b.get('bytes_reused') or 0)} reused, "
                  f"{format_size(b.get('bytes_stored') or 0)} stored", highlight=False)


@app.command("list")
@with_manager
def list_backups(
    mgr: Manager,
    volume: Annotated[str | None, typer.Argument(
        help="only the backups of this volume", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """List backups, newest first: volume, snapshot, size, bytes new and reused.

    --json prints the API's list of Backup objects (docs/api.md).
    """
    backups = mgr.get("/v1/backups", volume=volume)
    if emit(backups, json_out):
        return
    if not backups:
        what = f"volume {escape(volume)} has no backups" if volume else "no backups"
        console.print(f"{what}: `drove backup create VOLUME` makes one", highlight=False)
        return
    rows = [[escape(b["name"]), escape(b.get("volume") or ""), escape(b.get("snapshot") or ""),
             format_size(b.get("size") or 0), format_size(b.get("bytes_new") or 0),
             format_size(b.get("bytes_reused") or 0), local_time(b.get("created"))]
            for b in backups]
    show_table("backups", ["name", "volume", "snapshot", "size>", "new>", "reused>", "created"],
               rows)


@app.command()
@with_manager
def get(mgr: Manager, name: BackupArg, json_out: JsonOpt = False) -> None:
    """Show backup NAME: its volume and snapshot, sizes, what it uploaded and reused."""
    b = mgr.get(_path(name))
    if emit(b, json_out):
        return
    console.print(f"[bold]{escape(b['name'])}[/]  of {escape(b.get('volume') or '')}  "
                  f"snapshot {escape(b.get('snapshot') or '')}", highlight=False)
    facts: list[tuple[str, str]] = [
        ("volume size", format_size(b.get("size") or 0)),
        ("data", format_size(b.get("data_size") or 0)),
        ("uploaded", f"{format_size(b.get('bytes_new') or 0)} in {b.get('blocks_new') or 0} "
                     f"block(s), {format_size(b.get('bytes_stored') or 0)} stored"),
        ("reused", f"{format_size(b.get('bytes_reused') or 0)} in "
                   f"{b.get('blocks_reused') or 0} block(s)"),
        ("compression", b.get("compression") or ""),
    ]
    if b.get("parent"):
        facts.append(("parent", b["parent"]))
    if b.get("labels"):
        facts.append(("labels", labels_text(b["labels"])))
    facts.append(("created", local_time(b.get("created"))))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    for key, value in facts:
        grid.add_row(key, escape(value))
    console.print(grid)


@app.command()
@with_manager
def restore(
    mgr: Manager,
    backup: BackupArg,
    to: Annotated[str, typer.Option(
        "--to", help="name of the new volume to restore into", show_default=False)],
    replicas: Annotated[int | None, typer.Option(
        min=1, max=10, show_default=False,
        help="number of copies (default: as many as the backed-up volume had, for backups "
             "that recorded it; else the manager's default_replicas setting)")] = None,
    pool: PoolOpt = None,
    instant: Annotated[bool, typer.Option(
        "--instant", help="attach the volume at once and serve it while its data is still "
                          "in the backup (fetched as it is read); a task fills the rest")] = False,
    fill_rate: Annotated[str | None, typer.Option(
        "--fill-rate", show_default=False,
        help="with --instant: most bytes per second each replica's background fill fetches, "
             "e.g. 50M (default: no limit)")] = None,
    wait: Annotated[bool | None, typer.Option(
        "--wait/--no-wait", show_default=False,
        help="follow the task with a progress bar (default: yes; with --instant: no, the "
             "volume is usable before its fill ends)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Restore BACKUP into a new volume (--to); a failed or cancelled restore deletes it.

    Without --replicas the volume gets the backed-up volume's replica count.
    With --instant the volume is attached and usable when the command returns; the
    background fill is a task (`drove task list`), not waited for unless --wait.

    With --json prints {"volume", "bytes_written"}; with --no-wait --json
    {"task": ID, "volume": NEWVOLUME}.

    Example: drove backup restore backup-1a2b --to db-copy --replicas 2
    """
    body: dict[str, Any] = {"volume": to, "replicas": replicas, "pool": pool}
    if instant:
        body["instant"] = True
    if fill_rate is not None:
        try:
            body["fill_rate"] = parse_size(fill_rate)
        except ValueError as exc:
            fail(f"--fill-rate: {exc}")
    if instant:
        task = mgr.post(_path(backup, "/restore"), body)
        if wait:
            _follow(mgr, task, True, json_out, volume=to)
            return
        if emit({"task": task["id"], "volume": to}, json_out):
            return
        console.print(f"volume [bold]{escape(to)}[/] serves backup {escape(backup)} now "
                      f"(attached: `drove volume get {escape(to)}`); the rest is filled by task "
                      f"{escape(task['id'])} (`drove task wait {escape(task['id'])}`)",
                      highlight=False)
        return
    res = _follow(mgr, mgr.post(_path(backup, "/restore"), body), wait is not False, json_out,
                  volume=to)
    if res is None:
        return
    console.print(f"backup {escape(backup)} restored to volume [bold]{escape(to)}[/] "
                  f"({format_size(res.get('bytes_written') or 0)} written)", highlight=False)
    console.print(f"attach it with `drove volume attach {escape(to)}`", style="dim",
                  highlight=False)


@app.command()
@with_manager
def verify(mgr: Manager, backup: BackupArg, json_out: JsonOpt = False) -> None:
    """Read back every block of BACKUP from the target and check its hash.

    Exits 1 and lists the bad blocks (offset, hash, error) if any is missing or
    damaged. With --json prints {"blocks", "bytes", "errors": [...]}.
    """
    task = tasks.wait(mgr, mgr.post(_path(backup, "/verify")), quiet=json_out)
    res = task.get("result") or {}
    errors = res.get("errors") or []
    if not (task.get("state") == "failed" and errors):
        res = tasks.check(task) or {}   # exits 1 unless it succeeded
        errors = res.get("errors") or []
    if emit(res, json_out):
        if errors or task.get("state") != "succeeded":
            raise typer.Exit(1)
        return
    if not errors and task.get("state") == "succeeded":
        console.print(f"backup {escape(backup)}: {res.get('blocks', 0)} blocks, "
                      f"{format_size(res.get('bytes') or 0)}, [green]all good[/]",
                      highlight=False)
        return
    rows = [[f"{format_size(e.get('offset') or 0)} ({e.get('offset')})",
             escape(str(e.get("hash") or "")), f"[red]{escape(str(e.get('error') or ''))}[/]"]
            for e in errors]
    if rows:
        show_table(f"bad blocks of {escape(backup)}", ["offset", "hash", "error"], rows)
    fail(f"[red]backup {escape(backup)}: {len(errors)} bad block(s) of "
         f"{res.get('blocks', 0)}" + (f"; {escape(task['error'])}" if task.get("error") else "")
         + "[/]")


@app.command()
@with_manager
def delete(
    mgr: Manager,
    backup: BackupArg,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="do not ask (needed when stdin is not a terminal)")] = False,
    wait: WaitOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Delete BACKUP from the target (blocks other backups share stay).

    Asks first unless --yes. With --json prints {"blocks_removed", "bytes_removed"}.
    """
    if not yes:
        if not sys.stdin.isatty():
            fail(f"not deleting backup {escape(backup)} without asking: pass --yes")
        if not typer.confirm(f"delete backup {backup}? it cannot be undone"):
            fail("not deleted")
    res = _follow(mgr, mgr.delete(_path(backup)), wait, json_out, backup=backup)
    if res is None:
        return
    console.print(f"backup {escape(backup)} deleted: {res.get('blocks_removed', 0)} block(s), "
                  f"{format_size(res.get('bytes_removed') or 0)} removed from the target",
                  highlight=False)
