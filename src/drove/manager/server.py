"""`drove serve`: the manager with its API, alone on SQLite or one of several on etcd."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import IO, Any

from drove.agent.node import NodeAgent
from drove.cluster.etcdstore import EtcdStore, from_url
from drove.cluster.follower import FollowerProxy
from drove.cluster.managers import ClusterRole
from drove.cluster.tokens import CLUSTER_FILE, cluster_tokens
from drove.manager.api import build_app
from drove.manager.app import ManagerApp
from drove.manager.store import Store, StoreError
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


async def serve(data_dir: Path, listen: tuple[str, int], store_url: str | None = None, *,
                no_agent: bool = False) -> None:
    """Run the manager until SIGTERM/SIGINT.

    With SQLite (the default) volumes attached now come back at the next start. With
    etcd the manager is one of several: it leads or follows, and stopping it leaves
    every volume attached and serving.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = _lock(data_dir)
    try:
        # None: the SQLite file in data_dir; etcd://H1:2379,H2:2379[/prefix]: shared state.
        store = from_url(store_url, data_dir)
    except StoreError as exc:
        lock.close()
        raise ServeError(f"cannot open the store: {exc}") from exc
    if not isinstance(store, EtcdStore):
        try:
            if no_agent:
                raise ServeError("--no-agent needs a shared store (--store etcd://...): a "
                                 "manager on SQLite runs its node's agent itself")
            await _serve_alone(data_dir, listen, store)
        finally:
            store.close()
            lock.close()
        return
    try:
        await _serve_in_cluster(data_dir, listen, store, no_agent)
    finally:
        store.close()
        lock.close()


def _server(app: Any, listen: tuple[str, int]) -> ControlServer:
    try:
        return ControlServer(app, *listen)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror}; "
                         "give another --listen HOST:PORT") from exc


def _announce(data_dir: Path, url: str, extra: str = "") -> Path:
    info_file = data_dir / "manager.json"
    info_file.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    sys.stdout.write(f"drove {url} serving\n"
                     f"  API:   {url}/docs (OpenAPI: {url}/openapi.json)\n"
                     f"  token: {data_dir / 'token'}\n{extra}"
                     f"  data:  {data_dir}\n")
    sys.stdout.flush()
    return info_file


async def _serve_alone(data_dir: Path, listen: tuple[str, int], store: Store) -> None:
    """The one manager of a SQLite store, with its node's agent in-process."""
    token = ensure_token(data_dir)
    parts = ManagerApp(store, NodeAgent(data_dir), data_dir)
    server = _server(build_app(parts, token), listen)
    info_file = data_dir / "manager.json"
    try:
        await parts.start()
        await server.start()
        info_file = _announce(data_dir, server.url)
        await default_signals()
        log.info("stopping: detaching volumes (they come back at the next start)")
    finally:
        info_file.unlink(missing_ok=True)
        await server.stop()
        await parts.stop()


async def _serve_in_cluster(data_dir: Path, listen: tuple[str, int], store: EtcdStore,
                            no_agent: bool) -> None:
    """One of several managers on an etcd store: it leads or follows."""
    try:
        token, cluster_token = await asyncio.to_thread(cluster_tokens, store, data_dir)
    except StoreError as exc:
        raise ServeError(f"cannot agree on the tokens through the store: {exc}") from exc
    agent = None if no_agent else NodeAgent(data_dir)
    parts = ManagerApp(store, agent, data_dir, cluster_token_file=data_dir / CLUSTER_FILE)
    role = ClusterRole(store, parts, event=parts.events, node=agent.name if agent else None)
    proxy = FollowerProxy(build_app(parts, token, cluster_token=cluster_token, cluster=role),
                          role)
    server = _server(proxy, listen)
    info_file = data_dir / "manager.json"
    try:
        parts.register()
        await server.start()
        await role.start(server.url)
        info_file = _announce(data_dir, server.url,
                              f"  cluster token: {data_dir / CLUSTER_FILE} (for agents)\n"
                              f"  store: etcd {store.etcd.describe()} {store.prefix}\n")
        await default_signals()
        log.info("stopping: volumes stay attached and serving; another manager leads")
    finally:
        info_file.unlink(missing_ok=True)
        await role.close()
        await server.stop()
        await proxy.aclose()
        await parts.close()
