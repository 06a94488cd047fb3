"""Crash points: fail at every filesystem mutation of an operation, then reopen.

A failure injected at mutation N stands for a crash there: that mutation and
every later one raise, so nothing after it reaches the disk.  The reopened
replica must equal the state before or after the operation.  (Dirty pages that
a real crash would lose stay visible here; the ordering tests below check the
fsync-before-drop rules that cover that.)
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from crashinject import Crash, Injector, reopen_through_crashes
from drove.replica import Replica, chain, meta
from drove.replica.meta import LOCK_FILE, VOLUME_META

BS = 4096
CHUNK = 4


@pytest.fixture(autouse=True)
def small_purge_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Purge in 4-block steps, so folds and prunes crash between steps too."""
    monkeypatch.setattr(chain, "PURGE_STEP_BYTES", 4 * BS)


@contextlib.contextmanager
def no_sync():
    """Skip fsyncs while building fixtures (they are not what is under test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meta.fs, "fsync", lambda fd: None)
        mp.setattr(meta.fs, "fdatasync", lambda fd: None)
        yield


def pattern(c: int, n: int) -> bytes:
    return bytes([c]) * n


def build(d: Path) -> Replica:
    """s1 <- s2 <- head, with overlapping data, zeros over older data, unaligned edges."""
    with no_sync():
        r = Replica.create(d, 64 * BS, chunk_blocks=CHUNK)
        r.write(0, pattern(1, 10 * BS))
        r.write(30 * BS + 100, pattern(2, 5000))
        r.snapshot("s1")
        r.write(5 * BS + 7, pattern(3, 10 * BS))
        r.zero(2 * BS, BS)
        r.snapshot("s2", labels={"k": "v"})
        r.write(8 * BS, pattern(4, 4 * BS))
        r.write(31 * BS, pattern(5, BS))
        r.write(60 * BS, pattern(6, 3 * BS))
    r.flush()
    return r


def state(r: Replica) -> tuple[int, bytes, dict[str, bytes]]:
    """What a reader can see: size, head data, and every live snapshot's data."""
    snaps = {}
    for info in r.layers():
        if info.name and not info.removed:
            v = r.view(info.name)
            snaps[info.name] = bytes(v.read(0, v.size))
    return r.size, bytes(r.read(0, r.size)), snaps


def purge(r: Replica) -> None:
    for _ in r.purge_steps():
        pass


def check_clean_dir(r: Replica) -> None:
    """Only listed files remain after an open (leftovers removed)."""
    listed = {VOLUME_META, LOCK_FILE}
    for info in r.layers():
        listed |= {info.file, info.file + ".meta"}
    assert set(os.listdir(r.dir)) == listed


def run_crash_points(tmp_path: Path, setup: Callable[[Replica], None],
                     op: Callable[[Replica], Any]) -> int:
    """Crash ``op`` at each mutation in turn; returns how many crash points there were."""
    ref = build(tmp_path / "ref")
    with no_sync():
        setup(ref)
    before = state(ref)
    op(ref)
    after = state(ref)
    ref.close()
    for allow in itertools.count():
        d = tmp_path / f"crash{allow}"
        r = build(d)
        with no_sync():
            setup(r)
        assert state(r) == before
        with pytest.MonkeyPatch.context() as mp:
            inj = Injector(mp, allow)
            with contextlib.suppress(Crash):
                op(r)
            fired = inj.fired
            # Abandon it like a dead process: every further mutation still fails.
            with contextlib.suppress(BaseException):
                r.close()
        if fired is None:
            r2 = Replica.open(d, chunk_blocks=CHUNK)
            assert state(r2) == after
            r2.close()
            return allow
        r2 = reopen_through_crashes(d, CHUNK)
        got = state(r2)
        assert got in (before, after), f"crash at {fired}: state is neither before nor after"
        check_clean_dir(r2)
        # Still a working replica: purge, write, snapshot, reopen.
        purge(r2)
        assert state(r2) == got
        r2.write(0, b"z" * 10)
        r2.snapshot("after-crash")
        r2.close()
        r3 = Replica.open(d, chunk_blocks=CHUNK)
        assert r3.read(0, 10) == b"z" * 10
        r3.close()
    raise AssertionError("unreachable")


def nothing(r: Replica) -> None:
    pass


CASES: dict[str, tuple[Callable[[Replica], None], Callable[[Replica], Any]]] = {
    "snapshot": (nothing, lambda r: r.snapshot("s3", labels={"a": "b"})),
    "delete": (nothing, lambda r: r.delete_snapshot("s1")),
    "fold": (lambda r: r.delete_snapshot("s1"), purge),
    "fold-cached-checksum": (lambda r: (r.checksum("s2"), r.delete_snapshot("s1")), purge),
    "prune": (lambda r: r.delete_snapshot("s2"), purge),
    "remove": (lambda r: (r.revert("s1"), r.delete_snapshot("s2")), purge),
    "fold-then-prune": (lambda r: (r.delete_snapshot("s1"), r.delete_snapshot("s2")), purge),
    "revert": (nothing, lambda r: r.revert("s1")),
    "expand": (nothing, lambda r: r.expand(80 * BS)),
    "checksum": (nothing, lambda r: r.checksum("s1")),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow
def test_crash_points(tmp_path: Path, case: str) -> None:
    setup, op = CASES[case]
    points = run_crash_points(tmp_path, setup, op)
    assert points >= 3


# ------------------------------------------------------------------ ordering of syncs


class Recorder:
    """Logs every mutation as (name, fd or path, flags) and passes it through."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.log: list[tuple[str, Any, Any]] = []
        self.paths: dict[int, str] = {}
        for name in meta.FsOps.MUTATIONS:
            mp.setattr(meta.fs, name, self._wrap(name, getattr(meta.fs, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            if name == "open_write":
                self.paths[result] = Path(args[0]).name
            flags = args[3] if name == "pwritev" and len(args) > 3 else None
            self.log.append((name, args[0], flags))
            return result
        return call


def test_prune_syncs_head_before_punching(tmp_path: Path) -> None:
    r = build(tmp_path / "r")
    r.delete_snapshot("s2")
    head_fd = r._head_fd
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        for i, _ in enumerate(r.purge_steps()):
            # I/O between steps dirties the head again.
            r.write((8 + i) * BS, b"w" * BS)
    punches = [i for i, (n, _, _) in enumerate(rec.log) if n == "punch_hole"]
    assert punches, "prune punched nothing"
    for i in punches:
        since_sync = list(itertools.takewhile(
            lambda e: not (e[0] == "fdatasync" and e[1] == head_fd), reversed(rec.log[:i])))
        assert len(since_sync) < i, "no fdatasync of the head before the punch"
        assert not any(n == "pwritev" and fd == head_fd for n, fd, _ in since_sync)
    r.close()


def test_fold_syncs_child_before_commit(tmp_path: Path) -> None:
    r = build(tmp_path / "r")
    r.delete_snapshot("s1")
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        purge(r)
    child_fds = {fd for fd, name in rec.paths.items() if name == "volume-snap-s2.img"}
    writes = [i for i, (n, fd, _) in enumerate(rec.log) if n == "pwritev" and fd in child_fds]
    assert writes, "fold copied nothing"
    syncs = [i for i, (n, fd, _) in enumerate(rec.log) if n == "fdatasync" and fd in child_fds]
    # replace() is logged with its source: the staged temp file.
    commit = next(i for i, (n, p, _) in enumerate(rec.log)
                  if n == "replace" and Path(p).name == VOLUME_META + ".tmp")
    assert any(writes[-1] < s < commit for s in syncs)
    # The child's parent is rewritten before volume.meta drops the folded layer,
    # and the folded file is removed only after that commit.
    meta_commit = next(i for i, (n, p, _) in enumerate(rec.log)
                       if n == "replace" and Path(p).name == "volume-snap-s2.img.meta.tmp")
    unlink = next(i for i, (n, p, _) in enumerate(rec.log)
                  if n == "unlink" and Path(p).name == "volume-snap-s1.img")
    assert meta_commit < commit < unlink
    r.close()


def test_snapshot_syncs_head_first_and_fua_uses_dsync(tmp_path: Path) -> None:
    r = build(tmp_path / "r")
    head_fd = r._head_fd
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        r.write(0, b"f" * 100)
        r.snapshot("s3")
        r.write(0, b"g" * 100, fua=True)
    link = next(i for i, (n, _, _) in enumerate(rec.log) if n == "link")
    assert ("fdatasync", head_fd, None) in rec.log[:link]
    assert rec.log[-1][0] == "pwritev" and rec.log[-1][2] == os.RWF_DSYNC
    r.close()
