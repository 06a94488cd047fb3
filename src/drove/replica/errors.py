"""Errors of the replica's on-disk format."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The caller asked for something invalid (bad size, name, range, tree): a 400, not a bug.

    A plain ValueError or LookupError raised inside the replica is a bug and
    answers 500; only this and the named errors below are the caller's fault.
    """


class ReplicaError(Exception):
    """A replica directory cannot be used as found: corrupt, inconsistent or locked."""


class SnapshotNotFoundError(LookupError):
    """No live snapshot of a replica has the requested name."""

    def __str__(self) -> str:
        """Show the message as given (LookupError would quote it like a key)."""
        return str(self.args[0]) if self.args else "snapshot not found"


class SnapshotExistsError(FileExistsError, ValueError):
    """A live snapshot already has the requested name (a ValueError too, as any bad name)."""


class RebuildingError(ValueError):
    """Refused because of a rebuild: the replica or a layer is incomplete, or one is running."""


class ChecksumMismatchError(RebuildingError):
    """A rebuilt layer's checksum differs from its source's: the layer stays incomplete."""

    def __init__(self, file: str, expected: str, actual: str) -> None:
        super().__init__(f"layer {file}: checksum {actual} differs from the source's {expected}; "
                         "it stays incomplete")
        self.file = file
        self.expected = expected
        self.actual = actual


class LayerNotFoundError(LookupError):
    """No layer of a replica has the requested file name."""

    def __str__(self) -> str:
        """Show the message as given."""
        return str(self.args[0]) if self.args else "layer not found"


class StaleGenerationError(Exception):
    """An engine state update carries a lower generation than the stored one (refused)."""
