"""The chain against flat bytearray oracles: random I/O, snapshots, purge, revert, reopen."""

from __future__ import annotations

import errno
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from drove.replica import Replica, SnapshotExistsError, View, meta

BS = 4096
CHUNK = 4  # 16 KiB index chunks: I/O and extents cross chunk borders all the time
MAX_SIZE = 96 * BS
NAMES = ["a", "b", "c", "d", "e", "f"]


def payload(seed: int, n: int) -> bytes:
    """Non-zero-heavy random bytes (zeros too, to catch allocated-zero confusions)."""
    rnd = random.Random(seed)
    if seed % 5 == 0:
        return bytes(n)
    return rnd.randbytes(n)


class ChainMachine(RuleBasedStateMachine):
    """Drives one Replica and keeps an oracle per visible volume."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="drove-model-"))
        self.r: Replica | None = None
        self.head = bytearray()
        # Whole blocks a trim left undefined (NBD: until written; drove zeroes them where
        # the head held them and leaves what an older layer shows elsewhere): not checked.
        self.undefined: set[int] = set()
        self.snaps: dict[str, bytearray] = {}
        self.snap_undefined: dict[str, set[int]] = {}
        self.views: dict[str, View] = {}
        self.dead: list[View] = []

    @initialize(blocks=st.integers(16, 64))
    def create(self, blocks: int) -> None:
        self.r = Replica.create(self.tmp / "r", blocks * BS, chunk_blocks=CHUNK,
                                max_open_files=3)
        self.head = bytearray(blocks * BS)

    def teardown(self) -> None:
        if self.r is not None and not self.r.closed:
            self.r.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- helpers

    def _range(self, data: st.DataObject, max_len: int = 6 * BS) -> tuple[int, int]:
        size = len(self.head)
        # Bias towards block and chunk borders.
        off = data.draw(st.one_of(
            st.integers(0, size - 1),
            st.integers(0, size // BS - 1).map(lambda b: b * BS),
            st.integers(1, size // BS - 1).map(lambda b: b * BS - 1),
        ))
        length = data.draw(st.one_of(st.integers(1, min(max_len, size - off)),
                                     st.integers(1, max(1, (size - off) // BS)).map(
                                         lambda b: min(b * BS, size - off))))
        return off, length

    def _defined(self, off: int, length: int) -> None:
        """A write or zero made the whole blocks it covers defined again."""
        self.undefined -= set(range(-(-off // BS), (off + length) // BS))

    def _write_between(self, data: st.DataObject) -> None:
        """A random write, as I/O interleaving a purge's steps."""
        off, length = self._range(data)
        buf = payload(data.draw(st.integers(0, 1 << 30)), length)
        self.r.write(off, buf)
        self.head[off:off + length] = buf
        self._defined(off, length)

    # ---------------------------------------------------------------- I/O rules

    @rule(data=st.data(), fua=st.booleans())
    def write(self, data: st.DataObject, fua: bool) -> None:
        off, length = self._range(data)
        buf = payload(data.draw(st.integers(0, 1 << 30)), length)
        self.r.write(off, memoryview(buf), fua=fua)
        self.head[off:off + length] = buf
        self._defined(off, length)

    @rule(data=st.data(), fua=st.booleans(), fast=st.booleans())
    def zero(self, data: st.DataObject, fua: bool, fast: bool) -> None:
        off, length = self._range(data, max_len=20 * BS)
        try:
            self.r.zero(off, length, fua=fua, fast=fast)
        except OSError as e:
            assert fast and e.errno == errno.ENOTSUP
            return  # nothing changed: the invariants check that
        self.head[off:off + length] = bytes(length)
        self._defined(off, length)

    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        off, length = self._range(data, max_len=20 * BS)
        self.r.trim(off, length)
        self.head[off:off + length] = bytes(length)  # partly covered blocks: zeros
        self.undefined |= set(range(-(-off // BS), (off + length) // BS))

    @rule()
    def flush(self) -> None:
        self.r.flush()

    @rule(data=st.data())
    def read_some(self, data: st.DataObject) -> None:
        off, length = self._range(data)
        got = self.r.read(off, length)
        assert got == seen(self.head, self.undefined, got, off)[off:off + length]
        buf = bytearray(b"\xee" * length)
        self.r.readinto(off, buf)
        assert buf == got

    # ---------------------------------------------------------------- structure rules

    @rule(name=st.sampled_from(NAMES))
    def snapshot(self, name: str) -> None:
        if name in self.snaps:
            with pytest.raises(SnapshotExistsError):
                self.r.snapshot(name)
            return
        info = self.r.snapshot(name, labels={"n": name})
        assert info.name == name and info.labels == {"n": name}
        self.snaps[name] = bytearray(self.head)
        self.snap_undefined[name] = set(self.undefined)
        self.views[name] = self.r.view(name)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.r.delete_snapshot(name)
        del self.snaps[name]
        self.dead.append(self.views.pop(name))

    @rule(data=st.data())
    def purge(self, data: st.DataObject) -> None:
        for _ in self.r.purge_steps():
            if data.draw(st.booleans()):
                self._write_between(data)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def revert(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.r.revert(name)
        snap = self.snaps[name]
        self.head = bytearray(snap) + bytearray(len(self.head) - len(snap))
        self.undefined = set(self.snap_undefined[name])

    @precondition(lambda self: len(self.head) < MAX_SIZE)
    @rule(blocks=st.integers(1, 9))
    def expand(self, blocks: int) -> None:
        new = min(MAX_SIZE, len(self.head) + blocks * BS)
        self.r.expand(new)
        self.head += bytearray(new - len(self.head))
        assert self.r.size == new

    @rule()
    def reopen(self) -> None:
        self.r.close()
        self.r = Replica.open(self.tmp / "r", chunk_blocks=CHUNK, max_open_files=3)
        self.views = {name: self.r.view(name) for name in self.snaps}
        self.dead.clear()  # views of a closed replica are dead anyway

    # ---------------------------------------------------------------- invariants

    @invariant()
    def volumes_equal_oracles(self) -> None:
        if self.r is None:
            return
        assert self.r.size == len(self.head)
        got = self.r.read(0, len(self.head))
        want = seen(self.head, self.undefined, got, 0)
        assert got == want
        check_status(self.r.block_status(0, len(self.head)), want)
        for name, oracle in self.snaps.items():
            v = self.views[name]
            assert v.size == len(oracle)
            got = v.read(0, len(oracle))
            want = seen(oracle, self.snap_undefined[name], got, 0)
            assert got == want, f"snapshot {name} changed"
            check_status(v.block_status(0, len(oracle)), want)
        for v in self.dead:
            with pytest.raises(OSError) as e:
                v.read(0, 1)
            assert e.value.errno == errno.ESHUTDOWN
        live = sorted(i.name for i in self.r.layers() if i.name and not i.removed)
        assert live == sorted(self.snaps)


def seen(oracle: bytearray, undefined: set[int], got: bytes, off: int) -> bytearray:
    """The oracle with its undefined blocks' bytes taken from ``got`` (read at ``off``)."""
    out = bytearray(oracle)
    for b in undefined:
        s, e = max(b * BS, off), min((b + 1) * BS, off + len(got), len(out))
        if s < e:
            out[s:e] = got[s - off:e - off]
    return out


def check_status(status: list[tuple[int, bool]], oracle: bytes | bytearray) -> None:
    """block_status tiles the volume and never calls non-zero data a hole."""
    pos = 0
    for length, alloc in status:
        assert length > 0
        if not alloc:
            assert oracle[pos:pos + length].count(0) == length, f"hole at {pos} hides data"
        pos += length
    assert pos == len(oracle)


@pytest.mark.slow
def test_chain_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # The model checks data, not durability (the crash tests do): skip the fsyncs.
    monkeypatch.setattr(meta.fs, "fsync", lambda fd: None)
    monkeypatch.setattr(meta.fs, "fdatasync", lambda fd: None)
    run_state_machine_as_test(
        ChainMachine,
        settings=settings(max_examples=200, stateful_step_count=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.filter_too_much]),
    )
