"""Crash injection for chain tests: fail the Nth filesystem mutation, then reopen."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drove.replica import Replica, meta


class Crash(BaseException):
    """A simulated crash (BaseException: no ``except Exception`` may swallow it)."""


class Injector:
    """Lets the first ``allow`` filesystem mutations through; every later one crashes."""

    def __init__(self, mp: pytest.MonkeyPatch, allow: int) -> None:
        self.allow = allow
        self.calls = 0
        self.fired: str | None = None
        for name in meta.FsOps.MUTATIONS:
            mp.setattr(meta.fs, name, self._wrap(name, getattr(meta.fs, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls > self.allow:
                if self.fired is None:
                    self.fired = f"{name}#{self.calls}"
                raise Crash(self.fired)
            return fn(*args, **kwargs)
        return call


def reopen_through_crashes(d: Path, chunk_blocks: int) -> Replica:
    """Open, crashing at each mutation of open's own cleanup in turn, then really open."""
    for allow in itertools.count():
        with pytest.MonkeyPatch.context() as mp:
            inj = Injector(mp, allow)
            try:
                r = Replica.open(d, chunk_blocks=chunk_blocks)
            except Crash:
                continue
            fired = inj.fired
        r.close()
        if fired is None:
            break
    return Replica.open(d, chunk_blocks=chunk_blocks)
