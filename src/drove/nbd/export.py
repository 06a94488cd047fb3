"""The one narrow interface every served block device implements.

An :class:`Export` is what the NBD server serves and what every engine layer
(stats, qos, crypt, mirror) both consumes and provides, like an nbdkit plugin
or filter.  The NBD server validates every request (bounds, flags, read-only)
before calling an export, so an export may assume well-formed arguments:
``0 <= offset``, ``offset + length <= size``, ``length > 0``.

Errors: raise :class:`OSError` with an errno (``EIO``, ``ENOSPC``, ``EPERM``,
``EINVAL``, ``ENOTSUP``, ...); the server maps it to the NBD error of the
same name.  Any other exception is answered with ``EIO`` and logged.

Every operation has a coroutine form; READ, WRITE and FLUSH also have a
callback form, :meth:`Export.submit` (see :mod:`drove.nbd.eager`): the fast
path, used by the server when an export has it.  An export that is only ever
served (a replica's chain exports) may implement just the coroutines
(:class:`CoroutineExport`); everything stacked in the engine implements both
(:class:`Export`, which :class:`drove.engine.layers.Layer` provides whole).

The server may run the first step of a request
before wrapping it in a Task (an eager start, so exports that complete
without suspending cost no Task), so an export must not rely on
``asyncio.current_task()`` before its first ``await``.

Buffers: the ``data`` given to :meth:`Export.write` is a read-only view
into the server's receive memory; it stays valid and unchanged until the
call completes, and may be reused afterwards (copy it to keep it longer).
The buffer returned by :meth:`Export.read` may be held by the server until
it has been sent, so it must not be modified after it was returned
(return fresh memory, not a view of live storage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

Done = Callable[[Any, BaseException | None], None]
"""Completion of a submitted request: ``done(value, None)`` or ``done(None, error)``."""

# Block status flags of the base:allocation context (NBD spec names).
NBD_STATE_HOLE = 1
NBD_STATE_ZERO = 2


@dataclass(frozen=True, slots=True)
class Extent:
    """One run of a block-status reply: ``length`` bytes with ``flags``."""

    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an export supports; the server turns it into transmission flags."""

    readonly: bool = False
    flush: bool = True
    fua: bool = True
    trim: bool = True
    zero: bool = True
    fast_zero: bool = True
    cache: bool = True
    multi_conn: bool = True
    block_status: bool = True
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024


@runtime_checkable
class CoroutineExport(Protocol):
    """A block device served over NBD, with the coroutine form of every operation."""

    name: str
    description: str
    caps: Capabilities

    @property
    def size(self) -> int:
        """Current size in bytes (may grow while connected)."""
        ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return exactly ``length`` bytes at ``offset`` (never modified afterwards)."""
        ...

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write ``data`` (valid until this call completes) at ``offset``; durable when ``fua``."""
        ...

    async def zero(
        self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
        fast: bool = False,
    ) -> None:
        """Make the range read as zeros; with ``fast``, raise ENOTSUP unless cheap."""
        ...

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard the range (drove exports then read it as zeros)."""
        ...

    async def flush(self) -> None:
        """Make every write completed before this call durable."""
        ...

    async def cache(self, offset: int, length: int) -> None:
        """Hint: prefetch the range."""
        ...

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        """Describe allocation from ``offset``; may cover less than ``length``."""
        ...


@runtime_checkable
class Export(CoroutineExport, Protocol):
    """A block device with both forms of its hot operations: what engine layers stack."""

    def submit(self, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: Done) -> None:
        """Start READ, WRITE or FLUSH; ``done(value, error)`` is called exactly once.

        The same request as the coroutine form (``data`` is the write payload,
        None otherwise), so the two forms must do the same thing: a layer that
        changes one changes the other.
        """
        ...


class ExportProvider(Protocol):
    """Maps export names to exports for one server (exports may come and go)."""

    def list_exports(self) -> list[tuple[str, str]]:
        """(name, description) of every export, for NBD_OPT_LIST."""
        ...

    def open_export(self, name: str) -> CoroutineExport | None:
        """The export called ``name``, or None when there is none."""
        ...
