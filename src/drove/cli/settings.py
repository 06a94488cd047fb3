"""`drove settings ...`: the manager's settings."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape

from drove.cli.client import Manager, show_table, with_manager
from drove.cli.output import JsonOpt, console, emit, fail

app = typer.Typer(help="Settings of the manager (placement, defaults, timeouts).",
                  no_args_is_help=True)



@app.command()
@with_manager
def get(
    mgr: Manager,
    key: Annotated[str | None, typer.Argument(
        help="one setting (default: all)", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the settings (or the one named KEY: its bare value, handy in scripts)."""
    settings = mgr.get("/v1/settings")
    if key is not None:
        if key not in settings:
            fail(f"no setting {key!r}; settings are: {', '.join(sorted(settings))}")
        if not emit(settings[key], json_out):
            typer.echo(_text(settings[key]))
        return
    if emit(settings, json_out):
        return
    show_table("settings", ["setting", "value"],
          [[escape(k), escape(_text(v))] for k, v in sorted(settings.items())])


@app.command("set")
@with_manager
def set_(
    mgr: Manager,
    key: Annotated[str, typer.Argument(help="setting name (`drove settings get` lists them)",
                                       show_default=False)],
    value: Annotated[str, typer.Argument(help="new value (a number, true/false, or text)",
                                         show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Set setting KEY to VALUE.

    Examples:

        drove settings set default_replicas 2

        drove settings set over_provisioning_percent 200
    """
    known = mgr.get("/v1/settings")
    if key not in known:
        fail(f"no setting {key!r}; settings are: {', '.join(sorted(known))}")
    settings = mgr.patch("/v1/settings", {key: parse_value(value)})
    if emit(settings, json_out):
        return
    console.print(f"{escape(key)} = {escape(_text(settings.get(key)))}", highlight=False)


def parse_value(text: str) -> Any:
    """A setting's value from the command line: JSON (3, 8.5, true, null), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
