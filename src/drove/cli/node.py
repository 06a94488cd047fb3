"""`drove node ...`: the machines of drove (via the manager)."""

from __future__ import annotations

import typer
from rich.markup import escape

from drove.cli.client import Manager, show_table, with_manager
from drove.cli.output import JsonOpt, emit
from drove.units import format_size

app = typer.Typer(help="Nodes: the machines whose disks hold replicas.", no_args_is_help=True)



@app.command("list")
@with_manager
def list_nodes(mgr: Manager, json_out: JsonOpt = False) -> None:
    """List nodes with their disks' total capacity and free space.

    `drove disk list` shows each disk; --json prints the Node objects, disks included.
    """
    nodes = mgr.get("/v1/nodes")
    if emit(nodes, json_out):
        return
    rows = []
    for n in nodes:
        disks = n.get("disks") or []
        ready = [d for d in disks if d.get("state") == "ready"]
        rows.append([escape(n["name"]), escape(n.get("address") or ""), n.get("state"),
                     f"{len(ready)}/{len(disks)}",
                     format_size(sum(d.get("capacity") or 0 for d in disks)),
                     format_size(sum(d.get("available") or 0 for d in disks)),
                     sum(d.get("replicas") or 0 for d in disks)])
    show_table("nodes", ["name", "address", "state", "disks ready>", "capacity>", "available>",
                         "replicas>"], rows)
