"""Incremental, deduplicated backups of volume snapshots to a file or S3 target.

A backup cuts a snapshot into 2 MiB blocks (``blocks``), stores each distinct block
once under the hash of its contents on a ``target``, and publishes a manifest
mapping offsets to hashes (``store``).  Lock files on the target (``locks``) keep
deletion from removing blocks a running backup may still reference.
"""

from drove.backup.blocks import BLOCK_SIZE, CODECS
from drove.backup.errors import (
    BackupError,
    CorruptBlockError,
    LockError,
    MissingBlockError,
    NotFoundError,
    TargetError,
)
from drove.backup.filetarget import FileTarget
from drove.backup.store import BackupStore, Progress, Sink, Source
from drove.backup.target import Target, open_target

__all__ = [
    "BLOCK_SIZE",
    "CODECS",
    "BackupError",
    "BackupStore",
    "CorruptBlockError",
    "FileTarget",
    "LockError",
    "MissingBlockError",
    "NotFoundError",
    "Progress",
    "Sink",
    "Source",
    "Target",
    "TargetError",
    "open_target",
]


def __getattr__(name: str):
    """``S3Target`` on first use: importing boto3 takes a while."""
    if name == "S3Target":
        from drove.backup.s3target import S3Target

        return S3Target
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
