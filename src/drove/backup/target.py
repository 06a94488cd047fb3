"""Where backups are kept: a key/value interface over a directory or an S3 bucket.

Each kind of target registers the URL scheme it serves (``register``); this module
knows only that registry, and ``drove.backup`` registers the kinds it is assembled from.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import urlsplit

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

    def replace(self, key: str, data: bytes, version: str | None = None) -> str | None:
        """Overwrite ``key`` in one atomic step only if it still exists (and, where the
        target tracks versions, still is ``version``, a tag an earlier call returned).

        Returns the new version tag ('' where none is tracked), or None when nothing was
        written because ``key`` is gone; it never creates ``key`` (lock refresh relies on it).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot replace objects atomically")

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


Opener = Callable[..., Target]
"""Opens a target from its URL and the keyword options of ``open_target``."""

_KINDS: dict[str, tuple[Opener, str]] = {}


def register(scheme: str, opener: Opener, usage: str) -> None:
    """Serve ``scheme://`` URLs with ``opener``; ``usage`` is the URL form shown in errors."""
    _KINDS[scheme] = (opener, usage)


def _usage() -> str:
    return " or ".join(usage for _, usage in _KINDS.values())


def open_target(url: str, *, endpoint: str | None = None, region: str | None = None,
                access_key: str | None = None, secret_key: str | None = None) -> Target:
    """Open a target by its URL (``file:///abs/path``, ``s3://bucket[/prefix]``...).

    A bad URL raises ValueError; a target that exists but cannot be used TargetError.
    """
    scheme = urlsplit(url).scheme
    if not scheme:
        raise ValueError(f"backup target {url!r} has no scheme: use {_usage()}")
    if scheme not in _KINDS:
        raise ValueError(f"unsupported backup target scheme {scheme!r} in {url!r}: "
                         f"use {_usage()}")
    opener, _ = _KINDS[scheme]
    return opener(url, endpoint=endpoint, region=region, access_key=access_key,
                  secret_key=secret_key)
