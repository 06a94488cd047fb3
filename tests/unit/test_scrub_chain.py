"""The chain's part of a scrub, in process: one range's digest, re-hashing a layer against
its recorded checksum, and repairing blocks of a snapshot layer (a shared one copied first)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drove.replica import Replica
from drove.replica.errors import InvalidRequestError

BS = 4096
SIZE = 64 * BS
RANGE = 8 * BS
FILE = "volume-snap-s1.img"


def pat(c: int, n: int) -> bytes:
    return bytes([c]) * n


def volume(d: Path) -> Replica:
    """Snapshot s1 (0x01 at blocks 0-9 and 0x02 at 40-42, nothing else) under a head."""
    r = Replica.create(d, SIZE)
    r.write(0, pat(1, 10 * BS))
    r.write(40 * BS, pat(2, 3 * BS))
    r.snapshot("s1")
    assert FILE in {la.file for la in r.layers()}
    return r


def flip(path: Path, offset: int) -> None:
    """Invert 8 bytes of a file on disk (bit-rot)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def test_one_range_digest_matches_the_layer_digests(tmp_path: Path) -> None:
    r = volume(tmp_path / "r")
    whole = r.layer_digests(FILE, RANGE)
    for i, d in enumerate(whole):
        assert r.range_digest(FILE, i * RANGE, RANGE) == d
    assert whole[0] != whole[2]  # data versus none: the digest can tell


def test_rehash_finds_rot_the_recorded_checksum_does_not(tmp_path: Path) -> None:
    r = volume(tmp_path / "r")
    assert r.rehash_layer(FILE)[0] is None  # nothing recorded before a checksum is asked
    recorded = r.layer_checksum(FILE)
    assert r.rehash_layer(FILE) == (recorded, recorded)
    flip(tmp_path / "r" / FILE, 3 * BS + 5)
    got, now = r.rehash_layer(FILE)
    assert got == recorded and now != recorded
    assert r.layer_checksum(FILE) == recorded  # the cache alone cannot see rot


def test_repair_blocks_of_a_shared_layer_copies_it_first(tmp_path: Path) -> None:
    r = volume(tmp_path / "r")
    good = r.layer_digests(FILE, RANGE)
    other = tmp_path / "other.img"
    os.link(tmp_path / "r" / FILE, other)  # as a linked clone shares it
    flip(tmp_path / "r" / FILE, 3 * BS + 5)
    before = other.read_bytes()
    r.layer_checksum(FILE)  # a recorded checksum the repair must drop
    # Block 3 gets its data back; block 41 becomes a hole (the good copy had one there).
    r.repair_blocks(FILE, [(3 * BS, pat(1, BS)), (41 * BS, None)])
    r.sync_layer(FILE)
    assert other.read_bytes() == before  # the other volume's file is untouched
    assert os.stat(tmp_path / "r" / FILE).st_nlink == 1
    assert r.read(3 * BS, BS) == pat(1, BS)
    assert r.read(41 * BS, BS) == bytes(BS)  # hole in s1, nothing below: zeros
    now = r.layer_digests(FILE, RANGE)
    assert now[0] == good[0] and now[5] != good[5]
    recorded, actual = r.rehash_layer(FILE)
    assert recorded is None and actual  # the repair dropped the stale checksum


def test_repair_refuses_bad_input_and_changes_nothing(tmp_path: Path) -> None:
    r = volume(tmp_path / "r")
    head = next(la.file for la in r.layers() if la.head)
    digests = r.layer_digests(FILE, RANGE)
    for file, blocks, msg in (
            (head, [(0, pat(9, BS))], "is the head"),
            (FILE, [(100, pat(9, BS))], "whole 4096-byte block"),
            (FILE, [(0, pat(9, 100))], "whole 4096-byte block"),
            (FILE, [(SIZE, pat(9, BS))], "whole 4096-byte block")):
        with pytest.raises(InvalidRequestError, match=msg):
            r.repair_blocks(file, blocks)
    with pytest.raises(InvalidRequestError, match="outside layer"):
        r.range_digest(FILE, SIZE - BS, 2 * BS)
    assert r.layer_digests(FILE, RANGE) == digests
    assert r.read(0, BS) == pat(1, BS)
