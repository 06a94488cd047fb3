"""`drove node ...`: the machines of drove (via the manager)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape

from drove.cli import task as tasks
from drove.cli.client import Manager, show_table, with_manager
from drove.cli.output import JsonOpt, console, emit
from drove.units import format_size

app = typer.Typer(help="Nodes: the machines whose disks hold replicas (list, update, cordon, "
                       "drain, remove).", no_args_is_help=True)


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


@app.command()
@with_manager
def drain(
    mgr: Manager,
    name: NameArg,
    wait: Annotated[bool, typer.Option(
        help="follow the drain with a progress bar (Ctrl-C cancels it); --no-wait returns "
             "at once (`drove task wait ID` follows it later)")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Cordon node NAME and move every replica off it, then remove the old ones.

    Each replica is rebuilt on another node (online: its volume keeps serving,
    never with fewer RW copies than before), then the one on NAME is stopped and
    its data deleted. A detached volume is attached for its move and detached
    after. Refused while volumes are attached on NAME (their engines run there):
    detach them or attach them elsewhere first. `drove event list` tells each
    step; `drove node remove NAME` forgets the node once its agent is stopped.
    With --json prints the final Task (its result lists what moved).
    """
    task = mgr.post(_path(name) + "/drain")
    if not wait:
        if not emit({"task": task["id"], "node": name}, json_out):
            console.print(f"drain of node {escape(name)} started: task {escape(task['id'])}; "
                          f"`drove task wait {escape(task['id'])}` follows it", highlight=False)
        return
    final = tasks.wait(mgr, task, quiet=json_out)
    if json_out:
        emit(final, True)
        if final.get("state") != "succeeded":
            raise typer.Exit(1)
        return
    res = tasks.check(final) or {}
    moved = res.get("moved") or []
    console.print(f"node {escape(name)} drained: {len(moved)} replica(s) moved"
                  + "".join(f"\n  {escape(m['volume'])}: {escape(m['replica'])} -> "
                            f"{escape(m.get('by') or '-')} on node "
                            f"{escape(m.get('to_node') or '-')}" for m in moved),
                  highlight=False)


@app.command()
@with_manager
def remove(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Forget node NAME and its disks.

    Refused while it holds replicas or runs engines (the refusal lists them:
    `drove node drain NAME` moves them), and while its agent still runs (it would
    register the node again): stop the agent, wait until `drove node list` shows
    it down, then remove it.
    """
    res = mgr.delete(_path(name))
    if emit(res, json_out):
        return
    console.print(f"node {escape(name)} removed, with disk(s) "
                  f"{escape(', '.join(res.get('disks') or []) or '-')}", highlight=False)
