"""Per-request CPU cost of the NBD server's transmission path, without sockets.

Feeds pre-built request batches through the server's protocol object (the
same ``get_buffer`` / ``buffer_updated`` calls a transport makes) with a
transport that discards replies, and prints microseconds per request.  It
isolates the Python work of parsing, dispatch and reply building from the
kernel and from the client, so it is stable on a noisy machine; compare it
with the ``cpu us/IO`` column of bench/nbd_server.py to see the kernel's share.

    .venv/bin/python bench/nbd_micro.py [--requests 200000] [--batch 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from drove.nbd import proto
from drove.nbd.memory import MemoryExport, MemoryProvider
from drove.nbd.server import NbdServer
from drove.service import new_event_loop


class NullTransport:
    """Accepts everything a transport would be asked to do; counts reply bytes."""

    def __init__(self) -> None:
        """Start with nothing written."""
        self.written = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """No socket, no peer."""
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Ignored."""

    def write(self, data: Any) -> None:
        """Count and drop."""
        self.written += len(data)

    def writelines(self, parts: Any) -> None:
        """Count and drop."""
        for part in parts:
            self.written += len(part)

    def is_closing(self) -> bool:
        """Open until closed."""
        return self.closing

    def close(self) -> None:
        """Mark closed."""
        self.closing = True

    def abort(self) -> None:
        """Mark closed."""
        self.closing = True

    def pause_reading(self) -> None:
        """Ignored."""

    def resume_reading(self) -> None:
        """Ignored."""


def build_batch(kind: str, count: int, size: int, rng: random.Random) -> bytes:
    """``count`` pipelined 4 KiB requests of ``kind`` (read, write or mixed)."""
    out = bytearray()
    payload = bytes(4096)
    for i in range(count):
        offset = rng.randrange(size // 4096) * 4096
        is_write = kind == "write" or (kind == "mixed" and i % 2)
        cmd = proto.NBD_CMD_WRITE if is_write else proto.NBD_CMD_READ
        out += proto.REQUEST.pack(proto.NBD_REQUEST_MAGIC, 0, cmd, i, offset, 4096)
        if is_write:
            out += payload
    return bytes(out)


async def measure(kind: str, requests: int, batch: int, structured: bool, suspend: bool) -> float:
    """Microseconds per request for one workload."""
    size = 64 * 1024 * 1024
    export = MemoryExport(size, "", suspend=suspend)
    server = NbdServer(MemoryProvider([export]))
    conn = server._factory()
    transport = NullTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    assert conn._handshake_task is not None
    conn._handshake_task.cancel()  # skip the handshake: choose the export directly
    conn._structured = structured
    conn._choose(
        export, "", proto.transmission_flags(export.caps, structured), block_size_negotiated=True
    )
    conn._enter_transmission()
    rng = random.Random(1)
    batches = [build_batch(kind, batch, size, rng) for _ in range(64)]
    rounds = requests // batch
    start = time.perf_counter()
    for i in range(rounds):
        data = batches[i % len(batches)]
        pos = 0
        while pos < len(data):
            buf = conn.get_buffer(-1)
            n = min(len(buf), len(data) - pos)
            buf[:n] = data[pos : pos + n]
            conn.buffer_updated(n)
            pos += n
        if suspend:
            await asyncio.sleep(0)  # let the Tasks finish and reply
            await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    conn.connection_lost(None)
    return 1e6 * elapsed / (rounds * batch)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=16, help="requests per received batch")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (the best is shown)")
    args = parser.parse_args()
    loop = new_event_loop()
    print(f"{'workload':<10} {'replies':<11} {'export':<9} {'us/request':>10}")
    for suspend in (False, True):
        for structured in (False, True):
            for kind in ("read", "write", "mixed"):
                us = min(
                    loop.run_until_complete(
                        measure(kind, args.requests, args.batch, structured, suspend)
                    )
                    for _ in range(args.repeat)
                )
                print(
                    f"{kind:<10} {'structured' if structured else 'simple':<11} "
                    f"{'suspends' if suspend else 'eager':<9} {us:>10.2f}",
                    flush=True,
                )
    loop.close()


if __name__ == "__main__":
    main()
