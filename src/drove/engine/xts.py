"""AES-XTS-256 over runs of sectors, each with its own tweak, keeping the key schedule.

``cryptography`` makes a new cipher context (two AES key schedules) for every
tweak: several microseconds per 4 KiB sector, most of the encryption layer's
cost.  OpenSSL's EVP interface sets a new tweak on a context that keeps its
keys; called through ctypes that is about a microsecond.  That path is used
only when libcrypto loads and agrees with ``cryptography`` on a test sector
(checked once per key); otherwise ``cryptography`` does the work.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_UNSET: Any = object()
_lib: Any = _UNSET


def _libcrypto() -> Any:
    """libcrypto with the EVP functions typed, or None when there is none."""
    global _lib
    if _lib is _UNSET:
        _lib = None
        name = ctypes.util.find_library("crypto")
        try:
            lib = ctypes.CDLL(name) if name else None
            if lib is not None:
                vp, i = ctypes.c_void_p, ctypes.c_int
                lib.EVP_CIPHER_CTX_new.restype = vp
                lib.EVP_CIPHER_CTX_new.argtypes = []
                lib.EVP_CIPHER_CTX_free.restype = None
                lib.EVP_CIPHER_CTX_free.argtypes = [vp]
                lib.EVP_aes_256_xts.restype = vp
                lib.EVP_aes_256_xts.argtypes = []
                lib.EVP_CipherInit_ex.restype = i
                lib.EVP_CipherInit_ex.argtypes = [vp, vp, vp, ctypes.c_char_p, ctypes.c_char_p,
                                                  i]
                lib.EVP_CipherUpdate.restype = i
                lib.EVP_CipherUpdate.argtypes = [vp, vp, ctypes.POINTER(i), vp, i]
                _lib = lib
        except (OSError, AttributeError):
            _lib = None
    return _lib


def _address(buf: bytearray) -> tuple[int, Any]:
    """The address of a bytearray's memory, and the ctypes view keeping it exported."""
    view = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(view), view


class _Evp:
    """Two EVP contexts (encrypt, decrypt) holding one key."""

    def __init__(self, lib: Any, key: bytes) -> None:
        self._lib = lib
        self._ctx: dict[bool, int] = {}
        for enc in (True, False):
            ctx = lib.EVP_CIPHER_CTX_new()
            if not ctx:
                raise OSError("EVP_CIPHER_CTX_new failed")
            self._ctx[enc] = ctx
            if lib.EVP_CipherInit_ex(ctx, lib.EVP_aes_256_xts(), None, key, None,
                                     int(enc)) != 1:
                raise OSError("EVP_CipherInit_ex(aes-256-xts) failed")
        self._outl = ctypes.c_int()

    def __del__(self) -> None:
        for ctx in getattr(self, "_ctx", {}).values():
            self._lib.EVP_CIPHER_CTX_free(ctx)

    def sectors(self, encrypt: bool, first: int, src: int, dst: int, size: int,
                todo: list[int]) -> None:
        """The sectors at byte offsets ``todo`` from address ``src`` to ``dst``."""
        ctx, enc = self._ctx[encrypt], int(encrypt)
        init, update = self._lib.EVP_CipherInit_ex, self._lib.EVP_CipherUpdate
        outl = ctypes.byref(self._outl)
        for i in todo:
            tweak = (first + i // size).to_bytes(16, "little")
            if (init(ctx, None, None, None, tweak, enc) != 1
                    or update(ctx, dst + i, outl, src + i, size) != 1):
                raise OSError(5, "AES-XTS failed in libcrypto")


class Xts:
    """AES-XTS-256 with one key over sectors of ``sector`` bytes, tweak = sector number."""

    def __init__(self, key: bytes, sector: int, native: bool = True) -> None:
        self.sector = sector
        self._aes = algorithms.AES(key)
        self._evp: _Evp | None = None
        lib = _libcrypto() if native else None
        if lib is not None:
            try:
                evp = _Evp(lib, key)
            except OSError:
                evp = None
            if evp is not None and self._agrees(evp):
                self._evp = evp

    @property
    def backend(self) -> str:
        """Which library does the work: ``libcrypto`` (EVP, direct) or ``cryptography``."""
        return "libcrypto" if self._evp is not None else "cryptography"

    def _agrees(self, evp: _Evp) -> bool:
        sample = bytearray(os.urandom(self.sector))
        self._evp = None
        want = self.run(True, 12345, sample)
        self._evp = evp
        got = self.run(True, 12345, sample)
        return got == want and self.run(False, 12345, got) == sample

    def _tweak(self, n: int) -> bytes:
        # The tweak: the sector number, 16 bytes little-endian (dm-crypt's plain64).
        return n.to_bytes(16, "little")

    def run(self, encrypt: bool, first: int, data: Any, skip: bytes | None = None) -> bytearray:
        """``data`` (whole sectors, the first numbered ``first``) encrypted or decrypted; a
        sector equal to ``skip`` comes out as zeros."""
        view = memoryview(data).cast("B")
        n = len(view)
        out = bytearray(n)
        size = self.sector
        if self._evp is None:
            for i in range(0, n, size):
                chunk = view[i:i + size]
                if skip is not None and chunk == skip:
                    continue
                ctx = Cipher(self._aes, modes.XTS(self._tweak(first + i // size)))
                op = ctx.encryptor() if encrypt else ctx.decryptor()
                out[i:i + size] = op.update(chunk)
            return out
        src_buf = data if isinstance(data, bytearray) else bytearray(view)
        src, src_keep = _address(src_buf)
        dst, dst_keep = _address(out)
        todo = (range(0, n, size) if skip is None
                 else [i for i in range(0, n, size) if view[i:i + size] != skip])
        try:
            self._evp.sectors(encrypt, first, src, dst, size, list(todo))
        finally:
            del src_keep, dst_keep
        return out
