"""Volume documents in the store, the lock each volume's operations hold, and what a
document implies: the node it is (or would be) attached on and its data locality."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from drove.manager import locality
from drove.manager.errors import ApiError
from drove.manager.settings import Settings
from drove.manager.store import Store


class Records:
    """The stored volume documents of one manager, and one lock per volume.

    Every operation on a volume holds that volume's lock, so an API call and
    the healer never act on one volume at once.
    """

    def __init__(self, store: Store, settings: Settings, node: str | None,
                 data_dir: Path) -> None:
        self._store = store
        self._settings = settings
        self._node = node
        self._data_dir = data_dir
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        """The lock every operation on volume ``name`` holds."""
        return self._locks.setdefault(name, asyncio.Lock())

    def drop_lock(self, name: str) -> None:
        """Forget the lock of a deleted volume."""
        self._locks.pop(name, None)

    def get(self, name: str) -> dict[str, Any]:
        """The stored document of volume ``name`` (ApiError 404)."""
        doc = self.find(name)
        if doc is None:
            raise ApiError(404, f"no volume {name!r}; `drove volume list` shows them")
        return doc

    def find(self, name: str) -> dict[str, Any] | None:
        """The stored document of volume ``name`` (None when there is none)."""
        return self._store.get("volumes", name)

    def all(self) -> list[dict[str, Any]]:
        """Every stored volume document."""
        return self._store.list("volumes")

    def save(self, doc: dict[str, Any]) -> None:
        """Store a volume's document."""
        self._store.put("volumes", doc["name"], doc)

    def add(self, doc: dict[str, Any]) -> None:
        """Store the document of a new volume (the store refuses one that exists)."""
        self._store.put("volumes", doc["name"], doc, expect_version=0)

    def delete(self, name: str) -> None:
        """Delete volume ``name``'s document."""
        self._store.delete("volumes", name)

    def locality(self, doc: dict[str, Any]) -> str:
        """The volume's data locality (stored before the setting existed: the default)."""
        return locality.locality_of(doc, self._settings.get("default_data_locality"))

    def attach_node(self, doc: dict[str, Any]) -> str | None:
        """The node ``doc`` is attached on, or would be by default (this manager's own;
        None when it runs no agent and ``doc`` was never attached)."""
        return doc.get("node") or self._node

    def volume_dir(self, name: str) -> Path:
        """The directory of volume ``name``'s own files (its engine's state)."""
        return self._data_dir / "volumes" / name
