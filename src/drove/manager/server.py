"""`drove serve`: the manager with its API and an in-process node agent on one data dir."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import IO

from drove.agent.node import NodeAgent
from drove.cluster.etcdstore import from_url
from drove.manager.api import build_app
from drove.manager.app import ManagerApp
from drove.manager.store import StoreError
from drove.service import ControlServer, default_signals

log = logging.getLogger("drove.manager")


class ServeError(Exception):
    """The manager cannot start; the message says why and what to do."""


def ensure_token(data_dir: Path) -> str:
    """The API token, made at first start (file mode 0600)."""
    path = data_dir / "token"
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def _lock(data_dir: Path) -> IO[str]:
    f = open(data_dir / "manager.lock", "a+")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        info = data_dir / "manager.json"
        raise ServeError(f"another drove manager serves {data_dir} "
                         f"({info.read_text().strip() if info.exists() else 'starting'}); "
                         "stop it first, or give another --data-dir") from exc
    return f


async def serve(data_dir: Path, listen: tuple[str, int], store_url: str | None = None) -> None:
    """Run the manager until SIGTERM/SIGINT; volumes attached now come back at the next start."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _lock(data_dir)
    token = ensure_token(data_dir)
    try:
        # None: the SQLite file in data_dir; etcd://H1:2379,H2:2379[/prefix]: shared state.
        store = from_url(store_url, data_dir)
    except StoreError as exc:
        lock.close()
        raise ServeError(f"cannot open the store: {exc}") from exc
    parts = ManagerApp(store, NodeAgent(data_dir), data_dir)
    try:
        server = ControlServer(build_app(parts, token), *listen)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror}; "
                         "give another --listen HOST:PORT") from exc
    info_file = data_dir / "manager.json"
    try:
        await parts.start()
        await server.start()
        info_file.write_text(json.dumps({"url": server.url, "pid": os.getpid()}) + "\n")
        sys.stdout.write(f"drove {server.url} serving\n"
                         f"  API:   {server.url}/docs (OpenAPI: {server.url}/openapi.json)\n"
                         f"  token: {data_dir / 'token'}\n"
                         f"  data:  {data_dir}\n")
        sys.stdout.flush()
        await default_signals()
        log.info("stopping: detaching volumes (they come back at the next start)")
    finally:
        info_file.unlink(missing_ok=True)
        await server.stop()
        await parts.stop()
        store.close()
        lock.close()
