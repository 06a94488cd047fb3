"""Online rebuild of one replica from a healthy one, while clients keep writing.

1. Pause I/O briefly: snapshot every member, make the target's layer tree the
   source's (layers empty or holding an older copy, all *incomplete*, a fresh
   head on the new snapshot), add the target to the mirror in WO mode.  Resume.
2. For each layer, oldest first: the target pulls the layer's own data from
   the source's ``layer/FILE`` export — only allocated ranges, or, where the
   target already held an older copy, only the ranges whose digests differ.
3. Verify each layer: the target hashes it and compares with the source's
   checksum, which clears the layer's incomplete flag.
4. Set the target RW and persist the new membership (a generation bump).

Any failure drops the target back to ERR with its layers still incomplete,
so it can never be mistaken for a current replica (see generation.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from drove.engine.generation import parse_state
from drove.engine.mirror import Mirror, Mode
from drove.engine.replicas import ReplicaHandle
from drove.replica.meta import parents_first

log = logging.getLogger("drove.engine")

DIGEST_RANGE = 1 << 20
"""Granularity of delta comparison between an older copy and the source."""

POLL = 0.05


def _topological(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layers ordered parents first (oldest first among siblings)."""
    by_file = {la["file"]: la for la in layers}
    order = parents_first({f: la.get("parent") for f, la in by_file.items()},
                          order=lambda f: (by_file[f]["created"], f))
    return [by_file[f] for f in order]


def _differing(a: list[str], b: list[str], size: int, step: int) -> list[tuple[int, int]]:
    """Coalesced byte ranges where digest lists ``a`` and ``b`` differ."""
    ranges: list[tuple[int, int]] = []
    for i in range(max(len(a), len(b))):
        if i < len(a) and i < len(b) and a[i] == b[i]:
            continue
        start = i * step
        length = min(step, size - start)
        if length <= 0:
            continue
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
        else:
            ranges.append((start, length))
    return ranges


def _reuse_head_as(source: list[dict[str, Any]],
                   target_head: dict[str, Any] | None) -> str | None:
    """The source layer that the target's old head becomes, to be copied by delta.

    The target's head holds the writes it took since its head's parent, a layer the
    source has too; on the source those writes sit in the layers above that parent,
    the oldest of which holds most of them (the newer ones are the snapshots taken
    since, by rebuilds of other replicas say).  So the oldest layer above it on the
    source's head chain; the newest (the head's parent) when the parent is not there.
    """
    by_file = {la["file"]: la for la in source}
    head = next(la for la in source if la["head"])
    chain: list[str] = []  # the source head's ancestors, newest first
    cur = head["parent"]
    while cur is not None and cur in by_file and cur not in chain:
        chain.append(cur)
        cur = by_file[cur]["parent"]
    base = target_head.get("parent") if target_head else None
    if base is not None and base not in chain:
        return head["parent"]
    above = chain[:chain.index(base)] if base is not None else chain
    return above[-1] if above else head["parent"]


class RebuildError(Exception):
    """The rebuild could not finish; the target stays out of the volume."""


class Volume(Protocol):
    """What a rebuild needs of its volume (drove.engine.volume.Engine provides it)."""

    name: str
    mirror: Mirror
    generation: int
    epoch: int | None
    rebuild_bandwidth: int  # bytes/s a rebuild reads its source at (0: no limit)

    def event(self, kind: str, message: str, **fields: Any) -> None:
        """Record what happened and why."""

    def exclusive(self) -> asyncio.Lock:
        """The lock of structural operations."""

    async def on_all(self, what: str, call: Callable[[Any], Awaitable[Any]]) -> list[Any]:
        """Run ``call`` on every RW/WO replica, dropping those that fail."""

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` in the background."""

    async def delete_snapshot(self, name: str) -> dict[str, Any]:
        """Delete a snapshot on every replica."""


class Rebuild:
    """One rebuild of ``target``; its progress is what the control API shows."""

    def __init__(self, engine: Volume, target: ReplicaHandle) -> None:
        self.engine = engine
        self.target = target
        self.source: ReplicaHandle | None = None
        self.state = "starting"
        self.error: str | None = None
        self.snapshot: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self.pause_ms: float | None = None
        self.layers_total = 0
        self.layers_done = 0
        self.bytes_total = 0
        self.bytes_done = 0
        self.bytes_copied = 0
        self.current: str | None = None
        self._current_done = 0
        self.per_layer: list[dict[str, Any]] = []
        self._task: asyncio.Task[Any] | None = None
        self._abort_reason: str | None = None

    @property
    def running(self) -> bool:
        """Whether the rebuild has not ended yet."""
        return self.state not in ("done", "failed", "cancelled")

    def to_json(self) -> dict[str, Any]:
        """Progress: bytes done / total, layers, state, timing."""
        done = self.bytes_done + self._current_done
        elapsed = (self.finished or time.time()) - self.started
        return {
            "replica": self.target.name, "source": self.source.name if self.source else None,
            "state": self.state, "error": self.error, "snapshot": self.snapshot,
            "bytes_done": done, "bytes_total": self.bytes_total,
            "bytes_copied": self.bytes_copied,
            "layers_done": self.layers_done, "layers_total": self.layers_total,
            "current_layer": self.current, "pause_ms": self.pause_ms,
            "started": self.started, "finished": self.finished, "layers": self.per_layer,
            "seconds": round(elapsed, 3),
        }

    async def run(self) -> None:
        """Run the whole rebuild; never raises (failures are recorded and the target dropped)."""
        self._task = asyncio.current_task()
        eng = self.engine
        eng.event("rebuild-started", f"rebuild of replica {self.target.name} started",
                  replica=self.target.name)
        try:
            try:
                await self._run()
            except asyncio.CancelledError:
                if self._abort_reason is None:
                    self.state = "cancelled"
                    self.error = "cancelled"
                    self._abandon("rebuild cancelled")
                    raise
                raise RebuildError(self._abort_reason) from None
        except Exception as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("volume %s: rebuild of %s failed: %s", eng.name, self.target.name,
                        self.error)
            self._abandon(f"rebuild failed: {self.error}")
            eng.event("rebuild-failed", f"rebuild of replica {self.target.name} failed: "
                                        f"{self.error}", replica=self.target.name)
        else:
            self.state = "done"
            eng.event("rebuild-finished",
                      f"rebuild of replica {self.target.name} finished in "
                      f"{time.time() - self.started:.1f} s ({self.bytes_copied} bytes copied)",
                      replica=self.target.name, seconds=round(time.time() - self.started, 3))
        finally:
            self.finished = time.time()
            self.current = None
        await self._drop_snapshot()

    async def _drop_snapshot(self) -> None:
        """Delete the rebuild's own snapshot: it only marked where the copy started."""
        if self.snapshot is None or self.engine.mirror.faulted is not None:
            return
        try:
            await self.engine.delete_snapshot(self.snapshot)
        except Exception as exc:  # harmless leftover: a system-labelled snapshot
            log.warning("volume %s: could not delete rebuild snapshot %s: %s",
                        self.engine.name, self.snapshot, exc)

    def _abandon(self, why: str) -> None:
        t = self.target
        if t.mode is not Mode.ERR:
            self.engine.mirror.drop(t, why)
        else:
            t.error = t.error or why
        t.disconnect()
        self.engine.spawn(self._cancel_sync())

    async def _cancel_sync(self) -> None:
        with contextlib.suppress(Exception):
            await self.target.cancel_sync()

    def target_dropped(self, why: str) -> None:
        """The mirror dropped the target: stop at once, whatever the rebuild awaits."""
        task = self._task
        if self.running and task is not None and not task.done() \
                and task is not asyncio.current_task() and self._abort_reason is None:
            self._abort_reason = f"replica {self.target.name} failed during the rebuild: {why}"
            task.cancel()

    async def cancel(self) -> None:
        """Stop the rebuild (the target is left out of the volume)."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        eng, target, mirror = self.engine, self.target, self.engine.mirror
        old = {la["file"]: la for la in await self._target_layers()}
        state = parse_state(target.name, target.info)
        if state.volume not in (None, eng.name):
            # A wrong URL or directory: that replica is another volume's copy.
            raise RebuildError(f"replica {target.name} holds volume {state.volume!r}, not "
                               f"{eng.name!r}: not overwriting it")
        if state.order > (eng.epoch or 0, eng.generation) and not state.rebuilding:
            # It may hold acknowledged writes the serving replicas lack (they may be the
            # stale ones): never overwrite it; a person must look.  A state an older engine
            # wrote is never newer, whatever its generation (generation.py): the replica
            # of a host that was taken over, say, whose old engine went on counting.
            raise RebuildError(
                f"replica {target.name} holds generation {state.generation}, above this "
                f"volume's {eng.generation}: it may be newer than the replicas serving; "
                "not overwriting it")
        async with eng.exclusive():
            self.state = "preparing"
            sources = mirror.rw_members()
            if not sources:
                raise RebuildError("no RW replica to copy from")
            source = self.source = sources[0]  # type: ignore[assignment]
            await source.refresh()  # type: ignore[attr-defined]
            self.snapshot = "rebuild-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            started = time.perf_counter()
            async with mirror.paused():
                await eng.on_all(f"snapshot {self.snapshot}", lambda r: r.snapshot(
                    self.snapshot, {"drove.io/system": "rebuild"}))
                layers = await source.layers()  # type: ignore[attr-defined]
                head = next(la for la in layers if la["head"])
                snaps = [la for la in layers if not la["head"]]
                old_head = next((la for la in old.values() if la.get("head")), None)
                reuse = _reuse_head_as(layers, old_head)
                await target.prepare_rebuild(snaps, head["parent"], mirror.size,
                                             reuse_head_as=reuse)
                if (reuse is not None and reuse not in old and old_head is not None
                        and old_head.get("allocated")):
                    # Its old head is now that layer, an older copy: compared by digests,
                    # only the ranges that differ are copied (where it holds writes no
                    # other replica has, they are overwritten or punched out).
                    old[reuse] = old_head
                await target.refresh()
                await target.connect()
                mirror.set_mode(target, Mode.WO)
                target.error = None
            self.pause_ms = round((time.perf_counter() - started) * 1e3, 2)
        eng.event("rebuild-wo", f"replica {target.name} added write-only; I/O paused "
                                f"{self.pause_ms} ms", replica=target.name, pause_ms=self.pause_ms)
        self.state = "copying"
        order = _topological(snaps)
        self.layers_total = len(order)
        self.bytes_total = sum(la["size"] for la in order)
        for la in order:
            self._check_target()
            await self._copy_layer(source, la, old.get(la["file"]))
            self.layers_done += 1
        self._check_target()
        self.state = "joining"
        async with eng.exclusive():
            self._check_target()
            mirror.set_mode(target, Mode.RW)
            mirror.membership_changed()
            await mirror.settled()
        self._check_target()

    async def _target_layers(self) -> list[dict[str, Any]]:
        await self.target.refresh()
        try:
            return await self.target.layers()
        except Exception:
            return []

    def _check_target(self) -> None:
        if self.target.mode is Mode.ERR:
            raise RebuildError(f"replica {self.target.name} failed during the rebuild: "
                               f"{self.target.error}")

    async def _copy_layer(self, source: ReplicaHandle, layer: dict[str, Any],
                          older: dict[str, Any] | None) -> None:
        file, size = layer["file"], layer["size"]
        self.current = file
        self._current_done = 0
        if layer.get("backing"):
            # An instant restore's layer the source is still filling from a backup: it
            # cannot be copied yet, the target fetches it from the backup too.
            found = await source.backing_export()
            if not found.get("done"):
                await self.target.adopt_backing({k: found[k] for k in (
                    "layer", "backup", "target", "fill_rate")})
                self.per_layer.append({"file": file, "delta": False, "bytes_copied": 0,
                                       "backing": found["backup"], "seconds": 0})
                self.bytes_done += size
                return
        checksum = asyncio.ensure_future(source.layer_checksum(file))
        started = time.perf_counter()
        try:
            ranges: list[tuple[int, int]] | None = None
            if older is not None:
                a, b = await asyncio.gather(source.digests(file, DIGEST_RANGE),
                                            self.target.digests(file, DIGEST_RANGE))
                ranges = _differing(a, b, size, DIGEST_RANGE)
            copied = self.bytes_copied
            if ranges != []:
                await self._pull(source, file, ranges)
            self.per_layer.append({
                "file": file, "delta": older is not None,
                "bytes_copied": self.bytes_copied - copied,
                "seconds": round(time.perf_counter() - started, 3)})
            self.bytes_done += size
            self._current_done = 0
            await self.target.complete_layer(file, await checksum)
        finally:
            if not checksum.done():
                checksum.cancel()

    async def _pull(self, source: ReplicaHandle, file: str,
                    ranges: list[tuple[int, int]] | None) -> None:
        """Have the target pull ``ranges`` (None: everything allocated) of layer ``file``."""
        await self.target.start_sync(file, source.nbd_uri(f"layer/{file}"), ranges,
                                     rate=self.engine.rebuild_bandwidth)
        while True:
            await asyncio.sleep(POLL)
            self._check_target()
            st = await self.target.sync_status()
            total = st.get("bytes_total") or 0
            done = st.get("bytes_done") or 0
            self._current_done = done if ranges is None else 0
            if st["state"] == "done":
                self.bytes_copied += st.get("bytes_written", total)
                return
            if st["state"] in ("failed", "cancelled", "idle"):
                raise RebuildError(f"copying layer {file} failed: {st.get('error')}")
