"""`drove serve`: start the manager, its API and a node agent on a data directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from drove.cli.output import fail


def serve(
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", envvar="DROVE_DATA_DIR",
        help="where volumes, state and the API token live (default: ~/.local/share/drove)")]
        = None,
    listen: Annotated[str, typer.Option(help="API address HOST:PORT")] = "127.0.0.1:10800",
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    store: Annotated[str | None, typer.Option(
        "--store", envvar="DROVE_STORE",
        help="where the manager's state lives: etcd://HOST:PORT,HOST:PORT.../PREFIX "
             "(default: the SQLite file DATA_DIR/drove.db)")] = None,
    no_agent: Annotated[bool, typer.Option(
        "--no-agent", help="run no node agent here: every node runs `drove agent` "
                           "(needs --store etcd://...)")] = False,
    node: Annotated[str | None, typer.Option(
        help="with etcd: this host's node name (default: the host name)")] = None,
    agent_listen: Annotated[str | None, typer.Option(
        help="with etcd: HOST:PORT of this node's agent API; HOST is where its engines and "
             "replicas listen (default: --listen's host, any port)")] = None,
    kek_file: Annotated[Path | None, typer.Option(
        "--kek-file", help="the key-encryption key that wraps encrypted volumes' data keys: "
                           "64 hex digits, 32 bytes, or a passphrase (first line, 8 characters "
                           "or more); without it encrypted volumes cannot be made nor "
                           "attached")] = None,
) -> None:
    """Start drove: the manager with its REST API and this node's agent.

    The data directory is also the first disk. Prints the web UI's address (/), the
    API's and where the token is; stop with Ctrl-C or SIGTERM (attached volumes are
    detached and come back attached at the next start).

    With --store etcd://... any number of managers share the state: one leads
    (healer, scheduler, jobs), the others answer the API and take over within
    10 s of its death; stopping one leaves every volume attached and serving.
    The API token (DATA_DIR/token) and the agents' cluster token
    (DATA_DIR/cluster-token) then live in etcd.
    """
    from drove.manager.server import ServeError
    from drove.manager.server import serve as run_manager
    from drove.service import run
    from drove.units import parse_address

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        address = parse_address(listen)
        agent_address = parse_address(agent_listen) if agent_listen else None
    except ValueError as exc:
        fail(str(exc))
    if data_dir is None:
        from drove.cli.client import default_data_dir

        data_dir = default_data_dir()
    directory = data_dir.expanduser().resolve()
    from drove.manager.datakeys import DataKeys, kek_from_file

    try:
        keys = DataKeys(kek_from_file(kek_file) if kek_file is not None else None)
    except (OSError, ValueError) as exc:
        fail(f"--kek-file: {exc}")
    try:
        run(lambda: run_manager(directory, address, store, no_agent=no_agent, node=node,
                                agent_listen=agent_address, keys=keys))
    except ServeError as exc:
        fail(str(exc))
