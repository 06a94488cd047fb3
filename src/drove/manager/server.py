"""`drove serve`: the manager with its API, alone on SQLite or one of several on etcd."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import IO, Any

from drove.agent.node import NodeAgent
from drove.cluster.etcdstore import EtcdStore, from_url
from drove.cluster.follower import FollowerProxy
from drove.cluster.localagent import LocalAgent, LocalAgentError
from drove.cluster.managers import ClusterRole
from drove.cluster.tokens import CLUSTER_FILE, cluster_tokens
from drove.manager.api import build_app
from drove.manager.app import ManagerApp
from drove.manager.datakeys import DataKeys
from drove.manager.errors import ApiError, validate_name
from drove.manager.store import Store, StoreError
from drove.service import ControlServer, default_signals

log = logging.getLogger("drove.manager")


WILDCARDS = ("0.0.0.0", "::", "")
"""Listen addresses that name no one address (no use as a URL another host calls)."""


class ServeError(Exception):
    """The manager cannot start; the message says why and what to do."""


def ensure_token(data_dir: Path, name: str = "token", unlike: str | None = None) -> str:
    """The token in ``DATA_DIR/name`` (the API's by default), made at first start (file
    mode 0600); never ``unlike`` (the cluster token is not the API token)."""
    path = data_dir / name
    if path.exists():
        token = path.read_text().strip()
        if token and token != unlike:
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
                no_agent: bool = False, node: str | None = None,
                agent_listen: tuple[str, int] | None = None,
                keys: DataKeys | None = None) -> None:
    """Run the manager until SIGTERM/SIGINT (``keys``: with the KEK of --kek-file).

    With SQLite (the default) volumes attached now come back at the next start. With
    etcd the manager is one of several: it leads or follows, and stopping it leaves
    every volume attached and serving.
    """
    clustered = (store_url or "").startswith("etcd://")
    if not clustered:
        for given, option in ((no_agent, "--no-agent"), (node, "--node"),
                              (agent_listen, "--agent-listen")):
            if given:
                raise ServeError(f"{option} is for a manager in a cluster (--store "
                                 "etcd://...); a manager on SQLite runs its node's agent "
                                 "in-process")
    # Checked before anything is made: bad options change nothing.
    if clustered and listen[0] in WILDCARDS:
        raise ServeError(f"--listen {listen[0]} is every address, but the other managers "
                         "and the agents must be told one: give --listen with the address "
                         "they reach this host at")
    own = _own_node(listen, node, agent_listen) if clustered and not no_agent else None
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
            await _serve_alone(data_dir, listen, store, keys)
        finally:
            store.close()
            lock.close()
        return
    try:
        await _serve_in_cluster(data_dir, listen, store, own, keys)
    finally:
        store.close()
        lock.close()


def _own_node(listen: tuple[str, int], node: str | None,
              agent_listen: tuple[str, int] | None) -> tuple[str, tuple[str, int]]:
    """(name, HOST:PORT) of a cluster manager's own node agent, or ServeError why not."""
    name = node or socket.gethostname()
    try:
        validate_name("node", name)
    except ApiError as exc:
        raise ServeError(f"{exc}; give another --node") from exc
    # By default the node's agent listens on the API's address, any port.
    where = agent_listen or (listen[0], 0)
    if where[0] in WILDCARDS:
        raise ServeError(f"--agent-listen {where[0]} is every address: give the one other "
                         "hosts reach this node at (its engines and replicas listen there)")
    return name, where


def _server(app: Any, listen: tuple[str, int]) -> ControlServer:
    try:
        return ControlServer(app, *listen)
    except OSError as exc:
        raise ServeError(f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror}; "
                         "give another --listen HOST:PORT") from exc


def _announce(data_dir: Path, url: str, extra: str = "") -> Path:
    info_file = data_dir / "manager.json"
    tmp = info_file.with_suffix(".tmp")  # whole or absent: scripts poll for it
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    os.replace(tmp, info_file)
    sys.stdout.write(f"drove {url} serving\n"
                     f"  UI:    {url}/\n"
                     f"  API:   {url}/docs (OpenAPI: {url}/openapi.json)\n"
                     f"  token: {data_dir / 'token'} (the first admin's; `drove user` adds "
                     f"users)\n{extra}"
                     f"  data:  {data_dir}\n")
    sys.stdout.flush()
    return info_file


async def _serve_alone(data_dir: Path, listen: tuple[str, int], store: Store,
                       keys: DataKeys | None = None) -> None:
    """The one manager of a SQLite store, with its node's agent in-process."""
    token = ensure_token(data_dir)
    # Agents (`drove agent --token-file`) and this manager call each other with their own.
    cluster_token = ensure_token(data_dir, CLUSTER_FILE, unlike=token)
    parts = ManagerApp(store, NodeAgent(data_dir), data_dir,
                       cluster_token_file=data_dir / CLUSTER_FILE, keys=keys)
    server = _server(build_app(parts, token, cluster_token=cluster_token), listen)
    info_file = data_dir / "manager.json"
    try:
        await parts.start()
        await server.start()
        info_file = _announce(data_dir, server.url,
                              f"  cluster token: {data_dir / CLUSTER_FILE} (for agents)\n")
        await default_signals()
        log.info("stopping: detaching volumes (they come back at the next start)")
    finally:
        info_file.unlink(missing_ok=True)
        parts.manager.end_long_polls()  # else the server's stop waits for them
        await server.stop()
        await parts.stop()


async def _serve_in_cluster(data_dir: Path, listen: tuple[str, int], store: EtcdStore,
                            own: tuple[str, tuple[str, int]] | None,
                            keys: DataKeys | None = None) -> None:
    """One of several managers on an etcd store: it leads or follows; ``own`` is (name,
    HOST:PORT) of its node's agent, served like `drove agent` (None: --no-agent)."""
    try:
        token, cluster_token = await asyncio.to_thread(cluster_tokens, store, data_dir)
    except StoreError as exc:
        raise ServeError(f"cannot agree on the tokens through the store: {exc}") from exc
    local = None if own is None else LocalAgent(data_dir, own[0], own[1], cluster_token)
    parts = ManagerApp(store, None, data_dir, cluster_token_file=data_dir / CLUSTER_FILE,
                       node=local.node if local else None, keys=keys)
    role = ClusterRole(store, parts, event=parts.events, node=local.node if local else None)
    proxy = FollowerProxy(build_app(parts, token, cluster_token=cluster_token, cluster=role),
                          role)
    server = _server(proxy, listen)
    info_file = data_dir / "manager.json"
    try:
        await server.start()
        if local is not None:
            # Before campaigning: a leader must find this node at its agent's new address.
            try:
                await local.start(server.url)
            except LocalAgentError as exc:
                raise ServeError(str(exc)) from exc
        await role.start(server.url)
        node = f"  node:  {local.node} (agent {local.url})\n" if local else ""
        info_file = _announce(data_dir, server.url,
                              f"  cluster token: {data_dir / CLUSTER_FILE} (for agents)\n"
                              f"  store: etcd {store.etcd.describe()} {store.prefix}\n{node}")
        await default_signals()
        log.info("stopping: volumes stay attached and serving; another manager leads")
    finally:
        info_file.unlink(missing_ok=True)
        parts.manager.end_long_polls()  # the agents poll another manager from now on
        await role.close()
        if local is not None:
            await local.stop()
        await server.stop()
        await proxy.aclose()
        await parts.close()
