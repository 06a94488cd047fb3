"""The encryption layer (drove.engine.crypt) over memory, and the data keys of the manager."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from drove.engine.crypt import (
    SECTOR,
    CryptLayer,
    key_check,
    read_key_file,
    write_key_file,
)
from drove.engine.stack import LayerSettings, build_stack
from drove.manager.datakeys import DataKeys, kek_from_file
from drove.manager.errors import ApiError
from drove.nbd import eager
from drove.nbd.memory import MemoryExport

SIZE = 1 << 20
KEY = bytes(range(64))
PATTERN = b"drove-secret-pattern-0123456789!" * (SECTOR // 32)


def test_write_read_and_nothing_plain_below() -> None:
    mem = MemoryExport(SIZE)
    layer = CryptLayer(mem, KEY)

    async def run() -> None:
        await layer.write(8192, memoryview(PATTERN * 3))
        assert await layer.read(8192, 3 * SECTOR) == PATTERN * 3
        assert await layer.read(0, SECTOR) == bytes(SECTOR)  # a hole reads as zeros
        assert b"drove-secret" not in mem.data
        # Sector n is AES-XTS with tweak n (dm-crypt's plain64): an outside decryptor agrees.
        n = 8192 // SECTOR + 1
        dec = Cipher(algorithms.AES(KEY), modes.XTS(n.to_bytes(16, "little"))).decryptor()
        assert dec.update(bytes(mem.data[(n * SECTOR):(n + 1) * SECTOR])) == PATTERN
        # Same plaintext, other sectors: other ciphertexts (the tweak).
        assert mem.data[8192:12288] != mem.data[12288:16384]

    asyncio.run(run())


def test_zero_and_trim_read_as_zeros_and_zero_data_is_encrypted() -> None:
    mem = MemoryExport(SIZE)
    layer = CryptLayer(mem, KEY)

    async def run() -> None:
        await layer.write(0, memoryview(PATTERN * 4))
        await layer.zero(0, SECTOR)
        await layer.trim(SECTOR, SECTOR)
        await layer.zero(2 * SECTOR, SECTOR, may_trim=False)
        assert await layer.read(0, 4 * SECTOR) == bytes(3 * SECTOR) + PATTERN
        # Zeros written as data are encrypted like any data: not zeros below.
        await layer.write(4 * SECTOR, memoryview(bytes(SECTOR)))
        assert bytes(mem.data[4 * SECTOR:5 * SECTOR]) != bytes(SECTOR)
        assert await layer.read(4 * SECTOR, SECTOR) == bytes(SECTOR)

    asyncio.run(run())


def test_submit_path_encrypts_too_and_block_status_passes() -> None:
    mem = MemoryExport(SIZE)
    stack = build_stack(LayerSettings(data_key=KEY), mem)
    assert stack.crypt is not None and stack.top.caps.preferred_block == SECTOR

    async def run() -> None:
        fut = asyncio.get_running_loop().create_future()
        stack.top.submit(eager.WRITE, 0, SECTOR, memoryview(PATTERN), False,
                         lambda v, e: fut.set_result(e))
        assert await fut is None
        assert b"drove-secret" not in mem.data
        got = asyncio.get_running_loop().create_future()
        stack.top.submit(eager.READ, 0, SECTOR, None, False,
                         lambda v, e: got.set_result(bytes(v)))
        assert await got == PATTERN
        part = asyncio.get_running_loop().create_future()  # unaligned: via the coroutine
        stack.top.submit(eager.READ, 100, 200, None, False,
                         lambda v, e: part.set_result(bytes(v)))
        assert await part == PATTERN[100:300]
        assert await stack.top.block_status(0, SIZE) == await mem.block_status(0, SIZE)

    asyncio.run(run())


def test_unaligned_requests_against_a_flat_model() -> None:
    """Random unaligned writes, zeros, trims and reads, some concurrent in one sector, read
    like a bytearray; below, only ciphertext (or zeros) in whole sectors."""
    rng = random.Random(7)
    size = 64 * 1024
    mem = MemoryExport(size)
    layer = CryptLayer(mem, KEY)
    model = bytearray(size)

    async def run() -> None:
        for _ in range(300):
            batch = []
            for _ in range(rng.randint(1, 4)):  # disjoint ranges, started together
                off = rng.randrange(0, size - 1) // 4 * 4
                n = min(rng.choice((1, 100, 512, 4096, 5000, 9000)), size - off)
                if any(off < o + m and o < off + n for o, m, _ in batch):
                    continue
                batch.append((off, n, rng.choice("wwwzt")))
            coros = []
            for off, n, op in batch:
                if op == "w":
                    data = bytes(rng.randrange(1, 256) for _ in range(n))
                    model[off:off + n] = data
                    coros.append(layer.write(off, memoryview(data)))
                else:
                    model[off:off + n] = bytes(n)
                    coros.append(layer.zero(off, n) if op == "z" else layer.trim(off, n))
            await asyncio.gather(*coros)
            off = rng.randrange(0, size)
            n = rng.randint(1, size - off)
            assert await layer.read(off, n) == model[off:off + n]
        assert await layer.read(0, size) == model
        with pytest.raises(OSError) as err:
            await layer.zero(100, 10, fast=True)
        assert err.value.errno == errno.ENOTSUP

    asyncio.run(run())


def test_bad_keys() -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        CryptLayer(MemoryExport(SIZE), KEY[:32])
    with pytest.raises(ValueError, match="halves"):
        CryptLayer(MemoryExport(SIZE), KEY[:32] * 2)


def test_key_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_key_file(path, KEY)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_key_file(path) == KEY
    path.chmod(0o644)
    with pytest.raises(ValueError, match="0600"):
        read_key_file(path)
    path.chmod(0o600)
    path.write_text("zz")
    with pytest.raises(ValueError, match="hex"):
        read_key_file(path)


def test_data_keys_wrap_unwrap_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "kek").write_text(os.urandom(32).hex())
    (tmp_path / "phrase").write_text("correct horse battery staple\n")
    (tmp_path / "short").write_text("abc")
    keys = DataKeys(kek_from_file(tmp_path / "kek"))
    enc = keys.new_key()
    key = keys.unwrap(enc, "v")
    assert len(key) == 64 and key_check(key) == enc["key_id"]
    assert key.hex() not in str(enc) and base64.b64decode(enc["wrapped_key"]) != key
    assert kek_from_file(tmp_path / "phrase") == kek_from_file(tmp_path / "phrase")
    with pytest.raises(ValueError, match="passphrase"):
        kek_from_file(tmp_path / "short")
    other = DataKeys(kek_from_file(tmp_path / "phrase"))
    with pytest.raises(ApiError) as err:
        other.unwrap(enc, "v")
    assert err.value.status == 409 and enc["kek_id"] in str(err.value)
    with pytest.raises(ApiError) as err:
        DataKeys().unwrap(enc, "v")
    assert err.value.status == 422 and "--kek-file" in str(err.value)
    with pytest.raises(ApiError):
        DataKeys().new_key()


def test_libcrypto_path_agrees_with_cryptography() -> None:
    """The EVP path (when this machine has libcrypto) and cryptography's give one result."""
    from drove.engine.xts import Xts

    native, plain = Xts(KEY, SECTOR), Xts(KEY, SECTOR, native=False)
    assert plain.backend == "cryptography"
    data = bytearray(os.urandom(8 * SECTOR))
    data[2 * SECTOR:3 * SECTOR] = bytes(SECTOR)
    for first in (0, 1, 2**40 + 3):
        enc = native.run(True, first, memoryview(bytes(data)))
        assert enc == plain.run(True, first, data)
        assert native.run(False, first, enc) == data
        zeros = native.run(False, first, bytes(SECTOR) + enc[SECTOR:], skip=bytes(SECTOR))
        assert zeros[:SECTOR] == bytes(SECTOR) and zeros[SECTOR:] == data[SECTOR:]
