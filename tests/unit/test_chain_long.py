"""A 300-layer chain: reads through every layer, bounded open files, reopen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drove.replica import Replica, meta

BS = 4096
LAYERS = 300
SIZE = 512 * BS


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_300_layer_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Durability is not under test here; 300 snapshots' fsyncs would dominate.
    monkeypatch.setattr(meta.fs, "fsync", lambda fd: None)
    monkeypatch.setattr(meta.fs, "fdatasync", lambda fd: None)
    d = tmp_path / "r"
    fds0 = open_fds()
    r = Replica.create(d, SIZE, chunk_blocks=64, max_open_files=32)
    oracle = bytearray(SIZE)
    kept: dict[int, bytes] = {}
    for i in range(LAYERS):
        # A little in each layer: an unaligned write straddling blocks (read-modify-
        # write over older layers), plus a block of its own.
        off = (i * 7 * BS + 1000 + i) % (SIZE - 3 * BS)
        data = bytes([i % 251 + 1]) * (BS + 500)
        r.write(off, data)
        oracle[off:off + len(data)] = data
        own = (i % (SIZE // BS)) * BS
        r.write(own, bytes([i % 13 + 1]) * 100)
        oracle[own:own + 100] = bytes([i % 13 + 1]) * 100
        r.snapshot(f"s{i}")
        if i in (LAYERS // 2, LAYERS // 2 + 1, LAYERS - 1):
            kept[i] = bytes(oracle)
        assert open_fds() - fds0 < 40
    assert r.read(0, SIZE) == oracle
    view = r.view(f"s{LAYERS // 2}")
    assert view.read(0, SIZE) == kept[LAYERS // 2]
    assert open_fds() - fds0 < 40
    assert len(r.layers()) == LAYERS + 1
    r.close()
    assert open_fds() == fds0

    r = Replica.open(d, chunk_blocks=64, max_open_files=32)
    assert r.read(0, SIZE) == oracle
    assert r.view(f"s{LAYERS // 2}").read(0, SIZE) == kept[LAYERS // 2]
    # Delete every other snapshot and purge: folds all along the chain.
    for i in range(0, LAYERS - 1, 2):
        r.delete_snapshot(f"s{i}")
    r.purge()
    assert len(r.layers()) == LAYERS // 2 + 1
    assert r.read(0, SIZE) == oracle
    for i in (LAYERS // 2 + 1, LAYERS - 1):
        assert r.view(f"s{i}").read(0, SIZE) == kept[i]
    r.close()
