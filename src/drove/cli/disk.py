"""`drove disk ...`: the directories replicas are placed on (via the manager)."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.markup import escape

from drove.cli.client import Manager, show_table, with_manager
from drove.cli.output import JsonOpt, console, emit
from drove.units import format_size, parse_size

app = typer.Typer(help="Disks: directories that hold replicas; tags make pools.",
                  no_args_is_help=True)

STATE_STYLE = {"ready": "green", "unavailable": "red"}


@app.command()
@with_manager
def add(
    mgr: Manager,
    path: Annotated[str, typer.Argument(
        help="directory on the manager's host (made if missing; relative paths are taken "
             "from the current directory)", show_default=False)],
    tag: Annotated[list[str] | None, typer.Option(
        "--tag", "-t", show_default=False,
        help="tag, repeatable; `drove volume create --pool TAG` places on tagged disks")] = None,
    reserved: Annotated[int, typer.Option(
        parser=parse_size, help="space kept free for others, e.g. 10G")] = 0,
    name: Annotated[str | None, typer.Option(
        show_default=False, help="disk name (default: disk1, disk2, ...)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add directory PATH as a disk for replicas.

    Examples:

        drove disk add /mnt/ssd1 --tag ssd --reserved 10G

        drove disk add /srv/drove --name big
    """
    body: dict[str, Any] = {"path": os.path.abspath(os.path.expanduser(path)),
                            "tags": tag or [], "reserved": reserved, "name": name}
    d = mgr.post("/v1/disks", body)
    if emit(d, json_out):
        return
    console.print(f"disk [bold]{escape(d['name'])}[/] added: {escape(d['path'])}, "
                  f"{format_size(d.get('available') or 0)} available"
                  + (f", tags {escape(', '.join(d['tags']))}" if d.get("tags") else ""),
                  highlight=False)


@app.command("list")
@with_manager
def list_disks(mgr: Manager, json_out: JsonOpt = False) -> None:
    """List disks: state, capacity, free space, space promised to replicas, tags.

    "scheduled" is the sum of the sizes of the replicas placed on the disk
    (replicas are sparse, so it may exceed what they use).
    """
    disks = mgr.get("/v1/disks")
    if emit(disks, json_out):
        return
    disk_table(disks)


def disk_table(disks: list[dict[str, Any]], title: str = "disks") -> None:
    """The disks as a table (an error column when one has an error)."""
    errors = any(d.get("error") for d in disks)
    rows = []
    for d in disks:
        state = d.get("state") or ""
        style = STATE_STYLE.get(state)
        row = [escape(d["name"]), escape(d.get("node") or ""), escape(d.get("path") or ""),
               f"[{style}]{state}[/]" if style else escape(state),
               escape(", ".join(d.get("tags") or [])),
               format_size(d.get("capacity") or 0), format_size(d.get("available") or 0),
               format_size(d.get("reserved") or 0), format_size(d.get("scheduled") or 0),
               d.get("replicas", "")]
        if errors:
            row.append(escape(d.get("error") or ""))
        rows.append(row)
    show_table(title, ["name", "node", "path", "state", "tags", "capacity>", "available>",
                       "reserved>", "scheduled>", "replicas>"] + (["error"] if errors else []),
               rows)


@app.command()
@with_manager
def remove(
    mgr: Manager,
    name: Annotated[str, typer.Argument(help="disk name", show_default=False)],
    force: Annotated[bool, typer.Option(
        help="even while replicas live there (they fail and are rebuilt elsewhere)")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Stop using disk NAME (its files stay where they are).

    Refused while replicas live there, unless --force.
    """
    res = mgr.delete(f"/v1/disks/{name}", force=force)
    if not emit(res, json_out):
        console.print(f"disk {escape(name)} removed", highlight=False)
