"""The encryption layer: every 4 KiB sector encrypted with AES-XTS-256, the sector number as tweak.

Sector size 4 KiB, not 512 bytes: it is the replicas' block and the NBD
preferred block, so a sector never straddles two replica blocks, and XTS in
``cryptography`` costs one cipher object per sector: 4 KiB sectors make eight
times fewer of them per byte.  Smaller or unaligned requests still work (a
read-modify-write of the sectors they touch; see :class:`CryptLayer`): the
kernel's loop device over nbdfuse sends 512-byte ones.

Zeros: ZERO and TRIM of whole sectors pass through (sparse, fast, nothing to
encrypt), so an unwritten, zeroed or trimmed sector holds all-zero bytes below this layer; a
sector whose *ciphertext* is all zeros therefore reads as plaintext zeros
(a real ciphertext is all zeros with probability 2**-32768).  Block status
passes through: which sectors are allocated is not hidden (as with dm-crypt
and discard), their contents are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import hmac
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from drove.engine.layers import Layer
from drove.engine.xts import Xts
from drove.nbd import eager
from drove.nbd.export import Capabilities, CoroutineExport

SECTOR = 4096
"""Bytes encrypted as one XTS data unit (one tweak)."""

KEY_BYTES = 64
"""An AES-XTS-256 key: two 256-bit AES keys."""

_ZERO = bytes(SECTOR)


def key_check(key: bytes) -> str:
    """A short public fingerprint of ``key`` (HMAC-SHA256 of a fixed label): whoever holds a
    key can tell whether it is the one a volume expects, learning nothing of it."""
    return hmac.new(key, b"drove data key check", hashlib.sha256).hexdigest()[:16]


def check_key(key: bytes) -> None:
    """Raise ValueError unless ``key`` is a usable AES-XTS-256 key."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"an AES-XTS-256 key is {KEY_BYTES} bytes, not {len(key)}")
    if key[:32] == key[32:]:
        raise ValueError("the two halves of an AES-XTS key must differ")


class Sectors:
    """AES-XTS-256 over whole sectors at a volume offset (what the layer and a restore do)."""

    def __init__(self, key: bytes) -> None:
        check_key(key)
        self.xts = Xts(key, SECTOR)

    def encrypt(self, offset: int, data: Any) -> bytearray:
        """The ciphertext of ``data`` (whole sectors) written at ``offset``."""
        return self.xts.run(True, offset // SECTOR, data)

    def decrypt(self, offset: int, data: Any) -> bytearray:
        """The plaintext of ``data`` (whole sectors) read at ``offset``; all-zero sectors
        (holes, zeroed, trimmed) read as zeros."""
        return self.xts.run(False, offset // SECTOR, data, skip=_ZERO)


class CryptLayer(Layer):
    """Encrypts writes and decrypts reads of the layer below, sector by sector.

    Requests need not be aligned (nbdfuse under a loop device sends 512-byte ones):
    a partial sector is read, decrypted, patched and written back whole, one such
    read-modify-write at a time, so two of them in one sector never undo each other.
    Below, only whole sectors are ever written, zeroed or trimmed.
    """

    def __init__(self, inner: CoroutineExport, key: bytes) -> None:
        self.sectors = Sectors(key)
        super().__init__(inner)
        self._rmw = asyncio.Lock()

    @property
    def caps(self) -> Capabilities:
        """The capabilities below, preferring whole sectors."""
        below = self.inner.caps
        return dataclasses.replace(below, preferred_block=max(below.preferred_block, SECTOR))

    async def read(self, offset: int, length: int) -> bytearray:
        """Read below and decrypt (the whole sectors around an unaligned range)."""
        start, end = _outer(offset, length)
        plain = self.sectors.decrypt(start, await self.inner.read(start, end - start))
        if start == offset and end == offset + length:
            return plain
        return plain[offset - start:offset - start + length]

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Encrypt and write below (an unaligned write: read-modify-write of its sectors)."""
        if (offset | len(data)) % SECTOR:
            await self._patch(offset, data, fua)
            return
        await self.inner.write(offset, memoryview(self.sectors.encrypt(offset, data)), fua)

    def flush(self) -> Awaitable[None]:
        """Flush below (nothing is held here)."""
        return self.inner.flush()

    def submit(self, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: eager.Done) -> None:
        """READ and WRITE of whole sectors on the fast path below (encrypting before,
        decrypting in the completion); unaligned ones through the coroutines."""
        if cmd == eager.FLUSH:
            self.below(cmd, offset, length, data, fua, done)
            return
        if (offset | length) % SECTOR:
            eager.run(self.read(offset, length) if cmd == eager.READ
                      else self.write(offset, data, fua), done)
            return
        if cmd == eager.WRITE:
            try:
                sealed = memoryview(self.sectors.encrypt(offset, data))
            except Exception as exc:
                done(None, exc)
                return
            self.below(cmd, offset, length, sealed, fua, done)
            return

        def opened(value: Any, error: BaseException | None) -> None:
            if error is not None:
                done(None, error)
                return
            try:
                plain = self.sectors.decrypt(offset, value)
            except Exception as exc:
                done(None, exc)
                return
            done(plain, None)

        self.below(cmd, offset, length, None, fua, opened)

    async def _patch(self, offset: int, data: Any, fua: bool) -> None:
        """Write ``data`` into the sectors around it, keeping the rest of them."""
        start, end = _outer(offset, len(data))
        async with self._rmw:
            plain = self.sectors.decrypt(start, await self.inner.read(start, end - start))
            plain[offset - start:offset - start + len(data)] = data
            await self.inner.write(start, memoryview(self.sectors.encrypt(start, plain)), fua)

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
                   fast: bool = False) -> None:
        """Zero whole sectors below; partial ones are rewritten with zeros in them."""
        head, middle, tail = _split(offset, length)
        if fast and (head or tail):
            raise OSError(errno.ENOTSUP, "a partial sector of an encrypted volume is zeroed "
                                         "by rewriting it: not fast")
        if middle:
            await self.inner.zero(*middle, fua, may_trim, fast)
        for part in (head, tail):
            if part:
                await self._patch(part[0], bytes(part[1]), fua)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Trim whole sectors below; partial ones read as zeros after, like a trimmed range."""
        head, middle, tail = _split(offset, length)
        if middle:
            await self.inner.trim(*middle, fua)
        for part in (head, tail):
            if part:
                await self._patch(part[0], bytes(part[1]), fua)


def _outer(offset: int, length: int) -> tuple[int, int]:
    """The whole sectors around a range: (start, end)."""
    return offset - offset % SECTOR, -(-(offset + length) // SECTOR) * SECTOR


Part = tuple[int, int] | None


def _split(offset: int, length: int) -> tuple[Part, Part, Part]:
    """A range as (partial head, whole sectors, partial tail), each (offset, length) or None."""
    end = offset + length
    first, last = -(-offset // SECTOR) * SECTOR, end - end % SECTOR
    if first > last:  # within one sector
        return (offset, length), None, None
    head = (offset, first - offset) if first > offset else None
    middle = (first, last - first) if last > first else None
    tail = (last, end - last) if end > last else None
    return head, middle, tail


def read_key_file(path: Path) -> bytes:
    """The data key in ``path`` (hex); refused (ValueError) when others may read the file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077 or st.st_uid != os.getuid():
            raise ValueError(f"mode {st.st_mode & 0o777:o}, owner {st.st_uid}: a key file must "
                             "be mode 0600 and this user's")
        text = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("not a hex key") from None
    check_key(key)
    return key


def write_key_file(path: Path, key: bytes) -> None:
    """Write ``key`` (hex) to a new file ``path`` only this user can read (mode 0600)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, key.hex().encode("ascii"))
    finally:
        os.close(fd)
