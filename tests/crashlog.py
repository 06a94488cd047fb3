"""Reading back what tests/crash_writer.py logged: which writes must have survived."""

from __future__ import annotations

import struct
from pathlib import Path

from replicatools import run

BS = 4096


def read_volume(uri: str, path: Path) -> bytes:
    """The whole export, read with nbdcopy."""
    run(["nbdcopy", uri, str(path)])
    return path.read_bytes()


def parse_log(path: Path) -> tuple[dict[int, int], dict[int, set[int]]]:
    """Per block: the last acknowledged seq, and seqs issued after it but not acknowledged."""
    acked: dict[int, int] = {}
    issued: dict[int, set[int]] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # a flush marker, or a line cut by the end of the writer
        kind, block, seq = parts[0], int(parts[1]), int(parts[2])
        if kind == "I":
            issued.setdefault(block, set()).add(seq)
        elif kind == "A":
            acked[block] = seq
            issued[block] = {s for s in issued.get(block, set()) if s > seq}
    return acked, issued


def check_blocks(data: bytes, acked: dict[int, int], issued: dict[int, set[int]],
                 blocks: int) -> None:
    """Every acknowledged write is there (or a newer in-flight one); no torn or foreign block."""
    for block in range(blocks):
        chunk = data[block * BS:(block + 1) * BS]
        if chunk == bytes(BS):
            assert block not in acked, f"block {block}: acked seq {acked.get(block)} lost"
            continue
        b, seq = struct.unpack_from("<QQ", chunk)
        assert chunk == struct.pack("<QQ", b, seq) * (BS // 16), f"block {block} torn"
        assert b == block, f"block {block} holds data of block {b}"
        allowed = {acked[block]} if block in acked else set()
        allowed |= issued.get(block, set())
        assert seq in allowed, (
            f"block {block} holds seq {seq}; acked {acked.get(block)}, "
            f"in flight {sorted(issued.get(block, ()))}"
        )
