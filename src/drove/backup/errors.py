"""The exceptions of the backup store; every one is a ``BackupError``."""

from __future__ import annotations

from drove.units import format_size


class BackupError(Exception):
    """The backup store cannot do what was asked."""


class NotFoundError(BackupError):
    """A key or backup that does not exist; the message names it."""


class TargetError(BackupError):
    """The target is unusable (unreachable, bad bucket, refused credentials, I/O error)."""


class LockError(BackupError):
    """The store lock could not be taken in time, or a held lock was lost."""


class CorruptBlockError(BackupError):
    """A stored block does not decode to the data its hash names."""

    def __init__(self, hash: str, offset: int | None = None, reason: str = "checksum mismatch"):
        self.hash = hash
        self.offset = offset
        self.reason = reason
        super().__init__(f"block {hash}{_where(offset)} is corrupt: {reason}")


class MissingBlockError(CorruptBlockError):
    """A block a manifest references is not on the target."""

    def __init__(self, hash: str, offset: int | None = None):
        super().__init__(hash, offset, "missing from the target")
        # The generic "is corrupt: ..." wording would mislead: nothing was read.
        self.args = (f"block {hash}{_where(offset)} is missing from the target",)


def _where(offset: int | None) -> str:
    """`` at offset N (N GiB)`` for messages, empty when the offset is unknown."""
    if offset is None:
        return ""
    return f" at offset {offset} ({format_size(offset)})"
