"""`drove event ...`: what drove did and why (via the manager)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.markup import escape

from drove.cli.client import Manager, local_time, with_manager
from drove.cli.output import console, emit

app = typer.Typer(help="Events: what drove did and why (failures, rebuilds, attaches, ...).",
                  no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option(
    "--json", help="print JSON for scripts (with --follow: one event per line)")]
LEVEL_STYLE = {"info": "", "warning": "yellow", "error": "bold red"}


@app.command("list")
@with_manager
def list_events(
    mgr: Manager,
    volume: Annotated[str | None, typer.Option(
        "--volume", show_default=False, help="only the events of this volume")] = None,
    limit: Annotated[int, typer.Option(
        "--limit", "-n", min=1, max=10000, help="how many of the newest events")] = 100,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="keep printing new events as they happen (Ctrl-C stops)")]
        = False,
    interval: Annotated[float, typer.Option(
        min=0.1, help="seconds between polls with --follow")] = 1.0,
    json_out: JsonOpt = False,
) -> None:
    """List the newest events, oldest first.

    Examples:

        drove event list --volume db

        drove event list -f
    """
    events = mgr.get("/v1/events", volume=volume, limit=limit)
    if not follow:
        if not emit(events, json_out):
            for e in events:
                print_event(e)
        return
    last = 0
    try:
        while True:
            for e in events:
                if e["id"] > last:
                    last = e["id"]
                    if json_out:
                        typer.echo(json.dumps(e, sort_keys=True))
                    else:
                        print_event(e)
            time.sleep(interval)
            # `after` makes the manager send only new events; ones it repeats are skipped.
            events = mgr.get("/v1/events", volume=volume, limit=1000, after=last)
    except KeyboardInterrupt:
        return


def print_event(e: dict[str, Any]) -> None:
    """One line: time, level, kind, volume, message."""
    level = e.get("level") or ""
    style = LEVEL_STYLE.get(level, "")
    shown = f"[{style}]{level:7}[/]" if style else f"{level:7}"
    console.print(f"[dim]{local_time(e.get('time'))}[/]  {shown}  {escape(e.get('kind') or ''):24}"
                  f" {escape(e.get('volume') or '-'):12} {escape(e.get('message') or '')}",
                  highlight=False, soft_wrap=True)
