"""Starting the online rebuild of one replica of an attached volume: by its own process,
or in place as the replica the engine serves itself (data locality)."""

from __future__ import annotations

from typing import Any

from drove.manager import locality
from drove.manager.disks import Disks
from drove.manager.engines import Engines, process_endpoints
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.records import Records
from drove.manager.replicas import Replicas


class Rebuilds:
    """Hands a replica to a volume's engine to be rebuilt (the engine copies the data)."""

    def __init__(self, *, records: Records, replicas: Replicas, engines: Engines, disks: Disks,
                 event: EventFn) -> None:
        self._records = records
        self._replicas = replicas
        self._engines = engines
        self._disks = disks
        self._event = event

    async def rebuild(self, doc: dict[str, Any], rep: dict[str, Any], modes: dict[str, Any],
                      why: str) -> bool:
        """Rebuild ``rep`` online: by its own process, or as the engine's local replica.

        ``modes`` is the engine's report of each replica it holds.  True if the
        engine's membership changed.
        """
        # Marked before the process starts (and saved with it): between the start and the
        # engine taking it in WO mode, the cached engine info may still list the old process
        # as RW, and the volume must not be reported healthy in that window.
        rep["rebuilding"] = True
        if locality.wants_local(doc, rep, self._records.attach_node(doc),
                                self._records.locality(doc)):
            return await self._rebuild_local(doc, rep, modes, why)
        rep["local"] = False
        listed = modes.get(rep["name"])
        forgotten = False
        if listed is not None and listed.get("local"):
            # The engine holds its chain (and its directory's lock): released first.
            try:
                await self._engines.forget(doc, rep["name"])
            except ApiError as exc:
                self._replicas.fail(doc, rep, f"rebuild could not start: {exc}")
                return True
            listed, forgotten = None, True
        if not await self._replicas.start(doc, rep):
            return forgotten
        ends = process_endpoints(rep) or {}
        try:
            if listed is not None:
                await self._engines.forget(doc, rep["name"])
            await self._engines.call(doc, "POST", "/v1/replicas", json={
                "name": rep["name"], "url": ends.get("control")})
        except ApiError as exc:
            await self._replicas.stop(rep, 5.0)
            self._replicas.fail(doc, rep, f"rebuild could not start: {exc}")
            return True
        self._event("rebuild-started", f"replica {rep['name']} on disk {rep['disk']}: {why}",
                    doc["name"])
        return True

    async def _rebuild_local(self, doc: dict[str, Any], rep: dict[str, Any],
                             modes: dict[str, Any], why: str) -> bool:
        """Rebuild ``rep`` as the replica the engine serves itself, in place (by delta)."""
        problem = self._disks.problem(rep)
        if problem:
            self._replicas.fail(doc, rep, problem)
            return False
        listed = modes.get(rep["name"])
        body: dict[str, Any] = {"name": rep["name"], "directory": rep["path"]}
        try:
            if listed is not None and listed.get("local") and listed["mode"] == "ERR":
                body = {"name": rep["name"]}  # the engine re-opens its chain if it must
            elif listed is not None:
                await self._engines.forget(doc, rep["name"])
            # A process that served it must be gone before the engine takes its directory.
            await self._replicas.stop(rep)
            rep.update(local=True, proc=None, state="running", error=None)
            self._records.save(doc)
            await self._engines.call(doc, "POST", "/v1/replicas", json=body)
        except ApiError as exc:
            self._replicas.fail(doc, rep, f"rebuild could not start: {exc}")
            return True
        self._event("rebuild-started", f"replica {rep['name']} on disk {rep['disk']}: {why} "
                    "(local: served by the engine, no process)", doc["name"])
        return True
