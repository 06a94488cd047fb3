"""`drove node ...`: the machines of drove (via the manager)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape

from drove.cli.client import Manager, show_table, with_manager
from drove.cli.output import JsonOpt, console, emit
from drove.units import format_size

app = typer.Typer(help="Nodes: the machines whose disks hold replicas.", no_args_is_help=True)


class Role(StrEnum):
    """What a node does: holds replicas (storage), runs engines (compute), or both."""

    storage = "storage"
    compute = "compute"
    both = "both"


NameArg = Annotated[str, typer.Argument(help="the node's name (`drove node list`)",
                                        show_default=False)]


def _path(name: str) -> str:
    return f"/v1/nodes/{quote(name, safe='')}"


def _say(n: dict[str, Any], json_out: bool) -> None:
    """Print one node's placement attributes (or the Node object with --json)."""
    if emit(n, json_out):
        return
    console.print(f"node {escape(n['name'])}: zone {escape(n.get('zone') or '-')}, "
                  f"fault set {escape(n.get('fault_set') or '-')}, role {n.get('role')}"
                  + (", [bold]cordoned[/] (no new replicas)" if n.get("cordoned") else ""),
                  highlight=False)


@app.command("list")
@with_manager
def list_nodes(mgr: Manager, json_out: JsonOpt = False) -> None:
    """List nodes: state, zone, fault set, role, cordon, their disks' capacity and free space.

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
                     escape(n.get("zone") or "-"), escape(n.get("fault_set") or "-"),
                     n.get("role") or "both", "yes" if n.get("cordoned") else "no",
                     f"{len(ready)}/{len(disks)}",
                     format_size(sum(d.get("capacity") or 0 for d in disks)),
                     format_size(sum(d.get("available") or 0 for d in disks)),
                     sum(d.get("replicas") or 0 for d in disks)])
    show_table("nodes", ["name", "address", "state", "zone", "fault set", "role", "cordoned",
                         "disks ready>", "capacity>", "available>", "replicas>"], rows)


@app.command()
@with_manager
def update(
    mgr: Manager,
    name: NameArg,
    zone: Annotated[str | None, typer.Option(
        show_default=False, help="the node's zone; replicas of a volume spread over zones "
                                 "(\"\" clears it)")] = None,
    fault_set: Annotated[str | None, typer.Option(
        "--fault-set", show_default=False,
        help="nodes that fail together (a rack, a power feed): never two replicas of a "
             "volume in one (\"\" clears it)")] = None,
    role: Annotated[Role | None, typer.Option(
        show_default=False, help="storage holds replicas, compute attaches volumes, "
                                 "both does both")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Set node NAME's zone, fault set or role; placement of new replicas follows them.

    Replicas already on the node stay where they are.

    Examples:

        drove node update host2 --zone eu-1a --fault-set rack3
        drove node update host5 --role compute
    """
    body: dict[str, Any] = {}
    if zone is not None:
        body["zone"] = zone
    if fault_set is not None:
        body["fault_set"] = fault_set
    if role is not None:
        body["role"] = role.value
    if not body:
        raise typer.BadParameter("give at least one of --zone, --fault-set, --role")
    _say(mgr.patch(_path(name), body), json_out)


@app.command()
@with_manager
def cordon(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Place no new replicas on node NAME (those there stay and keep serving)."""
    _say(mgr.post(_path(name) + "/cordon"), json_out)


@app.command()
@with_manager
def uncordon(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Let new replicas go to node NAME again."""
    _say(mgr.post(_path(name) + "/uncordon"), json_out)
