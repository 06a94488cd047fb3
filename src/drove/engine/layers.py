"""The engine's layer contract (nbdkit filters as the model) and the one place the stack is built.

A :class:`Layer` wraps the export below it and passes every operation — the
coroutine forms and the callback form ``submit`` alike — and the size, the
name and the capabilities through, read from the layer below on every use (a
size or capability change below, an expand, shows through at once).  A layer
overrides only what it changes.

The two forms of READ, WRITE and FLUSH must stay one operation.  The contract
is checked when a layer class is defined:

* a class that overrides ``submit`` must override ``read``, ``write`` and
  ``flush`` too (else TypeError): it changes the fast path, so it says what
  the coroutine path does;
* a class that overrides only coroutines gets a ``submit`` that sends those
  commands through its coroutines and the others straight down, so an
  override is never bypassed by the fast path, and the fast path is kept for
  everything the layer does not change.

The engine's stack is built in one place: :func:`drove.engine.stack.build_stack`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from drove.nbd import eager
from drove.nbd.export import Capabilities, CoroutineExport, Extent

_COROUTINE_OF = {eager.READ: "read", eager.WRITE: "write", eager.FLUSH: "flush"}


def _defined_by(cls: type, attr: str) -> type:
    """The class of ``cls``'s MRO whose own ``attr`` is used (ignoring generated submits)."""
    for klass in cls.__mro__:
        value = klass.__dict__.get(attr)
        if value is not None and not getattr(value, "generated", False):
            return klass
    raise AttributeError(attr)


def _routed(via: frozenset[int], base: Callable[..., None]) -> Callable[..., None]:
    """A ``submit`` sending the commands in ``via`` through the layer's coroutines."""

    def submit(self: Layer, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: eager.Done) -> None:
        """READ, WRITE or FLUSH: through this layer's coroutine where it overrides one."""
        if cmd not in via:
            base(self, cmd, offset, length, data, fua, done)
        elif cmd == eager.READ:
            eager.run(self.read(offset, length), done)
        elif cmd == eager.WRITE:
            eager.run(self.write(offset, data, fua), done)
        else:
            eager.run(self.flush(), done)

    submit.generated = True  # type: ignore[attr-defined]
    return submit


class Layer:
    """Passes everything to ``inner``, the export below; subclasses override what they change."""

    def __init__(self, inner: CoroutineExport) -> None:
        self.inner = inner
        # The callback form below (an adapter over its coroutines if it has none).
        self.below: eager.Submit = eager.calls(inner)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        sub = _defined_by(cls, "submit")
        via = set()
        for cmd, method in _COROUTINE_OF.items():
            owner = _defined_by(cls, method)
            if owner is sub:
                continue
            if sub is not Layer and not issubclass(owner, sub):
                raise TypeError(
                    f"{cls.__name__}: {sub.__name__} overrides submit but not {method}; a "
                    "layer changing the callback form changes the coroutine form too")
            via.add(cmd)
        if via:
            cls.submit = _routed(frozenset(via), sub.__dict__["submit"])  # type: ignore[method-assign]
        elif getattr(cls.__dict__.get("submit"), "generated", False):
            del cls.submit  # type: ignore[misc]

    @property
    def name(self) -> str:
        """The export name (the layer below's)."""
        return self.inner.name

    @property
    def description(self) -> str:
        """The export description (the layer below's)."""
        return self.inner.description

    @property
    def caps(self) -> Capabilities:
        """The capabilities of the layer below, as they are now."""
        return self.inner.caps

    @property
    def size(self) -> int:
        """The size of the layer below, as it is now."""
        return self.inner.size

    # Plain functions returning the coroutine below: no frame of their own per request.

    def read(self, offset: int, length: int) -> Awaitable[Any]:
        """Read below."""
        return self.inner.read(offset, length)

    def write(self, offset: int, data: memoryview, fua: bool = False) -> Awaitable[None]:
        """Write below."""
        return self.inner.write(offset, data, fua)

    def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
             fast: bool = False) -> Awaitable[None]:
        """Write zeroes below."""
        return self.inner.zero(offset, length, fua, may_trim, fast)

    def trim(self, offset: int, length: int, fua: bool = False) -> Awaitable[None]:
        """Trim below."""
        return self.inner.trim(offset, length, fua)

    def flush(self) -> Awaitable[None]:
        """Flush below."""
        return self.inner.flush()

    def cache(self, offset: int, length: int) -> Awaitable[None]:
        """Pass the prefetch hint below."""
        return self.inner.cache(offset, length)

    def block_status(self, offset: int, length: int) -> Awaitable[Sequence[Extent]]:
        """Block status below."""
        return self.inner.block_status(offset, length)

    def submit(self, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: eager.Done) -> None:
        """READ, WRITE or FLUSH in callback style, below."""
        self.below(cmd, offset, length, data, fua, done)
