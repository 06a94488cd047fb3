"""The driver's gRPC server on a unix socket: Identity always, Controller and/or Node by mode."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc

from drove.cli.client import Manager
from drove.csi.controller import Controller
from drove.csi.identity import Identity
from drove.csi.node import Node
from drove.csi.proto import rpc

MODES = ("controller", "node", "all")
WORKERS = 8


def socket_path(endpoint: str) -> str:
    """The socket path of ``unix:///PATH`` (or ``unix:PATH``, or a bare absolute path)."""
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix):
            endpoint = endpoint[len(prefix):]
            break
    if not endpoint.startswith("/"):
        raise ValueError(f"endpoint {endpoint!r}: want unix:///ABSOLUTE/PATH/csi.sock")
    return endpoint


def build(endpoint: str, mode: str, mgr: Manager, node_id: str,
          state_dir: Path) -> grpc.Server:
    """A started server for ``mode`` on the unix socket of ``endpoint`` (a stale socket file
    left by a dead driver is replaced)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    path = socket_path(endpoint)
    if os.path.exists(path):
        os.unlink(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS,
                                                    thread_name_prefix="csi"))
    controller = mode in ("controller", "all")
    rpc.add_IdentityServicer_to_server(
        Identity(controller=controller, ready=lambda: mgr.get("/v1/health") is not None),
        server)
    if controller:
        rpc.add_ControllerServicer_to_server(Controller(mgr), server)
    if mode in ("node", "all"):
        rpc.add_NodeServicer_to_server(Node(mgr, node_id, state_dir), server)
    if server.add_insecure_port(f"unix://{path}") == 0:
        raise OSError(f"cannot listen on {path}")
    server.start()
    os.chmod(path, 0o600)  # the socket acts on the host's mounts: its owner only
    return server


def serve(endpoint: str, mode: str, mgr: Manager, node_id: str, state_dir: Path) -> None:
    """Serve until SIGTERM or SIGINT, then stop (calls in flight get 5 s to end)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = build(endpoint, mode, mgr, node_id, state_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("drove.csi").info("serving %s (%s, node %s)", endpoint, mode, node_id)
    stop.wait()
    server.stop(5).wait()
    with_path = socket_path(endpoint)
    if os.path.exists(with_path):
        os.unlink(with_path)
