"""The `drove` command."""

from __future__ import annotations

import typer

from drove import __version__
from drove.cli import (
    agent,
    backup,
    cluster,
    csi,
    disk,
    engine,
    event,
    job,
    node,
    plugin,
    replica,
    serve,
    settings,
    snapshot,
    task,
    user,
    volume,
)

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
app.command()(agent.agent)
app.command()(csi.csi)
app.add_typer(volume.app, name="volume")
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(disk.app, name="disk")
app.add_typer(node.app, name="node")
app.add_typer(cluster.app, name="cluster")
app.add_typer(event.app, name="event")
app.add_typer(settings.app, name="settings")
app.add_typer(backup.app, name="backup")
app.add_typer(task.app, name="task")
app.add_typer(job.app, name="job")
app.add_typer(plugin.app, name="plugin")
app.add_typer(user.app, name="user")


@app.command()
def version() -> None:
    """Print drove's version."""
    typer.echo(__version__)


def main() -> None:
    """Entry point of the console script."""
    app()
