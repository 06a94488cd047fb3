"""Callback-style ("submit") calls and coroutines run eagerly, for the data path.

An export or engine layer may offer, beside its coroutine methods, one
``submit(cmd, offset, length, data, fua, done)`` for the hot commands (READ,
WRITE, FLUSH): it starts the request and calls ``done(value, error)`` exactly
once when it completed, perhaps before returning.  Completions then travel as
plain function calls from a replica's reply to the client's reply, without a
Task, a Future or a trip through the event loop's ready queue per request (on
the engine those cost more than the rest of its Python work together).

:func:`run` bridges the two styles: it starts a coroutine at once and calls
``done`` with its outcome, using a Task only if the coroutine really suspends.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from typing import Any

from drove.nbd import proto

Done = Callable[[Any, BaseException | None], None]
"""Completion of a submitted request: ``done(value, None)`` or ``done(None, error)``."""

Submit = Callable[[int, int, int, Any, bool, Done], None]
"""``submit(cmd, offset, length, data, fua, done)`` for NBD_CMD_READ, _WRITE and _FLUSH."""

READ = proto.NBD_CMD_READ
WRITE = proto.NBD_CMD_WRITE
FLUSH = proto.NBD_CMD_FLUSH

_CoroutineType = types.CoroutineType
_tasks: set[asyncio.Task[Any]] = set()  # suspended runs, kept alive until done


@types.coroutine
def resume(coro: Any, first: Any) -> Any:
    """Continue a coroutine that was started by hand and suspended yielding ``first``.

    This is ``yield from`` for an already started coroutine: a Task awaiting
    it sees exactly the futures the coroutine yields, and exceptions (such as
    cancellation) thrown into the Task are forwarded to the coroutine.
    """
    value = first
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                value = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                value = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def as_coroutine(awaitable: Any) -> Any:
    """Wrap a non-coroutine awaitable so that it can be started with ``send``."""
    return await awaitable


def run(coro: Any, done: Done) -> None:
    """Run the awaitable ``coro`` now, as far as it goes; ``done`` gets its outcome.

    ``done`` is called before this returns when the coroutine never suspends.
    """
    if type(coro) is not _CoroutineType:
        coro = as_coroutine(coro)
    try:
        first = coro.send(None)
    except StopIteration as stop:
        done(stop.value, None)
        return
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        done(None, exc)
        return
    task = asyncio.get_running_loop().create_task(_finish(coro, first, done))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _finish(coro: Any, first: Any, done: Done) -> None:
    try:
        value = await resume(coro, first)
    except BaseException as exc:
        done(None, exc)
        if not isinstance(exc, Exception):
            raise
    else:
        done(value, None)


def calls(export: Any) -> Submit:
    """``export.submit`` if it has one, else an adapter over its coroutine methods."""
    submit = getattr(export, "submit", None)
    if submit is not None:
        return submit

    def via_coroutines(cmd: int, offset: int, length: int, data: Any, fua: bool,
                       done: Done) -> None:
        if cmd == READ:
            run(export.read(offset, length), done)
        elif cmd == WRITE:
            run(export.write(offset, data, fua=fua), done)
        else:
            run(export.flush(), done)

    return via_coroutines
