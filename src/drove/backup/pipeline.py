"""Run async work items with bounded concurrency, failing (and cancelling) as one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def bounded(items: Iterable[T], worker: Callable[[T], Awaitable[object]],
                  parallel: int) -> None:
    """Await ``worker(item)`` for every item, at most ``parallel`` at a time.

    The first failure cancels the work still in flight (and waits for it to unwind)
    before it is raised as itself, not wrapped in an ExceptionGroup as TaskGroup would.
    Items are pulled lazily, so memory stays bounded by ``parallel`` workers.
    """
    pending: set[asyncio.Task] = set()
    try:
        for item in items:
            while len(pending) >= parallel:
                pending = await _reap(pending)
            pending.add(asyncio.ensure_future(worker(item)))
        while pending:
            pending = await _reap(pending)
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _reap(pending: set[asyncio.Task]) -> set[asyncio.Task]:
    """Wait for one task to end; raise the first error among the ended ones."""
    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    error: BaseException | None = None
    for task in done:
        if task.cancelled():
            # A worker cancelled from outside (not by us): surface it like an error, but
            # prefer a real error from a sibling as the reason.
            error = error or asyncio.CancelledError()
            continue
        exc = task.exception()  # also marks it retrieved, silencing asyncio's warning
        if exc is not None and (error is None or isinstance(error, asyncio.CancelledError)):
            error = exc
    if error is not None:
        # The caller still holds the old set (done tasks included): its finally cancels
        # what is left.
        raise error
    return pending
