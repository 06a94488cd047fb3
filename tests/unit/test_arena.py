"""The shared payload arena's slots (drove.nbd.arena)."""

from __future__ import annotations

import os
import socket
import subprocess

from drove.nbd.arena import SLOT, Arena, PeerProcess


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


def test_a_retired_slot_comes_back_only_once_its_writer_has_exited() -> None:
    arena = Arena(slots=2)
    child = subprocess.Popen(["sleep", "60"])
    try:
        writer = PeerProcess(child.pid)
        (_, cut), (_, lost) = arena.take(SLOT), arena.take(SLOT)
        cut_at = arena.offset_of(cut)
        arena.retire(cut, writer)
        arena.retire(lost, None)  # the writer could not be told: never reused
        assert arena.retired == 2 and arena.in_use == 0
        assert arena.take(10) is None and arena.reclaim() == 0  # the writer still runs
        child.kill()
        child.wait()
        assert writer.exited()
        slot = arena.take(10)  # exhausted: take reclaims what it may
        assert slot is not None and arena.offset_of(slot[1]) == cut_at
        assert arena.retired == 1 and arena.take(10) is None
    finally:
        child.kill()
        child.wait()


def test_peer_process_of_a_unix_socket_only() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        peer = PeerProcess.of(a)
        assert peer is not None and peer.pid == os.getpid() and not peer.exited()
    tcp = socket.create_server(("127.0.0.1", 0))
    with tcp:
        assert PeerProcess.of(tcp) is None and PeerProcess.of(None) is None


def test_a_view_dropped_by_its_holder_is_never_mistaken_for_another() -> None:
    arena = Arena(slots=2)
    taken = arena.take(SLOT)
    assert taken is not None
    del taken  # the holder lets go without giving the slot back
    # New views are made in the memory the dropped ones had: none may pass for a slot.
    fresh = [memoryview(bytearray(8)).toreadonly() for _ in range(1000)]
    assert all(arena.offset_of(v) is None for v in fresh)
    assert arena.in_use == 1
