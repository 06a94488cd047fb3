"""In-memory sources and sinks, test data, an S3 stand-in and a target that fails or holds
calls on demand, for the backup store tests."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Iterable, Iterator

from drove.backup.blocks import BLOCK_SIZE
from drove.backup.errors import TargetError
from drove.backup.target import Target

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


class Gate:
    """Where a FaultyTarget holds calls until the test opens it (threading: calls come from
    worker threads)."""

    def __init__(self) -> None:
        self.entered = threading.Event()  # set when a call is being held
        self.left = threading.Event()  # set when a held call has returned or raised
        self._open = threading.Event()

    def open(self) -> None:
        """Let every held call (and any later one) go on."""
        self._open.set()

    def wait_entered(self, timeout: float = 30) -> None:
        """Block until a call is held here; AssertionError after ``timeout`` seconds."""
        assert self.entered.wait(timeout), "no call reached the gate"

    async def entered_async(self, timeout: float = 30) -> None:
        """``wait_entered`` for async tests."""
        await asyncio.to_thread(self.wait_entered, timeout)

    def hold(self) -> None:
        """Called by the held call: wait until opened (a test that forgets fails, no hang)."""
        self.entered.set()
        if not self._open.wait(120):
            raise TargetError("test gate was never opened")


class FaultyTarget(Target):
    """A target passing every call to ``inner``, except those a test makes fail or wait.

    ``fail(op, prefix, times)`` makes the next ``times`` calls of method ``op`` whose key
    starts with ``prefix`` raise TargetError; ``gate(op, prefix)`` holds the next such call
    until the returned Gate is opened.  ``calls`` lists (op, key, outcome) of every call
    that has ended: the result's repr, or the error's class name.
    """

    def __init__(self, inner: Target) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: list[tuple[str, str, str]] = []
        self._rules: list[tuple[str, str, Gate | TargetError, list[int]]] = []
        self._mutex = threading.Lock()

    def fail(self, op: str, prefix: str = "", times: int = 1,
             message: str = "injected failure") -> None:
        """Make the next ``times`` ``op`` calls on keys under ``prefix`` raise TargetError."""
        with self._mutex:
            self._rules.append((op, prefix, TargetError(message), [times]))

    def gate(self, op: str, prefix: str = "", times: int = 1) -> Gate:
        """Hold the next ``times`` ``op`` calls on keys under ``prefix`` at a new Gate."""
        gate = Gate()
        with self._mutex:
            self._rules.append((op, prefix, gate, [times]))
        return gate

    def heal(self) -> None:
        """Drop every rule not yet used up (held calls stay held until their gate opens)."""
        with self._mutex:
            self._rules.clear()

    def count(self, op: str, prefix: str = "", outcome: str | None = None) -> int:
        """How many ``op`` calls on keys under ``prefix`` ended (with ``outcome``, if given)."""
        with self._mutex:
            return sum(1 for o, k, out in self.calls if o == op and k.startswith(prefix)
                       and (outcome is None or out == outcome))

    def _call(self, op: str, key: str, fn, *args):
        """Apply the first matching rule, then run ``fn(*args)`` and record the call."""
        action = None
        with self._mutex:
            for rule_op, prefix, what, left in self._rules:
                if rule_op == op and key.startswith(prefix) and left[0] > 0:
                    left[0] -= 1
                    action = what
                    break
        gate = action if isinstance(action, Gate) else None
        try:
            if isinstance(action, TargetError):
                raise TargetError(str(action))
            if gate is not None:
                gate.hold()
            result = fn(*args)
        except Exception as e:
            self._record(op, key, type(e).__name__, gate)
            raise
        self._record(op, key, "bytes" if isinstance(result, bytes) else repr(result), gate)
        return result

    def _record(self, op: str, key: str, outcome: str, gate: Gate | None) -> None:
        """Note one ended call (then tell its gate, if it was held)."""
        with self._mutex:
            self.calls.append((op, key, outcome))
        if gate is not None:
            gate.left.set()

    def put(self, key: str, data: bytes) -> None:
        """Passed on (or failed/held)."""
        return self._call("put", key, self.inner.put, key, data)

    def replace(self, key: str, data: bytes, version: str | None = None) -> str | None:
        """Passed on (or failed/held)."""
        return self._call("replace", key, self.inner.replace, key, data, version)

    def get(self, key: str) -> bytes:
        """Passed on (or failed/held)."""
        return self._call("get", key, self.inner.get, key)

    def exists(self, key: str) -> bool:
        """Passed on (or failed/held)."""
        return self._call("exists", key, self.inner.exists, key)

    def list(self, prefix: str) -> Iterator[str]:
        """Passed on (or failed/held) when called, not when iterated."""
        return iter(self._call("list", prefix, lambda: list(self.inner.list(prefix))))

    def list_sizes(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Passed on (or failed/held) when called, not when iterated."""
        return iter(self._call("list_sizes", prefix,
                               lambda: list(self.inner.list_sizes(prefix))))

    def delete(self, key: str) -> None:
        """Passed on (or failed/held)."""
        return self._call("delete", key, self.inner.delete, key)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Passed on (or failed/held); the rule's prefix is matched with the first key."""
        keys = list(keys)
        return self._call("delete_many", keys[0] if keys else "", self.inner.delete_many,
                          keys)

    def sync(self) -> None:
        """Passed on (or failed/held); its key is ''."""
        return self._call("sync", "", self.inner.sync)

    def stale_temp_files(self, age: float) -> Iterator[str]:
        """Passed on."""
        return self.inner.stale_temp_files(age)

    def close(self) -> None:
        """Closes ``inner``."""
        self.inner.close()


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return result


def make_target(kind: str, request, tmp_path) -> Target:
    """An empty target: "file" (in tmp_path), "moto" (S3 stand-in) or "radosgw" (real S3)."""
    if kind == "file":
        from drove.backup.filetarget import FileTarget

        return FileTarget(tmp_path)
    if kind == "moto":
        return request.getfixturevalue("moto").target()
    if kind != "radosgw":
        raise ValueError(kind)
    from drove.backup.s3target import S3Target

    gw = request.getfixturevalue("radosgw")
    bucket = gw.make_bucket(f"t-{uuid.uuid4().hex[:12]}")
    return S3Target(bucket, "backups", endpoint=gw.endpoint, region=gw.region,
                    access_key=gw.access_key, secret_key=gw.secret_key)
