"""The engine process: one volume served over NBD, mirrored to its replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drove.engine.control import build_app
from drove.engine.handoff import (
    COMMIT_TIMEOUT,
    SUCCESSOR_MARGIN,
    HandoffError,
    HandoffService,
    Inheritance,
    ask_predecessor,
)
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
    handoff: str | None = None,
    takeover: str | None = None,
    ready: Callable[[dict[str, Any]], None] = print_ready,
    stop=default_signals,
) -> None:
    """Serve volume ``name`` until ``stop`` returns (SIGTERM/SIGINT by default); with
    ``data_key``, encrypted (drove.engine.crypt).

    ``handoff``: listen there for a successor engine (a live upgrade); ``takeover``:
    be that successor of the engine listening there (drove.engine.handoff).
    """
    key = process_key()  # ValueError (refuse to start) when DROVE_NBD_KEY is not a key
    if takeover is not None and epoch is None:
        raise HandoffError("--takeover needs --epoch, above the running engine's")
    engine = Engine(name, size, replicas, timeout=timeout, state_file=state_file,
                    auto_rebuild=auto_rebuild, epoch=epoch, local=local,
                    local_nbd=local_nbd, local_control=local_control,
                    quorum_wait=quorum_wait, fence_all=fence_all,
                    layers=LayerSettings(data_key=data_key))
    server = NbdServer(VolumeExports(engine), tls=tls, tls_required=tls_required,
                       arena=engine.arena)
    engine.nbd_connections = lambda: server.connections
    if takeover is not None:
        await _take_over(engine, server, takeover, handoff, control, key, ready, stop)
        return
    stopped = False
    try:
        await engine.start()
        addresses = await listen_nbd(server, nbd, unix, name)
        # The control API demands the volume's key, as the replicas' do (drove.replica.access).
        ctl = ControlServer(build_app(engine, Gate(key)), *control)
        await ctl.start()
        addresses["control"] = ctl.url
        service = None
        if handoff is not None:
            service = HandoffService(handoff, engine, server)
            await service.start()
            addresses["handoff"] = handoff
        stopping = await armed(stop)
        ready(_with_local(engine, addresses))
        stopped = True  # _serve stops the engine (or hands it over) however it ends
        await _serve(engine, server, ctl, service, stopping)
    finally:
        if not stopped:
            with contextlib.suppress(Exception):
                await engine.stop()


def _with_local(engine: Engine, addresses: dict[str, Any]) -> dict[str, Any]:
    """``addresses`` and the local replica's, when the engine serves one."""
    local_replica = engine.local_replica()
    if local_replica is not None and local_replica.opened:
        addresses["local_replica"] = {"name": local_replica.name,
                                      **local_replica.service.addresses}
    log.info("volume %s serving: %s", engine.name, addresses)
    return addresses


async def _serve(engine: Engine, server: NbdServer, ctl: ControlServer,
                 service: HandoffService | None, stopping: asyncio.Future[int]) -> None:
    """Serve until a signal (a clean stop) or a successor's commit (an exit that touches
    no replica)."""
    sampler = asyncio.ensure_future(_sample(engine))
    handed = service.committed if service is not None else asyncio.get_running_loop(
        ).create_future()
    try:
        await asyncio.wait([stopping, handed], return_when=asyncio.FIRST_COMPLETED)
        if handed.done():
            # The successor holds the sockets and a newer epoch: nothing is flushed or
            # marked here (the replicas are its), and the socket files stay its own.
            log.info("handed over to pid %s: exiting", handed.result())
            service.close(unlink=False)  # type: ignore[union-attr]
            return
        log.info("stopping on signal %s", stopping.result())
    finally:
        stopping.cancel()  # if serving ended another way
        sampler.cancel()
        if not handed.done():
            if service is not None:
                service.close()
            engine.qos.stop_throttling()  # what waited for its turn completes before the end
            await server.close()  # no more client I/O
        with contextlib.suppress(Exception):
            if not handed.done():
                # flush and mark the replicas clean before the control server stops: a
                # stalled control client can delay the end by its grace, never the clean stop
                await engine.stop()
        await ctl.stop()


async def _take_over(engine: Engine, server: NbdServer, path: str, handoff: str | None,
                     control: tuple[str, int], key: Any,
                     ready: Callable[[dict[str, Any]], None], stop: Any) -> None:
    """Take the volume over from the engine listening at ``path`` (drove.engine.handoff)."""
    ctl = ControlServer(build_app(engine, Gate(key)), *control)
    await ctl.start()
    committed = False
    inherited: Inheritance | None = None
    channel = None
    try:
        channel, frame = await ask_predecessor(path, engine.name, engine.requested_epoch)
        inherited = Inheritance(frame)
        inherited.check(server)
        inherited.apply_qos(engine)
        await channel.send({"op": "claiming"})
        log.info("volume %s: claiming epoch %s from the engine at %s", engine.name,
                 engine.requested_epoch, path)
        engine.defer_rebuild = True  # a rebuild writes: not before the commit
        try:
            async with asyncio.timeout(COMMIT_TIMEOUT - SUCCESSOR_MARGIN):
                await engine.start()
        except TimeoutError:
            raise HandoffError(f"could not take the replicas within "
                               f"{COMMIT_TIMEOUT - SUCCESSOR_MARGIN:g} s") from None
        addresses = inherited.addresses(engine.name)
        addresses["control"] = ctl.url
        if handoff is not None:
            addresses["handoff"] = handoff
        stopping = await armed(stop)
        ready(_with_local(engine, addresses))
        await channel.send({"op": "committed"})
        committed = True
    except BaseException as exc:
        log.error("volume %s: taking over from the engine at %s failed: %s", engine.name, path,
                  exc or type(exc).__name__)
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.send({"op": "abort", "error": str(exc) or type(exc).__name__,
                                    "claimed": engine.claim_sent})
        raise
    finally:
        if channel is not None:
            channel.close()
        if not committed:
            if inherited is not None:
                inherited.close()
            # Nothing is flushed or marked: the old engine takes the replicas back.
            with contextlib.suppress(Exception):
                await engine.suspend()
            await ctl.stop()
    assert inherited is not None
    await inherited.adopt(server)
    service = None
    if handoff is not None:
        sock = inherited.handoff_sock if handoff == path else None
        if sock is None:
            inherited.close()
        inherited.handoff_sock = None
        service = HandoffService(handoff, engine, server, sock=sock)
        await service.start()
    else:
        inherited.close()
    engine.event("took-over", f"took the volume over from the engine at {path} with "
                              f"{server.connections} client connection(s)",
                 connections=server.connections, epoch=engine.epoch)
    engine.start_deferred_rebuilds()
    await _serve(engine, server, ctl, service, stopping)
