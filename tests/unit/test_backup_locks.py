"""Lock files on a backup target: sharing, exclusion, staleness, and giving up in time.

Faults come from FaultyTarget (tests/backuptools.py): refreshes made to fail, or held
at a gate until the test opens it.  Waits are for conditions, with deadlines.
"""

import asyncio
import json
import threading
import time

import pytest

from backuptools import FaultyTarget, make_target, wait_for
from drove.backup.errors import LockError
from drove.backup.filetarget import FileTarget
from drove.backup.locks import Lock, exclusive_lock, hold_async, shared_lock

STALE = 2.0
"""stale_after for the timing tests: refresh every 0.4 s, give up after 1.4 s."""


@pytest.fixture
def target(tmp_path):
    """A file target."""
    return FileTarget(tmp_path)


@pytest.fixture(params=["file", "moto", pytest.param("radosgw", marks=pytest.mark.slow)])
def any_target(request, tmp_path):
    """An empty target of each kind: a directory, moto, and real S3 (Ceph radosgw)."""
    t = make_target(request.param, request, tmp_path)
    yield t
    t.close()


def lock_files(target) -> list[str]:
    """Lock keys on the target."""
    return sorted(target.list("locks/"))


def plant(target, kind: str, owner: str, age: float = 0, name: str = "planted") -> str:
    """Write another holder's lock file, refreshed ``age`` seconds ago."""
    key = f"locks/{name}.json"
    target.put(key, json.dumps({"kind": kind, "owner": owner, "created": "2024-01-01T00:00:00",
                                "refreshed": time.time() - age}).encode())
    return key


def refreshed(target, key: str) -> float:
    """The ``refreshed`` time in a lock file."""
    return json.loads(target.get(key))["refreshed"]


def record_loss(lock: Lock) -> tuple[threading.Event, list[tuple[float, str]]]:
    """An event set when ``lock`` is lost, and [(wall time, reason)] of the loss."""
    lost = threading.Event()
    seen: list[tuple[float, str]] = []

    def note(reason: str) -> None:
        seen.append((time.time(), reason))
        lost.set()

    lock.on_lost(note)
    return lost, seen


# -- sharing and exclusion -------------------------------------------------------------


def test_shared_locks_coexist_and_release(target):
    with shared_lock(target, "a") as one, shared_lock(target, "b", wait=0) as two:
        assert lock_files(target) == sorted([one.key, two.key])
        doc = json.loads(target.get(one.key))
        assert doc["kind"] == "shared" and doc["owner"] == "a"
        one.check()
    assert lock_files(target) == []


def test_exclusive_excludes_and_names_the_holder(target):
    messages = []
    with (shared_lock(target, "backup-x on host1"),
          pytest.raises(LockError, match="locked by shared lock of backup-x on host1 since"),
          exclusive_lock(target, "gc", wait=0.3, on_wait=messages.append, poll=0.05)):
        pass
    assert messages and messages[0].startswith("waiting: backup store is locked by shared")
    assert len(messages) == 1  # told once per distinct situation, not per retry
    assert lock_files(target) == []
    with (exclusive_lock(target, "gc", wait=0),
          pytest.raises(LockError, match="exclusive lock of gc"),
          shared_lock(target, "backup", wait=0.2, poll=0.05)):
        pass


def test_waiter_gets_the_lock_when_released(target):
    holder = Lock(target, "exclusive", "first")
    holder.acquire(wait=0)
    waits = []

    def waiting(message: str) -> None:
        waits.append(message)
        threading.Thread(target=holder.release).start()  # let the waiter in

    with shared_lock(target, "second", wait=30, poll=0.05, on_wait=waiting) as lock:
        lock.check()
    assert waits == [f"waiting: backup store is locked by exclusive lock of first since "
                     f"{holder.created}"]


def test_stale_locks_are_ignored_and_removed_by_exclusive(target):
    stale = plant(target, "exclusive", "dead@host pid 1 (delete y)", age=1000)
    with shared_lock(target, "backup", wait=0, stale_after=300):
        assert target.exists(stale)  # a shared acquirer ignores it but leaves it
    with exclusive_lock(target, "gc", wait=0, stale_after=300):
        assert not target.exists(stale)


def test_unreadable_lock_file_blocks_with_advice(target):
    target.put("locks/junk.json", b"not json")
    with (pytest.raises(LockError, match=r"unreadable lock file locks/junk\.json"),
          shared_lock(target, "x", wait=0)):
        pass


def test_margin_follows_restic(target):
    lock = Lock(target, "shared", "x", stale_after=300)
    assert lock.refresh_interval == 60 and lock.give_up_after == 300 - 1.5 * 60


# -- refresh: atomic, and given up in time ---------------------------------------------


def test_replace_never_creates_and_follows_versions(any_target):
    t = any_target
    assert t.replace("locks/none.json", b"x") is None
    assert not t.exists("locks/none.json")
    t.put("locks/a.json", b"one")
    v1 = t.replace("locks/a.json", b"two")
    assert v1 is not None and t.get("locks/a.json") == b"two"
    v2 = t.replace("locks/a.json", b"three", v1)
    assert v2 is not None and t.get("locks/a.json") == b"three"
    if not isinstance(t, FileTarget):  # S3 checks the ETag: someone else's write wins
        t.put("locks/a.json", b"theirs")
        assert t.replace("locks/a.json", b"mine", v2) is None
        assert t.get("locks/a.json") == b"theirs"
    t.delete("locks/a.json")
    assert t.replace("locks/a.json", b"again", v2) is None
    assert t.replace("locks/a.json", b"again") is None
    assert not t.exists("locks/a.json") and list(t.list("locks/")) == []


def test_file_replace_without_rename_exchange(tmp_path):
    t = FileTarget(tmp_path)
    t.exchange = False  # as on NFS, which refuses RENAME_EXCHANGE
    assert t.replace("locks/none.json", b"x") is None and not t.exists("locks/none.json")
    t.put("locks/a.json", b"one")
    assert t.replace("locks/a.json", b"two") == "" and t.get("locks/a.json") == b"two"
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["a.json"]


def test_lock_is_refreshed(any_target):
    ft = FaultyTarget(any_target)
    with shared_lock(ft, "b", stale_after=STALE) as lock:
        first = refreshed(any_target, lock.key)
        wait_for(lambda: ft.count("replace", lock.key) >= 2, what="two refreshes")
        assert refreshed(any_target, lock.key) > first
        lock.check()
        assert lock.lost is None
    assert lock_files(any_target) == []


def test_failing_refreshes_give_up_before_the_lock_can_be_called_stale(any_target):
    ft = FaultyTarget(any_target)
    with shared_lock(ft, "b", stale_after=STALE) as lock:
        lost, seen = record_loss(lock)
        ft.fail("replace", "locks/", times=10**6, message="injected outage")
        assert lost.wait(30)
        # What others see: the last refresh that made it to the target.
        last_ok = refreshed(any_target, lock.key)
        gave_up_at, reason = seen[0]
        assert lock.give_up_after - 0.1 <= gave_up_at - last_ok < STALE
        assert "could not keep it fresh" in reason and "injected outage" in reason
        assert ft.count("replace", lock.key, "TargetError") >= 2  # it kept trying
        with pytest.raises(LockError, match=r"lost the shared lock .* could not keep it fresh"):
            lock.check()
        ft.heal()
    assert lock_files(any_target) == []


def test_refresh_held_past_the_margin_gives_up(any_target):
    ft = FaultyTarget(any_target)
    with shared_lock(ft, "b", stale_after=STALE) as lock:
        lost, seen = record_loss(lock)
        gate = ft.gate("replace", "locks/")
        gate.wait_entered()  # a refresh is on its way and does not come back
        assert lost.wait(30)
        assert seen[0][0] - refreshed(any_target, lock.key) < STALE
        assert "could not keep it fresh: no refresh succeeded" in seen[0][1]
        gate.open()
        assert gate.left.wait(30)
        # It landed after the deadline: too late to count, the lock stays lost.
        assert ft.calls[-1][:2] == ("replace", lock.key)
        assert ft.calls[-1][2] not in ("None", "TargetError")
        with pytest.raises(LockError, match="could not keep it fresh"):
            lock.check()
    assert lock_files(any_target) == []


def test_refresh_held_until_after_release_leaves_no_lock_file(any_target):
    ft = FaultyTarget(any_target)
    with shared_lock(ft, "b", stale_after=STALE):
        gate = ft.gate("replace", "locks/")
        gate.wait_entered()
    gate.open()  # the refresh lands after release deleted the file
    assert gate.left.wait(30)
    assert lock_files(any_target) == []
    assert ft.calls[-1][0] == "replace" and ft.calls[-1][2] == "None"


def test_lock_removed_as_stale_is_noticed_and_not_recreated(any_target):
    ft = FaultyTarget(any_target)
    with shared_lock(ft, "backup", stale_after=STALE) as lock:
        lost, seen = record_loss(lock)
        # Another manager sees our lock as stale (as if we had stalled for long), removes
        # it and takes the exclusive lock.
        doc = json.loads(any_target.get(lock.key))
        any_target.put(lock.key, json.dumps({**doc, "refreshed": time.time() - 1000}).encode())
        with exclusive_lock(any_target, "gc elsewhere", wait=0) as gc:
            assert lock_files(any_target) == [gc.key]
            assert lost.wait(30)
            assert "lock file was removed" in seen[0][1]
            with pytest.raises(LockError, match="lock file was removed"):
                lock.check()
            assert lock_files(any_target) == [gc.key]  # never brought back
            gc.check()
    assert lock_files(any_target) == []


def test_check_fails_when_the_lock_file_is_gone(target):
    with shared_lock(target, "b") as lock:
        lock.check()
        target.delete(lock.key)
        with pytest.raises(LockError, match="lock file was removed"):
            lock.check()
        assert "lock file was removed" in lock.lost


# -- the async guard: the work under a lost lock stops ---------------------------------


def test_lost_lock_cancels_the_body_with_lock_error(tmp_path):
    inner = FileTarget(tmp_path)
    ft = FaultyTarget(inner)
    unwound = []

    async def main():
        with pytest.raises(LockError, match="could not keep it fresh") as info:
            async with hold_async(ft, "shared", "backup x", stale_after=STALE) as lock:
                ft.fail("replace", "locks/", times=10**6)
                try:
                    await asyncio.Event().wait()  # work that never ends by itself
                finally:
                    unwound.append(lock.lost)
        task = asyncio.current_task()
        assert task.cancelling() == 0  # our cancel was taken back
        await asyncio.sleep(0)  # and nothing is pending on this task
        return info.value

    error = asyncio.run(main())
    assert unwound and "could not keep it fresh" in unwound[0]
    assert "lost the shared lock" in str(error) and "backup x" in str(error)
    assert lock_files(inner) == []


def test_outside_cancellation_stays_a_cancellation(target):
    async def main():
        entered = asyncio.Event()

        async def body():
            async with hold_async(target, "shared", "me", stale_after=STALE):
                entered.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(body())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lock_files(target) == []

    asyncio.run(main())


def test_async_lock_released_on_cancel(target):
    async def main():
        plant(target, "exclusive", "someone", name="other")
        waits = []
        task = asyncio.create_task(_hold(target, waits))
        await asyncio.to_thread(wait_for, lambda: waits, 30, "a wait message")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # An attempt cancelled mid-flight is undone by its thread.
        await asyncio.to_thread(wait_for, lambda: lock_files(target) == ["locks/other.json"],
                                30, "the cancelled attempt's lock file to go")

    asyncio.run(main())


async def _hold(target, waits):
    async with hold_async(target, "shared", "me", wait=30, on_wait=waits.append, poll=0.05):
        raise AssertionError("must not get the lock")
