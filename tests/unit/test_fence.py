"""The replica's epoch fence: persisted epochs, refused stale heads, cut connections.

The NBD server and the replica chain are real; the client speaks raw NBD on a
unix socket so that the test decides exactly which requests are queued when the
fence moves.  The only stand-in is a flush gate the test opens by hand, to hold
one FLUSH in flight (and the connection's requests behind it) deterministically.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from drove.nbd import proto
from drove.nbd.errors import ExportRefused
from drove.nbd.server import NbdServer
from drove.replica import Replica
from drove.replica.errors import StaleGenerationError
from drove.replica.exports import FlushGate, ReplicaExports
from drove.replica.fence import Fence, StaleEpochError, head_export_name, parse_head_epoch

BS = 4096


class HeldFlushGate(FlushGate):
    """A flush gate whose flushes wait until the test opens it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, func) -> None:
        """Hold the flush until released, then run it."""
        self.entered.set()
        await self.release.wait()
        await super().run(func)


async def raw_connect(path: str, export: str) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:
    """Fixed-newstyle handshake by hand (NBD_OPT_EXPORT_NAME); the transmission streams."""
    reader, writer = await asyncio.open_unix_connection(path)
    await reader.readexactly(18)  # NBDMAGIC, IHAVEOPT, handshake flags
    writer.write(struct.pack(">I", proto.NBD_FLAG_C_FIXED_NEWSTYLE | proto.NBD_FLAG_C_NO_ZEROES))
    name = export.encode()
    writer.write(proto.OPTION_HEADER.pack(proto.IHAVEOPT, proto.NBD_OPT_EXPORT_NAME, len(name))
                 + name)
    await writer.drain()
    await reader.readexactly(10)  # size, transmission flags
    return reader, writer


def request(cmd: int, handle: int, offset: int = 0, length: int = 0) -> bytes:
    """One NBD request header."""
    return proto.REQUEST.pack(proto.NBD_REQUEST_MAGIC, 0, cmd, handle, offset, length)


@pytest.fixture
def replica(tmp_path: Path):
    rep = Replica.create(tmp_path / "r", 256 * BS)
    yield rep
    if not rep.closed:
        rep.close()


def test_export_names() -> None:
    assert parse_head_epoch(head_export_name(7)) == 7
    for name in ("head", "", "head@epoch=", "head@epoch=-1", "head@epoch=1x", "snapshot/a"):
        assert parse_head_epoch(name) is None


def test_epoch_and_generation_persist_and_only_grow(tmp_path: Path, replica: Replica) -> None:
    fence = Fence(replica)
    fence.claim(3)
    with pytest.raises(StaleEpochError):
        fence.claim(3)  # two engines can never hold one epoch
    with pytest.raises(StaleEpochError):
        fence.admit(2, "a stale call")
    with pytest.raises(StaleEpochError):
        fence.admit(None, "a call with no epoch")
    fence.admit(3, "the owner")
    replica.set_engine_state({"generation": 5, "clean": False})
    with pytest.raises(StaleGenerationError):
        replica.set_engine_state({"generation": 4, "clean": True})
    replica.set_engine_state({"generation": 5, "clean": True})  # same: the clean stop
    replica.close()
    again = Replica.open(tmp_path / "r")
    try:
        assert again.epoch == 3
        assert again.engine_state == {"generation": 5, "clean": True}
    finally:
        again.close()


def test_plain_head_is_read_only_once_an_engine_owns_the_replica(replica: Replica) -> None:
    fence = Fence(replica)
    exports = ReplicaExports(replica, FlushGate(), fence)
    assert not exports.open_export("head").caps.readonly  # a bare replica, by hand
    fence.claim(1)
    assert exports.open_export("head").caps.readonly
    assert exports.open_export("").caps.readonly
    assert not exports.open_export(head_export_name(1)).caps.readonly
    with pytest.raises(ExportRefused, match="stale"):
        exports.open_export(head_export_name(0))  # below the owner's
    fence.advance(4)
    with pytest.raises(ExportRefused, match="epoch 4"):
        exports.open_export(head_export_name(3))


async def _serve(replica: Replica, path: Path, gate: FlushGate) -> tuple[NbdServer, Fence]:
    fence = Fence(replica)
    server = NbdServer(ReplicaExports(replica, gate, fence), max_inflight_requests=1)
    fence.bind(server.cut_connections)
    await server.listen_unix(path)
    return server, fence


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (within 10 s), replies discarded."""
    try:
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
    except ConnectionError:
        pass
    return True


def test_a_newer_epoch_discards_what_the_old_connection_queued(replica: Replica,
                                                               tmp_path: Path) -> None:
    """Writes queued behind a FLUSH in flight are never executed once the fence moves."""

    async def main() -> None:
        gate = HeldFlushGate()
        server, fence = await _serve(replica, tmp_path / "nbd.sock", gate)
        try:
            fence.claim(1)
            reader, writer = await raw_connect(str(tmp_path / "nbd.sock"), head_export_name(1))
            writer.write(request(proto.NBD_CMD_FLUSH, 1))
            await writer.drain()
            await gate.entered.wait()  # the FLUSH is in flight: the connection reads no more
            payload = b"\xee" * (16 * BS)
            for i in range(4):
                writer.write(request(proto.NBD_CMD_WRITE, 10 + i, i * 16 * BS, len(payload))
                             + payload)
            # And one write whose payload is still incomplete.
            writer.write(request(proto.NBD_CMD_WRITE, 20, 64 * BS, 32 * BS) + payload)
            # No drain: the server reads nothing while the FLUSH is in flight, so what
            # does not fit in the socket stays queued here.
            fence.advance(2)  # a newer engine claims the replica
            gate.release.set()
            assert await _closed(reader)
            assert replica.read(0, 256 * BS) == bytes(256 * BS), "a queued write landed"
            assert server.connections == 0
            writer.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_cut_all_drops_every_head_connection(replica: Replica, tmp_path: Path) -> None:
    """prepare_rebuild and revert cut every head connection, the owner's too."""

    async def main() -> None:
        server, fence = await _serve(replica, tmp_path / "nbd.sock", FlushGate())
        try:
            fence.claim(5)
            owner = await raw_connect(str(tmp_path / "nbd.sock"), head_export_name(5))
            # A snapshot reader is not a writer: it stays.
            replica.snapshot("s")
            snap = await raw_connect(str(tmp_path / "nbd.sock"), "snapshot/s")
            assert fence.cut_all("test") == 1
            assert await _closed(owner[0])
            snap[1].write(request(proto.NBD_CMD_READ, 1, 0, BS))
            await snap[1].drain()
            magic, err, handle = proto.SIMPLE_REPLY.unpack(await snap[0].readexactly(16))
            assert (magic, err, handle) == (proto.NBD_SIMPLE_REPLY_MAGIC, 0, 1)
            await snap[0].readexactly(BS)
            for _, w in (owner, snap):
                w.close()
        finally:
            await server.close()

    asyncio.run(main())
