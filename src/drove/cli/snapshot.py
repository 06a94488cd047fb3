"""`drove snapshot ...`: snapshots of a volume (via the manager)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.tree import Tree

from drove.cli.client import Manager, labels_text, local_time, with_manager
from drove.cli.output import JsonOpt, console, emit, parse_labels
from drove.units import format_size

app = typer.Typer(help="Snapshots of a volume: create, list (as a tree), delete, revert, "
                       "export over NBD.", no_args_is_help=True)

VolumeArg = Annotated[str, typer.Argument(help="volume name", show_default=False)]
SnapArg = Annotated[str, typer.Argument(help="snapshot name", show_default=False)]


def _path(volume: str, rest: str = "") -> str:
    return f"/v1/volumes/{volume}{rest}"


@app.command()
@with_manager
def create(
    mgr: Manager,
    volume: VolumeArg,
    name: Annotated[str | None, typer.Argument(
        help="snapshot name (default: snap-YYYYmmdd-HHMMSS)", show_default=False)] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label", "-l", help="KEY=VALUE, repeatable", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Snapshot VOLUME (it must be attached; I/O pauses for milliseconds).

    Examples:

        drove snapshot create db before-upgrade --label reason=upgrade

        drove snapshot create db
    """
    body: dict[str, Any] = {"name": name, "labels": parse_labels(label)}
    snap = mgr.post(_path(volume, "/snapshots"), body)
    if not emit(snap, json_out):
        console.print(f"snapshot [bold]{escape(snap['name'])}[/] of volume {escape(volume)} "
                      "created", highlight=False)


@app.command("list")
@with_manager
def list_snapshots(mgr: Manager, volume: VolumeArg, json_out: JsonOpt = False) -> None:
    """Show the snapshots of VOLUME as a tree: each under its parent, the live head last.

    Sizes are the data held in each layer. --json prints the API's list of
    Snapshot objects (name, parent, children, created, size, labels, removed;
    the head is "volume-head" with "head": true).
    """
    snaps = mgr.get(_path(volume, "/snapshots"))
    if emit(snaps, json_out):
        return
    if not any(not s.get("head") for s in snaps):
        console.print(f"volume {escape(volume)} has no snapshots: "
                      f"`drove snapshot create {escape(volume)} NAME` makes one", highlight=False)
        if not snaps:
            return
    console.print(snapshot_tree(volume, snaps))


def snapshot_tree(volume: str, snaps: list[dict[str, Any]]) -> Tree:
    """The snapshots as a rich Tree under the volume (roots: no parent, or one not listed)."""
    by_name = {s["name"]: s for s in snaps}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in snaps:
        parent = s.get("parent") if s.get("parent") in by_name else None
        children.setdefault(parent, []).append(s)

    def order(s: dict[str, Any]) -> tuple[bool, str]:
        return bool(s.get("head")), s.get("created") or ""

    root = Tree(f"[bold]{escape(volume)}[/]")
    seen: set[str] = set()

    def add(branch: Tree, parent: str | None) -> None:
        for s in sorted(children.get(parent, []), key=order):
            if s["name"] in seen:
                continue
            seen.add(s["name"])
            add(branch.add(_node_label(s)), s["name"])

    add(root, None)
    for s in snaps:  # anything in a cycle (should not happen) is still shown
        if s["name"] not in seen:
            seen.add(s["name"])
            root.add(_node_label(s))
    return root


def _node_label(s: dict[str, Any]) -> str:
    if s.get("head"):
        text = f"[cyan]{escape(s['name'])}[/] [dim](head: live data)[/]"
    else:
        text = f"[bold]{escape(s['name'])}[/]"
    text += f"  {format_size(s.get('size') or 0)}"
    if s.get("created"):
        text += f"  [dim]{local_time(s['created'])}[/]"
    if s.get("labels"):
        text += f"  {escape(labels_text(s['labels']))}"
    if s.get("removed"):
        text += "  [dim](removed)[/]"
    return text


@app.command()
@with_manager
def delete(mgr: Manager, volume: VolumeArg, name: SnapArg, json_out: JsonOpt = False) -> None:
    """Delete snapshot NAME of VOLUME (its data folds into its child)."""
    res = mgr.delete(_path(volume, f"/snapshots/{name}"))
    if not emit(res, json_out):
        console.print(f"snapshot {escape(name)} of volume {escape(volume)} deleted",
                      highlight=False)


@app.command()
@with_manager
def revert(mgr: Manager, volume: VolumeArg, name: SnapArg, json_out: JsonOpt = False) -> None:
    """Revert VOLUME to snapshot NAME: what was written since is dropped.

    The volume must be attached without --mount and have no NBD client
    connected. --json prints the Volume object.
    """
    v = mgr.post(_path(volume, "/revert"), {"snapshot": name})
    if not emit(v, json_out):
        console.print(f"volume {escape(volume)} reverted to snapshot {escape(name)}",
                      highlight=False)


@app.command()
@with_manager
def export(mgr: Manager, volume: VolumeArg, name: SnapArg, json_out: JsonOpt = False) -> None:
    """Serve snapshot NAME of VOLUME read-only over NBD and print its URI.

    Example: qemu-img convert -O qcow2 "$(drove snapshot export db s1)" s1.qcow2
    """
    res = mgr.post(_path(volume, f"/snapshots/{name}/export"))
    if not emit(res, json_out):
        typer.echo(res["nbd_uri"])
