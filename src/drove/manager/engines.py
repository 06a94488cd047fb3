"""The manager's client of the volumes' engines: control calls, what each engine reported
last, and where each replica is served (a process's own addresses, or the engine's for the
local replica)."""

from __future__ import annotations

from typing import Any

import httpx

from drove.agent.orphans import option
from drove.manager.errors import ApiError
from drove.manager.volumekey import control_headers, keyed_base


def process_endpoints(rep: dict[str, Any]) -> dict[str, str] | None:
    """The NBD base URI and control URL a replica's process announced (None: no process)."""
    ready = (rep.get("proc") or {}).get("ready") or {}
    if "nbd" not in ready or "control" not in ready:
        return None
    return {"nbd": ready["nbd"], "control": ready["control"]}


def launch_epoch(engine: dict[str, Any] | None) -> int | None:
    """The epoch an engine process was started with (its ``--epoch``; None: unknown)."""
    value = option((engine or {}).get("argv") or [], "--epoch")
    return int(value) if value and value.isdigit() else None


def rebuild_running(rebuild: dict[str, Any] | None) -> bool:
    """Whether the engine's rebuild report is of one still under way."""
    return bool(rebuild) and rebuild.get("state") not in ("done", "failed", "cancelled")


class Engines:
    """Calls to the engines of attached volumes, and the info each reported last."""

    def __init__(self) -> None:
        self._http = httpx.AsyncClient(timeout=30)
        self._info: dict[str, dict[str, Any]] = {}

    @property
    def http(self) -> httpx.AsyncClient:
        """The HTTP client the manager reaches engines and replicas with."""
        return self._http

    async def close(self) -> None:
        """Close the HTTP client (the manager stops)."""
        await self._http.aclose()

    async def call(self, doc: dict[str, Any], method: str, path: str,
                   timeout: float = 600, **kwargs: Any) -> Any:
        """One call to the control API of ``doc``'s engine; its JSON (ApiError when refused,
        409 when the volume is not attached, 503 when its engine does not answer)."""
        engine = doc.get("engine")
        if doc["state"] != "attached" or not engine:
            raise ApiError(409, f"volume {doc['name']} is {doc['state']}: attach it first "
                                f"(`drove volume attach {doc['name']}`)")
        url = engine["ready"]["control"] + path
        # The engine's API, like its replicas', answers only callers with the volume's key.
        headers = {**kwargs.pop("headers", {}), **control_headers(doc)}
        try:
            r = await self._http.request(method, url, timeout=timeout, headers=headers,
                                         **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(503, f"engine of volume {doc['name']} does not answer: {exc!r}; "
                                "the healer restarts it") from exc
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code if r.status_code < 500 else 502,
                           f"volume {doc['name']}: {detail}")
        return r.json() if r.content else None

    async def refresh(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """What the volume's engine reports now (None when it does not answer)."""
        try:
            info = await self.call(doc, "GET", "/v1/info", timeout=5)
        except ApiError:
            return None
        self._info[doc["name"]] = info
        return info

    def cached(self, name: str) -> dict[str, Any] | None:
        """What volume ``name``'s engine reported last (None: nothing since it was attached)."""
        return self._info.get(name)

    def drop(self, name: str) -> dict[str, Any] | None:
        """Forget what volume ``name``'s engine reported (it stops); what it reported last."""
        return self._info.pop(name, None)

    async def forget(self, doc: dict[str, Any], replica: str) -> None:
        """Take ``replica`` out of the engine (a local one: its chain closes, its lock goes);
        one the engine does not hold is no error."""
        try:
            await self.call(doc, "DELETE", f"/v1/replicas/{replica}")
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def stats(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The I/O statistics of ``doc``'s engine (ApiError when it does not answer)."""
        stats: dict[str, Any] = await self.call(doc, "GET", "/v1/stats", timeout=2)
        return stats

    async def replica_endpoints(self, doc: dict[str, Any],
                                rep: dict[str, Any]) -> dict[str, Any] | None:
        """Where replica ``rep`` of ``doc`` is served now: ``nbd`` (the base URI of its
        exports, with the volume's access key: ``/snapshot/NAME``, ``/layer/FILE``),
        ``control`` (its API URL) and ``headers`` (what a call to that API carries).

        A replica process announced both when it started.  The local replica is
        served by the engine, whose info gives its control URL (it changes when
        the engine re-opens it), and that API its NBD address.  None when it is
        not served.
        """
        if not rep.get("local"):
            ends = process_endpoints(rep)
            return None if ends is None else {**ends, "nbd": keyed_base(doc, ends["nbd"]),
                                              "headers": control_headers(doc)}
        info = await self.refresh(doc) or {}
        entry = next((r for r in info.get("replicas", [])
                      if r["name"] == rep["name"] and r.get("local")), None)
        if entry is None or not entry.get("url"):
            return None
        try:
            r = await self._http.get(f"{entry['url']}/v1/info", timeout=10,
                                     headers=control_headers(doc))
            r.raise_for_status()
            nbd = r.json()["addresses"]["nbd"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        return {"nbd": keyed_base(doc, nbd), "control": entry["url"],
                "headers": control_headers(doc)}
