"""`drove snapshot ...`: snapshots of a volume (via the manager)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.tree import Tree

from drove.cli.client import Manager, labels_text, local_time, with_manager
from drove.cli.output import JsonOpt, console, emit, err_console, fail, parse_labels
from drove.units import format_size

app = typer.Typer(help="Snapshots of a volume: create, list (as a tree), delete, revert, "
                       "diff, export over NBD or to qcow2 (whole or incremental).",
                  no_args_is_help=True)

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
def list_snapshots(mgr: Manager, volume: VolumeArg, json_out: JsonOpt = False,
                   show_all: Annotated[bool, typer.Option(
                       "--all", help="also the deleted snapshots kept for linked clones "
                                     "(hidden), with the clones that need them")] = False,
                   ) -> None:
    """Show the snapshots of VOLUME as a tree: each under its parent, the live head last.

    Each shows the bytes its layer file allocates, the data it holds and what
    deleting it would free, with why (a delete folds a snapshot into its only child
    or prunes what the head overwrote; a branch point or a snapshot linked clones
    need frees nothing). --json prints the API's list of Snapshot objects (name,
    parent, children, created, size, data, freed_by_delete, why, labels, removed;
    the head is "volume-head" with "head": true).
    """
    snaps = mgr.get(_path(volume, "/snapshots"), all=show_all or None)
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
    if s.get("data") is not None:
        text += f"  data {format_size(s['data'])}"
    if not s.get("head") and s.get("freed_by_delete") is not None:
        freed = s["freed_by_delete"]
        text += (f"  delete frees {format_size(freed)}" if freed >= 0
                 else f"  delete costs {format_size(-freed)}")
        if s.get("why"):
            text += f" [dim]({escape(s['why'])})[/]"
    if s.get("created"):
        text += f"  [dim]{local_time(s['created'])}[/]"
    if s.get("labels"):
        text += f"  {escape(labels_text(s['labels']))}"
    if s.get("removed"):
        text += "  [dim](removed)[/]"
    if s.get("hidden"):
        text += (f"  [yellow](hidden: deleted, kept for clone(s) "
                 f"{escape(', '.join(s.get('dependants') or []))})[/]")
    return text


@app.command()
@with_manager
def delete(mgr: Manager, volume: VolumeArg, name: SnapArg, json_out: JsonOpt = False) -> None:
    """Delete snapshot NAME of VOLUME (its data folds into its child)."""
    res = mgr.delete(_path(volume, f"/snapshots/{name}"))
    if emit(res, json_out):
        return
    if res.get("hidden"):
        console.print(f"snapshot {escape(name)} of volume {escape(volume)} hidden: linked "
                      f"clone(s) {escape(', '.join(res.get('dependants') or []))} depend on "
                      "it; it is deleted with the last of them", highlight=False)
        return
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


class ExportFormat(StrEnum):
    """What `drove snapshot export` produces."""

    nbd = "nbd"
    qcow2 = "qcow2"


@app.command()
@with_manager
def export(
    mgr: Manager,
    volume: VolumeArg,
    name: SnapArg,
    since: Annotated[str | None, typer.Option(
        "--since", help="an older snapshot FROM: export only what changed since it",
        show_default=False)] = None,
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="nbd: print the NBD URI; qcow2: write --output")] = ExportFormat.nbd,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="the qcow2 file to write (--format qcow2)",
        show_default=False)] = None,
    backing: Annotated[Path | None, typer.Option(
        "--backing", help="with --since and --format qcow2: a qcow2 (or raw) image of FROM, "
                          "the backing file of the delta written", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Serve snapshot NAME of VOLUME read-only over NBD and print its URI, or write it
    to a qcow2 file.

    With --since FROM the export's block status reports only what changed since
    snapshot FROM as data, the rest as zero holes: copy it onto an image of FROM
    with a client that leaves zero holes alone and writes zero data, e.g.

        nbdcopy --destination-is-zero --sparse=0 --request-size=4096 URI TARGET

    (TARGET an NBD URI or a block device holding FROM: nbdcopy empties plain files.)
    With --format qcow2 --since FROM --backing FROM.qcow2 the file holds only the
    changes, over FROM.qcow2.

    Examples:

        qemu-img convert -O qcow2 "$(drove snapshot export db s1)" s1.qcow2

        drove snapshot export db s1 --format qcow2 -o s1.qcow2

        drove snapshot export db s2 --since s1 --format qcow2 -o s2.qcow2 --backing s1.qcow2
    """
    if fmt is ExportFormat.qcow2 and output is None:
        fail("--format qcow2 needs --output FILE")
    if fmt is ExportFormat.nbd and (output is not None or backing is not None):
        fail("--output and --backing go with --format qcow2")
    if backing is not None and since is None:
        fail("--backing goes with --since FROM: it is the image of FROM the delta sits on")
    if fmt is ExportFormat.qcow2 and since is not None and backing is None:
        fail("--since with --format qcow2 needs --backing FROM.qcow2 (an image of FROM)")
    if output is not None and output.exists():
        fail(f"{output} exists: choose another --output or remove it")
    if backing is not None and not backing.is_file():
        fail(f"--backing {backing}: no such file")
    body = {"since": since} if since is not None else None
    res = mgr.post(_path(volume, f"/snapshots/{name}/export"), body)
    if output is not None:
        from drove.cli.imagefile import write_qcow2

        uri = res["backing_nbd_uri"] if since is not None else res["nbd_uri"]
        write_qcow2(uri, output, backing=backing, quiet=json_out)
        res = {**res, "output": str(output), "backing": None if backing is None
               else str(backing)}
        if not emit(res, json_out):
            what = f"changes of {name} since {since}" if since else f"snapshot {name}"
            console.print(f"{escape(what)} of volume {escape(volume)} written to "
                          f"{escape(str(output))}", highlight=False)
        return
    if emit(res, json_out):
        return
    typer.echo(res["nbd_uri"])
    if since is not None:  # on stderr: "$(drove snapshot export ...)" gets the URI alone
        err_console.print(f"only what changed since {escape(since)} is data, the rest zero "
                          f"holes; to turn an image of {escape(since)} (an NBD export or "
                          "block device) into "
                          f"{escape(name)}: nbdcopy --destination-is-zero --sparse=0 "
                          "--request-size=4096 URI TARGET", highlight=False)


@app.command()
@with_manager
def diff(
    mgr: Manager,
    volume: VolumeArg,
    since: Annotated[str, typer.Argument(help="the older snapshot", metavar="FROM",
                                         show_default=False)],
    to: Annotated[str | None, typer.Argument(help="the newer snapshot", metavar="[TO]",
                                             show_default=False)] = None,
    to_head: Annotated[bool, typer.Option(
        "--to-head", help="compare FROM with the live head instead of a snapshot TO")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List the extents of VOLUME that differ between snapshots FROM and TO (or the head).

    Read from the chain's allocation, without reading data: a block written in any
    layer after FROM up to TO counts, even if rewritten with the same bytes.  When
    a revert made FROM and TO branches, the diff goes through their common ancestor
    (what FROM holds there differs too).  --json prints since, to, head, ancestor,
    branch, size, block_size, bytes and extents (offset and length pairs, in bytes).

    Examples:

        drove snapshot diff db s1 s2

        drove snapshot diff db s1 --to-head --json
    """
    if (to is None) == (not to_head):
        fail("give either TO or --to-head")
    res = mgr.get(_path(volume, "/diff"), since=since, to=to)
    if emit(res, json_out):
        return
    from drove.cli.imagefile import diff_table

    console.print(diff_table(res))
