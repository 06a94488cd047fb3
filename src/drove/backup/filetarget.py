"""A target in a local directory or an NFS mount."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from drove.backup.errors import NotFoundError, TargetError
from drove.backup.target import Target, check_key

_TEMP = re.compile(r"\.tmp-[0-9a-f]{12}$")
"""Suffix of a file being written; ``put`` renames it into place when complete."""


def _load_syncfs():
    """libc's syncfs(2), or None where it is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h: swap the two names atomically; both must exist


def _load_renameat2():
    """libc's renameat2(2), or None where it is unavailable."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
"""renameat2 errors meaning "this file system cannot exchange" (NFS, old kernels)."""


def _exchange(a: str, b: str) -> None:
    """Swap the files at ``a`` and ``b`` atomically; OSError (ENOENT if one is gone)."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), b)


class FileTarget(Target):
    """Objects as files under a directory; ``put`` is write-to-temp then rename.

    Puts are not fsynced one by one (far too slow for thousands of blocks); ``sync``
    flushes the whole file system with syncfs(2) instead, which the store does before
    and after publishing a manifest.  Leftover ``.tmp-`` files of interrupted puts are
    skipped by ``list`` and offered by ``stale_temp_files`` for removal.
    """

    def __init__(self, path: str | os.PathLike[str]):
        root = Path(path)
        if not root.is_absolute():
            raise ValueError(f"backup directory {str(root)!r} must be an absolute path")
        self.root = root
        self.url = "file://" + quote(str(root))
        if not root.is_dir():
            raise TargetError(f"backup directory {root} does not exist: "
                              "create it (or mount the NFS export there) first")

    def _path(self, key: str) -> Path:
        """The file of ``key``."""
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        """Write to a temp file beside the final name, then rename it into place."""
        path = self._path(key)
        tmp = f"{path}.tmp-{secrets.token_hex(6)}"
        try:
            self._write_temp(path, tmp, data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise TargetError(f"cannot write {key} to {self.url}: {e}") from e

    @staticmethod
    def _write_temp(path: Path, tmp: str, data: bytes) -> None:
        """Write ``data`` to the new file ``tmp`` beside ``path`` (making its directory)."""
        try:
            f = open(tmp, "xb")  # noqa: SIM115 - the with below closes it
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "xb")  # noqa: SIM115
        with f:
            f.write(data)

    exchange = True
    """Whether ``replace`` may use renameat2(RENAME_EXCHANGE); cleared on a file system
    that refuses it (NFS), where ``replace`` falls back to check-then-rename."""

    def replace(self, key: str, data: bytes, version: str | None = None) -> str | None:
        """Write a temp file, then swap it with ``key``'s file by renameat2(RENAME_EXCHANGE).

        The exchange is atomic and fails with ENOENT when ``key`` is gone, so a file
        deleted meanwhile (a lock removed as stale) is never brought back; the old
        contents end up in the temp file, which is then unlinked.  ``version`` is ignored:
        the file target tracks none (nobody but its holder ever writes a lock file).

        Where the file system cannot exchange (NFS answers EINVAL) the fallback checks that
        the file exists and renames over it: a delete landing in between is undone.  The
        lock makes that harmless: a refresh that ends later than its give-up deadline
        counts as lost, and another holder may delete a lock only after that deadline.
        """
        path = self._path(key)
        tmp = f"{path}.tmp-{secrets.token_hex(6)}"
        try:
            self._write_temp(path, tmp, data)
            if self.exchange:
                try:
                    _exchange(tmp, str(path))
                except OSError as e:
                    if e.errno not in _NO_EXCHANGE:
                        raise
                    self.exchange = False
                else:
                    os.unlink(tmp)  # now holds the old contents
                    return ""
            if not path.is_file():
                os.unlink(tmp)
                return None
            os.replace(tmp, path)
            return ""
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return None
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise TargetError(f"cannot replace {key} in {self.url}: {e}") from e

    def get(self, key: str) -> bytes:
        """The file's contents."""
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"{key} does not exist in {self.url}") from None
        except OSError as e:
            raise TargetError(f"cannot read {key} from {self.url}: {e}") from e

    def exists(self, key: str) -> bool:
        """Whether the file exists."""
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix``, walking only the directories that can match."""
        for key, _ in self._walk(prefix, sizes=False):
            yield key

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Keys under ``prefix`` with file sizes."""
        return self._walk(prefix, sizes=True)

    def _walk(self, prefix: str, *, sizes: bool,
              temp: bool = False) -> Iterator[tuple[str, int]]:
        """(key, size) of files whose key starts with ``prefix``; temp files iff ``temp``."""
        directory, _, _ = prefix.rpartition("/")
        if directory:
            check_key(directory)
        start = self.root / directory if directory else self.root
        stack = [(start, f"{directory}/" if directory else "")]
        try:
            while stack:
                path, rel = stack.pop()
                try:
                    it = os.scandir(path)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                with it:
                    for entry in it:
                        key = rel + entry.name
                        # Skip subtrees that cannot hold a match (prefix is a string prefix).
                        if not (key.startswith(prefix) or prefix.startswith(key + "/")):
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            stack.append((Path(entry.path), key + "/"))
                        elif bool(_TEMP.search(entry.name)) == temp and key.startswith(prefix):
                            yield key, entry.stat().st_size if sizes else 0
        except OSError as e:
            raise TargetError(f"cannot list {prefix or '/'} in {self.url}: {e}") from e

    def delete(self, key: str) -> None:
        """Unlink the file; an absent file is fine."""
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise TargetError(f"cannot delete {key} from {self.url}: {e}") from e

    def sync(self) -> None:
        """syncfs(2) on the target's file system (os.sync where syncfs is missing)."""
        if _syncfs is None:
            os.sync()
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise TargetError(f"cannot sync {self.url}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def stale_temp_files(self, age: float) -> Iterator[str]:
        """Temp files of interrupted puts whose last change is older than ``age`` seconds."""
        cutoff = time.time() - age
        for key, _ in self._walk("", sizes=False, temp=True):
            try:
                if os.stat(self.root / key).st_mtime < cutoff:
                    yield key
            except FileNotFoundError:
                continue
