"""`drove cluster status`: the managers of a cluster, which one leads and since when."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape

from drove.cli.client import Manager, show_table, with_manager
from drove.cli.output import JsonOpt, console, emit

app = typer.Typer(help="The managers of a cluster (several `drove serve --store etcd://`).",
                  no_args_is_help=True)


@app.command()
@with_manager
def status(mgr: Manager, json_out: JsonOpt = False) -> None:
    """Show the managers, which one leads and since when."""
    doc: dict[str, Any] = mgr.get("/v1/cluster")
    if emit(doc, json_out):
        return
    if doc["store"] != "etcd":
        console.print("one manager on a SQLite store: no cluster, no election", highlight=False)
        return
    leader = doc["leader"] or "none (an election is under way)"
    console.print(f"leader: {escape(leader)}"
                  + (f" since {doc['since']}" if doc.get("since") else ""), highlight=False)
    show_table("managers", ["url", "state", "role", "host", "pid", "node", "last seen"],
               [[escape(m["url"]), m["state"], "leader" if m["leader"] else "follower",
                 escape(m.get("host") or ""), str(m.get("pid") or ""),
                 escape(m.get("node") or "-"), m.get("last_seen") or ""]
                for m in doc["managers"]])
