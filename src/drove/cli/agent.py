"""`drove agent`: the node agent of one host in a drove cluster."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from drove.cli.output import fail


def agent(
    manager: Annotated[str, typer.Option(
        "--manager", envvar="DROVE_URL",
        help="the managers' URLs, comma-separated; heartbeats go to the first that answers")],
    node: Annotated[str, typer.Option(help="this node's name (a-z 0-9 . _ -)")],
    listen: Annotated[str, typer.Option(
        help="HOST:PORT of the agent's API; HOST is also where this host's engines and "
             "replicas listen, so give the address other hosts reach it at")],
    token_file: Annotated[Path, typer.Option(
        help="file holding the cluster token (a copy of a manager's "
             "DATA_DIR/cluster-token; the API token does not open the managers to agents)")],
    data_dir: Annotated[Path | None, typer.Option(
        envvar="DROVE_DATA_DIR",
        help="this host's state and first disk (default: ~/.local/share/drove-agent)")] = None,
    zone: Annotated[str | None, typer.Option(help="the zone (failure domain) of this host")]
        = None,
    role: Annotated[str, typer.Option(
        help="storage (holds replicas), compute (attaches volumes) or both")] = "both",
    heartbeat_interval: Annotated[float, typer.Option(
        help="seconds between heartbeats (the managers call a node down after 5 s without "
             "one; what the node must act on comes through a long-poll, not heartbeats)")]
        = 1.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run this host's node agent: it starts the engines and replicas the managers place here.

    Prints one JSON line once it serves (node id, API URL, the manager it reached).
    Engines and replicas it started keep serving when it stops; a restarted agent
    adopts them.
    """
    from drove.cluster.agent import AgentConfig, AgentConfigError, serve
    from drove.service import run
    from drove.units import parse_address

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    managers = [u.strip() for u in manager.split(",") if u.strip()]
    if not managers:
        fail("--manager needs at least one URL, e.g. http://10.0.0.1:10800")
    try:
        address = parse_address(listen)
        token = token_file.read_text().strip()
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read the cluster token from {token_file}: {exc.strerror}; copy a "
             "manager's DATA_DIR/cluster-token to this host")
    if not token:
        fail(f"{token_file} is empty; copy a manager's DATA_DIR/cluster-token into it")
    cfg = AgentConfig(managers=managers, node=node, listen=address, token=token,
                      data_dir=data_dir or Path.home() / ".local/share/drove-agent",
                      zone=zone, role=role, heartbeat_interval=heartbeat_interval)
    try:
        run(lambda: serve(cfg))
    except AgentConfigError as exc:
        fail(str(exc))
