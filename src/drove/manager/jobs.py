"""Recurring jobs (snapshot, backup, scrub, trim): cron schedules, retention, runs as events.

A job's next run is computed from its last run (or its creation) with croniter,
in UTC.  The scheduler sleeps until the earliest next run; when the manager
was down over one or more scheduled times, the job is due at start and runs
once (not once per missed time), then follows its schedule from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from datetime import UTC, datetime
from typing import Any, Protocol

from croniter import croniter

from drove.manager.backups import Backups
from drove.manager.errors import ApiError, validate_name
from drove.manager.scrub import KIND as SCRUB_KIND
from drove.manager.scrub import Scrubber
from drove.manager.space import KIND as TRIM_KIND
from drove.manager.space import Space
from drove.manager.store import Store, now_iso
from drove.manager.tasks import Tasks

log = logging.getLogger("drove.manager")

JOB_LABEL = "drove.job"
"""Label on every snapshot and backup a job makes: what its retention counts."""

MAX_SLEEP = 30.0
"""The scheduler re-reads the jobs at least this often (seconds)."""


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def next_run(job: dict[str, Any]) -> datetime:
    """When ``job`` runs next (UTC)."""
    base = _parse(job["last_run"] or job["created"])
    return croniter(job["cron"], base).get_next(datetime)


class Snapshots(Protocol):
    """What jobs need of the manager's volumes (drove.manager.core.Manager)."""

    store: Store

    def event(self, kind: str, message: str, volume: str | None = None,
              level: str = "info") -> None:
        """Record what the system did and why."""

    async def snapshots(self, name: str) -> list[dict[str, Any]]:
        """A volume's snapshot tree."""

    async def create_snapshot(self, name: str, snapshot: str | None = None,
                              labels: dict[str, str] | None = None) -> dict[str, Any]:
        """Snapshot a volume."""

    async def delete_snapshot(self, name: str, snapshot: str) -> dict[str, Any]:
        """Delete a snapshot of a volume."""

    @property
    def scrubber(self) -> Scrubber:
        """Scrubs volumes (jobs of kind ``scrub``)."""

    @property
    def space(self) -> Space:
        """Reports volumes' space and trims them (jobs of kind ``trim``)."""


class Jobs:
    """The recurring jobs and their scheduler."""

    def __init__(self, volumes: Snapshots, backups: Backups, tasks: Tasks) -> None:
        self.m = volumes
        self.backups = backups
        self.tasks = tasks
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[dict[str, Any]]] = {}

    # ------------------------------------------------------------ CRUD

    def view(self, job: dict[str, Any]) -> dict[str, Any]:
        """A job as the API shows it."""
        return {**job, "next_run": next_run(job).strftime("%Y-%m-%dT%H:%M:%SZ")
                if job["enabled"] else None, "running": job["name"] in self._running}

    def list(self) -> list[dict[str, Any]]:
        """Every job."""
        return [self.view(j) for j in self.m.store.list("jobs")]

    def _doc(self, name: str) -> dict[str, Any]:
        doc = self.m.store.get("jobs", name)
        if doc is None:
            raise ApiError(404, f"no job {name!r}; `drove job list` shows them")
        return doc

    def get(self, name: str) -> dict[str, Any]:
        """One job."""
        return self.view(self._doc(name))

    def create(self, *, name: str | None, kind: str, cron: str, retain: int,
               volumes: list[str], selector: dict[str, str], labels: dict[str, str],
               enabled: bool = True) -> dict[str, Any]:
        """Add a job (ApiError 422 for a bad schedule or no volumes to act on)."""
        name = name or f"{kind}-{secrets.token_hex(3)}"
        validate_name("job", name)
        if kind not in ("snapshot", "backup", "scrub", TRIM_KIND):
            raise ApiError(422, f"kind must be snapshot, backup, scrub or trim, not {kind!r}")
        if not croniter.is_valid(cron):
            raise ApiError(422, f"bad cron schedule {cron!r}: use five fields, "
                                "e.g. '0 * * * *' for hourly")
        if not 1 <= retain <= 1000:
            raise ApiError(422, "retain must be between 1 and 1000")
        if not volumes and not selector:
            raise ApiError(422, "a job needs volumes to act on: name them (volumes) or "
                                "select them by label (selector)")
        for v in volumes:
            validate_name("volume", v)
        if self.m.store.get("jobs", name) is not None:
            raise ApiError(409, f"job {name!r} exists; choose another name or delete it")
        doc = {"name": name, "kind": kind, "cron": cron, "retain": retain,
               "volumes": list(volumes), "selector": dict(selector), "labels": dict(labels),
               "enabled": enabled, "created": now_iso(), "last_run": None,
               "last_result": None}
        self.m.store.put("jobs", name, doc, expect_version=0)
        self.m.event("job-created", f"job {name}: {kind} on {self._targets(doc)} at "
                     f"'{cron}', keep {retain}")
        self._wake.set()
        return self.view(doc)

    async def delete(self, name: str) -> dict[str, Any]:
        """Remove a job (a run in progress is cancelled)."""
        self._doc(name)
        run = self._running.get(name)
        if run is not None:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run
        self.m.store.delete("jobs", name)
        self.m.event("job-deleted", f"job {name} deleted")
        self._wake.set()
        return {"deleted": name}

    @staticmethod
    def _targets(job: dict[str, Any]) -> str:
        parts = list(job["volumes"])
        if job["selector"]:
            parts.append("volumes labelled "
                         + ",".join(f"{k}={v}" for k, v in job["selector"].items()))
        return " + ".join(parts)

    def volumes_of(self, job: dict[str, Any]) -> list[str]:
        """The volumes a job acts on now: named ones plus those its selector matches."""
        names = list(job["volumes"])
        sel = job["selector"]
        if sel:
            for v in self.m.store.list("volumes"):
                labels = v.get("labels") or {}
                if all(labels.get(k) == val for k, val in sel.items()) \
                        and v["name"] not in names:
                    names.append(v["name"])
        return names

    # ------------------------------------------------------------ running

    async def run_now(self, name: str) -> dict[str, Any]:
        """Run a job once now and wait for it; the job afterwards."""
        self._doc(name)
        await self._launch(name)
        return self.get(name)

    async def _launch(self, name: str) -> dict[str, Any]:
        run = self._running.get(name)
        if run is None:
            run = asyncio.create_task(self._run(name), name=f"job-{name}")
            self._running[name] = run
            run.add_done_callback(lambda _t: self._running.pop(name, None))
        return await asyncio.shield(run)

    async def _run(self, name: str) -> dict[str, Any]:
        job = self._doc(name)
        job["last_run"] = now_iso()
        self.m.store.put("jobs", name, job)  # before running: a crash mid-run is no "missed" run
        outcomes: list[str] = []
        ok = True
        volumes = self.volumes_of(job)
        if not volumes:
            ok = False
            outcomes.append("no volume matches")
        for vol in volumes:
            try:
                outcomes.append(f"{vol}: " + await self._run_one(job, vol))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                ok = False
                detail = str(exc) if isinstance(exc, ApiError) else repr(exc)
                outcomes.append(f"{vol}: failed: {detail}")
        message = "; ".join(outcomes)
        job = self.m.store.get("jobs", name)
        if job is None:
            return {}
        job["last_result"] = {"time": now_iso(), "ok": ok, "message": message}
        self.m.store.put("jobs", name, job)
        self.m.event("job-run" if ok else "job-failed", f"job {name} ({job['kind']}) ran: "
                     f"{message}", level="info" if ok else "warning")
        return job["last_result"]

    async def _run_one(self, job: dict[str, Any], volume: str) -> str:
        labels = {**job["labels"], JOB_LABEL: job["name"]}
        if job["kind"] == "scrub":
            return await self._scrub(volume, job["name"], labels, job["retain"])
        if job["kind"] == TRIM_KIND:  # its event says what was freed; retain is unused
            trimmed: dict[str, Any] = await self.m.space.trim(volume)
            return str(trimmed["message"])
        if job["kind"] == "snapshot":
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            snap = await self.m.create_snapshot(volume, f"{job['name']}-{stamp}-"
                                                f"{secrets.token_hex(2)}", labels)
            removed = await self._retain_snapshots(volume, job["name"], job["retain"])
            return f"snapshot {snap['name']}" + (f", deleted {', '.join(removed)}"
                                                 if removed else "")
        task = await self.backups.create(volume, None, labels)
        done = await self.tasks.wait(task["id"]) or {}
        if done.get("state") != "succeeded":
            raise ApiError(409, f"backup task {task['id']} {done.get('state')}: "
                                f"{done.get('error')}")
        name = done["result"]["name"]
        removed = await self._retain_backups(volume, job["name"], job["retain"])
        # The newest job snapshot is the next incremental's base; older ones only cost space.
        await self._retain_snapshots(volume, job["name"], 1)
        return f"backup {name}" + (f", deleted {', '.join(removed)}" if removed else "")

    async def _scrub(self, volume: str, job: str, labels: dict[str, str], keep: int) -> str:
        """Snapshot the head, scrub the volume as a task and wait for it; keep the newest
        ``keep`` of the job's snapshots (the head's data is compared in them)."""
        self.m.scrubber.check(volume)
        task = self.tasks.start(SCRUB_KIND, self.m.scrubber.task(volume, labels),
                                volume=volume)
        done = await self.tasks.wait(task["id"]) or {}
        res = done.get("result") or {}
        if done.get("state") != "succeeded":
            raise ApiError(409, f"scrub task {task['id']} {done.get('state')}: "
                                f"{done.get('error')}")
        removed = await self._retain_snapshots(volume, job, keep)
        return (f"scrub {task['id']}: {res.get('layers', 0)} layer(s), "
                f"{res.get('repaired', 0)} range(s) repaired, snapshot {res.get('snapshot')}"
                + (f", deleted {', '.join(removed)}" if removed else ""))

    async def _retain_snapshots(self, volume: str, job: str, keep: int) -> list[str]:
        snaps = [s for s in await self.m.snapshots(volume)
                 if not s.get("head") and (s.get("labels") or {}).get(JOB_LABEL) == job]
        snaps.sort(key=lambda s: s["created"])
        removed = []
        for s in snaps[:-keep]:
            await self.m.delete_snapshot(volume, s["name"])
            removed.append(s["name"])
        return removed

    async def _retain_backups(self, volume: str, job: str, keep: int) -> list[str]:
        mine = [b for b in await self.backups.list(volume)
                if (b.get("labels") or {}).get(JOB_LABEL) == job]
        mine.sort(key=lambda b: b["created"], reverse=True)
        removed = []
        for b in mine[keep:]:
            task = await self.backups.delete(b["name"])
            done = await self.tasks.wait(task["id"]) or {}
            if done.get("state") != "succeeded":
                raise ApiError(409, f"retention could not delete backup {b['name']}: "
                                    f"{done.get('error')}")
            removed.append(b["name"])
        return removed

    # ------------------------------------------------------------ scheduler

    def start(self) -> None:
        """Start the scheduler (missed runs are due at once)."""
        self._task = asyncio.create_task(self._loop(), name="jobs")

    async def stop(self) -> None:
        """Stop the scheduler and cancel runs in progress."""
        tasks = [t for t in [self._task, *self._running.values()] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _loop(self) -> None:
        while True:
            now = datetime.now(UTC)
            soonest = MAX_SLEEP
            for job in self.m.store.list("jobs"):
                if not job["enabled"] or job["name"] in self._running:
                    continue
                try:
                    due = (next_run(job) - now).total_seconds()
                except (ValueError, KeyError) as exc:
                    log.warning("job %s: bad schedule: %s", job["name"], exc)
                    continue
                if due <= 0:
                    task = asyncio.create_task(self._launch(job["name"]))
                    task.add_done_callback(_log_failure)
                else:
                    soonest = min(soonest, due)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.2, soonest))


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("job run failed: %r", task.exception())
