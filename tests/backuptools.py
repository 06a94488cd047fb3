"""In-memory sources and sinks, test data and an S3 stand-in for the backup store tests."""

from __future__ import annotations

import asyncio
import random
import uuid

from drove.backup.blocks import BLOCK_SIZE

BS = BLOCK_SIZE


def volume_data(layout: str, *, seed: int = 1, tail: int = 0) -> bytearray:
    """Volume contents, one character per 2 MiB block, plus ``tail`` random bytes.

    ``R`` random, ``Z`` zero, ``T`` compressible text, ``H`` random 4 KiB pages
    alternating with zero pages, ``S`` random data then a zero second half.
    """
    rnd = random.Random(seed)
    out = bytearray()
    for c in layout:
        if c == "R":
            out += rnd.randbytes(BS)
        elif c == "Z":
            out += bytes(BS)
        elif c == "T":
            line = f"line {rnd.random()} of some very compressible text\n".encode()
            out += (line * (BS // len(line) + 1))[:BS]
        elif c == "H":
            for i in range(BS // 4096):
                out += rnd.randbytes(4096) if i % 2 == 0 else bytes(4096)
        elif c == "S":
            out += rnd.randbytes(BS // 2) + bytes(BS // 2)
        else:
            raise ValueError(c)
    out += rnd.randbytes(tail)
    return out


class MemorySource:
    """A snapshot in memory that counts what is read; reads can be held or made to fail."""

    def __init__(self, data: bytes | bytearray):
        self.data = bytes(data)
        self.bytes_read = 0
        self.reads: list[tuple[int, int]] = []
        self.hold_from: int | None = None
        self.fail_from: int | None = None
        self.waiting = asyncio.Event()  # set when a read is being held
        self.release = asyncio.Event()  # set to let held reads go on

    def hold(self, offset: int) -> None:
        """Hold every read at or past ``offset`` until ``release`` is set."""
        self.hold_from = offset

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        if self.hold_from is not None and offset >= self.hold_from:
            self.waiting.set()
            await self.release.wait()
        if self.fail_from is not None and offset >= self.fail_from:
            raise OSError(f"simulated read error at {offset}")
        self.bytes_read += length
        self.reads.append((offset, length))
        return self.data[offset:offset + length]


class MemorySink:
    """A new, zeroed volume in memory that records where it was written."""

    def __init__(self, size: int):
        self.data = bytearray(size)
        self.writes: list[tuple[int, int]] = []
        self.flushed = False

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Store ``data`` at ``offset``."""
        assert offset + len(data) <= len(self.data), "write past the end of the volume"
        self.data[offset:offset + len(data)] = data
        self.writes.append((offset, len(data)))

    async def flush(self) -> None:
        """Note the flush."""
        self.flushed = True

    def touched(self, start: int, length: int) -> bool:
        """Whether any write overlapped ``[start, start + length)``."""
        return any(o < start + length and start < o + n for o, n in self.writes)


class MotoS3:
    """A moto S3 server on a free local port (a quick stand-in for radosgw)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def client(self):
        """A plain boto3 client for setting up buckets."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        """Create a bucket with a fresh name."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def target(self, bucket: str | None = None, prefix: str = "backups"):
        """An S3Target on a fresh (or the given) bucket."""
        from drove.backup.s3target import S3Target

        return S3Target(bucket or self.new_bucket(), prefix, endpoint=self.endpoint,
                        access_key="testing", secret_key="testing")

    def stop(self) -> None:
        """Stop the server."""
        self.server.stop()
