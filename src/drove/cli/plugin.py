"""`drove plugin docker`: this host's Docker (and Podman) volume plugin."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Annotated

import typer

from drove.cli.output import fail

app = typer.Typer(help="Plugins that let container engines use drove volumes.",
                  no_args_is_help=True)


@app.command()
def docker(
    socket_path: Annotated[Path, typer.Option(
        "--socket", help="the unix socket dockerd finds the plugin by (its name, drove, is "
                         "the driver name: `docker volume create -d drove`)")]
        = Path("/run/docker/plugins/drove.sock"),
    manager: Annotated[str | None, typer.Option(
        "--manager", envvar="DROVE_URL",
        help="the managers' URLs, comma-separated (default: the local manager of --data-dir)")]
        = None,
    token: Annotated[str | None, typer.Option(
        envvar="DROVE_TOKEN", help="the API token (default: DATA_DIR/token)")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        envvar="DROVE_DATA_DIR", help="a local manager's data directory, to find it and its "
                                      "token")] = None,
    node: Annotated[str | None, typer.Option(
        help="this host's drove node, where volumes are attached (default: the host name)")]
        = None,
    state_dir: Annotated[Path, typer.Option(
        help="where the plugin keeps its mount state (state.json) and mounts volumes "
             "(mounts/NAME); outside Docker's data root")] = Path("/var/lib/drove-docker"),
    default_size: Annotated[str, typer.Option(
        help="the size of a volume created without --opt size (e.g. by `docker run -v`)")]
        = "1G",
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Serve the Docker volume plugin protocol for this host until SIGTERM/SIGINT.

    `docker volume create -d drove --opt size=10G [--opt replicas=3] [--opt pool=TAG]
    [--opt fs=ext4|xfs] [--opt from-snapshot=VOL@SNAP] [--opt from-backup=B [--opt
    instant=true]] [--opt preempt=true] NAME`; `docker run -v NAME:/data ...` attaches
    the volume on this node and mounts it. Prints one JSON line once it serves.
    """
    from drove.cli.client import Manager, ManagerError
    from drove.plugins import docker as plugin
    from drove.plugins.dockerdriver import DockerDriver
    from drove.plugins.dockeropts import parse_size
    from drove.plugins.mountstate import MountState
    from drove.service import armed, default_signals, print_ready, run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        size = parse_size(default_size)
    except ValueError as exc:
        fail(f"--default-size {default_size}: {exc}")
    try:
        client = Manager.connect(manager, token, data_dir)
        state = MountState(state_dir / "state.json")
    except (ManagerError, ValueError) as exc:
        fail(str(exc))
    driver = DockerDriver(client, node or socket.gethostname(), state,
                          state_dir / "mounts", size)

    async def main() -> None:
        stop = await armed(default_signals)
        await plugin.serve(driver, socket_path, stop, ready=print_ready)

    try:
        run(main)
    except OSError as exc:
        fail(f"cannot serve on {socket_path}: {exc}")
    finally:
        client.close()
