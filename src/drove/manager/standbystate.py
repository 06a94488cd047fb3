"""A DR standby volume's record and the refusals it brings (no I/O: core, views and
backups use it; the follower itself is :mod:`drove.manager.standby`).

A standby's stored document carries ``standby``: the volume on the backup target it
follows (``of``), the last backup restored completely (``backup``, ``backup_created``,
``restored_at``), the backup being written now (``applying``), the newest backup seen
on the target, the last error and the counters of the last incremental restore.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from drove.manager.errors import ApiError

KEY = "standby"
"""The key of a volume document that makes it a standby."""

LABEL = "drove.standby-of"
"""The label a standby carries: the volume whose backups it follows."""


def standby_of(doc: dict[str, Any]) -> str | None:
    """The volume whose backups ``doc`` follows (None: an ordinary volume)."""
    state = doc.get(KEY)
    return state.get("of") if isinstance(state, dict) else None


def check_not_standby(doc: dict[str, Any], what: str) -> None:
    """Refuse to ``what`` a standby (ApiError 409 saying to activate it first)."""
    of = standby_of(doc)
    if of is not None:
        name = doc["name"]
        raise ApiError(409, f"volume {name} is a DR standby of volume {of} (it follows {of}'s "
                            f"backups) and cannot be {what}: `drove volume activate {name}` "
                            "first (it restores the newest backup and becomes an ordinary "
                            "volume)")


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


def standby_view(doc: dict[str, Any], now: datetime | None = None) -> dict[str, Any] | None:
    """The standby facts the API shows (None for an ordinary volume).

    ``lag_seconds``: how old the standby's data is, from the creation of the last backup
    restored to now (None before the first restore); ``behind``: whether the target
    holds a newer backup than the one restored.
    """
    state = doc.get(KEY)
    if not isinstance(state, dict):
        return None
    now = now or datetime.now(UTC)
    created = _parse(state.get("backup_created"))
    newest = state.get("newest") or {}
    return {
        "of": state.get("of"),
        "backup": state.get("backup"),
        "backup_created": state.get("backup_created"),
        "restored_at": state.get("restored_at"),
        "lag_seconds": round((now - created).total_seconds(), 1) if created else None,
        "newest_backup": newest.get("name"),
        "behind": bool(newest.get("name")) and newest.get("name") != state.get("backup"),
        "checked_at": state.get("checked_at"),
        "applying": state.get("applying"),
        "error": state.get("error"),
        "last_restore": state.get("last_restore"),
    }
