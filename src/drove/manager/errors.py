"""The manager's refused-request error and the checks of names and sizes that raise it.

Its own module so every part of the manager (volumes, backups, jobs, the API)
refuses a request the same way without importing one another.
"""

from __future__ import annotations

import re

from drove.manager.placement import ROLES
from drove.units import parse_size

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
BLOCK = 4096


class ApiError(Exception):
    """A refused request: ``status`` is the HTTP status, the message what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def validate_name(kind: str, name: str) -> str:
    """``name`` if it is a valid object name, else ApiError 422."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ApiError(422, f"invalid {kind} name {name!r}: use 1-63 characters of "
                            "a-z 0-9 . _ -, starting with a letter or digit")
    return name


def validate_role(role: str) -> str:
    """``role`` if it is a node role (storage, compute, both), else ApiError 422."""
    if role not in ROLES:
        raise ApiError(422, f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def to_size(value: int | str, what: str = "size") -> int:
    """A size in bytes from an int or "10G" (ApiError 422 unless a positive multiple of 4 KiB)."""
    try:
        size = parse_size(value)
    except (ValueError, TypeError) as exc:
        raise ApiError(422, f"invalid {what} {value!r}: {exc}") from exc
    if size <= 0 or size % BLOCK:
        raise ApiError(422, f"invalid {what} {value!r}: must be a positive multiple of 4 KiB")
    return size
