"""Labels the manager puts on snapshots, shared by volumes, backups and jobs."""

from __future__ import annotations

from typing import Any

SNAPSHOT_ID_LABEL = "drove.id"
"""Label giving every snapshot the manager takes an identity shared by all replicas.

Replicas stamp their own creation time, and names can be reused after a delete:
only this id proves that the snapshot a backup was taken from is still there.
"""


def snapshot_id(layer: dict[str, Any]) -> str:
    """The identity of a snapshot layer ('' when it has none: never a base)."""
    return (layer.get("labels") or {}).get(SNAPSHOT_ID_LABEL, "")
