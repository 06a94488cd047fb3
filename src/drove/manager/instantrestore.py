"""Instant restore from the manager's side: a volume usable before its data is copied back.

``drove backup restore B --to NEW --instant`` creates NEW, attaches it (no host
device), and asks each replica to put backup B under its empty head
(``POST /v1/backing``, :mod:`drove.replica.backingapi`): from then on the volume
serves reads, fetching the 2 MiB backup blocks they touch, and takes writes.
The replicas each fetch their own blocks, as Longhorn's restore does: the chain
keeps every write above the backup's layer, so no fetch can overwrite one, and
no engine protocol has to order fetches against writes across replicas.  The
cost is target traffic times the replica count.

A task (kind ``instant-restore``) follows the replicas' background fill and shows
its progress; it ends once every replica's backup layer is filled, and the volume
is then an ordinary one (the layer stays as a snapshot named after the backup).
While any volume depends on a backup that backup cannot be deleted.  The state
lives in the volume's document (``instant_restore``), so a restarted manager
starts following again; the replicas resume their fill by themselves when they
are opened again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import httpx

from drove.manager.errors import ApiError
from drove.manager.store import Store
from drove.manager.tasks import TaskContext, TaskFailed, Tasks
from drove.replica.fence import EPOCH_HEADER

log = logging.getLogger("drove.manager")

KIND = "instant-restore"
POLL = 1.0
"""Seconds between two looks at the replicas' fill."""


class Volumes(Protocol):
    """What an instant restore needs of the manager's volumes (drove.manager.core.Manager)."""

    store: Store

    @property
    def http(self) -> httpx.AsyncClient:
        """The client for the replicas' control APIs."""

    def event(self, kind: str, message: str, volume: str | None = None,
              level: str = "info") -> None:
        """Record what the system did and why."""

    def record(self, name: str) -> dict[str, Any]:
        """A volume's stored document (ApiError 404)."""

    def save(self, doc: dict[str, Any]) -> None:
        """Store a volume's document."""

    async def replica_endpoints(self, doc: dict[str, Any],
                                rep: dict[str, Any]) -> dict[str, Any] | None:
        """Where a replica is served now: ``control`` URL and ``headers`` (or None)."""

    def volume(self, name: str) -> dict[str, Any]:
        """A volume as the API shows it."""

    def create_volume(self, name: str, size: int | str, replicas: int | None = None,
                      pool: str | None = None,
                      labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Create a volume."""

    async def delete_volume(self, name: str, force: bool = False,
                            _internal: bool = False) -> dict[str, Any]:
        """Delete a volume and its data."""

    async def attach(self, name: str, mount: str | None = None, fs: str = "ext4",
                     _internal: bool = False) -> dict[str, Any]:
        """Start a volume's processes."""


def depending_on(store: Store, backup: str) -> list[str]:
    """Volumes whose instant restore from ``backup`` is not finished."""
    return sorted(d["name"] for d in store.list("volumes")
                  if (d.get("instant_restore") or {}).get("backup") == backup)


class InstantRestores:
    """Starts instant restores and follows their fill."""

    def __init__(self, volumes: Volumes, tasks: Tasks,
                 target: Callable[[], dict[str, Any]]) -> None:
        self.m = volumes
        self.tasks = tasks
        self._target = target  # the backup target's config, secret included

    async def start(self, backup: str, volume: str, size: int, replicas: int | None,
                    pool: str | None, fill_rate: int = 0) -> dict[str, Any]:
        """Create ``volume`` serving ``backup`` at once; the task following its fill
        (``fill_rate``: bytes per second each replica's background fill fetches at most)."""
        cfg = self._target()
        self.m.create_volume(volume, size, replicas, pool, {"drove.restored-from": backup})
        doc = self.m.record(volume)
        doc["instant_restore"] = {"backup": backup, "snapshot": backup}
        self.m.save(doc)
        try:
            await self.m.attach(volume, _internal=True)
            doc = self.m.record(volume)
            # Each replica reads the backup's block map itself: all at once.
            results = await asyncio.gather(*(self._install(doc, rep, backup, cfg, fill_rate)
                                             for rep in doc["replicas"]),
                                           return_exceptions=True)
            for res in results:
                if isinstance(res, BaseException):
                    raise res
        except Exception as exc:
            self.m.event("restore-failed", f"instant restore of backup {backup} into volume "
                         f"{volume} failed: {exc}; the volume is deleted", volume,
                         level="warning")
            await self.m.delete_volume(volume, force=True, _internal=True)
            if isinstance(exc, ApiError):
                raise
            raise ApiError(409, f"instant restore of backup {backup} failed: {exc}") from exc
        self.m.event("volume-restored-instantly", f"volume {volume} serves backup {backup} "
                     "now; its data is fetched as it is read and filled in the background",
                     volume)
        return self.follow(volume)

    async def _install(self, doc: dict[str, Any], rep: dict[str, Any], backup: str,
                       cfg: dict[str, Any], fill_rate: int) -> None:
        """Put the backup under replica ``rep``'s empty head."""
        ends = await self.m.replica_endpoints(doc, rep)
        if ends is None:
            raise ApiError(409, f"replica {rep['name']} of volume {doc['name']} is not served")
        headers = {**(ends.get("headers") or {}), EPOCH_HEADER: str(doc.get("epoch", 0))}
        body = {"name": backup, "backup": backup, "fill_rate": fill_rate,
                "target": {k: cfg.get(k) for k in ("url", "endpoint", "region", "access_key",
                                                   "secret_key")}}
        r = await self.m.http.post(f"{ends['control']}/v1/backing", json=body, headers=headers,
                                   timeout=120)
        if r.status_code >= 300:
            raise ApiError(409, f"replica {rep['name']} refused the backup: "
                                f"{_detail(r)}")

    def resume(self) -> None:
        """Follow again the fills a previous manager was following."""
        for doc in self.m.store.list("volumes"):
            if doc.get("instant_restore") and not self.tasks.running(KIND, doc["name"]):
                self.follow(doc["name"])

    def follow(self, volume: str) -> dict[str, Any]:
        """Start the task following ``volume``'s fill; the Task."""
        backup = (self.m.record(volume).get("instant_restore") or {}).get("backup")

        async def run(ctx: TaskContext) -> dict[str, Any]:
            return await self._follow(ctx, volume)

        async def end(task: dict[str, Any]) -> None:
            if task["state"] == "succeeded":
                self.m.event("volume-restored", f"volume {volume} restored from backup "
                             f"{backup}: every block is local, it is an ordinary volume now",
                             volume)

        return self.tasks.start(KIND, run, volume=volume, backup=backup, on_end=end)

    async def _follow(self, ctx: TaskContext, volume: str) -> dict[str, Any]:
        """Poll the replicas' fill until every one is done; then the volume is ordinary."""
        while True:
            try:
                doc = self.m.record(volume)
            except ApiError:
                raise TaskFailed(f"volume {volume} was deleted during its fill") from None
            state = doc.get("instant_restore")
            if not state:
                return {"volume": volume}
            if doc["state"] != "attached":
                ctx.message(f"paused: volume {volume} is {doc['state']}; the fill goes on "
                            "once it is attached")
                await asyncio.sleep(POLL)
                continue
            seen = [await self._status(doc, rep) for rep in doc["replicas"]
                    if rep["state"] in ("running", "stopped")]
            if seen and all(s is not None and s.get("done") for s in seen):
                doc = self.m.record(volume)
                doc.pop("instant_restore", None)
                self.m.save(doc)
                total = ctx.doc["progress"]["total"]
                ctx.progress(total, total)
                return {"volume": volume, "backup": state["backup"], "bytes": total}
            known = [s for s in seen if s is not None and not s.get("done")]
            if known:
                ctx.progress(sum(s.get("bytes_filled", 0) for s in known),
                             sum(s.get("bytes", 0) for s in known))
            errors = [e for s in known for e in s.get("errors", [])]
            if errors:
                first = errors[0]
                ctx.message(f"{len(errors)} block(s) cannot be fetched, retrying (reads there "
                            f"fail with EIO): {first['error']}")
            elif len(known) < len(seen):
                ctx.message("waiting for a replica to answer")
            else:
                ctx.message(None)
            await asyncio.sleep(POLL)

    async def _status(self, doc: dict[str, Any], rep: dict[str, Any]) -> dict[str, Any] | None:
        """A replica's fill status (None when it does not answer now)."""
        try:
            ends = await self.m.replica_endpoints(doc, rep)
            if ends is None:
                return None
            r = await self.m.http.get(f"{ends['control']}/v1/backing",
                                      headers=ends.get("headers"), timeout=10)
            r.raise_for_status()
            return r.json()
        except (httpx.HTTPError, ValueError):
            return None


def _detail(r: httpx.Response) -> str:
    """The error a control API answered with."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    return str(body.get("detail") or body.get("error") or body) if isinstance(body, dict) \
        else str(body)
