"""Backup, restore, verify and delete snapshots on a target (see ``manifest`` for layout).

Target I/O, hashing and compression run in a thread pool (hashlib and zstd release the
GIL; boto3 blocks); reading the source and writing the sink are awaited on the event
loop, so the caller's NBD client keeps working concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from drove.backup import manifest as mf
from drove.backup.blocks import BLOCK_SIZE, CODECS, block_key, data_runs, decode, digest, encode
from drove.backup.blocks import is_zero as _is_zero
from drove.backup.errors import (
    BackupError,
    CorruptBlockError,
    MissingBlockError,
    NotFoundError,
)
from drove.backup.locks import EXCLUSIVE, SHARED, Lock, OnWait, default_owner, hold_async
from drove.backup.pipeline import bounded
from drove.backup.target import Target

R = TypeVar("R")
log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done, total)`` in bytes; called often, so it must be cheap."""

TEMP_FILE_AGE = 3600
"""Seconds after which a leftover temp file of an interrupted put is garbage."""

_DELETE_CHUNK = 1000


class Source(Protocol):
    """The snapshot being backed up (provided by the caller)."""

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Exactly ``length`` bytes at ``offset``."""
        ...


class Sink(Protocol):
    """The new volume a backup is restored into; it must read as zeros initially.

    ``write`` may be called concurrently (up to ``parallel`` writes in flight).
    """

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``."""
        ...

    async def flush(self) -> None:
        """Make every write durable."""
        ...


@dataclass
class _Stats:
    """Counters of one backup, updated on the event loop only (no locking needed)."""

    bytes_read: int = 0
    bytes_new: int = 0
    bytes_stored: int = 0
    bytes_reused: int = 0
    blocks_new: int = 0
    blocks_reused: int = 0

    def reused(self, length: int) -> None:
        """Count a block that was already on the target."""
        self.bytes_reused += length
        self.blocks_reused += 1


class BackupStore:
    """Backups of volume snapshots on one ``Target``; use as a (async) context manager.

    The store does not own the target: closing the store leaves the target open.
    """

    def __init__(self, target: Target, *, parallel: int = 4, owner: str = "drove",
                 lock_wait: float = 600, stale_after: float = 300, lock_poll: float = 2.0):
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.target = target
        self.parallel = parallel
        self.owner = owner
        self.lock_wait = lock_wait
        self.stale_after = stale_after
        self.lock_poll = lock_poll
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="backup")

    def close(self) -> None:
        """Shut the thread pool down (the target stays open)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackupStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> BackupStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------

    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        """``fn(*args)`` in the store's thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def _lock(self, kind: str, purpose: str, on_wait: OnWait | None):
        """Async context manager holding a store lock of ``kind`` for ``purpose``."""
        return hold_async(self.target, kind, default_owner(purpose, self.owner),
                          wait=self.lock_wait, stale_after=self.stale_after, on_wait=on_wait,
                          poll=self.lock_poll)

    async def _load(self, key: str, what: str = "manifest") -> dict[str, Any]:
        """The JSON document at ``key``."""
        return await self._run(mf.load, self.target, key, what)

    async def _put_json(self, key: str, doc: dict[str, Any]) -> None:
        """Store ``doc`` as JSON at ``key``."""
        await self._run(self.target.put, key, mf.dump(doc))

    async def _manifests(self, prefix: str) -> list[dict[str, Any]]:
        """Every manifest under ``prefix`` (read in parallel)."""
        keys = await self._run(
            lambda: [k for k in self.target.list(prefix) if mf.parse_manifest_key(k)])
        docs: list[dict[str, Any]] = []

        async def load(key: str) -> None:
            with contextlib.suppress(NotFoundError):  # deleted since listed
                docs.append(await self._load(key))

        await bounded(keys, load, self.parallel)
        return docs

    # -- queries -----------------------------------------------------------------------

    async def manifest(self, name: str) -> dict[str, Any]:
        """Backup ``name``'s manifest, block map included (NotFoundError if absent)."""
        mf.check_name("backup", name)
        key = await self._run(mf.find, self.target, name)
        return await self._load(key)

    async def info(self, name: str) -> dict[str, Any]:
        """Backup ``name``'s manifest without the block map."""
        return mf.summary(await self.manifest(name))

    async def list(self, volume: str | None = None) -> list[dict[str, Any]]:
        """Manifests (without block maps) of every backup, or of ``volume``'s; newest first."""
        if volume is not None:
            mf.check_name("volume", volume)
        prefix = f"{mf.VOLUMES}{volume}/backups/" if volume else mf.VOLUMES
        docs = [mf.summary(d) for d in await self._manifests(prefix)]
        docs.sort(key=lambda d: (str(d.get("created", "")), str(d.get("name", ""))),
                  reverse=True)
        return docs

    async def volume_config(self, volume: str) -> dict[str, Any] | None:
        """``volume``'s volume.cfg (last backup and snapshot), None if it has none."""
        mf.check_name("volume", volume)
        try:
            return await self._load(mf.volume_key(volume), "volume config")
        except NotFoundError:
            return None

    # -- create ------------------------------------------------------------------------

    async def create(self, source: Source, *, volume: str, size: int, snapshot: str,
                     snapshot_id: str = "", ranges: list[tuple[int, int]],
                     base: str | None = None, labels: dict[str, str] | None = None,
                     compression: str = "zstd", name: str | None = None,
                     progress: Progress | None = None,
                     on_wait: OnWait | None = None,
                     replicas: int | None = None) -> dict[str, Any]:
        """Back up the blocks of ``source`` overlapping ``ranges``; the rest comes from
        ``base`` (incremental) or is a hole (full).  Returns the manifest without blocks.

        ``replicas``: the volume's replica count, recorded for restores to default to.
        """
        mf.check_name("volume", volume)
        name = mf.check_name("backup", name) if name is not None else mf.new_backup_name()
        if base is not None:
            mf.check_name("backup", base)
        if compression not in CODECS:
            raise ValueError(f"unknown compression {compression!r} "
                             f"(use one of {', '.join(CODECS)})")
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"bad volume size {size!r}")
        labels = dict(labels or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError("labels must map strings to strings")
        to_read = _blocks_overlapping(ranges, size)

        async with self._lock(SHARED, f"backup {name} of {volume}", on_wait) as lock:
            try:
                existing = await self._run(mf.find, self.target, name)
            except NotFoundError:
                pass
            else:
                raise BackupError(f"backup {name!r} already exists ({existing})")
            blocks: dict[int, str] = {}
            if base is not None:
                blocks = await self._base_blocks(base, volume, size, to_read)
            for offset in to_read:
                blocks.pop(offset, None)
            stats = _Stats()
            for offset in blocks:  # carried over from the base
                stats.reused(mf.block_length(offset, size))
            await self._backup_blocks(source, to_read, size, compression, blocks, stats,
                                      progress)
            doc = {
                "format": mf.FORMAT, "name": name, "volume": volume, "snapshot": snapshot,
                "snapshot_id": snapshot_id, "size": size, "block_size": BLOCK_SIZE,
                "created": mf.now_iso(), "labels": labels, "compression": compression,
                "parent": base, **asdict(stats),
                **({"replicas": replicas} if replicas is not None else {}),
                "data_size": sum(mf.block_length(o, size) for o in blocks),
                "blocks": {str(o): blocks[o] for o in sorted(blocks)},
            }
            # Blocks must be durable before a manifest can point at them, and the lock
            # still ours: had we stalled past the stale time, a gc may have removed some.
            await self._run(self.target.sync)
            await self._run(lock.check)
            await self._publish(doc, {
                "name": volume, "size": size, "last_backup": name, "last_snapshot": snapshot,
                "last_snapshot_id": snapshot_id, "updated": doc["created"]}, lock)
        return mf.summary(doc)

    async def _publish(self, doc: dict[str, Any], cfg: dict[str, Any], lock: Lock) -> None:
        """Put the manifest and volume.cfg, then check ``lock`` again; all or nothing.

        The check after the manifest is visible closes the last gap: a gc that removed our
        lock as stale and listed the manifests before ours appeared may have deleted
        blocks it names.  Our lock file still being there (refreshes never recreate it)
        proves no gc has started since it; otherwise the backup fails and its manifest
        and volume.cfg are taken back, so it is never trusted.  The same happens when the
        publication fails or is cancelled (the lock's watchdog cancels it too).
        """
        volume, name = doc["volume"], doc["name"]
        try:
            previous = await self.volume_config(volume)
        except BackupError:
            previous = None

        async def publish() -> None:
            await self._put_json(mf.manifest_key(volume, name), doc)
            await self._put_json(mf.volume_key(volume), cfg)
            await self._run(self.target.sync)
            await self._run(lock.check)

        async def unpublish() -> None:
            await self._run(self.target.delete, mf.manifest_key(volume, name))
            if previous is None:
                await self._run(self.target.delete, mf.volume_key(volume))
            else:
                await self._put_json(mf.volume_key(volume), previous)
            await self._run(self.target.sync)

        task = asyncio.ensure_future(publish())
        try:
            await asyncio.shield(task)
        except BaseException:
            # A put already sent may still land: wait for the puts to end, then take the
            # manifest back, so that a failed or cancelled backup never leaves one behind.
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # seen (we were cancelled meanwhile): no "never retrieved"
            undo = asyncio.ensure_future(unpublish())
            await asyncio.wait([undo])
            if not undo.cancelled() and undo.exception() is not None:
                # Left behind, it may name blocks a gc removed: say so loudly.
                log.error("cannot remove the manifest of failed backup %s (%s): %s; verify "
                          "it or delete it", name, mf.manifest_key(volume, name),
                          undo.exception())
            raise

    async def _base_blocks(self, base: str, volume: str, size: int,
                           to_read: list[int]) -> dict[int, str]:
        """The base's block map, clipped to ``size``; may add a block to ``to_read``."""
        key = await self._run(mf.find, self.target, base)
        doc = await self._load(key)
        blocks = mf.check_manifest(doc, key)
        if doc.get("volume") != volume:
            raise ValueError(f"base backup {base!r} is of volume {doc.get('volume')!r}, "
                             f"not {volume!r}")
        old_size = doc["size"]
        edge = min(old_size, size)
        if old_size != size and edge % BLOCK_SIZE:
            # The volume was resized: the block at the old end changes length, so the
            # base's entry for it cannot be carried over: read it afresh.
            offset = edge - edge % BLOCK_SIZE
            if offset not in to_read:
                to_read.append(offset)
                to_read.sort()
        return {o: h for o, h in blocks.items() if o < size}

    async def _backup_blocks(self, source: Source, offsets: list[int], size: int, codec: str,
                             blocks: dict[int, str], stats: _Stats,
                             progress: Progress | None) -> None:
        """Read, hash and upload the blocks at ``offsets``, filling ``blocks`` and ``stats``."""
        loop = asyncio.get_running_loop()
        total = sum(mf.block_length(o, size) for o in offsets)
        done = 0
        # One upload per distinct content: later blocks with the same hash wait for it.
        claimed: dict[str, asyncio.Future[None]] = {}

        async def one(offset: int) -> None:
            nonlocal done
            length = mf.block_length(offset, size)
            data = await source.read(offset, length)
            if len(data) != length:
                raise BackupError(f"source returned {len(data)} bytes at offset {offset}, "
                                  f"expected {length}")
            stats.bytes_read += length
            h = await self._run(_hash_unless_zero, data)
            if h is not None:
                blocks[offset] = h
                if h in claimed:
                    await asyncio.shield(claimed[h])  # shield: our cancel must not kill it
                    stats.reused(length)
                else:
                    claimed[h] = fut = loop.create_future()
                    try:
                        stored = await self._run(self._upload, h, data, codec)
                    except BaseException as e:
                        _fail(fut, e)
                        raise
                    fut.set_result(None)
                    if stored is None:
                        stats.reused(length)
                    else:
                        stats.bytes_new += length
                        stats.bytes_stored += stored
                        stats.blocks_new += 1
            done += length
            if progress is not None:
                progress(done, total)

        await bounded(offsets, one, self.parallel)

    def _upload(self, h: str, data: bytes, codec: str) -> int | None:
        """Put block ``h`` unless the target has it; stored bytes, None if it was there."""
        key = block_key(h)
        if self.target.exists(key):
            return None
        stored = encode(data, codec)
        self.target.put(key, stored)
        return len(stored)

    # -- restore and verify ------------------------------------------------------------

    def _fetch(self, h: str, offset: int, length: int) -> bytes:
        """Block ``h`` (at ``offset``) from the target, decoded and checked."""
        try:
            stored = self.target.get(block_key(h))
        except NotFoundError:
            raise MissingBlockError(h, offset) from None
        data = decode(stored, h, offset)
        if len(data) != length:
            raise CorruptBlockError(h, offset, f"holds {len(data)} bytes where the manifest "
                                    f"expects {length}")
        return data

    def _fetch_runs(self, h: str, offset: int,
                    length: int) -> tuple[bytes, list[tuple[int, int]]]:
        """``_fetch`` plus the block's non-zero runs, computed in the worker thread."""
        data = self._fetch(h, offset, length)
        return data, data_runs(data)

    def reading(self, purpose: str, on_wait: OnWait | None = None):
        """Async context manager holding a shared store lock for ``purpose``: while it is
        held no delete or gc removes a block (what a reader of blocks outside
        :meth:`restore` holds, e.g. a DR standby's incremental restore)."""
        return self._lock(SHARED, purpose, on_wait)

    async def fetch_block(self, h: str, offset: int, length: int) -> bytes:
        """Block ``h`` (at ``offset``, ``length`` bytes), decoded and checked against its
        hash (MissingBlockError, CorruptBlockError); hold :meth:`reading` around it."""
        return await self._run(self._fetch, h, offset, length)

    async def restore(self, name: str, sink: Sink, *, progress: Progress | None = None,
                      on_wait: OnWait | None = None) -> dict[str, Any]:
        """Write backup ``name`` into ``sink`` (holes stay unwritten), then flush it."""
        mf.check_name("backup", name)
        async with self._lock(SHARED, f"restore {name}", on_wait):
            key = await self._run(mf.find, self.target, name)
            doc = await self._load(key)
            blocks = mf.check_manifest(doc, key)
            size = doc["size"]
            total = sum(mf.block_length(o, size) for o in blocks)
            done = written = 0

            async def one(item: tuple[int, str]) -> None:
                nonlocal done, written
                offset, h = item
                length = mf.block_length(offset, size)
                data, runs = await self._run(self._fetch_runs, h, offset, length)
                view = memoryview(data)
                for start, n in runs:
                    await sink.write(offset + start, view[start:start + n])
                    written += n
                done += length
                if progress is not None:
                    progress(done, total)

            await bounded(sorted(blocks.items()), one, self.parallel)
            await sink.flush()
        return {"bytes_written": written, "blocks": len(blocks), "size": size}

    async def verify(self, name: str, *, progress: Progress | None = None,
                     on_wait: OnWait | None = None) -> dict[str, Any]:
        """Fetch and check every block of backup ``name``; report every problem found."""
        mf.check_name("backup", name)
        errors: list[dict[str, Any]] = []
        async with self._lock(SHARED, f"verify {name}", on_wait):
            key = await self._run(mf.find, self.target, name)
            try:
                doc = await self._load(key)
                blocks = mf.check_manifest(doc, key)
            except NotFoundError:
                raise
            except BackupError as e:
                return {"name": name, "blocks": 0, "bytes": 0,
                        "errors": [{"offset": None, "hash": None, "error": str(e)}]}
            size = doc["size"]
            by_hash: dict[str, list[int]] = {}
            for offset, h in sorted(blocks.items()):
                by_hash.setdefault(h, []).append(offset)
            total = sum(mf.block_length(o, size) for o in blocks)
            done = 0

            async def one(item: tuple[str, list[int]]) -> None:
                nonlocal done
                h, offsets = item
                length = mf.block_length(offsets[0], size)
                try:
                    # A block used at several offsets is fetched once, reported at each.
                    await self._run(self._fetch, h, offsets[0], length)
                except CorruptBlockError as e:
                    for offset in offsets:
                        err = _at(e, offset)
                        errors.append({"offset": offset, "hash": h, "error": str(err)})
                done += sum(mf.block_length(o, size) for o in offsets)
                if progress is not None:
                    progress(done, total)

            await bounded(by_hash.items(), one, self.parallel)
        errors.sort(key=lambda e: e["offset"])
        return {"name": name, "blocks": len(blocks), "bytes": total, "errors": errors}

    # -- delete and gc -----------------------------------------------------------------

    async def delete(self, name: str, *, progress: Progress | None = None,
                     on_wait: OnWait | None = None) -> dict[str, Any]:
        """Delete backup ``name`` and every block no other backup references.

        Waits (telling ``on_wait`` why) while backups run: they may reference blocks
        that only this backup's manifest names.
        """
        mf.check_name("backup", name)
        async with self._lock(EXCLUSIVE, f"delete {name}", on_wait) as lock:
            key = await self._run(mf.find, self.target, name)
            volume, _ = mf.parse_manifest_key(key) or ("", "")
            await self._run(self.target.delete, key)
            # The manifest must be gone for good before any of its blocks is.
            await self._run(self.target.sync)
            await self._repoint_volume(volume, name)
            stats = await self._gc_locked(lock, progress)
        return {"name": name, "blocks_removed": stats["blocks_removed"],
                "bytes_removed": stats["bytes_removed"]}

    async def _repoint_volume(self, volume: str, deleted: str) -> None:
        """If volume.cfg names ``deleted``, point it at the newest remaining backup."""
        try:
            cfg = await self.volume_config(volume)
        except BackupError:
            cfg = None  # unreadable: rewrite it from the remaining backups
        else:
            if cfg is None or cfg.get("last_backup") != deleted:
                return
        remaining = await self.list(volume)
        if not remaining:
            await self._run(self.target.delete, mf.volume_key(volume))
            return
        newest = remaining[0]
        await self._put_json(mf.volume_key(volume), {
            "name": volume, "size": newest.get("size"), "last_backup": newest.get("name"),
            "last_snapshot": newest.get("snapshot"),
            "last_snapshot_id": newest.get("snapshot_id", ""), "updated": mf.now_iso()})

    async def gc(self, *, on_wait: OnWait | None = None) -> dict[str, Any]:
        """Delete every block no manifest references (under the exclusive lock)."""
        async with self._lock(EXCLUSIVE, "gc", on_wait) as lock:
            return await self._gc_locked(lock, None)

    async def _gc_locked(self, lock: Lock, progress: Progress | None) -> dict[str, Any]:
        """gc proper, under ``lock`` (exclusive).

        The lock is checked before each batch of deletions: had this process stalled past
        the stale time, a backup may have started since and be reusing these blocks.
        """
        keys = await self._run(
            lambda: [k for k in self.target.list(mf.VOLUMES) if mf.parse_manifest_key(k)])
        referenced: set[str] = set()

        async def load(key: str) -> None:
            # Any unreadable manifest stops the gc (the error propagates): its blocks are
            # unknown, and deleting one would destroy a backup.
            doc = await self._load(key)
            referenced.update(mf.check_manifest(doc, key).values())

        await bounded(keys, load, self.parallel)

        def unreferenced() -> list[tuple[str, int]]:
            return [(k, n) for k, n in self.target.list_sizes(mf.BLOCKS)
                    if (h := mf.block_hash(k)) is not None and h not in referenced]

        doomed = await self._run(unreferenced)
        total = sum(n for _, n in doomed)
        removed = 0

        async def delete_chunk(chunk: list[tuple[str, int]]) -> None:
            nonlocal removed
            await self._run(lock.check)
            await self._run(self.target.delete_many, [k for k, _ in chunk])
            removed += sum(n for _, n in chunk)
            if progress is not None:
                progress(removed, total)

        chunks = [doomed[i:i + _DELETE_CHUNK] for i in range(0, len(doomed), _DELETE_CHUNK)]
        await bounded(chunks, delete_chunk, self.parallel)
        temp = await self._run(lambda: list(self.target.stale_temp_files(TEMP_FILE_AGE)))
        if temp:
            await self._run(self.target.delete_many, temp)
        await self._run(self.target.sync)
        return {"manifests": len(keys), "blocks_kept": len(referenced),
                "blocks_removed": len(doomed), "bytes_removed": total,
                "temp_files_removed": len(temp)}


def _blocks_overlapping(ranges: list[tuple[int, int]], size: int) -> list[int]:
    """Sorted offsets of the blocks that overlap any ``(start, length)`` range."""
    offsets: set[int] = set()
    for start, length in ranges:
        if start < 0 or length < 0 or start + length > size:
            raise ValueError(f"range ({start}, {length}) is outside the {size} byte volume")
        if length:
            offsets.update(range(start - start % BLOCK_SIZE, start + length, BLOCK_SIZE))
    return sorted(offsets)


def _hash_unless_zero(data: bytes | bytearray | memoryview) -> str | None:
    """The block's hash, None when it is all zero (a hole)."""
    return None if _is_zero(data) else digest(data)


def _fail(fut: asyncio.Future[None], error: BaseException) -> None:
    """Pass a failed upload on to the blocks waiting for it."""
    if isinstance(error, asyncio.CancelledError):
        fut.cancel()
    else:
        fut.set_exception(error)
        fut.exception()  # mark retrieved: waiters may be gone already


def _at(error: CorruptBlockError, offset: int) -> CorruptBlockError:
    """``error`` restated for another offset holding the same block."""
    if isinstance(error, MissingBlockError):
        return MissingBlockError(error.hash, offset)
    return CorruptBlockError(error.hash, offset, error.reason)

