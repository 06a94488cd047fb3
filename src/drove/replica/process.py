"""The replica process: one chain served as NBD exports plus its control API."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drove.nbd.server import NbdServer
from drove.replica.chain import Replica
from drove.replica.control import ReplicaControl, build_app
from drove.replica.exports import FlushGate, ReplicaExports
from drove.replica.fence import Fence
from drove.service import ControlServer, armed, default_signals, listen_nbd, print_ready
from drove.units import format_size

log = logging.getLogger("drove.replica")

__all__ = ["ReplicaSetupError", "open_or_create", "print_ready", "serve_replica"]


class ReplicaSetupError(Exception):
    """The replica directory cannot be served as asked (message says what to do)."""


def open_or_create(directory: Path, size: int | None) -> Replica:
    """Open the replica in ``directory``, creating it when ``size`` is given and none exists."""
    if (directory / "volume.meta").exists():
        replica = Replica.open(directory)
        if size is not None and size != replica.size:
            have = replica.size
            replica.close()
            raise ReplicaSetupError(
                f"replica in {directory} is {format_size(have)} ({have} bytes), not {size} bytes; "
                "omit --size to serve it as it is, or grow it with `drove replica expand`"
            )
        return replica
    if size is None:
        raise ReplicaSetupError(f"{directory} holds no replica; give --size to create one")
    directory.mkdir(parents=True, exist_ok=True)
    log.info("creating replica in %s (%s)", directory, format_size(size))
    return Replica.create(directory, size)


async def serve_replica(
    directory: Path,
    size: int | None,
    *,
    nbd: tuple[str, int] | None,
    unix: str | None,
    control: tuple[str, int],
    tls=None,
    tls_required: bool = False,
    ready: Callable[[dict[str, Any]], None] = print_ready,
    stop=default_signals,
) -> None:
    """Serve the replica until ``stop`` returns (SIGTERM/SIGINT by default)."""
    replica = open_or_create(directory, size)
    try:
        gate = FlushGate()
        fence = Fence(replica)
        exports = ReplicaExports(replica, gate, fence)
        server = NbdServer(exports, tls=tls, tls_required=tls_required, accept_arena=True)
        fence.bind(server.cut_connections)
        addresses = await listen_nbd(server, nbd, unix)
        rc = ReplicaControl(replica, gate, fence, addresses)
        ctl = ControlServer(build_app(rc), *control)
        await ctl.start()
        addresses["control"] = ctl.url
        log.info("replica %s serving: %s", directory, addresses)
        stopping = await armed(stop)
        ready(addresses)
        try:
            sig = await stopping
            log.info("stopping on signal %s", sig)
        finally:
            stopping.cancel()  # if serving ended another way
            # No more client I/O or background sync, then the chain is made durable, and only
            # then the control server stops: a stalled control client cannot delay the flush.
            await server.close()
            await rc.close()
            await gate.drain()
            replica.flush()
            await ctl.stop()
            await rc.close()  # a sync started over the control API meanwhile
    finally:
        replica.close()
