"""Shared CLI output: JSON for scripts, rich tables for people, errors that say what to do."""

from __future__ import annotations

import json
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
ReplicasOpt = Annotated[int | None, typer.Option(
    min=1, max=10, show_default=False,
    help="number of copies (default: the manager's default_replicas setting)")]
PoolOpt = Annotated[str | None, typer.Option(
    show_default=False, help="place replicas only on disks with this tag")]

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


def parse_labels(items: list[str] | None) -> dict[str, str]:
    """KEY=VALUE options as a dict (fails naming the bad item)."""
    labels = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"label {item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def api_call(method: str, url: str, path: str, *, serve_hint: str, **kwargs: Any) -> Any:
    """Call a control API; HTTP errors become messages that say what to do next."""
    import httpx

    try:
        resp = httpx.request(method, url.rstrip("/") + path, timeout=600, **kwargs)
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url}: {exc}; is `{serve_hint}` running?")
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        fail(f"{detail} (HTTP {resp.status_code})")
    return resp.json()
