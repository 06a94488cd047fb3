"""Space honesty in the CLI: the space section of `drove volume get` (actual size per replica
disk, the head's data, each snapshot's data and what deleting it frees) and
`drove volume trim`."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from drove.cli.client import Manager, show_table, with_manager
from drove.cli.output import JsonOpt, console, emit
from drove.units import format_size


def _size(n: int | None) -> str:
    """A byte count for a table cell ('' when unknown, a sign when negative)."""
    if n is None:
        return ""
    return format_size(n) if n >= 0 else "-" + format_size(-n)


def show_space(space: dict[str, Any] | None) -> None:
    """The space section of `drove volume get`: a row per replica disk, then per snapshot."""
    if not space:
        return
    rows = []
    errors = any(r.get("error") for r in space.get("replicas", []))
    for r in space.get("replicas", []):
        row = [escape(r["replica"]), escape(r.get("node") or ""), escape(r.get("disk") or ""),
               _size(r.get("actual")), _size(r.get("own")), _size(r.get("shared")),
               _size(r.get("head"))]
        if errors:
            row.append(escape(r.get("error") or ""))
        rows.append(row)
    show_table("space on each replica's disk (shared: hard links with linked clones, "
               "counted once)", ["replica", "node", "disk", "actual>", "own>", "shared>",
                                 "head data>"] + (["error"] if errors else []), rows)
    snaps = space.get("snapshots") or []
    if not snaps:
        return
    rows = [[escape(s["name"] or s["file"]) + (" (deleted)" if s.get("removed") else ""),
             _size(s.get("data")), _size(s.get("freed_by_delete")), escape(s.get("why") or "")]
            for s in snaps]
    show_table(f"snapshots (replica {escape(space.get('source') or '')}'s layers)",
               ["snapshot", "data>", "delete frees>", "why"], rows)


@with_manager
def trim(mgr: Manager,
         name: Annotated[str, typer.Argument(help="volume name", show_default=False)],
         json_out: JsonOpt = False) -> None:
    """Trim volume NAME's filesystem (fstrim where drove mounted it: `drove volume attach
    NAME --mount DIR`), so that the space of deleted files is freed on the replicas.

    Prints what fstrim trimmed and how much the replicas' actual size fell. A volume
    not mounted by drove is refused: run fstrim in the container that mounts it.
    """
    res = mgr.post(f"/v1/volumes/{name}/trim", {})
    if emit(res, json_out):
        return
    console.print(f"volume [bold]{escape(name)}[/]: fstrim at {escape(res['mountpoint'])} on "
                  f"node {escape(res.get('node') or '')} trimmed "
                  f"{format_size(res['trimmed'])}", highlight=False)
    rows = [[escape(r["replica"]), _size(r.get("actual_before")), _size(r.get("actual")),
             _size(r.get("freed")), escape(r.get("error") or "")] for r in res["replicas"]]
    show_table("actual size on each replica's disk", ["replica", "before>", "after>",
                                                      "freed>", "error"], rows)
    console.print(f"head data: {_size(res.get('head_before'))} -> {_size(res.get('head'))}",
                  highlight=False)
