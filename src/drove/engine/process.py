"""The engine process: one volume served over NBD, mirrored to its replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drove.engine.control import build_app
from drove.engine.hostview import GrowableView, view_name
from drove.engine.mirror import DEFAULT_QUORUM_WAIT
from drove.engine.stack import LayerSettings
from drove.engine.volume import DEFAULT_TIMEOUT, Engine
from drove.nbd.server import NbdServer
from drove.replica.access import Gate, process_key
from drove.service import ControlServer, armed, default_signals, listen_nbd, print_ready

log = logging.getLogger("drove.engine")


class VolumeExports:
    """The engine's one export, under the volume's name and as the default ''."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def list_exports(self) -> list[tuple[str, str]]:
        """Just the volume."""
        return [(self.engine.name, f"drove volume {self.engine.name}")]

    def open_export(self, name: str) -> Any:
        """The volume for '' or its name; its growable view (for host attach) by that name."""
        if name in ("", self.engine.name):
            return self.engine.export
        if name == view_name(self.engine.name):
            return GrowableView(self.engine.export)
        return None


async def _sample(engine: Engine) -> None:
    while True:
        await asyncio.sleep(1.0)
        engine.stats.sample()


async def serve_engine(
    name: str,
    size: int,
    replicas: list[tuple[str, str]],
    *,
    nbd: tuple[str, int] | None,
    unix: str | None,
    control: tuple[str, int],
    timeout: float = DEFAULT_TIMEOUT,
    state_file: Path | None = None,
    auto_rebuild: bool = True,
    epoch: int | None = None,
    local: tuple[str, Path] | None = None,
    local_nbd: tuple[str, int] | None = ("127.0.0.1", 0),
    local_control: tuple[str, int] = ("127.0.0.1", 0),
    quorum_wait: float = DEFAULT_QUORUM_WAIT,
    fence_all: bool = False,
    data_key: bytes | None = None,
    tls=None,
    tls_required: bool = False,
    ready: Callable[[dict[str, Any]], None] = print_ready,
    stop=default_signals,
) -> None:
    """Serve volume ``name`` until ``stop`` returns (SIGTERM/SIGINT by default); with
    ``data_key``, encrypted (drove.engine.crypt)."""
    key = process_key()  # ValueError (refuse to start) when DROVE_NBD_KEY is not a key
    engine = Engine(name, size, replicas, timeout=timeout, state_file=state_file,
                    auto_rebuild=auto_rebuild, epoch=epoch, local=local,
                    local_nbd=local_nbd, local_control=local_control,
                    quorum_wait=quorum_wait, fence_all=fence_all,
                    layers=LayerSettings(data_key=data_key))
    stopped = False
    try:
        await engine.start()
        server = NbdServer(VolumeExports(engine), tls=tls, tls_required=tls_required,
                           arena=engine.arena)
        engine.nbd_connections = lambda: server.connections
        addresses = await listen_nbd(server, nbd, unix, name)
        # The control API demands the volume's key, as the replicas' do (drove.replica.access).
        ctl = ControlServer(build_app(engine, Gate(key)), *control)
        await ctl.start()
        addresses["control"] = ctl.url
        local_replica = engine.local_replica()
        if local_replica is not None and local_replica.opened:
            addresses["local_replica"] = {"name": local_replica.name,
                                          **local_replica.service.addresses}
        sampler = asyncio.ensure_future(_sample(engine))
        log.info("volume %s serving: %s", name, addresses)
        stopping = await armed(stop)
        ready(addresses)
        try:
            sig = await stopping
            log.info("stopping on signal %s", sig)
        finally:
            stopping.cancel()  # if serving ended another way
            sampler.cancel()
            engine.qos.stop_throttling()  # what waited for its turn completes before the end
            await server.close()  # no more client I/O
            # flush and mark the replicas clean before the control server stops: a stalled
            # control client can delay the end by its grace, never the clean stop
            stopped = True
            with contextlib.suppress(Exception):
                await engine.stop()
            await ctl.stop()
    finally:
        if not stopped:
            with contextlib.suppress(Exception):
                await engine.stop()
