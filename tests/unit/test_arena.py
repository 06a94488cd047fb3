"""The shared payload arena's slots (drove.nbd.arena)."""

from __future__ import annotations

import os

from drove.nbd.arena import SLOT, Arena


def rss_shmem_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


def test_slots_are_handed_out_found_by_view_given_back_and_trimmed() -> None:
    arena = Arena(slots=3)
    assert os.readlink(arena.path).startswith("/memfd:drove-arena")
    assert arena.take(SLOT + 1) is None  # too big: the caller goes inline
    taken = [arena.take(SLOT) for _ in range(3)]
    assert all(t is not None for t in taken) and arena.take(10) is None  # all busy
    offsets = {arena.offset_of(data) for _, data in taken}
    assert offsets == {0, SLOT, 2 * SLOT} and arena.in_use == 3
    assert arena.offset_of(memoryview(b"x")) is None  # not from the arena
    buf, data = taken[1]
    buf[:5] = b"hello"
    assert data.readonly and bytes(data[:5]) == b"hello"
    with open(arena.path, "rb") as f:  # what another process mapping the memfd sees
        f.seek(arena.offset_of(data))
        assert f.read(5) == b"hello"
    for b, _ in taken:
        b[5:] = b"\x01" * (SLOT - 5)
    before = rss_shmem_kib()
    assert before >= 3 * 1024
    for _, d in taken:
        arena.give_back(d)
    assert arena.in_use == 0
    arena.trim()
    assert rss_shmem_kib() <= before - 3 * 1024  # the written slots' memory went back
    again = arena.take(5)
    assert again is not None and bytes(again[1]) == bytes(5)  # a trimmed slot reads zeros
