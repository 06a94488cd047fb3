"""The engine's handle on one replica process: its control API and NBD addresses."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from drove.engine.mirror import Member, Mode, ReplicaIO
from drove.nbd import proto
from drove.nbd.errors import OptionError
from drove.replica.access import bearer, keyed_export, process_key, redact
from drove.replica.fence import EPOCH_HEADER, head_export_name
from drove.webclient import HttpClient, RequestError

SLOW_CALL_TIMEOUT = 600.0
"""Seconds a control call that reads whole layers may take (checksums, digests, prepare)."""


class ReplicaControlError(OSError):
    """A replica's control API refused or failed a call (message has its answer)."""

    def __init__(self, status: int, message: str, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error  # the replica's error class name, when it answered one

    @property
    def stale_epoch(self) -> bool:
        """The replica refused the call because a newer engine owns it."""
        return self.error == "StaleEpochError"


class Disconnected:
    """Placeholder I/O for a replica the engine is not connected to: every call fails."""

    async def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("replica not connected")

    read = write = zero = trim = flush = cache = block_status = _fail

    def abort(self) -> None:
        """Nothing to cut."""


class ReplicaHandle(Member):
    """A mirror member that also knows how to reach its replica's control API."""

    def __init__(self, name: str, url: str, timeout: float, arena: Any = None) -> None:
        super().__init__(name, Disconnected(), Mode.ERR)
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.arena = arena  # drove.nbd.arena.Arena offered to a same-host replica
        self.http = HttpClient(self.url, timeout=timeout)
        self.info: dict[str, Any] = {}
        self.epoch: int | None = None  # the engine's, once it has one
        # The volume's access key, which the replica's NBD exports and control API demand
        # (drove.replica.access).
        self.key = process_key()
        self.http.headers.update(bearer(self.key))
        # Called with the reason when the replica says a newer engine owns it.
        self.on_fenced: Callable[[str], None] | None = None

    @property  # type: ignore[override]
    def error(self) -> str | None:
        """Why the replica is out of the volume (the engine's API shows it)."""
        return self._error

    @error.setter
    def error(self, why: str | None) -> None:
        # NBD errors name the export, which carries the volume's key: never shown.
        self._error = None if why is None else redact(why)

    def set_epoch(self, epoch: int) -> None:
        """Send ``epoch`` with every control call and head connection from now on."""
        self.epoch = epoch
        self.http.headers[EPOCH_HEADER] = str(epoch)

    def _fenced(self, why: str) -> None:
        if self.on_fenced is not None:
            self.on_fenced(why)

    @property
    def connected(self) -> bool:
        """Whether an NBD connection is in use (not the placeholder)."""
        return not isinstance(self.io, Disconnected)

    def to_json(self) -> dict[str, Any]:
        """What the engine's API says about this replica."""
        return {"name": self.name, "url": self.url, "mode": str(self.mode),
                "error": self.error,
                "nbd": self.nbd_uri("head", keyed=False) if self.info else None,
                "arena": getattr(self.io, "arena", None) is not None}

    async def call(self, method: str, path: str, *, slow: bool = False, **kwargs: Any) -> Any:
        """One control call; ReplicaControlError on a non-2xx answer or no answer.

        Calls answered at once are bounded by the I/O timeout; ``slow`` ones
        (hashing or preparing whole layers) get :data:`SLOW_CALL_TIMEOUT`.
        """
        try:
            r = await self.http.request(method, path, timeout=SLOW_CALL_TIMEOUT if slow
                                        else self.timeout, **kwargs)
        except RequestError as exc:
            raise ReplicaControlError(0, f"replica {self.name} ({self.url}): {exc!r}") from exc
        if r.status_code >= 400:
            try:
                answer = r.json()
                detail, error = answer.get("detail", r.text), answer.get("error")
            except (ValueError, AttributeError):
                detail, error = r.text, None
            exc = ReplicaControlError(
                r.status_code, f"replica {self.name}: {method} {path}: {r.status_code} {detail}",
                error)
            if exc.stale_epoch:
                self._fenced(f"replica {self.name}: {detail}")
            raise exc
        return r.json() if r.content else None

    async def claim(self, epoch: int) -> dict[str, Any]:
        """Take the replica for this engine's new epoch (409 if it is not above the replica's)."""
        self.info = await self.call("POST", "/v1/epoch", json={"epoch": epoch})
        return self.info

    async def refresh(self) -> dict[str, Any]:
        """Fetch the replica's info (size, addresses, engine state, rebuild flags)."""
        self.info = await self.call("GET", "/v1/info")
        return self.info

    def nbd_uri(self, export: str, *, keyed: bool = True) -> str:
        """URI of ``export`` on this replica: its unix socket when local, else TCP.

        ``keyed``: with the volume's access key in the export name (what opens it);
        without, for showing (the engine's API must not hand the key out).
        """
        if keyed:
            export = keyed_export(self.key, export)
        addresses = self.info.get("addresses", {})
        unix = addresses.get("nbd_unix")
        if unix and os.path.exists(unix):
            return f"nbd+unix:///{export}?socket={unix}"
        if "nbd_host" in addresses:
            return f"nbd://{addresses['nbd_host']}:{addresses['nbd_port']}/{export}"
        if unix:
            return f"nbd+unix:///{export}?socket={unix}"
        raise ReplicaControlError(0, f"replica {self.name} announces no NBD address")

    async def connect(self) -> ReplicaIO:
        """Open a fresh NBD connection to the head (of our epoch) and use it for I/O."""
        from drove.nbd.client import connect_uri

        export = "head" if self.epoch is None else head_export_name(self.epoch)
        try:
            client = await connect_uri(self.nbd_uri(export), request_timeout=self.timeout,
                                       arena=self.arena)
        except OptionError as exc:
            if exc.reply == proto.NBD_REP_ERR_POLICY:
                self._fenced(f"replica {self.name} refused the head: {exc.message}")
            raise
        old, self.io = self.io, client
        old.abort()
        return client

    def disconnect(self) -> None:
        """Cut the NBD connection."""
        old, self.io = self.io, Disconnected()
        old.abort()

    async def close(self) -> None:
        """Close the NBD connection (flushing nothing) and the HTTP client."""
        io = self.io
        self.io = Disconnected()
        close = getattr(io, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:
                io.abort()
        await self.http.aclose()

    # control calls the engine makes
    async def layers(self) -> list[dict[str, Any]]:
        """Every layer, removed ones included."""
        return await self.call("GET", "/v1/layers", params={"removed": "true"})

    async def set_engine_state(self, state: dict[str, Any]) -> None:
        """Persist the engine's state (generation, clean flag, members) on the replica.

        The replica refuses a generation lower than the one it holds (409).
        """
        await self.call("PUT", "/v1/engine-state", json=state)

    async def snapshot(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        """Snapshot the head."""
        return await self.call("POST", "/v1/snapshots", json={"name": name, "labels": labels})

    async def delete_snapshot(self, name: str) -> dict[str, Any]:
        """Delete a snapshot and purge."""
        return await self.call("DELETE", f"/v1/snapshots/{name}", slow=True)

    async def revert(self, name: str) -> dict[str, Any]:
        """New head on snapshot ``name``."""
        return await self.call("POST", "/v1/revert", json={"snapshot": name})

    async def expand(self, size: int) -> dict[str, Any]:
        """Grow to ``size``."""
        return await self.call("POST", "/v1/expand", json={"size": size})

    async def backing_export(self) -> dict[str, Any]:
        """The backup an instant restore still fills this replica's bottom layer from
        (``{"done": true}`` when it fills none): what a rebuild target adopts."""
        return await self.call("POST", "/v1/backing/export")

    async def adopt_backing(self, body: dict[str, Any]) -> dict[str, Any]:
        """Fetch an incomplete bottom layer from its backup (body: as backing_export's)."""
        return await self.call("POST", "/v1/backing/adopt", slow=True, json=body)

    async def layer_checksum(self, file: str) -> str:
        """sha256 of one layer's own data (cached by the replica)."""
        return (await self.call("GET", f"/v1/layers/{file}/checksum", slow=True))["checksum"]

    async def digests(self, file: str, range_size: int) -> list[str]:
        """Per-range digests of one layer's own data."""
        r = await self.call("GET", f"/v1/layers/{file}/digests", slow=True,
                            params={"range_size": range_size})
        return r["digests"]

    async def prepare_rebuild(self, layers: list[dict[str, Any]], head_parent: str | None,
                              size: int, reuse_head_as: str | None) -> dict[str, Any]:
        """Make this replica's tree the source's, every layer incomplete, empty head on top."""
        return await self.call("POST", "/v1/rebuild/prepare", slow=True, json={
            "layers": layers, "head_parent": head_parent, "size": size,
            "reuse_head_as": reuse_head_as})

    async def start_sync(self, file: str, source: str,
                         ranges: list[tuple[int, int]] | None, rate: int = 0) -> None:
        """Start pulling layer ``file`` from the ``source`` NBD URI (``rate``: bytes/s)."""
        body: dict[str, Any] = {
            "file": file, "source": source,
            "ranges": None if ranges is None else [list(r) for r in ranges]}
        if rate:
            body["rate"] = rate
        await self.call("POST", "/v1/rebuild/sync", json=body)

    async def sync_status(self) -> dict[str, Any]:
        """Progress of the running pull."""
        return await self.call("GET", "/v1/rebuild/sync")

    async def cancel_sync(self) -> None:
        """Stop the running pull."""
        await self.call("DELETE", "/v1/rebuild/sync")

    async def complete_layer(self, file: str, checksum: str) -> dict[str, Any]:
        """Verify layer ``file`` against the source's checksum; clears its incomplete flag."""
        return await self.call("POST", f"/v1/rebuild/layers/{file}/complete", slow=True,
                               json={"checksum": checksum})
