"""The replica process: one chain served as NBD exports plus its control API."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drove.nbd.server import NbdServer
from drove.replica import access, backingapi
from drove.replica.chain import Replica
from drove.replica.control import ReplicaControl, build_app
from drove.replica.exports import FlushGate, ReplicaExports
from drove.replica.fence import Fence
from drove.service import ControlServer, armed, default_signals, listen_nbd, print_ready
from drove.units import format_size

log = logging.getLogger("drove.replica")

__all__ = ["ReplicaService", "ReplicaSetupError", "open_or_create", "print_ready",
           "serve_replica"]


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


class ReplicaService:
    """One replica served: its chain, NBD exports, epoch fence and control API.

    The replica process runs one; an engine runs one for its local replica
    (data locality), whose head it also opens in-process with :meth:`open_head`.
    """

    def __init__(self, directory: Path, size: int | None, *, nbd: tuple[str, int] | None,
                 unix: str | None, control: tuple[str, int], tls=None,
                 tls_required: bool = False, size_to_create_only: bool = False,
                 access_key: str | None = access.FROM_ENV) -> None:
        """``access_key``: the volume's key its NBD clients must name (None: none; by
        default the process's, from ``DROVE_NBD_KEY``; see drove.replica.access)."""
        self.directory = directory
        self._access = access.Gate(access.process_key() if access_key is access.FROM_ENV
                                   else access_key)
        self._size = size
        self._size_to_create_only = size_to_create_only  # an existing replica opens as it is
        self._nbd, self._unix, self._control = nbd, unix, control
        self._tls, self._tls_required = tls, tls_required
        self.replica: Replica | None = None
        self.addresses: dict[str, Any] = {}
        self._cut_hooks: list[Callable[[Callable[[Any], bool]], int]] = []

    async def start(self) -> dict[str, Any]:
        """Open (or create) the chain and start serving; the addresses to announce."""
        size = self._size
        if self._size_to_create_only and (self.directory / "volume.meta").exists():
            size = None
        replica = self.replica = open_or_create(self.directory, size)
        try:
            self.gate = FlushGate()
            self.fence = Fence(replica)
            self.exports = ReplicaExports(replica, self.gate, self.fence, self._access)
            self.server = NbdServer(self.exports, tls=self._tls,
                                    tls_required=self._tls_required, accept_arena=True)
            self.fence.bind(self._cut)
            addresses = await listen_nbd(self.server, self._nbd, self._unix)
            self.control = ReplicaControl(replica, self.gate, self.fence, addresses)
            self.ctl = ControlServer(build_app(self.control, self._access), *self._control)
            await self.ctl.start()
        except BaseException:
            self.replica = None
            replica.close()
            raise
        addresses["control"] = self.ctl.url
        self.addresses = addresses
        backingapi.start_fill(replica)  # an instant restore's fill goes on where it was
        return addresses

    def set_size(self, size: int) -> None:
        """The size to create the replica with when its directory holds none yet."""
        self._size = size

    def _cut(self, which: Callable[[Any], bool]) -> int:
        """Cut the NBD connections ``which`` picks, and in-process heads it picks."""
        return self.server.cut_connections(which) + sum(hook(which) for hook in self._cut_hooks)

    def on_cut(self, hook: Callable[[Callable[[Any], bool]], int]) -> None:
        """Also call ``hook(which)`` when the fence cuts heads (for in-process heads)."""
        self._cut_hooks.append(hook)

    def open_head(self, export: str) -> Any:
        """Open head export ``export`` in-process, as a connection would (fenced)."""
        head = self.exports.open_local(export)
        if head is None:
            raise ReplicaSetupError(f"replica in {self.directory} has no export {export!r}")
        return head

    async def stop(self) -> None:
        """Stop serving, make the chain durable, close it.

        No more client I/O or background sync first, then the chain is made durable,
        and only then the control server stops: a stalled control client cannot
        delay the flush.
        """
        replica, self.replica = self.replica, None
        if replica is None:
            return
        try:
            await backingapi.stop_fill(replica)
            await self.server.close()
            await self.control.close()
            await self.gate.drain()
            replica.flush()
            await self.ctl.stop()
            await self.control.close()  # a sync started over the control API meanwhile
        finally:
            replica.close()


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
    service = ReplicaService(directory, size, nbd=nbd, unix=unix, control=control, tls=tls,
                             tls_required=tls_required)
    addresses = await service.start()
    try:
        log.info("replica %s serving: %s", directory, addresses)
        stopping = await armed(stop)
        ready(addresses)
        try:
            sig = await stopping
            log.info("stopping on signal %s", sig)
        finally:
            stopping.cancel()  # if serving ended another way
    finally:
        await service.stop()
