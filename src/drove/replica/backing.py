"""An instant restore's bottom layer: a backup fetched into a snapshot layer as it is read.

A replica restored instantly has a chain whose bottom layer (the *backing* layer, a
named snapshot the size of the backup) starts empty.  Beside it, two files say where
its data really is::

    backing.json      (0600) the backup: target config, name, block map, the layer
    backing.filled    one bit per 2 MiB block: fetched into the layer and durable

Until a block is filled the read index treats every block the backup holds as data
of the backing layer (:meth:`Backing.extents`), so zero/trim/block status and
read-modify-write behave as if the data were there.  Whatever reads such a block
first fetches it (:meth:`Backing.ensure` on the event loop, :meth:`Backing.fill_now`
from synchronous code): the stored block is checked against its hash, its data runs
are written into the layer file, and only then the block counts as filled.  Writes
land in the head above, so a fetch can never overwrite them.  The bitmap is
persisted after the layer is fdatasync'ed: a crash in between fetches a block
again, which writes the same bytes.

A block that is missing or corrupt on the target, or a target that does not
answer, fails the reads of that block with :class:`BackingUnavailableError` (EIO
whose message starts with :data:`UNAVAILABLE`, so an engine can tell it from a
broken replica) and nothing else.

The fill (:meth:`Backing.run_fill`) fetches every other block in the background,
retrying failures; once all are filled the replica drops these files and the
layer is an ordinary snapshot (:meth:`drove.replica.chain.Replica.finish_backing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drove.backup import manifest as mf
from drove.backup import open_target
from drove.backup.blocks import BLOCK_SIZE, block_key, data_runs, decode
from drove.backup.errors import BackupError, CorruptBlockError, MissingBlockError, NotFoundError
from drove.backup.target import Target
from drove.replica import meta
from drove.replica.errors import ReplicaError

log = logging.getLogger(__name__)

BACKING_FILE = "backing.json"
FILLED_FILE = "backing.filled"
FORMAT = 1
UNAVAILABLE = "backup data unavailable"
"""How the message of a read failing for want of backup data starts (see module doc)."""

BLOCKS_PER_CHUNK = BLOCK_SIZE // meta.BLOCK
"""4 KiB blocks per 2 MiB backup block."""

FETCH_THREADS = 4
FILL_PARALLEL = 6
"""Blocks the fill keeps in flight."""
PERSIST_EVERY = 1.0
"""Seconds between two persists of the bitmap during the fill."""
READ_DEADLINE = 5.0
"""Seconds a read waits for the backup before it fails (an engine waits 8 for a replica)."""
RETRY_FIRST, RETRY_MAX = 2.0, 10.0
"""Seconds the fill waits before trying failed blocks again (doubling up to the max)."""

TARGET_KEYS = ("url", "endpoint", "region", "access_key", "secret_key")


class BackingUnavailableError(OSError):
    """A read needs backup data that cannot be had now (missing, corrupt, no answer)."""

    def __init__(self, offset: int, why: str) -> None:
        super().__init__(errno.EIO, f"{UNAVAILABLE} at offset {offset}: {why}")


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (local, or an NBD error carrying the server's message) is a
    :class:`BackingUnavailableError`: every replica would fail the same, none is broken."""
    if isinstance(exc, BackingUnavailableError):
        return True
    text = getattr(exc, "server_message", "") or ""
    return isinstance(exc, OSError) and UNAVAILABLE in text


@dataclass(frozen=True)
class BackingConfig:
    """What backing.json holds."""

    layer: str
    backup: str
    target: dict[str, Any]
    size: int
    blocks: dict[int, str]
    rate: int = 0
    """Bytes per second the background fill fetches at most (0: as fast as it can)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored."""
        return {"format": FORMAT, "layer": self.layer, "backup": self.backup,
                "target": self.target, "size": self.size, "rate": self.rate,
                "blocks": {str(o): h for o, h in sorted(self.blocks.items())}}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> BackingConfig:
        """Parse backing.json; ReplicaError naming ``where`` when it is not ours."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ReplicaError(f"{where}: not a backing file of format {FORMAT}")
        try:
            blocks = {int(o): str(h) for o, h in obj["blocks"].items()}
            target = {k: obj["target"].get(k) for k in TARGET_KEYS}
            return cls(layer=str(obj["layer"]), backup=str(obj["backup"]), target=target,
                       size=int(obj["size"]), blocks=blocks, rate=int(obj.get("rate", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ReplicaError(f"{where}: malformed ({exc!r})") from None


def filling_layer(dirpath: Path) -> tuple[str, str] | None:
    """(layer file, backup) of the replica in ``dirpath`` still being filled, or None.

    For code that works on a replica's files alone (a linked clone must not share a
    layer that is still being written)."""
    try:
        cfg = BackingConfig.from_json(meta.read_json(dirpath / BACKING_FILE), BACKING_FILE)
    except ReplicaError:
        return None if not (dirpath / BACKING_FILE).exists() else ("?", "?")
    return cfg.layer, cfg.backup


def read_manifest(target_cfg: dict[str, Any], backup: str) -> tuple[int, dict[int, str]]:
    """(size, offset → hash) of ``backup`` on the target ``target_cfg`` describes."""
    target = _open(target_cfg)
    try:
        key = mf.find(target, mf.check_name("backup", backup))
        doc = mf.load(target, key)
        return int(doc["size"]), mf.check_manifest(doc, key)
    finally:
        target.close()


def _open(cfg: dict[str, Any]) -> Target:
    return open_target(cfg["url"], endpoint=cfg.get("endpoint"), region=cfg.get("region"),
                       access_key=cfg.get("access_key"), secret_key=cfg.get("secret_key"))


def write_config(dirpath: Path, dirfd: int, cfg: BackingConfig) -> None:
    """Write backing.json (mode 0600: it holds the target's secret) and an empty bitmap."""
    data = json.dumps(cfg.to_json(), separators=(",", ":")).encode()
    _write_atomic(dirpath, dirfd, BACKING_FILE, data, 0o600)
    _write_atomic(dirpath, dirfd, FILLED_FILE, b"", 0o600)


def remove_files(dirpath: Path, dirfd: int) -> None:
    """Drop backing.json and the bitmap (the layer is ordinary from then on), durably."""
    for name in (BACKING_FILE, FILLED_FILE, BACKING_FILE + meta.TMP_SUFFIX,
                 FILLED_FILE + meta.TMP_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            meta.fs.unlink(dirpath / name)
    meta.fs.fsync(dirfd)


def _write_atomic(dirpath: Path, dirfd: int, name: str, data: bytes, mode: int) -> None:
    tmp = dirpath / (name + meta.TMP_SUFFIX)
    fd = meta.fs.open_write(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        meta.write_all(fd, [data], 0)
        meta.fs.fsync(fd)
    finally:
        os.close(fd)
    meta.fs.replace(tmp, dirpath / name)
    meta.fs.fsync(dirfd)


class Backing:
    """The backing layer of one open replica: what is filled, fetching, the fill."""

    def __init__(self, dirpath: Path, dirfd: int, cfg: BackingConfig, filled: bytearray) -> None:
        """Use :meth:`load`."""
        self._dir = dirpath
        self._dirfd = dirfd
        self.cfg = cfg
        self.layer = cfg.layer
        self.nblocks = -(-cfg.size // BLOCK_SIZE)
        self._filled = filled
        self._fd = meta.fs.open_write(dirpath / cfg.layer, os.O_RDWR)
        self.active = True
        self._pending = False  # marks not yet persisted
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self.errors: dict[int, str] = {}
        self._target: Target | None = None
        self._target_lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="backing")
        self._fill_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self.fetched_bytes = 0
        self.started = time.monotonic()

    # ------------------------------------------------------------ open / close

    @classmethod
    def load(cls, dirpath: Path, dirfd: int, layers: Iterable[str]) -> Backing | None:
        """The backing of the replica in ``dirpath`` (None: it has none).

        backing.json naming a layer the replica does not list is the leftover of an
        install that never committed, or of a rebuild that replaced the tree: removed.
        """
        path = dirpath / BACKING_FILE
        if not path.exists():
            return None
        cfg = BackingConfig.from_json(meta.read_json(path), str(path))
        if cfg.layer not in set(layers):
            log.warning("%s: removing %s: layer %s is not in the chain", dirpath, BACKING_FILE,
                        cfg.layer)
            remove_files(dirpath, dirfd)
            return None
        nblocks = -(-cfg.size // BLOCK_SIZE)
        try:
            raw = (dirpath / FILLED_FILE).read_bytes()
        except FileNotFoundError:
            raw = b""
        filled = bytearray(-(-nblocks // 8))
        filled[:len(raw)] = raw[:len(filled)]
        return cls(dirpath, dirfd, cfg, filled)

    def close(self) -> None:
        """Stop fetching (the fill task must have been stopped) and close the layer fd."""
        self.active = False
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._target_lock:
            if self._target is not None:
                with contextlib.suppress(Exception):
                    self._target.close()
                self._target = None
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # ------------------------------------------------------------ state

    def is_filled(self, b: int) -> bool:
        """Whether 2 MiB block ``b`` is in the layer file."""
        return bool(self._filled[b >> 3] & (1 << (b & 7)))

    def _mark(self, b: int) -> None:
        self._filled[b >> 3] |= 1 << (b & 7)
        self._pending = True
        self.errors.pop(b, None)

    def unfilled(self) -> list[int]:
        """2 MiB blocks the backup holds that are not filled yet, in order."""
        return [o // BLOCK_SIZE for o in sorted(self.cfg.blocks)
                if not self.is_filled(o // BLOCK_SIZE)]

    @property
    def done(self) -> bool:
        """Whether every block of the backup is filled."""
        return all(self.is_filled(o // BLOCK_SIZE) for o in self.cfg.blocks)

    def extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """4 KiB-block ranges of [start, end) the backup holds (filled or not), merged."""
        last = self.cfg.size // meta.BLOCK
        out: list[tuple[int, int]] = []
        b0, b1 = start // BLOCKS_PER_CHUNK, -(-end // BLOCKS_PER_CHUNK)
        for b in range(b0, min(b1, self.nblocks)):
            if b * BLOCK_SIZE not in self.cfg.blocks:
                continue
            s = max(start, b * BLOCKS_PER_CHUNK)
            e = min(end, (b + 1) * BLOCKS_PER_CHUNK, last)
            if s >= e:
                continue
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out

    def missing(self, runs: Iterable[tuple[int, int]]) -> list[int]:
        """2 MiB blocks, not filled yet, that 4 KiB-block ranges ``runs`` of the layer touch."""
        out: list[int] = []
        for s, e in runs:
            for b in range(s // BLOCKS_PER_CHUNK, -(-e // BLOCKS_PER_CHUNK)):
                if (b < self.nblocks and b * BLOCK_SIZE in self.cfg.blocks
                        and not self.is_filled(b) and (not out or out[-1] != b)):
                    out.append(b)
        return out

    def status(self) -> dict[str, Any]:
        """What the fill did so far (for the control API and the manager's task)."""
        offsets = self.cfg.blocks
        filled = sum(1 for o in offsets if self.is_filled(o // BLOCK_SIZE))
        total_bytes = sum(mf.block_length(o, self.cfg.size) for o in offsets)
        done_bytes = sum(mf.block_length(o, self.cfg.size) for o in offsets
                         if self.is_filled(o // BLOCK_SIZE))
        errors = [{"offset": b * BLOCK_SIZE, "error": e} for b, e in sorted(self.errors.items())]
        return {"backup": self.cfg.backup, "layer": self.layer, "blocks": len(offsets),
                "filled": filled, "bytes": total_bytes, "bytes_filled": done_bytes,
                "errors": errors,
                # Done only once the layer is ordinary (finish_backing), not when the
                # last block is in: until then a restart would still read backing.json.
                "done": False}

    # ------------------------------------------------------------ fetching

    def _target_get(self, key: str) -> bytes:
        with self._target_lock:
            if self._target is None:
                self._target = _open(self.cfg.target)
            target = self._target
        return target.get(key)

    def _fetch_store(self, b: int) -> None:
        """Fetch block ``b``, check it, write its data runs into the layer (thread-safe)."""
        offset = b * BLOCK_SIZE
        h = self.cfg.blocks[offset]
        length = mf.block_length(offset, self.cfg.size)
        try:
            try:
                stored = self._target_get(block_key(h))
            except NotFoundError:
                raise MissingBlockError(h, offset) from None
            data = decode(stored, h, offset)
            if len(data) != length:
                raise CorruptBlockError(h, offset, f"holds {len(data)} bytes, expected {length}")
        except (BackupError, OSError, ValueError) as exc:
            raise BackingUnavailableError(offset, f"block {h[:16]} of backup "
                                          f"{self.cfg.backup}: {exc}") from exc
        except Exception as exc:  # an S3 client's own errors: the target did not answer
            raise BackingUnavailableError(offset, f"backup target {self.cfg.target['url']}: "
                                          f"{exc!r}") from exc
        view = memoryview(data)
        for start, n in data_runs(data):
            meta.write_all(self._fd, [view[start:start + n]], offset + start)
        self.fetched_bytes += length

    def fill_now(self, blocks: Iterable[int]) -> None:
        """Fetch ``blocks`` here and now (synchronous callers: it blocks while fetching)."""
        for b in blocks:
            if self.is_filled(b):
                continue
            try:
                self._fetch_store(b)
            except BackingUnavailableError as exc:
                self.errors[b] = exc.strerror or str(exc)
                raise
            self._mark(b)

    async def ensure(self, blocks: Iterable[int], deadline: float | None = READ_DEADLINE) -> None:
        """Fetch whichever of ``blocks`` is not filled (one fetch per block however many
        readers wait for it); BackingUnavailableError for the first that cannot be had.

        After ``deadline`` seconds BackingUnavailableError too (the fetch goes on and
        fills the block when it ends): a reader must hear EIO before its engine gives
        the replica up as not answering.
        """
        loop = asyncio.get_running_loop()
        end = None if deadline is None else loop.time() + deadline
        waits: list[tuple[asyncio.Future[None], int]] = []
        for b in blocks:
            if self.is_filled(b):
                continue
            fut = self._inflight.get(b)
            if fut is None:
                fut = self._inflight[b] = loop.create_future()
                task = loop.run_in_executor(self._pool, self._fetch_store, b)
                task.add_done_callback(lambda t, b=b, fut=fut: self._fetched(b, fut, t))
            waits.append((fut, b))
        for fut, b in waits:
            if end is None:
                await asyncio.shield(fut)
                continue
            try:
                await asyncio.wait_for(asyncio.shield(fut), max(0.0, end - loop.time()))
            except TimeoutError:
                raise BackingUnavailableError(
                    b * BLOCK_SIZE, f"backup target {self.cfg.target['url']} did not answer "
                    f"within {deadline:.0f} s (the fetch goes on)") from None

    def _fetched(self, b: int, fut: asyncio.Future[None], task: asyncio.Future[None]) -> None:
        self._inflight.pop(b, None)
        if task.cancelled():
            fut.cancel()
            return
        exc = task.exception()
        if exc is None:
            if self.active:
                self._mark(b)
            fut.set_result(None)
        else:
            if isinstance(exc, BackingUnavailableError):
                self.errors[b] = exc.strerror or str(exc)
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters may be gone

    def persist(self) -> None:
        """Make filled blocks durable, then record them (fdatasync, atomic bitmap)."""
        with self._persist_lock:  # the fill's thread and a closing replica may both call
            if not self._pending:
                return
            self._pending = False
            # A block is marked after its data is written: what is marked now is in the file.
            marked = bytes(self._filled)
            meta.fs.fdatasync(self._fd)
            _write_atomic(self._dir, self._dirfd, FILLED_FILE, marked, 0o600)

    # ------------------------------------------------------------ the fill

    def start_fill(self, finish: Callable[[], None]) -> None:
        """Start the background fill on the running loop; ``finish()`` once all is filled."""
        if self._fill_task is None or self._fill_task.done():
            self._wake = asyncio.Event()
            self._fill_task = asyncio.create_task(self._fill(finish),
                                                  name=f"fill {self.layer}")

    def retry_now(self) -> None:
        """Try failed blocks again at once rather than after the back-off."""
        if self._wake is not None:
            self._wake.set()

    async def stop_fill(self) -> None:
        """Stop the fill and make what it fetched durable."""
        task, self._fill_task = self._fill_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.active:
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().run_in_executor(None, self.persist)

    async def _fill(self, finish: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_FIRST
        while self.active:
            todo = self.unfilled()
            if not todo:
                await loop.run_in_executor(None, self.persist)
                finish()
                log.info("%s: backing layer %s filled from backup %s", self._dir, self.layer,
                         self.cfg.backup)
                return
            await self._pass(todo)
            if not self.errors:
                delay = RETRY_FIRST
                continue
            # Only blocks that failed are left: try them again after a back-off.
            log.warning("%s: %d block(s) of backup %s cannot be fetched (first: %s); trying "
                        "again in %.0f s", self._dir, len(self.errors), self.cfg.backup,
                        next(iter(self.errors.values())), delay)
            assert self._wake is not None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _pass(self, todo: list[int]) -> None:
        """Fetch ``todo`` with a few fetches always in flight (no batch waits for its
        slowest block), persisting the bitmap about once a second meanwhile."""
        loop = asyncio.get_running_loop()
        rate = self.cfg.rate
        queue = iter(todo)
        began, sent = loop.time(), 0
        flushed = loop.time()
        persisting: asyncio.Future[None] | None = None

        async def worker() -> None:
            nonlocal sent, flushed, persisting
            for b in queue:
                if rate:  # take this block's share of the budget first, then wait for it
                    mine, sent = sent, sent + BLOCK_SIZE
                    if (ahead := mine / rate - (loop.time() - began)) > 0:
                        await asyncio.sleep(ahead)
                try:
                    await self.ensure([b], deadline=None)
                except BackingUnavailableError:
                    pass  # recorded in self.errors: retried after a back-off
                except OSError as exc:  # the layer could not be written (a full disk, say)
                    log.error("%s: cannot fill block %d of %s: %s", self._dir, b, self.layer,
                              exc)
                    self.errors[b] = f"cannot write layer {self.layer}: {exc}"
                now = loop.time()
                if now - flushed >= PERSIST_EVERY and (persisting is None or persisting.done()):
                    flushed = now
                    persisting = loop.run_in_executor(None, self.persist)

        await asyncio.gather(*(worker() for _ in range(FILL_PARALLEL)))
        if persisting is not None:
            await persisting
        await loop.run_in_executor(None, self.persist)
