"""What else may hold a volume (the backups' tasks), and the refusals that follow from it."""

from __future__ import annotations

from typing import Any, Protocol

from drove.manager.errors import ApiError


class VolumeGuard(Protocol):
    """What else holds a volume now: asked before it is attached, detached, deleted or
    loses a snapshot (the backups' tasks, wired in drove.manager.app)."""

    def busy(self, volume: str) -> str | None:
        """Why ``volume`` must not be detached or lose snapshots now (None: it may)."""

    def restore_task(self, volume: str) -> str | None:
        """The id of the task restoring a backup into ``volume`` (None when there is none)."""


def check_not_busy(guard: VolumeGuard, doc: dict[str, Any], what: str) -> None:
    """Refuse to ``what`` the volume while a task holds it (ApiError 409)."""
    why = guard.busy(doc["name"])
    if why:
        raise ApiError(409, f"cannot {what} volume {doc['name']} now: {why}; wait for the "
                            "task or cancel it (`drove task cancel ID`)")


def check_not_restoring(guard: VolumeGuard, doc: dict[str, Any]) -> None:
    """Refuse to attach a volume a backup is being restored into (ApiError 409)."""
    if doc.get("restoring"):
        task = guard.restore_task(doc["name"]) or "?"
        raise ApiError(409, f"volume {doc['name']} is being restored from backup "
                            f"{doc['restoring'].get('backup')} (task {task}); wait for it "
                            f"(`drove task wait {task}`) or cancel it")
