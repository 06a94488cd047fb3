"""Linked clones against flat bytearray oracles: random writes, snapshots, deletes and purges
(of snapshots clones share: the manager would hide those, the format must cope anyway),
clones of clones, flattens and reopens.  Whatever one volume does, every other volume and
every snapshot reads what its oracle says."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

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

from drove.replica import Replica
from drove.replica.clone import make_clone

BS = 4096
SIZE = 48 * BS
NAMES = ["a", "b"]
MAX_VOLUMES = 5


def payload(seed: int, n: int) -> bytes:
    """Random bytes (all zeros now and then)."""
    return bytes(n) if seed % 7 == 0 else random.Random(seed).randbytes(n)


class Volume:
    """One replica directory, open, with the oracle of its head and of its snapshots."""

    def __init__(self, name: str, path: Path, replica: Replica, data: bytearray) -> None:
        self.name = name
        self.path = path
        self.r = replica
        self.data = data
        self.snaps: dict[str, bytes] = {}


class CloneMachine(RuleBasedStateMachine):
    """A source volume and its linked clones, each checked against its oracle."""

    @initialize()
    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="drove-clone-model-"))
        src = Replica.create(self.tmp / "v0", SIZE)
        self.vols = [Volume("v0", self.tmp / "v0", src, bytearray(SIZE))]

    def teardown(self) -> None:
        for v in getattr(self, "vols", []):
            v.r.close()
        shutil.rmtree(getattr(self, "tmp", "/nonexistent"), ignore_errors=True)

    @rule(i=st.integers(0, MAX_VOLUMES - 1), block=st.integers(0, SIZE // BS - 1),
          n=st.integers(1, 6), off=st.sampled_from([0, 100]), seed=st.integers(0, 1 << 30))
    def write(self, i: int, block: int, n: int, off: int, seed: int) -> None:
        v = self.vols[i % len(self.vols)]
        start = block * BS + off
        length = min(n * BS, SIZE - start)
        data = payload(seed, length)
        v.r.write(start, data)
        v.data[start:start + length] = data

    @rule(i=st.integers(0, MAX_VOLUMES - 1), seed=st.integers(0, 1 << 30))
    def overwrite_all(self, i: int, seed: int) -> None:
        """The head covers every block: deleting the snapshot under it then prunes it all."""
        v = self.vols[i % len(self.vols)]
        data = payload(seed | 1, SIZE)
        v.r.write(0, data)
        v.data[:] = data

    @rule(i=st.integers(0, MAX_VOLUMES - 1), block=st.integers(0, SIZE // BS - 1),
          n=st.integers(1, 8))
    def zero(self, i: int, block: int, n: int) -> None:
        v = self.vols[i % len(self.vols)]
        length = min(n, SIZE // BS - block) * BS
        v.r.zero(block * BS, length)
        v.data[block * BS:block * BS + length] = bytes(length)

    @rule(i=st.integers(0, MAX_VOLUMES - 1), name=st.sampled_from(NAMES))
    def snapshot(self, i: int, name: str) -> None:
        v = self.vols[i % len(self.vols)]
        if name in v.snaps:
            return
        v.r.snapshot(name)
        v.snaps[name] = bytes(v.data)

    @rule(i=st.integers(0, MAX_VOLUMES - 1), name=st.sampled_from(NAMES), cover=st.booleans(),
          seed=st.integers(0, 1 << 30))
    def delete_and_purge(self, i: int, name: str, cover: bool, seed: int) -> None:
        """Delete a snapshot even if clones share it (folds and prunes then meet links);
        with ``cover``, after a write over the whole head (a prune then punches it all)."""
        v = self.vols[i % len(self.vols)]
        if name not in v.snaps:
            return
        if cover:
            self.overwrite_all(i, seed)
        v.r.delete_snapshot(name)
        v.r.purge()
        del v.snaps[name]

    @precondition(lambda self: len(self.vols) < MAX_VOLUMES)
    @rule(i=st.integers(0, MAX_VOLUMES - 1), name=st.sampled_from(NAMES))
    def clone(self, i: int, name: str) -> None:
        v = self.vols[i % len(self.vols)]
        self.snapshot(i, name)  # (a no-op when it exists)
        new = f"v{len(self.vols)}"
        make_clone(v.path, self.tmp / new, name, {"volume": v.name, "snapshot": name})
        self.vols.append(Volume(new, self.tmp / new, Replica.open(self.tmp / new),
                                bytearray(v.snaps[name])))

    @rule(i=st.integers(1, MAX_VOLUMES - 1))
    def flatten(self, i: int) -> None:
        v = self.vols[i % len(self.vols)]
        v.r.flatten()
        v.r.purge()
        assert all(la.base is None for la in v.r.layers()), v.name

    @rule(i=st.integers(0, MAX_VOLUMES - 1))
    def reopen(self, i: int) -> None:
        v = self.vols[i % len(self.vols)]
        v.r.close()
        v.r = Replica.open(v.path)

    @invariant()
    def every_volume_and_snapshot_reads_its_oracle(self) -> None:
        for v in getattr(self, "vols", []):
            assert bytes(v.r.read(0, SIZE)) == bytes(v.data), v.name
            for name, want in v.snaps.items():
                assert bytes(v.r.view(name).read(0, SIZE)) == want, (v.name, name)


def test_clones_against_oracles() -> None:
    run_state_machine_as_test(CloneMachine, settings=settings(
        max_examples=60, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
