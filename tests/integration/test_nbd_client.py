"""drove.nbd.client against real servers: drove's own NbdServer, nbdkit, and scripted fakes.

Our server runs in-process on a background loop (tests/nbdtools.py); nbdkit
runs as a subprocess (memory, file, error, delay, exportname, blocksize-policy,
TLS); a small scripted server on a thread sends what real servers never
send (unknown cookies, malformed chunks, fragmented replies, holes, stalls).
Every client runs inside ``asyncio.run``-style runners on uvloop (production)
and, where the loop matters, on the default asyncio loop as well.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from drove.nbd import proto
from drove.nbd.client import (
    NbdClient,
    NbdCommandError,
    NbdConnectionError,
    NbdHandshakeError,
    NbdTimeoutError,
    connect_tcp,
    connect_unix,
    connect_uri,
    parse_uri,
    tls_context_from_dir,
)
from drove.nbd.export import NBD_STATE_HOLE, NBD_STATE_ZERO, Capabilities, Extent
from drove.nbd.memory import MemoryExport, MemoryProvider
from drove.service import new_event_loop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbdtools import FailingExport, ServerThread, make_tls_dir, server_tls_context

pytestmark = pytest.mark.timeout(60)

SIZE = 16 * 1024 * 1024
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": new_event_loop,
    "asyncio": asyncio.new_event_loop,
}
HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO


def run(main: Callable[[], Coroutine[Any, Any, Any]], loop: str = "uvloop") -> Any:
    """Run ``main()`` on a fresh loop of the given kind (uvloop by default, like production)."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


# --- Servers ------------------------------------------------------------------------


def make_provider() -> MemoryProvider:
    """drove's exports used by these tests (fresh memory each time)."""
    ro = MemoryExport(SIZE, "ro", "read-only", readonly=True)
    return MemoryProvider(
        [
            MemoryExport(SIZE, "", "default export"),
            ro,
            MemoryExport(SIZE, "nofast", "fast zero fails", fast_zero=False),
            MemoryExport(SIZE, "nofastcap", "no fast zero", caps=Capabilities(fast_zero=False)),
            MemoryExport(SIZE, "small", "64K max block", caps=Capabilities(max_block=65536)),
            MemoryExport(SIZE, "bare", "no FUA, CACHE, WRITE_ZEROES",
                         caps=Capabilities(fua=False, cache=False, zero=False)),
            FailingExport(
                SIZE, "fail", "fails at 1 MiB", bad_offset=1 << 20,
                error=OSError(errno.ENOSPC, "replica disk full"),
            ),
        ],
        default="",
    )


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    """drove's NbdServer on TCP and a unix socket."""
    with ServerThread(make_provider(), unix_path=tmp_path / "drove.sock") as server:
        yield server


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nbdkit:
    """An nbdkit subprocess on a unix socket (or TCP with ``tcp=True``)."""

    def __init__(self, directory: Path, *args: str, tcp: bool = False) -> None:
        """Start ``nbdkit ARGS`` and wait until it accepts connections."""
        directory.mkdir(parents=True, exist_ok=True)
        self.sock = str(directory / "nbdkit.sock")
        pidfile = directory / "nbdkit.pid"
        for stale in (self.sock, pidfile):
            Path(stale).unlink(missing_ok=True)
        self.port = free_port() if tcp else 0
        where = ["-p", str(self.port), "-i", "127.0.0.1"] if tcp else ["-U", self.sock]
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", *where, "-P", str(pidfile), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        # nbdkit writes the pid file once it is ready to accept connections.
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit {args} failed: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit {args} did not start")
            time.sleep(0.005)

    def uri(self, export: str = "") -> str:
        """The URI of ``export``."""
        if self.port:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.sock}"

    def kill(self) -> None:
        """SIGKILL nbdkit and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Callable[..., Nbdkit]]:
    """Factory for nbdkit servers; all are killed at teardown."""
    started: list[Nbdkit] = []

    def start(*args: str, tcp: bool = False) -> Nbdkit:
        server = Nbdkit(tmp_path / f"nbdkit{len(started)}", *args, tcp=tcp)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CA, server and client certificates (GnuTLS file names, for nbdkit too)."""
    return make_tls_dir(tmp_path_factory.mktemp("tls"))


# --- A scripted server for what real servers never send ---------------------------------


class FakeServer:
    """A one-connection NBD server on a thread: a real handshake, then ``script(sock)``.

    ``go=False`` answers NBD_OPT_GO with ERR_UNSUP (an old server);
    ``structured`` decides NBD_OPT_STRUCTURED_REPLY; base:allocation gets id 7.
    """

    META_ID = 7

    def __init__(
        self, script: Callable[[socket.socket], None], *, go: bool = True,
        structured: bool = True, size: int = 1 << 20,
        tflags: int = proto.NBD_FLAG_HAS_FLAGS | proto.NBD_FLAG_SEND_FLUSH,
    ) -> None:
        """Listen on a free port and serve one connection with ``script``."""
        self.script = script
        self.go = go
        self.structured = structured
        self.size = size
        self.tflags = tflags
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._handshake(sock)
                self.script(sock)
        except (ConnectionError, EOFError):
            pass
        except BaseException as exc:  # reported by close()
            self.error = exc

    def _handshake(self, sock: socket.socket) -> None:
        sock.sendall(proto.NEWSTYLE_GREETING.pack(
            proto.NBDMAGIC, proto.IHAVEOPT,
            proto.NBD_FLAG_FIXED_NEWSTYLE | proto.NBD_FLAG_NO_ZEROES))
        recv_exact(sock, 4)

        def reply(option: int, rtype: int, data: bytes = b"") -> None:
            sock.sendall(proto.OPTION_REPLY.pack(proto.NBD_OPTS_REPLY_MAGIC, option, rtype,
                                                 len(data)) + data)

        while True:
            _, option, length = proto.OPTION_HEADER.unpack(recv_exact(sock, 16))
            data = recv_exact(sock, length)
            if option == proto.NBD_OPT_EXPORT_NAME:
                sock.sendall(proto.EXPORT_NAME_REPLY.pack(self.size, self.tflags))
                return
            if option == proto.NBD_OPT_GO and self.go:
                reply(option, proto.NBD_REP_INFO,
                      proto.INFO_EXPORT.pack(proto.NBD_INFO_EXPORT, self.size, self.tflags))
                reply(option, proto.NBD_REP_ACK)
                return
            if option == proto.NBD_OPT_STRUCTURED_REPLY and self.structured:
                reply(option, proto.NBD_REP_ACK)
            elif option == proto.NBD_OPT_SET_META_CONTEXT and self.structured:
                name = proto.BASE_ALLOCATION.encode()
                reply(option, proto.NBD_REP_META_CONTEXT, struct.pack(">I", self.META_ID) + name)
                reply(option, proto.NBD_REP_ACK)
            else:
                assert data is not None
                reply(option, proto.NBD_REP_ERR_UNSUP)

    def close(self) -> None:
        """Stop listening; re-raise what the script raised."""
        self.listener.close()
        self.thread.join(5)
        if self.error is not None:
            raise self.error


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Receive exactly ``n`` bytes or raise EOFError."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def recv_request(sock: socket.socket) -> tuple[int, int, int, int, int]:
    """One request header: (flags, type, cookie, offset, length)."""
    magic, flags, cmd, cookie, offset, length = proto.REQUEST.unpack(recv_exact(sock, 28))
    assert magic == proto.NBD_REQUEST_MAGIC
    return flags, cmd, cookie, offset, length


def chunk(flags: int, rtype: int, cookie: int, payload: bytes) -> bytes:
    """One structured reply chunk."""
    return proto.STRUCTURED_REPLY.pack(
        proto.NBD_STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, len(payload)) + payload


def simple(cookie: int, error: int = 0) -> bytes:
    """One simple reply header."""
    return proto.SIMPLE_REPLY.pack(proto.NBD_SIMPLE_REPLY_MAGIC, error, cookie)


# --- Helpers --------------------------------------------------------------------------


async def random_io(client: NbdClient, model: bytearray, rng: random.Random, *,
                    rounds: int = 3, ops: int = 300, span: int = SIZE) -> int:
    """Rounds of ``ops`` concurrent random reads and writes checked against ``model``.

    Requests in one round touch distinct 32 KiB slots, so their order does
    not matter; returns the most requests seen in flight at once.
    """
    slot = 32768
    peak = 0

    async def check(offset: int, length: int, expect: bytes) -> None:
        if rng.random() < 0.5:
            got = await client.read(offset, length)
        else:
            got = bytearray(b"\xee" * length)
            await client.readinto(offset, memoryview(got))
        assert got == expect, f"read {offset}+{length} differs"

    for _ in range(rounds):
        tasks = []
        for index in rng.sample(range(span // slot), ops):
            start = index * slot + rng.randrange(0, slot // 512) * 512
            length = rng.randrange(1, (index * slot + slot - start) // 512 + 1) * 512
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                model[start : start + length] = data
                view = memoryview(data) if rng.random() < 0.5 else data
                tasks.append(asyncio.ensure_future(client.write(start, view)))
            else:
                expect = bytes(model[start : start + length])
                tasks.append(asyncio.ensure_future(check(start, length, expect)))
        await asyncio.sleep(0)  # every task sent its request
        peak = max(peak, client.in_flight)
        await asyncio.gather(*tasks)
    assert client.in_flight == 0
    assert await client.read(0, span) == model[:span]
    return peak


async def extents_of(client: NbdClient, offset: int, length: int) -> list[tuple[int, int]]:
    """All extents of a range (several requests if needed), merged, as (length, flags)."""
    out: list[tuple[int, int]] = []
    end = offset + length
    while offset < end:
        extents = await client.block_status(offset, end - offset)
        assert extents and sum(e.length for e in extents) <= end - offset
        for extent in extents:
            if out and out[-1][1] == extent.flags:
                out[-1] = (out[-1][0] + extent.length, extent.flags)
            else:
                out.append((extent.length, extent.flags))
            offset += extent.length
    return out


# --- Handshake and information -------------------------------------------------------------


def test_handshake_info_own_server(srv: ServerThread) -> None:
    async def main() -> None:
        for client in (
            await connect_tcp(srv.host, srv.port),
            await connect_unix(srv.unix_path),  # type: ignore[arg-type]
            await connect_uri(srv.uri()),
        ):
            async with client:
                assert client.export == "" and client.size == SIZE
                assert client.structured and client.can_block_status
                assert not client.read_only and not client.tls
                assert client.can_flush and client.can_fua and client.can_trim
                assert client.can_zero and client.can_fast_zero and client.can_cache
                assert client.can_multi_conn
                assert client.flags & proto.NBD_FLAG_HAS_FLAGS
                assert (client.min_block, client.preferred_block) == (1, 4096)
                assert client.max_block == 32 * 1024 * 1024
                assert client.description == "" and client.in_flight == 0
                assert not client.closed
            assert client.closed
        async with await connect_uri(srv.uri("ro")) as ro:
            assert ro.read_only and ro.export == "ro"
            assert not ro.can_trim and not ro.can_zero and not ro.can_fua
        async with await connect_uri(srv.uri("small")) as small:
            assert small.max_block == 65536
        async with await connect_uri(srv.uri(), block_status=False) as plain:
            assert plain.structured and not plain.can_block_status
            with pytest.raises(NbdCommandError) as info:
                await plain.block_status(0, 4096)
            assert info.value.errno == errno.ENOTSUP

    run(main)


def test_handshake_info_nbdkit(nbdkit: Callable[..., Nbdkit]) -> None:
    server = nbdkit("memory", "64M")
    policy = nbdkit("--filter=blocksize-policy", "memory", "1M",
                    "blocksize-minimum=512", "blocksize-maximum=64K")

    async def main() -> None:
        async with await connect_uri(server.uri()) as client:
            assert client.size == 64 * 1024 * 1024 and client.structured
            assert client.can_block_status and client.can_zero and client.can_fast_zero
            assert client.can_flush and client.can_fua and client.can_trim and client.can_cache
        async with await connect_unix(policy.sock) as client:
            assert (client.min_block, client.preferred_block, client.max_block) == (
                512, 4096, 65536)

    run(main)


def test_export_not_found(srv: ServerThread, nbdkit: Callable[..., Nbdkit]) -> None:
    strict = nbdkit("--filter=exportname", "memory", "1M", "exportname=vol",
                    "exportname-strict=true")

    async def main() -> None:
        with pytest.raises(NbdHandshakeError, match=r"export 'missing' not found on nbd://"):
            await connect_tcp(srv.host, srv.port, "missing")
        with pytest.raises(NbdHandshakeError, match=r"export 'nope' not found on nbd\+unix://"):
            await connect_uri(strict.uri("nope"))
        async with await connect_uri(strict.uri("vol")) as client:
            assert client.export == "vol"
        with pytest.raises(ConnectionRefusedError):
            await connect_tcp("127.0.0.1", free_port())
        with pytest.raises(FileNotFoundError):
            await connect_unix("/nonexistent/nbd.sock")

    run(main)


# --- I/O ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_random_pipelined_io_own_server(srv: ServerThread, loop: str) -> None:
    async def main() -> None:
        async with await connect_tcp(srv.host, srv.port) as client:
            peak = await random_io(client, bytearray(SIZE), random.Random(loop))
            assert peak >= 250  # hundreds of requests really were in flight together

    run(main, loop)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_random_pipelined_io_nbdkit(nbdkit: Callable[..., Nbdkit], loop: str) -> None:
    server = nbdkit("memory", "64M")

    async def main() -> None:
        async with await connect_unix(server.sock) as client:
            peak = await random_io(client, bytearray(SIZE), random.Random(7))
            assert peak >= 250

    run(main, loop)


@pytest.mark.parametrize("kind", ["own", "nbdkit"])
def test_zero_trim_flush_fua_cache(srv: ServerThread, nbdkit: Callable[..., Nbdkit],
                                   kind: str) -> None:
    uri = srv.uri() if kind == "own" else nbdkit("memory", "16M").uri()
    pattern = bytes(range(256)) * 256  # 64 KiB

    async def main() -> None:
        async with await connect_uri(uri) as client:
            await client.write(0, pattern * 16, fua=True)
            await client.zero(4096, 8192)
            await client.zero(65536, 4096, may_trim=False, fua=True)
            await client.zero(131072, 65536, fast=True)
            await client.trim(262144, 65536, fua=True)
            await client.flush()
            await client.cache(0, 1 << 20)
            await client.zero(0, 0)  # zero-length requests are no-ops
            await client.trim(0, 0)
            await client.write(0, b"")
            assert await client.read(0, 0) == bytearray()
            model = bytearray(pattern * 16)
            for offset, length in ((4096, 8192), (65536, 4096), (131072, 65536),
                                   (262144, 65536)):
                model[offset : offset + length] = bytes(length)
            assert await client.read(0, len(model)) == model
            status = await extents_of(client, 0, 1 << 20)
            assert sum(length for length, _ in status) == 1 << 20
            if kind == "own":  # drove's memory export tracks 4 KiB blocks exactly
                assert status[0] == (4096, 0)
                assert status[1] == (8192, HOLE)
            assert client.in_flight == 0

    run(main)


def test_buffer_types(srv: ServerThread) -> None:
    async def main() -> None:
        async with await connect_uri(srv.uri()) as client:
            words = array.array("Q", range(1024))  # 8 KiB of 64-bit items
            await client.write(0, words)
            await client.write(8192, memoryview(b"abcdefgh" * 512).toreadonly())
            back = array.array("Q", bytes(8192))
            await client.readinto(0, back)
            assert back == words
            big = bytearray(16384)
            await client.readinto(0, memoryview(big)[8192:])  # a slice: lands in place
            assert big[8192:] == words.tobytes() and big[:8192] == bytes(8192)
            with pytest.raises(TypeError):
                await client.readinto(0, b"read-only")

    run(main)


def test_unadvertised_features(srv: ServerThread) -> None:
    async def main() -> None:
        async with await connect_uri(srv.uri("bare")) as client:
            assert client.can_flush and not client.can_fua
            assert not client.can_cache and not client.can_zero and not client.can_fast_zero
            await client.write(0, b"fua" * 512, fua=True)  # sent without FUA, then a FLUSH
            await client.trim(0, 512, fua=True)
            await client.cache(0, 4096)  # only a hint: nothing is sent
            with pytest.raises(NbdCommandError) as info:
                await client.zero(0, 4096)
            assert info.value.errno == errno.ENOTSUP
            assert await client.read(0, 1536) == bytes(512) + (b"fua" * 512)[512:]

    run(main)


def test_block_status_sparse_file(tmp_path: Path, nbdkit: Callable[..., Nbdkit]) -> None:
    path = tmp_path / "sparse.img"
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(8 * mib)
        f.seek(mib)
        f.write(b"\x01" * 65536)
        f.seek(4 * mib)
        f.write(b"\x02" * mib)
    server = nbdkit("file", str(path))

    async def main() -> None:
        async with await connect_unix(server.sock) as client:
            expect = [(mib, HOLE), (65536, 0), (3 * mib - 65536, HOLE), (mib, 0), (3 * mib, HOLE)]
            assert await extents_of(client, 0, 8 * mib) == expect
            # A range inside an extent is described by a single (clipped) extent.
            assert await client.block_status(mib + 4096, 8192) == [Extent(8192, 0)]
            first = await client.block_status(mib, 7 * mib)
            assert first[0] == Extent(65536, 0)
            assert (await client.read(4 * mib, 16)) == b"\x02" * 16

    run(main)


def test_large_requests_are_split(srv: ServerThread, nbdkit: Callable[..., Nbdkit]) -> None:
    policy = nbdkit("--filter=blocksize-policy", "memory", "16M", "blocksize-maximum=64K",
                    "blocksize-error-policy=error")
    rng = random.Random(3)

    async def exercise(client: NbdClient, length: int, pieces: int) -> None:
        assert client.max_block == 65536
        data = rng.randbytes(length)
        task = asyncio.ensure_future(client.write(4096, data))
        await asyncio.sleep(0)
        assert client.in_flight == pieces
        await task
        buf = bytearray(length)
        task = asyncio.ensure_future(client.readinto(4096, buf))
        await asyncio.sleep(0)
        assert client.in_flight == pieces
        await task
        assert buf == data
        assert await client.read(4096, length) == data
        await client.zero(4096, length, may_trim=False)  # not fast: split at max_block too
        await client.cache(0, length)
        assert await client.read(4096, length) == bytes(length)

    async def main() -> None:
        async with await connect_uri(srv.uri("small")) as client:
            await exercise(client, (1 << 20) + 4096, 17)
        async with await connect_unix(policy.sock) as client:
            await exercise(client, 3 << 20, 32)  # 48 pieces, at most 32 in flight

    run(main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_flow_control_with_many_large_writes(nbdkit: Callable[..., Nbdkit], loop: str) -> None:
    server = nbdkit("memory", "64M")
    rng = random.Random(4)

    async def main() -> None:
        async with await connect_unix(server.sock) as client:
            blocks = [rng.randbytes(1 << 20) for _ in range(64)]
            tasks = [asyncio.ensure_future(client.write(i << 20, b))
                     for i, b in enumerate(blocks)]
            paused = False
            while not all(t.done() for t in tasks):
                paused |= client._c.write_paused
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)
            assert paused  # 64 MiB at once overflowed the transport's buffer
            reads = await asyncio.gather(*(client.read(i << 20, 1 << 20) for i in range(64)))
            assert reads == blocks

    run(main, loop)


# --- Errors ---------------------------------------------------------------------------------


def test_command_errors_own_server(srv: ServerThread) -> None:
    async def main() -> None:
        async with await connect_uri(srv.uri("fail")) as client:
            with pytest.raises(NbdCommandError) as info:
                await client.write(1 << 20, b"x" * 4096)
            err = info.value
            assert err.errno == errno.ENOSPC and err.nbd_error == proto.NBD_ENOSPC
            assert "replica disk full" in str(err) and err.server_message == "replica disk full"
            assert err.command == "WRITE" and err.offset == 1 << 20
            with pytest.raises(NbdCommandError) as info:
                await client.read(SIZE, 4096)  # beyond the end
            assert info.value.errno == errno.EINVAL
            with pytest.raises(NbdCommandError) as info:
                await client.write(SIZE - 512, b"y" * 4096)
            assert info.value.errno == errno.ENOSPC
            with pytest.raises(NbdCommandError) as info:
                await client.read(-1, 10)
            assert info.value.errno == errno.EINVAL
            # A failed request leaves the connection usable.
            await client.write(0, b"ok")
            assert await client.read(0, 2) == b"ok"
            # One failing piece fails a split read, after every piece was answered.
            with pytest.raises(NbdCommandError) as info:
                await client.read(SIZE - (40 << 20), 80 << 20)
        async with await connect_uri(srv.uri("ro")) as ro:
            with pytest.raises(NbdCommandError) as info:
                await ro.write(0, b"z" * 512)
            assert info.value.errno == errno.EPERM
            with pytest.raises(NbdCommandError) as info:
                await ro.trim(0, 512)
            assert info.value.errno == errno.EPERM
        async with await connect_uri(srv.uri("nofast")) as nofast:
            assert nofast.can_fast_zero  # advertised, but the export refuses: server ENOTSUP
            with pytest.raises(NbdCommandError) as info:
                await nofast.zero(0, 4096, fast=True)
            assert info.value.errno == errno.ENOTSUP and info.value.nbd_error
            await nofast.zero(0, 4096)
        async with await connect_uri(srv.uri("nofastcap")) as nofast:
            assert not nofast.can_fast_zero  # not advertised: refused without asking
            with pytest.raises(NbdCommandError) as info:
                await nofast.zero(0, 4096, fast=True)
            assert info.value.errno == errno.ENOTSUP and not info.value.nbd_error

    run(main)


def test_command_errors_nbdkit(nbdkit: Callable[..., Nbdkit]) -> None:
    server = nbdkit(
        "--filter=error", "memory", "4M",
        "error-pread=EIO", "error-pread-rate=100%",
        "error-pwrite=ENOSPC", "error-pwrite-rate=100%",
        "error-zero=ENOMEM", "error-zero-rate=100%",
        "error-trim=EPERM", "error-trim-rate=100%",
        "error-extents=ESHUTDOWN", "error-extents-rate=100%",
    )
    expect = {
        "read": errno.EIO, "write": errno.ENOSPC, "zero": errno.ENOMEM,
        "trim": errno.EPERM, "block_status": errno.ESHUTDOWN,
    }

    async def main() -> None:
        async with await connect_unix(server.sock) as client:
            calls = {
                "read": client.read(0, 4096),
                "write": client.write(0, b"w" * 4096),
                "zero": client.zero(0, 4096),
                "trim": client.trim(0, 4096),
                "block_status": client.block_status(0, 4096),
            }
            results = await asyncio.gather(*calls.values(), return_exceptions=True)
            for name, result in zip(calls, results, strict=True):
                assert isinstance(result, NbdCommandError), (name, result)
                assert result.errno == expect[name], (name, result)
            await client.flush()

    run(main)


# --- Losing the connection -------------------------------------------------------------------


def test_server_killed_mid_flight(nbdkit: Callable[..., Nbdkit]) -> None:
    server = nbdkit("--filter=delay", "memory", "16M", "delay-read=5")

    async def main() -> None:
        client = await connect_unix(server.sock)
        tasks = [asyncio.ensure_future(client.read(i * 4096, 4096)) for i in range(100)]
        await asyncio.sleep(0.2)
        assert client.in_flight == 100
        started = time.monotonic()
        server.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert time.monotonic() - started < 2
        assert all(isinstance(r, NbdConnectionError) for r in results), results[:3]
        assert client.closed and client.in_flight == 0
        for call in (client.read(0, 1), client.write(0, b"x"), client.flush(),
                     client.zero(0, 512), client.block_status(0, 512)):
            with pytest.raises(NbdConnectionError, match="closed"):
                await asyncio.wait_for(call, 1)
        await client.close()  # still fine, and idempotent
        await client.close()

    run(main)


@pytest.mark.exclusive  # timed
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_request_timeout(nbdkit: Callable[..., Nbdkit], loop: str) -> None:
    server = nbdkit("--filter=delay", "memory", "16M", "delay-read=10")

    async def main() -> None:
        client = await connect_unix(server.sock, request_timeout=0.4)
        await asyncio.sleep(0.8)  # idle: the watchdog must not fire
        await client.write(0, b"w" * 4096)
        started = time.monotonic()
        tasks = [asyncio.ensure_future(client.read(0, 4096)) for _ in range(10)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - started
        assert 0.39 <= elapsed < 1.0, elapsed
        assert all(isinstance(r, NbdTimeoutError) for r in results), results
        assert isinstance(results[0], TimeoutError) and "within 0.4 s" in str(results[0])
        with pytest.raises(NbdConnectionError):
            await client.write(0, b"x")
        await client.close()

    run(main, loop)


def test_busy_connection_does_not_time_out(srv: ServerThread) -> None:
    async def main() -> None:
        async with await connect_tcp(srv.host, srv.port, request_timeout=0.2) as client:
            deadline = time.monotonic() + 0.8
            while time.monotonic() < deadline:  # a constant stream of quick requests
                await asyncio.gather(*(client.read(i * 4096, 4096) for i in range(16)))
            await client.flush()

    run(main)


def test_timeout_counts_requests_blocked_by_flow_control() -> None:
    # The server completes the handshake and then never reads: writes pile
    # up in the transport until it pauses, and the waiting ones time out too.
    stop = threading.Event()
    fake = FakeServer(lambda sock: stop.wait(10), size=64 << 20)

    async def main() -> None:
        client = await connect_tcp("127.0.0.1", fake.port, request_timeout=0.4)
        data = bytes(4 << 20)
        started = time.monotonic()
        tasks = [asyncio.ensure_future(client.write(i << 22, data)) for i in range(12)]
        await asyncio.sleep(0.1)
        assert client._c.write_paused  # flow control holds some requests back
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert time.monotonic() - started < 1.5
        assert all(isinstance(r, NbdTimeoutError) for r in results), results

    try:
        run(main)
    finally:
        stop.set()
        fake.close()


def test_close_waits_for_in_flight(nbdkit: Callable[..., Nbdkit]) -> None:
    server = nbdkit("--filter=delay", "memory", "16M", "delay-read=300ms")

    async def main() -> None:
        client = await connect_unix(server.sock)
        await client.write(0, b"data" * 1024)
        tasks = [asyncio.ensure_future(client.read(0, 4096)) for _ in range(20)]
        await asyncio.sleep(0)
        started = time.monotonic()
        await client.close()
        assert time.monotonic() - started >= 0.25
        assert all(t.done() and t.result() == b"data" * 1024 for t in tasks)
        assert client.closed
        with pytest.raises(NbdConnectionError):
            await client.read(0, 1)
        await client.close()

        # abort() instead fails what is in flight at once.
        client = await connect_unix(server.sock)
        tasks = [asyncio.ensure_future(client.read(0, 4096)) for _ in range(20)]
        await asyncio.sleep(0)
        client.abort()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, NbdConnectionError) for r in results)
        await client.close()

    run(main)


def test_cancelled_readinto_leaves_buffer_alone(nbdkit: Callable[..., Nbdkit]) -> None:
    server = nbdkit("--filter=delay", "--filter=blocksize-policy", "memory", "16M",
                    "delay-read=300ms", "blocksize-maximum=64K")

    async def main() -> None:
        async with await connect_unix(server.sock) as client:
            await client.write(0, b"\x01" * (1 << 20))
            small, large = bytearray(4096), bytearray(1 << 20)
            tasks = [asyncio.ensure_future(client.readinto(0, small)),
                     asyncio.ensure_future(client.readinto(0, large))]
            await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert client.in_flight == 17  # the server still owes the replies (1 + 16 pieces)
            deadline = time.monotonic() + 5  # nbdkit runs 16 requests at a time
            while client.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert client.in_flight == 0
            assert small == bytes(4096) and large == bytes(1 << 20)
            assert await client.read(0, 4) == b"\x01" * 4  # and the connection still works

    run(main)


# --- TLS -----------------------------------------------------------------------------------


def test_tls_nbdkit(tls_dir: Path, nbdkit: Callable[..., Nbdkit]) -> None:
    server = nbdkit("--tls=require", f"--tls-certificates={tls_dir}", "--tls-verify-peer",
                    "memory", "16M", tcp=True)

    async def main() -> None:
        ctx = tls_context_from_dir(tls_dir)
        async with await connect_tcp("127.0.0.1", server.port, tls=ctx) as client:
            assert client.tls and client.uri.startswith("nbds://")
            peak = await random_io(client, bytearray(SIZE), random.Random(5), rounds=1)
            assert peak >= 250
        uri = f"nbds://127.0.0.1:{server.port}/?tls-certificates={tls_dir}"
        async with await connect_uri(uri) as client:
            assert client.tls
        with pytest.raises(NbdHandshakeError, match="requires TLS"):
            await connect_tcp("127.0.0.1", server.port)
        wrong = ssl.create_default_context()  # system CAs: the server is not trusted
        with pytest.raises(NbdHandshakeError, match="TLS handshake"):
            await connect_tcp("127.0.0.1", server.port, tls=wrong)

    run(main)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_tls_own_server(tls_dir: Path, tmp_path: Path, loop: str) -> None:
    with ServerThread(make_provider(), tls=server_tls_context(tls_dir), tls_required=True,
                      unix_path=tmp_path / "tls.sock") as srv:
        async def main() -> None:
            uri = srv.uri(scheme="nbds", query=f"tls-certificates={tls_dir}")
            async with await connect_uri(uri) as client:
                assert client.tls and client.can_block_status
                data = random.Random(1).randbytes(3 << 20)
                await client.write(0, data)
                assert await client.read(0, len(data)) == data
            # Over a unix socket the name to verify comes from tls-hostname (no host).
            unix = (f"nbds+unix:///?socket={srv.unix_path}&tls-certificates={tls_dir}"
                    f"&tls-hostname=localhost")
            async with await connect_uri(unix) as client:
                assert client.tls and await client.read(0, 3 << 20) == data
            with pytest.raises(NbdHandshakeError, match="requires TLS"):
                await connect_uri(srv.uri())

        run(main, loop)
    with ServerThread(make_provider()) as plain:
        async def refused() -> None:
            with pytest.raises(NbdHandshakeError, match="NBD_OPT_STARTTLS refused"):
                await connect_tcp(plain.host, plain.port, tls=tls_context_from_dir(tls_dir))

        run(refused, loop)


# --- URIs ---------------------------------------------------------------------------------


def test_parse_uri() -> None:
    u = parse_uri("nbd://example.com:10810/vol%20a")
    assert (u.tls, u.host, u.port, u.socket, u.export) == (False, "example.com", 10810, None,
                                                            "vol a")
    u = parse_uri("nbds://[::1]/")
    assert (u.tls, u.host, u.port, u.export) == (True, "::1", 10809, "")
    assert parse_uri("nbd://h").export == ""
    u = parse_uri("nbd+unix:///head?socket=/run/r1.sock")
    assert (u.tls, u.host, u.socket, u.export) == (False, None, "/run/r1.sock", "head")
    u = parse_uri("nbds+unix:///?socket=/s&tls-certificates=/etc/pki")
    assert u.tls and u.export == "" and u.query["tls-certificates"] == "/etc/pki"
    for bad in ("http://h/x", "nbd+unix:///x", "nbd+unix://host/x?socket=/s", "nbd:///x",
                "nbd://h:port/x"):
        with pytest.raises(ValueError):
            parse_uri(bad)


def test_connect_uri(srv: ServerThread, nbdkit: Callable[..., Nbdkit]) -> None:
    server = nbdkit("memory", "1M")

    async def main() -> None:
        for uri in (srv.uri("small"), srv.unix_uri("small"), server.uri()):
            async with await connect_uri(uri) as client:
                await client.write(512, b"via uri")
                assert await client.read(512, 7) == b"via uri"
                assert client.uri.split("?")[0].rstrip("/") == uri.split("?")[0].rstrip("/")

    run(main)


# --- Scripted servers: parser paths and protocol violations ------------------------------------


def test_structured_chunks_holes_errors_and_fragments() -> None:
    def script(sock: socket.socket) -> None:
        # READ 0+8192: hole for the first half, data for the second, out of
        # order, sent one byte at a time to split every header and payload.
        _, cmd, cookie, offset, length = recv_request(sock)
        assert (cmd, offset, length) == (proto.NBD_CMD_READ, 0, 8192)
        reply = chunk(0, proto.NBD_REPLY_TYPE_OFFSET_DATA, cookie,
                      struct.pack(">Q", 4096) + b"\xab" * 4096)
        reply += chunk(proto.NBD_REPLY_FLAG_DONE, proto.NBD_REPLY_TYPE_OFFSET_HOLE, cookie,
                       proto.OFFSET_HOLE.pack(0, 4096))
        for i in range(len(reply)):
            sock.sendall(reply[i : i + 1])
        # READ 0+65536: data chunk then ERROR_OFFSET, then DONE via NONE.
        _, cmd, cookie, offset, length = recv_request(sock)
        msg = b"bad sector"
        sock.sendall(
            chunk(0, proto.NBD_REPLY_TYPE_OFFSET_DATA, cookie, struct.pack(">Q", 0) + b"\x01" * 100)
            + chunk(0, proto.NBD_REPLY_TYPE_ERROR_OFFSET, cookie,
                    struct.pack(">IH", proto.NBD_EIO, len(msg)) + msg + struct.pack(">Q", 100))
            + chunk(proto.NBD_REPLY_FLAG_DONE, proto.NBD_REPLY_TYPE_NONE, cookie, b""))
        # BLOCK_STATUS with extents past the request, then a simple FLUSH reply.
        _, cmd, cookie, offset, length = recv_request(sock)
        assert cmd == proto.NBD_CMD_BLOCK_STATUS
        sock.sendall(chunk(proto.NBD_REPLY_FLAG_DONE, proto.NBD_REPLY_TYPE_BLOCK_STATUS, cookie,
                           struct.pack(">IIIII", FakeServer.META_ID, 4096, 0, 1 << 20, 3)))
        _, cmd, cookie, _, _ = recv_request(sock)
        assert cmd == proto.NBD_CMD_FLUSH
        sock.sendall(simple(cookie))
        # BLOCK_STATUS answered by 50 000 descriptors: larger than the receive buffer.
        _, cmd, cookie, offset, length = recv_request(sock)
        body = struct.pack(">I", FakeServer.META_ID) + struct.pack(">II", 512, 0) * 50_000
        sock.sendall(chunk(proto.NBD_REPLY_FLAG_DONE, proto.NBD_REPLY_TYPE_BLOCK_STATUS, cookie,
                           body))
        # READ of 256 KiB in one data chunk, its payload in slices (direct receive).
        _, cmd, cookie, offset, length = recv_request(sock)
        payload = bytes(range(256)) * 1024
        data = chunk(proto.NBD_REPLY_FLAG_DONE, proto.NBD_REPLY_TYPE_OFFSET_DATA, cookie,
                     struct.pack(">Q", offset) + payload)
        for i in range(0, len(data), 50000):
            sock.sendall(data[i : i + 50000])
            time.sleep(0.002)
        recv_request(sock)  # DISC
        assert sock.recv(1) == b""

    fake = FakeServer(script)

    async def main() -> None:
        client = await connect_tcp("127.0.0.1", fake.port)
        assert client.can_block_status
        buf = bytearray(b"\xff" * 8192)
        await client.readinto(0, buf)
        assert buf == bytes(4096) + b"\xab" * 4096
        with pytest.raises(NbdCommandError) as info:
            await client.read(0, 65536)
        assert info.value.errno == errno.EIO and info.value.error_offset == 100
        assert "bad sector" in str(info.value)
        assert await client.block_status(0, 8192) == [Extent(4096, 0), Extent(4096, 3)]
        await client.flush()
        many = await client.block_status(0, 1 << 20)
        assert len(many) == 2048 and all(e == Extent(512, 0) for e in many)  # clipped
        assert await client.read(1 << 20, 262144) == bytes(range(256)) * 1024
        await client.close()

    try:
        run(main)
    finally:
        fake.close()


def reply_with(make: Callable[[int, int, int], bytes]) -> Callable[[socket.socket], None]:
    """A script answering the first request with ``make(cookie, offset, length)``."""
    def script(sock: socket.socket) -> None:
        _, _, cookie, offset, length = recv_request(sock)
        recv_request(sock)  # the second read
        sock.sendall(make(cookie, offset, length))
        sock.settimeout(5)
        assert sock.recv(1) == b""  # the client hangs up by itself

    return script


@pytest.mark.parametrize("case", [
    "unknown-cookie", "bad-magic", "data-outside", "short-read", "bad-chunk-type",
    "simple-structured-read",
])
def test_protocol_violations_abort(case: str) -> None:
    scripts = {
        "unknown-cookie": lambda c, o, n: simple(c + 1000),
        "bad-magic": lambda c, o, n: b"\x12\x34\x56\x78" + bytes(12),
        "data-outside": lambda c, o, n: chunk(
            proto.NBD_REPLY_FLAG_DONE, proto.NBD_REPLY_TYPE_OFFSET_DATA, c,
            struct.pack(">Q", o + n) + b"x"),
        "short-read": lambda c, o, n: chunk(
            proto.NBD_REPLY_FLAG_DONE, proto.NBD_REPLY_TYPE_OFFSET_DATA, c,
            struct.pack(">Q", o) + b"x" * (n - 1)),
        "bad-chunk-type": lambda c, o, n: chunk(proto.NBD_REPLY_FLAG_DONE, 77, c, b""),
        "simple-structured-read": lambda c, o, n: simple(c) + bytes(n),
    }
    fake = FakeServer(reply_with(scripts[case]))

    async def main() -> None:
        client = await connect_tcp("127.0.0.1", fake.port)
        results = await asyncio.wait_for(
            asyncio.gather(client.read(0, 512), client.read(4096, 512), return_exceptions=True),
            5)
        assert all(isinstance(r, NbdConnectionError) for r in results), results
        assert "protocol violation" in str(results[1])
        with pytest.raises(NbdConnectionError, match="protocol violation"):
            await client.read(0, 512)
        await client.close()

    try:
        run(main)
    finally:
        fake.close()


def test_export_name_fallback_and_simple_replies() -> None:
    # An old server: no GO, no structured replies; reads come back as simple replies.
    memory = bytearray(1 << 20)

    def script(sock: socket.socket) -> None:
        while True:
            _, cmd, cookie, offset, length = recv_request(sock)
            if cmd == proto.NBD_CMD_DISC:
                return
            if cmd == proto.NBD_CMD_WRITE:
                memory[offset : offset + length] = recv_exact(sock, length)
                sock.sendall(simple(cookie))
            elif cmd == proto.NBD_CMD_READ:
                if offset + length > len(memory):
                    sock.sendall(simple(cookie, proto.NBD_EINVAL))
                else:
                    sock.sendall(simple(cookie) + memory[offset : offset + length])
            else:
                sock.sendall(simple(cookie))

    fake = FakeServer(script, go=False, structured=False)
    data = random.Random(2).randbytes(200_000)

    async def main() -> None:
        client = await connect_tcp("127.0.0.1", fake.port)
        assert not client.structured and not client.can_block_status
        assert client.size == 1 << 20 and client.max_block == 32 << 20
        await asyncio.gather(*(client.write(i * 200_000, data) for i in range(5)))
        results = await asyncio.gather(*(client.read(i * 200_000, 200_000) for i in range(5)))
        assert all(r == data for r in results)
        with pytest.raises(NbdCommandError) as info:
            await client.read(1 << 20, 512)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(NbdCommandError) as info:
            await client.block_status(0, 512)
        assert info.value.errno == errno.ENOTSUP
        await client.flush()
        await client.close()

    try:
        run(main)
    finally:
        fake.close()
    assert memory[:200_000] == data


def test_connect_timeout() -> None:
    # A listener that accepts (via the backlog) but never greets.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        async def main() -> None:
            started = time.monotonic()
            with pytest.raises(NbdTimeoutError, match="timed out"):
                await connect_tcp("127.0.0.1", port, connect_timeout=0.3)
            assert time.monotonic() - started < 1

        run(main)


def test_not_an_nbd_server() -> None:
    def serve(listener: socket.socket) -> None:
        sock, _ = listener.accept()
        with sock:
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            time.sleep(0.5)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()

        async def main() -> None:
            with pytest.raises(NbdHandshakeError, match="not an NBD server"):
                await connect_tcp("127.0.0.1", listener.getsockname()[1])

        run(main)
        thread.join(5)


def test_many_connections_share_a_loop(srv: ServerThread) -> None:
    # The engine keeps one connection per replica on one loop.
    async def main() -> None:
        clients = await asyncio.gather(*(connect_uri(srv.uri()) for _ in range(3)))
        data = os.urandom(65536)
        await asyncio.gather(*(c.write(i * 65536, data) for i, c in enumerate(clients)))
        reads = await asyncio.gather(*(c.read(i * 65536, 65536) for i, c in enumerate(clients)))
        assert all(r == data for r in reads)
        await asyncio.gather(*(c.close() for c in clients))

    run(main)


# --- Callback style (the engine's hot path) ------------------------------------------------


def _submitted(client: NbdClient, cmd: int, offset: int = 0, length: int = 0,
               data: Any = None, fua: bool = False) -> tuple[asyncio.Future[Any], list[bool]]:
    """``client.submit`` as a Future; the list tells whether ``done`` ran inside ``submit``."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    inside = [True]
    sync: list[bool] = []

    def done(value: Any, exc: BaseException | None) -> None:
        assert not fut.done(), "done called twice"
        sync.append(inside[0])
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)

    client.submit(cmd, offset, length, data, fua, done)
    inside[0] = False
    return fut, sync


def test_submit_read_write_flush_errors_and_loss(nbdkit: Callable[..., Nbdkit]) -> None:
    good = nbdkit("memory", "4M")
    bad = nbdkit("--filter=error", "memory", "4M", "error-pwrite=ENOSPC",
                 "error-pwrite-rate=100%")
    slow = nbdkit("--filter=delay", "memory", "4M", "delay-read=5")

    async def main() -> None:
        async with await connect_unix(good.sock) as client:
            writes = [_submitted(client, proto.NBD_CMD_WRITE, i * 4096, 4096,
                                 memoryview(bytes([i]) * 4096), fua=i % 2 == 0)
                      for i in range(32)]
            assert await asyncio.gather(*(f for f, _ in writes)) == [None] * 32
            flush, _ = _submitted(client, proto.NBD_CMD_FLUSH)
            assert await flush is None
            reads = [_submitted(client, proto.NBD_CMD_READ, i * 4096, 4096) for i in range(32)]
            for i, (fut, sync) in enumerate(reads):
                value = await fut
                assert isinstance(value, bytearray) and value == bytes([i]) * 4096
                assert sync == [False]  # answered from the reply parser, not inside submit
            # Larger than a piece: split on the coroutine path, same callback.
            big = bytes(range(256)) * (8 << 12)  # 8 MiB > the 4 MiB export: refused
            fut, _ = _submitted(client, proto.NBD_CMD_WRITE, 0, len(big), memoryview(big))
            with pytest.raises(OSError):
                await fut
            assert await client.read(0, 4096) == bytes([0]) * 4096  # nothing changed

        async with await connect_unix(bad.sock) as client:
            fut, sync = _submitted(client, proto.NBD_CMD_WRITE, 0, 4096, memoryview(b"x" * 4096))
            with pytest.raises(NbdCommandError) as e:
                await fut
            assert e.value.errno == errno.ENOSPC and sync == [False]

        client = await connect_unix(slow.sock)
        pending = [_submitted(client, proto.NBD_CMD_READ, 0, 4096) for _ in range(8)]
        await asyncio.sleep(0.2)
        slow.kill()
        for fut, _ in pending:
            with pytest.raises(NbdConnectionError):
                await asyncio.wait_for(fut, 2)
        fut, _ = _submitted(client, proto.NBD_CMD_READ, 0, 4096)
        with pytest.raises(NbdConnectionError):
            await fut
        await client.close()

    run(main)


def test_submitted_reads_through_an_arena_and_a_timed_out_one_retires_its_slot(
        tmp_path: Path) -> None:
    from drove.nbd.arena import Arena

    class SlowReads(MemoryExport):
        async def read(self, offset: int, length: int) -> Any:
            if offset >= 8 << 20:
                await asyncio.sleep(0.6)  # past the client's timeout
            return await super().read(offset, length)

    exp = SlowReads(SIZE, "")
    exp.data[:] = random.Random(5).randbytes(SIZE)
    sock = tmp_path / "s.sock"
    arena = Arena(slots=8)

    async def main() -> None:
        client = await connect_unix(sock, request_timeout=0.3, arena=arena)
        assert client.arena is arena
        futs = [_submitted(client, proto.NBD_CMD_READ, i << 20, 1 << 20)[0] for i in range(4)]
        for i, fut in enumerate(futs):
            view = await fut
            assert arena.offset_of(view) is not None  # answered in the arena
            assert bytes(view) == bytes(exp.data[i << 20:(i + 1) << 20])
            arena.give_back(view)
        assert arena.in_use == 0
        small, _ = _submitted(client, proto.NBD_CMD_READ, 0, 4096)
        assert isinstance(await small, bytearray)  # small reads stay inline
        # Cut off: the server may still write into the slot, which is never reused.
        slow, _ = _submitted(client, proto.NBD_CMD_READ, 8 << 20, 1 << 20)
        with pytest.raises(NbdTimeoutError):
            await slow
        assert arena.retired == 1 and arena.in_use == 0
        await asyncio.sleep(0.5)
        client.abort()

    with ServerThread(MemoryProvider([exp]), unix_path=sock, accept_arena=True):
        run(main)
