"""The `drove` command."""

from __future__ import annotations

import typer

from drove import __version__
from drove.cli import engine, replica, serve

app = typer.Typer(
    name="drove",
    help="drove: replicated block storage for containers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(replica.app, name="replica")
app.add_typer(engine.app, name="engine")
app.command()(serve.serve)


@app.command()
def version() -> None:
    """Print drove's version."""
    typer.echo(__version__)


def main() -> None:
    """Entry point of the console script."""
    app()
