"""Incremental, deduplicated backups of volume snapshots to a file or S3 target.

A backup cuts a snapshot into 2 MiB blocks (``blocks``), stores each distinct block
once under the hash of its contents on a ``target``, and publishes a manifest
mapping offsets to hashes (``store``).  Lock files on the target (``locks``) keep
deletion from removing blocks a running backup may still reference.

The kinds of target (a directory, an S3 bucket) are registered here by URL scheme,
so ``target`` knows neither and neither module imports the other's.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

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
from drove.backup.target import Target, open_target, register

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


def _open_file(url: str, **_options: Any) -> Target:
    """``file:///abs/path`` (S3 options do not apply to a directory)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URL {url!r} names host {parts.netloc!r}: "
                         "use file:///abs/path (mount remote storage first)")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"file URL {url!r} needs an absolute path: file:///abs/path")
    return FileTarget(path)


def _open_s3(url: str, **options: Any) -> Target:
    """``s3://bucket[/prefix]`` with the endpoint, region and keys in ``options``."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise ValueError(f"S3 URL {url!r} names no bucket: use s3://bucket[/prefix]")
    # boto3 takes a moment to import: only pay for it when S3 is used.
    from drove.backup.s3target import S3Target

    return S3Target(parts.netloc, unquote(parts.path).strip("/"), **options)


register("file", _open_file, "file:///abs/path")
register("s3", _open_s3, "s3://bucket[/prefix]")


def __getattr__(name: str):
    """``S3Target`` on first use: importing boto3 takes a while."""
    if name == "S3Target":
        from drove.backup.s3target import S3Target

        return S3Target
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
