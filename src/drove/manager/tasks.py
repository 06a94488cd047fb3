"""Long operations as tasks: progress that can be polled, cancellation, a record kept.

A task is an asyncio task in the manager plus a document in the store.  The
document is written when the task starts and ends (progress lives in memory
and is merged into what the API shows), so a manager that dies mid-task finds
it "running" at its next start and marks it failed: nothing claims a success
that did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from drove.manager.store import Store, now_iso

log = logging.getLogger("drove.manager")

KEEP_FINISHED = 500
"""Finished tasks kept in the store; older ones are pruned."""


class TaskContext:
    """What a running task reports through: progress and a line saying what it does."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def progress(self, done: int, total: int) -> None:
        """Bytes (or items) done out of total."""
        self.doc["progress"] = {"done": done, "total": total}

    def message(self, text: str | None) -> None:
        """What the task is doing or waiting for (None clears it)."""
        self.doc["message"] = text

    def set(self, **fields: Any) -> None:
        """Fill in fields found while running (e.g. the backup's name)."""
        self.doc.update(fields)


TaskFn = Callable[[TaskContext], Awaitable[dict[str, Any] | None]]
OnEnd = Callable[[dict[str, Any]], Awaitable[None]]


class Tasks:
    """Runs and records tasks."""

    def __init__(self, store: Store, event: Callable[..., None]) -> None:
        self.store = store
        self._event = event
        self._running: dict[str, tuple[asyncio.Task[None], dict[str, Any]]] = {}

    def recover(self) -> list[dict[str, Any]]:
        """Mark tasks left running by a previous manager as failed; return them."""
        lost = []
        for doc in self.store.list("tasks"):
            if doc["state"] == "running":
                doc.update(state="failed", finished=now_iso(),
                           error="the manager stopped while the task ran; start it again")
                self.store.put("tasks", doc["id"], doc)
                lost.append(doc)
        return lost

    def start(self, kind: str, fn: TaskFn, *, volume: str | None = None,
              backup: str | None = None, on_end: OnEnd | None = None) -> dict[str, Any]:
        """Start ``fn`` as a task; return its view at once."""
        tid = f"task-{secrets.token_hex(6)}"
        doc: dict[str, Any] = {
            "id": tid, "kind": kind, "state": "running", "volume": volume, "backup": backup,
            "progress": {"done": 0, "total": 0}, "message": None, "error": None,
            "result": None, "created": now_iso(), "finished": None,
        }
        self.store.put("tasks", tid, doc, expect_version=0)
        task = asyncio.create_task(self._run(doc, fn, on_end), name=tid)
        self._running[tid] = (task, doc)
        return dict(doc)

    async def _run(self, doc: dict[str, Any], fn: TaskFn, on_end: OnEnd | None) -> None:
        ctx = TaskContext(doc)
        try:
            doc["result"] = await fn(ctx)
            doc["state"] = "succeeded"
        except asyncio.CancelledError:
            doc.update(state="cancelled", error="cancelled")
        except Exception as exc:  # the task's failure is its result, not the manager's
            if not isinstance(exc, TaskFailed):
                log.exception("task %s failed", doc["id"])
            doc.update(state="failed", error=str(exc) or repr(exc))
            if isinstance(exc, TaskFailed) and exc.result is not None:
                doc["result"] = exc.result
        doc["finished"] = now_iso()
        doc["message"] = None
        if on_end is not None:
            try:
                await on_end(doc)
            except Exception:  # cleanup trouble must not lose the task's record
                log.exception("task %s: cleanup failed", doc["id"])
        self.store.put("tasks", doc["id"], doc)
        self._running.pop(doc["id"], None)
        self._prune()

    def _prune(self) -> None:
        finished = [d for d in self.store.list("tasks") if d["state"] != "running"]
        finished.sort(key=lambda d: d["created"])
        for d in finished[:-KEEP_FINISHED]:
            self.store.delete("tasks", d["id"])

    def get(self, tid: str) -> dict[str, Any] | None:
        """One task as it is now (None if unknown)."""
        live = self._running.get(tid)
        if live is not None:
            return dict(live[1])
        return self.store.get("tasks", tid)

    def list(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every recorded task, newest first (``state`` filters)."""
        docs = {d["id"]: d for d in self.store.list("tasks")}
        docs.update({tid: dict(doc) for tid, (_, doc) in self._running.items()})
        out = [d for d in docs.values() if state is None or d["state"] == state]
        return sorted(out, key=lambda d: d["created"], reverse=True)

    def running(self, kind_prefix: str = "", volume: str | None = None) -> list[dict[str, Any]]:
        """Running tasks of a kind (prefix) and volume."""
        return [dict(doc) for _, doc in self._running.values()
                if doc["kind"].startswith(kind_prefix)
                and (volume is None or doc["volume"] == volume)]

    async def cancel(self, tid: str) -> bool:
        """Cancel a running task and wait for it to end; False if it was not running."""
        live = self._running.get(tid)
        if live is None:
            return False
        task = live[0]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
        return True

    async def wait(self, tid: str) -> dict[str, Any] | None:
        """Wait for a task to end; its final record."""
        live = self._running.get(tid)
        if live is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(live[0])
        return self.get(tid)

    async def stop(self) -> None:
        """Cancel every running task (the manager is stopping)."""
        for tid in list(self._running):
            await self.cancel(tid)


class TaskFailed(Exception):
    """A task's expected failure: the message is for the user, ``result`` is still kept."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result
