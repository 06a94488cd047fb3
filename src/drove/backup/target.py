"""Where backups are kept: a key/value interface over a directory or an S3 bucket."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from urllib.parse import unquote, urlsplit

_BAD_KEY = re.compile(r"(^|/)\.{0,2}(/|$)|\\|^/")


class Target(ABC):
    """A flat namespace of immutable-ish objects named by ``/``-separated keys.

    Every method is thread-safe: the backup store calls them from a thread pool.
    """

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically: readers see all of it or nothing."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object stored under ``key``; NotFoundError if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Every key starting with ``prefix`` (recursively), relative to the target root."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; an absent key is fine."""

    @abstractmethod
    def sync(self) -> None:
        """Make every completed ``put`` and ``delete`` durable."""

    def close(self) -> None:  # noqa: B027 - optional hook: most targets hold nothing
        """Release connections and handles."""

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Like ``list``, with each object's stored size in bytes."""
        for key in self.list(prefix):
            yield key, 0

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete several keys (in batches where the target supports it)."""
        for key in keys:
            self.delete(key)

    def stale_temp_files(self, age: float) -> Iterator[str]:
        """Keys of leftover partial uploads older than ``age`` seconds, for ``delete``."""
        return iter(())

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def check_key(key: str) -> str:
    """``key`` if it is a clean relative key (no ``..``, empty or absolute parts)."""
    if not key or _BAD_KEY.search(key):
        raise ValueError(f"bad target key {key!r}")
    return key


def open_target(url: str, *, endpoint: str | None = None, region: str | None = None,
                access_key: str | None = None, secret_key: str | None = None) -> Target:
    """Open ``file:///abs/path`` or ``s3://bucket[/prefix]``.

    A bad URL raises ValueError; a target that exists but cannot be used TargetError.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {url!r} names host {parts.netloc!r}: "
                             "use file:///abs/path (mount remote storage first)")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"file URL {url!r} needs an absolute path: file:///abs/path")
        from drove.backup.filetarget import FileTarget

        return FileTarget(path)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"S3 URL {url!r} names no bucket: use s3://bucket[/prefix]")
        # boto3 takes a moment to import: only pay for it when S3 is used.
        from drove.backup.s3target import S3Target

        return S3Target(parts.netloc, unquote(parts.path).strip("/"), endpoint=endpoint,
                        region=region, access_key=access_key, secret_key=secret_key)
    if not parts.scheme:
        raise ValueError(f"backup target {url!r} has no scheme: "
                         "use file:///abs/path or s3://bucket[/prefix]")
    raise ValueError(f"unsupported backup target scheme {parts.scheme!r} in {url!r}: "
                     "use file:///abs/path or s3://bucket[/prefix]")


def __getattr__(name: str):
    """``FileTarget`` and ``S3Target`` live in their own modules (boto3 loads slowly and
    only S3 needs it); importing them from here still works."""
    if name == "FileTarget":
        from drove.backup.filetarget import FileTarget

        return FileTarget
    if name == "S3Target":
        from drove.backup.s3target import S3Target

        return S3Target
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
