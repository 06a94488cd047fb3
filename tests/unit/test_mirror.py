"""The mirror's rules, over in-process memory exports with injected faults.

Real replica processes are exercised in tests/integration/test_engine*.py;
here each rule is checked in isolation and fast, with a bytearray oracle.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import random

import pytest

from drove.engine.mirror import BLOCK, Member, Mirror, Mode
from drove.nbd import eager
from drove.nbd.memory import MemoryExport

SIZE = 1 << 20

# Every rule is checked through both entries of the mirror: its coroutine methods,
# and ``submit`` (the engine's hot path); for submit, also with members that offer
# ``submit`` themselves and complete on the spot, errors included.
STYLE = "coroutine"


@pytest.fixture(autouse=True, params=["coroutine", "submit", "submit-sync-members"])
def style(request):
    global STYLE
    STYLE = request.param
    yield request.param
    STYLE = "coroutine"


class FaultyIO:
    """A MemoryExport as a replica connection, with failures on demand."""

    def __init__(self, size: int = SIZE, *, aligned_only: bool = False) -> None:
        self.mem = MemoryExport(size, suspend=True)
        self.fail_with: int | None = None  # errno for every mutating call
        self.aligned_only = aligned_only
        self.calls: list[str] = []
        self.aborted = False
        self.reads = 0
        self.on_write = None  # called inside every write, before it succeeds

    def _check(self, op: str, offset: int = 0, length: int = 0) -> None:
        if self.aborted:
            raise ConnectionError("aborted")
        self.calls.append(op)
        if self.fail_with is not None and op != "read":
            raise OSError(self.fail_with, f"injected {op} failure")
        if self.aligned_only and op in ("write", "zero", "trim") and (
                offset % BLOCK or length % BLOCK):
            raise AssertionError(f"unaligned {op} sent to a WO replica: {offset}+{length}")

    async def read(self, offset: int, length: int) -> bytes:
        self._check("read")
        self.reads += 1
        return bytes(await self.mem.read(offset, length))

    async def write(self, offset: int, data, *, fua: bool = False) -> None:
        self._check("write", offset, len(data))
        if self.on_write is not None:
            self.on_write()
        await self.mem.write(offset, memoryview(bytes(data)), fua)

    async def zero(self, offset: int, length: int, *, fua: bool = False, may_trim: bool = True,
                   fast: bool = False) -> None:
        self._check("zero", offset, length)
        await self.mem.zero(offset, length, fua, may_trim, fast)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check("trim", offset, length)
        await self.mem.zero(offset, length, fua)  # drove replicas read trimmed data as zeros

    async def flush(self) -> None:
        self._check("flush")

    async def cache(self, offset: int, length: int) -> None:
        self._check("cache")

    async def block_status(self, offset: int, length: int):
        self._check("block_status")
        return await self.mem.block_status(offset, length)

    def abort(self) -> None:
        self.aborted = True


class SyncIO(FaultyIO):
    """A FaultyIO with ``submit`` whose memory never suspends: it completes at once."""

    def __init__(self, size: int = SIZE, *, aligned_only: bool = False) -> None:
        super().__init__(size, aligned_only=aligned_only)
        self.mem.suspend = False
        self.submitted = 0

    def submit(self, cmd, offset, length, data, fua, done) -> None:
        self.submitted += 1
        if cmd == eager.READ:
            eager.run(self.read(offset, length), done)
        elif cmd == eager.WRITE:
            eager.run(self.write(offset, data, fua=fua), done)
        else:
            eager.run(self.flush(), done)


class SubmitFront:
    """The mirror seen through ``submit`` for READ, WRITE and FLUSH."""

    def __init__(self, mirror: Mirror) -> None:
        self._mirror = mirror

    def __getattr__(self, name):
        return getattr(self._mirror, name)

    async def _call(self, cmd, offset=0, length=0, data=None, fua=False):
        fut = asyncio.get_running_loop().create_future()

        def done(value, exc):
            assert not fut.done(), "done called twice"
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)

        self._mirror.submit(cmd, offset, length, data, fua, done)
        return await fut

    async def read(self, offset, length):
        return bytes(await self._call(eager.READ, offset, length))

    async def write(self, offset, data, fua=False):
        return await self._call(eager.WRITE, offset, len(data), data, fua)

    async def flush(self):
        return await self._call(eager.FLUSH)


def new_io(**kwargs) -> FaultyIO:
    return SyncIO(**kwargs) if STYLE == "submit-sync-members" else FaultyIO(**kwargs)


def make(n: int, *, on_change=None) -> tuple[Mirror, list[Member], list[FaultyIO]]:
    ios = [new_io() for _ in range(n)]
    members = [Member(f"r{i}", io) for i, io in enumerate(ios)]
    mirror = Mirror("vol", SIZE, on_change=on_change)
    for m in members:
        mirror.add(m)
    if STYLE != "coroutine":
        return SubmitFront(mirror), members, ios  # type: ignore[return-value]
    return mirror, members, ios


def run(coro):
    return asyncio.run(coro)


def test_write_reaches_every_replica_and_reads_spread():
    async def main():
        mirror, _, ios = make(3)
        await mirror.write(4096, memoryview(b"x" * 8192))
        await mirror.flush()
        for io in ios:
            assert io.mem.data[4096:4096 + 8192] == b"x" * 8192
            assert io.calls.count("flush") == 1
        for _ in range(30):
            assert await mirror.read(4096, 10) == b"x" * 10
        assert all(io.reads >= 5 for io in ios)  # round robin over RW replicas
        if STYLE == "submit-sync-members":
            assert all(io.submitted >= 5 for io in ios)
    run(main())


def test_failed_replica_is_dropped_after_membership_is_persisted():
    order: list[str] = []

    async def main():
        async def on_change():
            await asyncio.sleep(0.01)
            order.append("persisted")

        mirror, members, ios = make(3, on_change=on_change)
        ios[1].fail_with = errno.EIO
        await mirror.write(0, memoryview(b"a" * 4096))
        order.append("acked")
        assert members[1].mode is Mode.ERR and ios[1].aborted
        assert "injected write failure" in members[1].error
        assert order == ["persisted", "acked"]
        assert mirror.faulted is None
        # Reads never go to the dropped replica.
        for _ in range(10):
            assert await mirror.read(0, 4096) == b"a" * 4096
    run(main())


def test_all_replicas_failing_faults_the_volume_with_eio():
    async def main():
        mirror, _members, ios = make(2)
        for io in ios:
            io.fail_with = errno.EIO
        with pytest.raises(OSError) as e:
            await mirror.write(0, memoryview(b"a" * 512))
        assert e.value.errno == errno.EIO
        assert mirror.faulted
        for io in ios:
            io.fail_with = None
        with pytest.raises(OSError) as e:
            await mirror.read(0, 512)  # faulted is sticky: no silent return to service
        assert e.value.errno == errno.EIO
    run(main())


def test_enospc_on_some_drops_them_on_all_is_returned_and_volume_stays_readable():
    async def main():
        mirror, members, ios = make(3)
        await mirror.write(0, memoryview(b"k" * 4096))
        ios[0].fail_with = errno.ENOSPC
        await mirror.write(4096, memoryview(b"b" * 4096))
        assert members[0].mode is Mode.ERR
        ios[1].fail_with = ios[2].fail_with = errno.ENOSPC
        with pytest.raises(OSError) as e:
            await mirror.write(8192, memoryview(b"c" * 4096))
        assert e.value.errno == errno.ENOSPC
        assert members[1].mode is Mode.RW and members[2].mode is Mode.RW
        assert mirror.faulted is None
        assert await mirror.read(0, 8192) == b"k" * 4096 + b"b" * 4096
    run(main())


def test_fast_zero_refused_everywhere_or_converged():
    async def main():
        mirror, members, ios = make(2)
        await mirror.write(0, memoryview(b"z" * 8192))
        ios[0].mem.fast_zero = False
        await mirror.zero(0, 8192, fast=True)  # one can, one cannot: both end up zeroed
        for io in ios:
            assert io.mem.data[:8192] == bytes(8192)
        ios[1].mem.fast_zero = False
        await mirror.write(0, memoryview(b"z" * 8192))
        with pytest.raises(OSError) as e:
            await mirror.zero(0, 8192, fast=True)
        assert e.value.errno == errno.ENOTSUP
        for io in ios:
            assert io.mem.data[:8192] == b"z" * 8192
        assert all(m.mode is Mode.RW for m in members)
    run(main())


def test_wo_replica_gets_only_whole_blocks_and_ends_identical():
    """Concurrent unaligned writes, zeros and trims; the WO copy must equal the RW one."""
    async def main():
        rng = random.Random(7)
        mirror, _members, ios = make(1)
        seed = rng.randbytes(SIZE)
        await mirror.write(0, memoryview(seed))
        wo_io = new_io(aligned_only=True)
        wo_io.mem.data[:] = seed  # as if its lower layers were already copied
        wo = Member("wo", wo_io, Mode.WO)
        mirror.add(wo)

        async def one(off: int, length: int) -> None:
            kind = rng.choice(["write", "write", "zero", "trim"])
            if kind == "write":
                await mirror.write(off, memoryview(rng.randbytes(length)))
            elif kind == "zero":
                await mirror.zero(off, length)
            else:
                await mirror.trim(off, length)

        # Many requests in flight at once on disjoint byte ranges (overlapping concurrent
        # writes have no defined order) that often share an edge block.
        for _ in range(20):
            cuts = sorted(rng.sample(range(1, SIZE // 4), 25))
            base = rng.randrange(0, SIZE // 2)
            spans = [(base + a, b - a) for a, b in itertools.pairwise(cuts)]
            await asyncio.gather(*(one(o, n) for o, n in spans))
        await asyncio.gather(*(mirror.write(100 + 512 * i, memoryview(bytes([i]) * 300))
                               for i in range(16)))
        assert wo.mode is Mode.WO, wo.error
        assert wo_io.mem.data == ios[0].mem.data
        assert wo_io.reads == 0  # a WO replica is never read
    run(main())


def test_fast_zero_with_a_wo_replica_is_refused_before_anything_changes():
    async def main():
        mirror, _, ios = make(1)
        await mirror.write(0, memoryview(b"q" * 4096))
        mirror.add(Member("wo", new_io(aligned_only=True), Mode.WO))
        with pytest.raises(OSError) as e:
            await mirror.zero(0, 4096, fast=True)
        assert e.value.errno == errno.ENOTSUP
        assert ios[0].mem.data[:4096] == b"q" * 4096
    run(main())


def test_pause_holds_new_requests_and_waits_for_inflight():
    async def main():
        mirror, _, ios = make(2)
        gate = asyncio.Event()
        original = ios[0].write

        async def slow_write(offset, data, *, fua=False):
            await gate.wait()
            await original(offset, data, fua=fua)

        ios[0].write = slow_write
        first = asyncio.ensure_future(mirror.write(0, memoryview(b"1" * 4096)))
        await asyncio.sleep(0.01)
        entered = asyncio.Event()

        async def pauser():
            async with mirror.paused():
                entered.set()
                # The first write finished (a submitted one called back; its awaiting
                # Task runs in the next turn); a write issued now waits for resume.
                await asyncio.sleep(0)
                assert first.done()
                second = asyncio.ensure_future(mirror.write(0, memoryview(b"2" * 4096)))
                await asyncio.sleep(0.02)
                assert not second.done()
                ios[0].write = original
            return second

        p = asyncio.ensure_future(pauser())
        await asyncio.sleep(0.02)
        assert not entered.is_set()
        gate.set()
        second = await p
        await second
        assert ios[0].mem.data[:4096] == ios[1].mem.data[:4096] == b"2" * 4096
    run(main())


def test_read_fails_over_to_another_rw_replica():
    async def main():
        mirror, members, ios = make(2)
        await mirror.write(0, memoryview(b"r" * 4096))

        async def broken_read(offset, length):
            raise OSError(errno.EIO, "bad sector")

        ios[0].read = broken_read
        for _ in range(4):
            assert await mirror.read(0, 4096) == b"r" * 4096
        assert members[0].mode is Mode.ERR
    run(main())


def test_wo_replica_that_took_a_write_every_rw_refused_is_dropped():
    async def main():
        mirror, members, ios = make(1)
        wo = Member("wo", new_io(aligned_only=True), Mode.WO)
        mirror.add(wo)
        ios[0].fail_with = errno.ENOSPC
        with pytest.raises(OSError) as e:
            await mirror.write(0, memoryview(b"w" * 4096))
        assert e.value.errno == errno.ENOSPC
        assert members[0].mode is Mode.RW  # full, not failed
        assert wo.mode is Mode.ERR and "diverged" in wo.error
    run(main())


def _watchable(io: FaultyIO) -> FaultyIO:
    """Give ``io`` what NbdClient has for it: a ``lost`` future and a ``reason``."""
    io.lost = asyncio.get_running_loop().create_future()  # type: ignore[attr-defined]
    io.reason = ""  # type: ignore[attr-defined]
    return io


def _lose(io: FaultyIO, why: str) -> None:
    io.reason = why  # type: ignore[attr-defined]
    io.lost.set_result(None)  # type: ignore[attr-defined]


def test_a_connection_lost_while_idle_drops_only_the_current_one():
    async def main():
        changes = []

        async def on_change():
            changes.append(1)

        mirror = Mirror("vol", SIZE, on_change=on_change)
        members = [Member(f"r{i}", _watchable(new_io())) for i in range(4)]
        for m in members[:3]:
            mirror.add(m)
        # r1 is lost with no request in flight: it leaves at once.
        _lose(members[1].io, "connection to r1 lost: server closed the connection")
        await asyncio.sleep(0)
        await mirror.settled()
        assert members[1].mode is Mode.ERR and "server closed" in members[1].error
        assert changes == [1]
        # r2's connection is replaced first (a reconnect): the old one's loss is no news.
        old = members[2].io
        members[2].io = _watchable(new_io())
        _lose(old, "closed by the client")
        mirror.remove(members[0])
        _lose(members[0].io, "closed by the client")  # removed first: no news either
        await asyncio.sleep(0)
        assert members[2].mode is Mode.RW and members[0].mode is Mode.RW
        # A connection already gone when its member is added is noticed there.
        _lose(members[3].io, "gone early")
        mirror.add(members[3])
        assert members[3].mode is Mode.ERR and members[3].error == "gone early"
        await mirror.settled()
        assert changes == [1, 1]
    run(main())


@pytest.mark.parametrize("replicas", [1, 3])
def test_nothing_is_acknowledged_once_the_volume_faulted(replicas):
    """A write every replica applied fails if the volume faulted (fenced) meanwhile."""
    async def main():
        mirror, _members, ios = make(replicas)
        ios[-1].on_write = lambda: mirror.fault("fenced by a newer engine")
        with pytest.raises(OSError) as err:
            await mirror.write(0, memoryview(b"w" * 4096))
        assert err.value.errno == errno.EIO
        assert all(io.mem.data[:4096] == b"w" * 4096 for io in ios)  # applied, not acked
        ios[-1].on_write = None
        for call in (lambda: mirror.read(0, 4096), mirror.flush,
                     lambda: mirror.write(0, memoryview(b"x" * 4096))):
            with pytest.raises(OSError):
                await call()
    run(main())


def test_failed_ping_drops_only_the_connection_it_pinged():
    """A ping on a connection the member no longer uses (dropped, then re-added as WO on a
    new one) does not drop the member again; a failed ping on the current one does."""
    from drove.engine.volume import Engine

    class SlowPing(FaultyIO):
        def __init__(self) -> None:
            super().__init__()
            self.release = asyncio.Event()
            self.pinged = asyncio.Event()

        async def cache(self, offset: int, length: int) -> None:
            self.pinged.set()
            await self.release.wait()
            raise ConnectionError("ping timed out")

    async def main():
        engine = Engine("vol", SIZE, [("r0", "http://127.0.0.1:9"), ("r1", "http://127.0.0.1:9")])
        engine.mirror.on_change = None  # no replica processes to persist generations on
        old = SlowPing()
        for r, io in zip(engine.replicas, (FaultyIO(), old), strict=True):
            r.io, r.mode = io, Mode.RW
            engine.mirror.add(r)
        r1 = engine.replicas[1]
        check = asyncio.ensure_future(engine.health_check())
        await old.pinged.wait()
        engine.mirror.drop(r1, "lost")  # meanwhile: dropped, rebuilt, back as WO
        await engine.mirror.settled()
        r1.io = FaultyIO()
        engine.mirror.set_mode(r1, Mode.WO)
        old.release.set()
        await check
        assert r1.mode is Mode.WO, r1.error
        failing = SlowPing()
        failing.release.set()
        r1.io = failing
        await engine.health_check()
        assert r1.mode is Mode.ERR and "health check failed" in r1.error
        for r in engine.replicas:
            await r.http.aclose()
    run(main())


def make_with_local(n_remote: int, *, wait: float = 5.0, on_quorum=None):
    """A mirror over one local member (r0, in the engine process) and ``n_remote`` others,
    with the write quorum required."""
    ios = [new_io() for _ in range(n_remote + 1)]
    members = [Member(f"r{i}", io) for i, io in enumerate(ios)]
    members[0].local = True
    mirror = Mirror("vol", SIZE)
    for m in members:
        mirror.add(m)
    mirror.quorum_wait = wait
    mirror.on_quorum = on_quorum
    mirror.require_outside(True)
    if STYLE != "coroutine":
        return SubmitFront(mirror), members, ios
    return mirror, members, ios


def test_the_local_replica_alone_acknowledges_nothing():
    async def main():
        changes: list[bool] = []
        mirror, members, ios = make_with_local(1, wait=0.2, on_quorum=changes.append)
        await mirror.write(0, memoryview(b"a" * 4096))
        # The remote fails this write: only the local replica has it, so it is not
        # acknowledged; it waits for an outside replica, then fails.
        ios[1].fail_with = errno.EIO
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(OSError) as err:
            await mirror.write(0, memoryview(b"b" * 4096))
        assert err.value.errno == errno.EIO and "outside" in str(err.value)
        assert loop.time() - t0 >= 0.2
        assert members[1].mode is Mode.ERR and not mirror.quorum_met and changes == [False]
        # Later writes and flushes wait and fail without touching the local replica.
        ios[0].calls.clear()
        for op in (lambda: mirror.write(8192, memoryview(b"c" * 4096)), mirror.flush):
            with pytest.raises(OSError):
                await op()
        assert ios[0].calls == [] and ios[0].mem.data[8192:12288] == bytes(4096)
        assert mirror.faulted is None and await mirror.read(0, 1) in (b"a", b"b")
    run(main())


def test_a_waiting_write_completes_when_an_outside_replica_joins():
    async def main():
        mirror, _, ios = make_with_local(1, wait=30)
        ios[1].fail_with = errno.EIO
        write = asyncio.ensure_future(mirror.write(0, memoryview(b"w" * 4096)))
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert not write.done() and mirror.waiting_for_quorum == 1
        # A pause (a rebuild bringing a replica in) is not held up by the waiting write.
        async with mirror.paused():
            fresh = new_io()
            mirror.add(Member("r2", fresh, Mode.WO))
        await asyncio.wait_for(write, 5)
        assert fresh.mem.data[:4096] == b"w" * 4096 and ios[0].mem.data[:4096] == b"w" * 4096
        assert mirror.quorum_met and mirror.waiting_for_quorum == 0
    run(main())


def test_one_outside_replica_of_two_is_enough():
    async def main():
        mirror, members, ios = make_with_local(2, wait=0.01)
        ios[1].fail_with = errno.EIO
        await mirror.write(0, memoryview(b"z" * 4096))
        await mirror.flush()
        assert members[1].mode is Mode.ERR and mirror.quorum_met
        assert ios[2].mem.data[:4096] == b"z" * 4096
    run(main())
