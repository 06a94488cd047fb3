"""The event log: what the system did and why, kept in the store and written to the log."""

from __future__ import annotations

import logging
from typing import Protocol

from drove.manager.store import Store

log = logging.getLogger("drove.manager")


class EventFn(Protocol):
    """What records an event (an :class:`EventLog`): the parts of the manager are handed one."""

    def __call__(self, kind: str, message: str, volume: str | None = None,
                 level: str = "info") -> None:
        """Record what the system did and why."""


class EventLog:
    """Records events; every part of the manager is handed the same one."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __call__(self, kind: str, message: str, volume: str | None = None,
                 level: str = "info") -> None:
        """Record what the system did and why."""
        getattr(log, "warning" if level != "info" else "info")("%s: %s", kind, message)
        self.store.append_event(level, kind, volume, message)
