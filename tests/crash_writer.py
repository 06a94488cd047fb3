"""Pipelined NBD writer that logs every acknowledged write (runs under Debian's python3).

Usage: crash_writer.py URI LOG BLOCKS SEED [FLUSH_EVERY]

Each 4 KiB write of block ``b`` carries ``(b, seq)`` repeated, so a reader can
tell which write a block holds.  For every batch it logs ``I b seq`` before
issuing and ``A b seq`` once the server acknowledged it, and ``F n`` after a
completed flush.  It runs until the server goes away.
"""

import os
import random
import struct
import sys

import nbd

BS = 4096
BATCH = 16


def payload(block: int, seq: int) -> bytes:
    """The content of write ``seq`` to ``block``."""
    return struct.pack("<QQ", block, seq) * (BS // 16)


def main() -> None:
    uri, log_path, blocks, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    flush_every = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    seq = 0
    rounds = 0
    try:
        while True:
            batch = rnd.sample(range(blocks), BATCH)
            issued = []
            lines = []
            for b in batch:
                seq += 1
                issued.append((b, seq))
                lines.append(f"I {b} {seq}\n")
            os.write(fd, "".join(lines).encode())
            # Buffers must outlive their commands: keep them referenced until retired.
            buffers = [nbd.Buffer.from_bytearray(bytearray(payload(b, s))) for b, s in issued]
            pending = {
                h.aio_pwrite(buf, b * BS) for buf, (b, _) in zip(buffers, issued, strict=True)
            }
            while pending:
                h.poll(-1)
                # aio_command_completed raises nbd.Error when the command failed.
                pending = {c for c in pending if not h.aio_command_completed(c)}
            os.write(fd, "".join(f"A {b} {s}\n" for b, s in issued).encode())
            rounds += 1
            if rounds % flush_every == 0:
                h.flush()
                os.write(fd, f"F {rounds}\n".encode())
    except nbd.Error:
        pass
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
