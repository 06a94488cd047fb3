"""Shared CLI output: JSON for scripts, rich tables for people, errors that say what to do."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` as an error and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def emit(data: Any, as_json: bool) -> bool:
    """Print ``data`` as JSON when asked; return whether it did."""
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    return as_json


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a simple table."""
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    console.print(t)
