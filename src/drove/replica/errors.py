"""Errors of the replica's on-disk format."""

from __future__ import annotations


class ReplicaError(Exception):
    """A replica directory cannot be used as found: corrupt, inconsistent or locked."""


class SnapshotNotFoundError(LookupError):
    """No live snapshot of a replica has the requested name."""

    def __str__(self) -> str:
        """Show the message as given (LookupError would quote it like a key)."""
        return str(self.args[0]) if self.args else "snapshot not found"


class SnapshotExistsError(FileExistsError, ValueError):
    """A live snapshot already has the requested name (a ValueError too, as any bad name)."""
