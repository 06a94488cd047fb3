"""`snapshot diff` through a real engine against an oracle of the writes made with nbdsh.

Hypothesis draws batches of writes, zeroes and trims (4 KiB blocks, ranges biased to
block borders); each batch goes to the engine's NBD export between two snapshots, over
a local replica (in the engine) and a replica process.  The oracle is a model of the
chain's allocation rule: a write makes the head hold every block it touches; a zero
keeps a block the head holds, makes the head hold (real zeros) a block an older layer
holds, and punches a whole block only older layers lack; a trim does the same except
that it leaves a whole block the head does not hold as it is.  The engine's diff of the
two snapshots (and of the first and the head) must equal the blocks the head holds, and
cover every byte where the two snapshots' contents differ.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicatools import nbdinfo_json, nbdsh

BS = 4096
SIZE = 512 * BS  # 2 MiB: batches cross blocks and 64 KiB chunks all the time


def _ranges(size: int) -> st.SearchStrategy[tuple[int, int]]:
    """(offset, length) within the volume, biased to block borders."""
    offset = st.one_of(st.integers(0, size - 1),
                       st.integers(0, size // BS - 1).map(lambda b: b * BS),
                       st.integers(1, size // BS - 1).map(lambda b: b * BS - 1))
    return offset.flatmap(lambda o: st.tuples(st.just(o), st.one_of(
        st.integers(1, min(6 * BS, size - o)),
        st.integers(1, max(1, min(16, (size - o) // BS))).map(lambda b: b * BS))))


OPS = st.lists(st.tuples(st.sampled_from(["write", "write", "zeros", "zero", "trim"]),
                         _ranges(SIZE)), min_size=1, max_size=12)


class ChainOracle:
    """Which blocks the head and the older layers hold, and the volume's bytes."""

    def __init__(self, size: int) -> None:
        self.below: set[int] = set()
        self.head: set[int] = set()
        self.data = bytearray(size)

    def write(self, off: int, data: bytes) -> None:
        """A write: the head holds every block it touches (partial ones completed)."""
        self.data[off:off + len(data)] = data
        self.head.update(range(off // BS, (off + len(data) - 1) // BS + 1))

    def trim(self, off: int, n: int) -> None:
        """A trim, as drove.replica.chain.Replica.trim treats blocks: a zero, but whole
        blocks the head does not hold are left as they are."""
        end = off + n
        full_lo, full_hi = -(-off // BS), end // BS
        if full_lo >= full_hi or not self.below:
            self.zero(off, n)
            return
        if off % BS:
            self.zero(off, full_lo * BS - off)
        for b in range(full_lo, full_hi):
            if b in self.head:
                self.zero(b * BS, BS)
        if end % BS:
            self.zero(full_hi * BS, end - full_hi * BS)

    def zero(self, off: int, n: int) -> None:
        """A zero, as drove.replica.chain.Replica.zero treats blocks."""
        self.data[off:off + n] = bytes(n)
        end = off + n
        full_lo, full_hi = -(-off // BS), end // BS
        partial = []
        if full_lo > full_hi:
            partial.append(off // BS)
        else:
            if off % BS:
                partial.append(off // BS)
            if end % BS:
                partial.append(full_hi)
        for b in partial:
            if b not in self.head and b in self.below:
                self.head.add(b)  # completed from the older layer, then zeroed
        for b in range(full_lo, full_hi):
            if b in self.below:
                self.head.add(b)  # real zeros hide the older data
            else:
                self.head.discard(b)  # punched: nothing older shows through

    def snapshot(self) -> None:
        """The head becomes an older layer under a new, empty head."""
        self.below |= self.head
        self.head = set()


def _extents(blocks: set[int]) -> list[list[int]]:
    """Blocks as merged [offset, length] byte extents."""
    out: list[list[int]] = []
    for b in sorted(blocks):
        if out and out[-1][0] + out[-1][1] == b * BS:
            out[-1][1] += BS
        else:
            out.append([b * BS, BS])
    return out


def _script(ops: list[tuple[str, tuple[int, int]]], seed: int,
            oracle: ChainOracle) -> str:
    """The nbdsh script making ``ops`` (and the oracle's same changes)."""
    lines = []
    for i, (kind, (off, n)) in enumerate(ops):
        if kind in ("write", "zeros"):
            byte = 0 if kind == "zeros" else (seed + i) % 255 + 1
            oracle.write(off, bytes([byte]) * n)
            lines.append(f"h.pwrite(bytes([{byte}]) * {n}, {off})")
        else:
            (oracle.trim if kind == "trim" else oracle.zero)(off, n)
            lines.append(f"h.{kind}({n}, {off})")
    lines.append("h.flush()")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_diff_equals_the_oracle_of_writes_through_the_engine(cluster):
    engine = cluster.start(2, str(SIZE), local=True)
    uri = engine.uri()
    oracle = ChainOracle(SIZE)
    names = (f"s{i}" for i in itertools.count())
    last = next(names)
    engine.ok("POST", "/v1/snapshots", json={"name": last})
    oracle.snapshot()
    seeds = itertools.count(1)

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(ops=OPS)
    def batch(ops: list[tuple[str, tuple[int, int]]]) -> None:
        nonlocal last
        before = bytes(oracle.data)
        nbdsh(uri, _script(ops, next(seeds), oracle))
        expected = _extents(oracle.head)
        to_head = engine.ok("GET", "/v1/diff", params={"since": last})
        assert to_head["extents"] == expected, ops
        snap = next(names)
        engine.ok("POST", "/v1/snapshots", json={"name": snap})
        d = engine.ok("GET", "/v1/diff", params={"since": last, "to": snap})
        assert d["extents"] == expected and d["bytes"] == len(oracle.head) * BS, ops
        # Sound: every byte that differs between the snapshots lies in the diff.
        changed = {i // BS for i, (x, y) in enumerate(zip(before, oracle.data, strict=True))
                   if x != y}
        assert changed <= oracle.head, ops
        oracle.snapshot()
        last = snap

    batch()
    # The delta export of the replica the engine serves itself reports the same extents.
    whole = engine.ok("GET", "/v1/diff", params={"since": "s0", "to": last})
    extents = nbdinfo_json(cluster.local.uri(f"snapshot/{last}@since=s0"), "--map")
    assert [[e["offset"], e["length"]] for e in extents if e["type"] == 0] \
        == whole["extents"]
    # The oracle's bytes are the volume's: the model followed the real chain.
    got = nbdsh(uri, f"import sys\nsys.stdout.buffer.write(h.pread({SIZE}, 0))\n").stdout
    assert got == bytes(oracle.data)
