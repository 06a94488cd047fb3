"""Lock files on a backup target."""

import asyncio
import json
import threading
import time

import pytest

from drove.backup.errors import LockError, TargetError
from drove.backup.filetarget import FileTarget
from drove.backup.locks import Lock, exclusive_lock, hold_async, shared_lock


@pytest.fixture
def target(tmp_path):
    """A file target."""
    return FileTarget(tmp_path)


def lock_files(target) -> list[str]:
    """Lock keys on the target."""
    return sorted(target.list("locks/"))


def plant(target, kind: str, owner: str, age: float = 0, name: str = "planted") -> str:
    """Write another holder's lock file, refreshed ``age`` seconds ago."""
    key = f"locks/{name}.json"
    target.put(key, json.dumps({"kind": kind, "owner": owner, "created": "2024-01-01T00:00:00",
                                "refreshed": time.time() - age}).encode())
    return key


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
    threading.Timer(0.3, holder.release).start()
    start = time.monotonic()
    with shared_lock(target, "second", wait=5, poll=0.05):
        assert time.monotonic() - start >= 0.25


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


def test_check_fails_when_the_lock_file_is_gone(target):
    with shared_lock(target, "b") as lock:
        lock.check()
        target.delete(lock.key)
        with pytest.raises(LockError, match="lock file was removed"):
            lock.check()


def test_lock_is_refreshed(target):
    with shared_lock(target, "b", stale_after=0.5) as lock:
        first = json.loads(target.get(lock.key))["refreshed"]
        time.sleep(0.35)
        assert json.loads(target.get(lock.key))["refreshed"] > first
        lock.check()


class FlakyTarget(FileTarget):
    """A file target whose puts can be made to fail."""

    failing = False

    def put(self, key, data):
        if self.failing:
            raise TargetError("simulated outage")
        super().put(key, data)


def test_check_fails_after_refreshes_fail_for_the_stale_time(tmp_path):
    target = FlakyTarget(tmp_path)
    with shared_lock(target, "b", stale_after=0.4) as lock:
        target.failing = True
        time.sleep(0.6)
        with pytest.raises(LockError, match="lost the shared lock"):
            lock.check()
        target.failing = False
    assert lock_files(target) == []


def test_refresh_does_not_resurrect_a_removed_lock(target):
    with shared_lock(target, "b", stale_after=0.3) as lock:
        target.delete(lock.key)
        time.sleep(0.2)
        assert not target.exists(lock.key)
        with pytest.raises(LockError):
            lock.check()


def test_async_lock_released_on_cancel(target):
    async def main():
        plant(target, "exclusive", "someone", name="other")
        waits = []
        task = asyncio.create_task(_hold(target, waits))
        await asyncio.sleep(0.2)
        assert waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)  # an attempt cancelled mid-flight is undone by its thread
        assert lock_files(target) == ["locks/other.json"]

    asyncio.run(main())


async def _hold(target, waits):
    async with hold_async(target, "shared", "me", wait=30, on_wait=waits.append, poll=0.05):
        raise AssertionError("must not get the lock")
