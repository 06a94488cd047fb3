"""`drove csi`: the CSI driver (Identity, Controller, Node) on a unix socket."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from drove.cli.output import fail


def csi(
    endpoint: Annotated[str, typer.Option(
        envvar="CSI_ENDPOINT", help="the socket to serve on: unix:///PATH/csi.sock")],
    node_id: Annotated[str, typer.Option(
        help="this host's drove node name (NodeGetInfo's node ID; volumes are attached "
             "there)")],
    manager: Annotated[str | None, typer.Option(
        "--manager", envvar="DROVE_URL",
        help="the manager's URL (several comma-separated); default: the local manager")]
        = None,
    token: Annotated[str | None, typer.Option(
        envvar="DROVE_TOKEN", help="the API token (default: the local data directory's)")]
        = None,
    token_file: Annotated[Path | None, typer.Option(
        help="file holding the API token (a copy of the manager's DATA_DIR/token)")] = None,
    mode: Annotated[str, typer.Option(
        help="controller (one per cluster), node (one per host) or all")] = "all",
    state_dir: Annotated[Path, typer.Option(
        help="where the node service keeps what it staged (survives its restart)")]
        = Path("/var/lib/drove/csi"),
) -> None:
    """Run the CSI driver: a Kubernetes (or any CO's) door to drove volumes.

    The controller creates, deletes, snapshots, clones, expands and attaches volumes
    through the manager; the node service gives this host the device (nbdfuse + loop),
    makes a filesystem only on a blank volume, mounts it, and publishes mounts or raw
    block devices to containers.
    """
    from drove.cli.client import Manager, ManagerError
    from drove.csi.server import MODES, serve

    if mode not in MODES:
        fail(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read the API token from {token_file}: {exc.strerror}")
    try:
        mgr = Manager.connect(manager, token, timeout=300.0)
    except ManagerError as exc:
        fail(str(exc))
    try:
        serve(endpoint, mode, mgr, node_id, state_dir)
    except (ValueError, OSError) as exc:
        fail(str(exc))
