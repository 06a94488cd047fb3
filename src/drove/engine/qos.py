"""The QoS layer: per-volume IOPS and bandwidth limits (token buckets), changed live.

Limits: IOPS and bytes per second for the volume as a whole and for reads and
writes separately (0: no limit); a request passes when every bucket it draws
from allows it.  ``burst`` is in seconds: each bucket holds up to ``limit *
burst`` tokens, so a volume that was idle may run that long above its limit
(at least one request always fits: a request larger than a bucket passes when
the bucket is full and leaves it in debt, which keeps the long-run rate exact).

Requests that must wait are queued in arrival order (one queue for reads, one
for writes: a throttled write never holds back a read that its own limits
allow) and are never failed; the NBD server's per-connection backpressure
bounds the queues.  Zero and trim count as write operations of no bytes;
block status and cache hints are not throttled.

FLUSH is never queued: it must make durable every write that was
*acknowledged* before it was sent, and a write still waiting here has not been
acknowledged (nor passed down), so the flush owes it nothing; a client that
wants a write covered waits for its reply first, as NBD requires anyway.

The buckets are :mod:`drove.tokenbucket`'s, which also paces the rebuild and
backup copies (:class:`drove.tokenbucket.Pacer`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from drove.engine.layers import Layer
from drove.nbd import eager
from drove.nbd.export import CoroutineExport
from drove.tokenbucket import TokenBucket, capacity

READ, WRITE = 0, 1

_now = time.monotonic

MAX_BURST = 60.0
"""Longest burst, in seconds (a larger one would make a limit meaningless for a minute)."""


@dataclass(frozen=True)
class QosLimits:
    """A volume's limits; 0 means no limit.  Bandwidths in bytes per second."""

    iops: int = 0
    bandwidth: int = 0
    read_iops: int = 0
    write_iops: int = 0
    read_bandwidth: int = 0
    write_bandwidth: int = 0
    burst: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"QoS {f.name} must be a number >= 0, not {value!r}")
        if self.burst > MAX_BURST:
            raise ValueError(f"QoS burst is at most {MAX_BURST:g} seconds, not {self.burst}")

    @property
    def unlimited(self) -> bool:
        """Whether no limit is set."""
        return not any(getattr(self, f.name) for f in fields(self) if f.name != "burst")

    def to_json(self) -> dict[str, Any]:
        """The limits as the APIs show them."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> QosLimits:
        """Limits from a JSON object (unknown keys or bad values: ValueError)."""
        doc = doc or {}
        if not isinstance(doc, dict):
            raise ValueError(f"QoS limits must be an object, not {doc!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"unknown QoS field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        return cls(**doc)

    def merged(self, changes: dict[str, Any]) -> QosLimits:
        """These limits with ``changes`` applied (validated as a whole)."""
        return QosLimits.from_json({**self.to_json(), **changes})


class _Buckets:
    """The buckets of one set of limits, and which of them each direction draws from."""

    def __init__(self, now: float) -> None:
        self.by_name: dict[str, TokenBucket] = {}
        # per direction: [(bucket, counts bytes)]
        self.of: tuple[list[tuple[TokenBucket, bool]], list[tuple[TokenBucket, bool]]] = ([], [])
        self.now = now

    def apply(self, limits: QosLimits, now: float) -> None:
        """Make the buckets match ``limits`` (existing ones keep their level)."""
        wanted = {"iops": (limits.iops, False, (READ, WRITE)),
                  "bandwidth": (limits.bandwidth, True, (READ, WRITE)),
                  "read_iops": (limits.read_iops, False, (READ,)),
                  "write_iops": (limits.write_iops, False, (WRITE,)),
                  "read_bandwidth": (limits.read_bandwidth, True, (READ,)),
                  "write_bandwidth": (limits.write_bandwidth, True, (WRITE,))}
        of: tuple[list[tuple[TokenBucket, bool]], list[tuple[TokenBucket, bool]]] = ([], [])
        for name, (rate, is_bytes, dirs) in wanted.items():
            if not rate:
                self.by_name.pop(name, None)
                continue
            cap = capacity(rate, limits.burst, 0 if is_bytes else 1)
            bucket = self.by_name.get(name)
            if bucket is None:
                bucket = self.by_name[name] = TokenBucket(rate, cap, now)
            else:
                bucket.change(rate, cap, now)
            for d in dirs:
                of[d].append((bucket, is_bytes))
        self.of = of

    def try_take(self, d: int, nbytes: int, now: float) -> bool:
        """Take a request's tokens if every bucket allows it now (inlined: the hot path)."""
        mine = self.of[d]
        for b, is_bytes in mine:
            n = nbytes if is_bytes else 1
            tokens = b.tokens + (now - b.stamp) * b.rate
            b.tokens = tokens = tokens if tokens < b.capacity else b.capacity
            b.stamp = now
            if tokens < (n if n < b.capacity else b.capacity):
                return False
        for b, is_bytes in mine:
            b.tokens -= nbytes if is_bytes else 1
        return True

    def wait(self, d: int, nbytes: int) -> float:
        """Seconds until a request could pass (buckets refilled at the last try)."""
        return max((b.wait(nbytes if is_bytes else 1) for b, is_bytes in self.of[d]),
                   default=0.0)


class QosLayer(Layer):
    """Throttles reads and writes to its limits; queues what must wait, in order."""

    def __init__(self, inner: CoroutineExport, limits: QosLimits | None = None) -> None:
        super().__init__(inner)
        self.limits = QosLimits()
        self._off = True  # no limit: every request goes straight down
        self._buckets = _Buckets(time.monotonic())
        self._waiting: tuple[collections.deque[tuple[int, Callable[[], None]]], ...] = (
            collections.deque(), collections.deque())
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # when _timer fires (time.monotonic)
        self.throttled = [0, 0]  # requests that had to wait, per direction
        # Told whether limits are set (after the queue was let through when they are not):
        # the stack then wires the callback path above past this layer (drove.engine.stack).
        self.on_throttling: Callable[[bool], None] | None = None
        self.set_limits(limits or QosLimits())

    # ----------------------------------------------------------- limits

    def set_limits(self, limits: QosLimits) -> None:
        """Apply new limits now; queued requests are judged against them at once."""
        self.limits = limits
        self._buckets.apply(limits, time.monotonic())
        self._off = limits.unlimited
        self._release()
        if self.on_throttling is not None:
            self.on_throttling(not self._off)

    def stop_throttling(self) -> None:
        """Let everything through from now on, queued requests first (the engine stops:
        what the clients sent completes before the connections close and the final flush)."""
        self._off = True
        self._release()
        if self.on_throttling is not None:
            self.on_throttling(False)

    def to_json(self) -> dict[str, Any]:
        """The limits and the queues, for the control API."""
        return {"limits": self.limits.to_json(),
                "waiting": {"read": len(self._waiting[READ]), "write": len(self._waiting[WRITE])},
                "throttled": {"read": self.throttled[READ], "write": self.throttled[WRITE]}}

    # ----------------------------------------------------------- the queues

    def _admit(self, d: int, nbytes: int, go: Callable[[], None]) -> None:
        """Run ``go`` now if the limits allow and nothing waits before it; else queue it."""
        if not self._waiting[d] and self._buckets.try_take(d, nbytes, _now()):
            go()
        else:
            self._queue(d, nbytes, go)

    def _queue(self, d: int, nbytes: int, go: Callable[[], None]) -> None:
        """Queue a request that must wait; wake up when the first one may pass."""
        self.throttled[d] += 1
        q = self._waiting[d]
        q.append((nbytes, go))
        if len(q) == 1:
            self._arm()

    def _release(self) -> None:
        """Start every queued request the limits allow now (all when unlimited), in order."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        moved = True
        while moved:
            moved = False
            for d in (READ, WRITE):
                q = self._waiting[d]
                if q and (self._off or self._buckets.try_take(d, q[0][0], _now())):
                    q.popleft()[1]()
                    moved = True
        self._arm()

    def _arm(self) -> None:
        """Wake up when the first queued request could pass."""
        if self._off:
            return
        waits = [self._buckets.wait(d, q[0][0]) for d, q in enumerate(self._waiting) if q]
        if not waits:
            return
        at = time.monotonic() + min(waits)
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        # uvloop's handles do not tell when they are due, hence _timer_at.
        self._timer = asyncio.get_running_loop().call_later(min(waits), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._release()

    async def _wait(self, d: int, nbytes: int) -> None:
        """The coroutine form's turn: return once the limits let the request pass."""
        fut: asyncio.Future[None] | None = None
        passed = False

        def go() -> None:
            nonlocal passed
            passed = True
            if fut is not None and not fut.done():
                fut.set_result(None)

        self._admit(d, nbytes, go)
        if not passed:
            fut = asyncio.get_running_loop().create_future()
            await fut

    # ----------------------------------------------------------- operations

    def submit(self, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: eager.Done) -> None:
        """READ and WRITE in their turn; FLUSH at once (see the module docstring)."""
        if self._off or cmd == eager.FLUSH:
            self.below(cmd, offset, length, data, fua, done)
            return
        d = WRITE if cmd == eager.WRITE else READ
        if not self._waiting[d] and self._buckets.try_take(d, length, _now()):
            self.below(cmd, offset, length, data, fua, done)  # within the limits: no closure
            return
        self._queue(d, length, functools.partial(self.below, cmd, offset, length, data, fua,
                                                 done))

    async def read(self, offset: int, length: int) -> Any:
        """Read in its turn."""
        if not self._off:
            await self._wait(READ, length)
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        """Write in its turn."""
        if not self._off:
            await self._wait(WRITE, len(data))
        await self.inner.write(offset, data, fua)

    async def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
                   fast: bool = False) -> None:
        """Write zeroes in its turn (one write operation, no bytes)."""
        if not self._off:
            await self._wait(WRITE, 0)
        await self.inner.zero(offset, length, fua, may_trim, fast)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Trim in its turn (one write operation, no bytes)."""
        if not self._off:
            await self._wait(WRITE, 0)
        await self.inner.trim(offset, length, fua)

    def flush(self) -> Awaitable[None]:
        """Flush at once: no queued write was acknowledged, so none needs covering."""
        return self.inner.flush()
