"""The stats layer: per-volume operation counts, bytes and latency histograms.

A :class:`~drove.engine.layers.Layer` (an nbdkit-filter-like wrapper of the
export below) that changes nothing about the data: it overrides the operations
it counts and inherits the rest (cache, size, capabilities).  The hot path costs
two ``perf_counter_ns`` calls and a few integer additions per request;
everything derived (rates, percentiles) is computed when someone asks.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any

from drove.engine.layers import Layer
from drove.nbd import eager
from drove.nbd.export import CoroutineExport, Extent

BUCKETS = 32
"""Latency histogram buckets: bucket i counts latencies in [2**(i-1), 2**i) microseconds."""

OPS = ("read", "write", "zero", "trim", "flush", "block_status")


class OpStats:
    """Counters of one operation kind."""

    __slots__ = ("bytes", "count", "errors", "hist", "total_ns")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.bytes = 0
        self.total_ns = 0
        self.hist = [0] * BUCKETS

    def record(self, nbytes: int, elapsed_ns: int, ok: bool) -> None:
        """Count one completed request."""
        self.count += 1
        self.bytes += nbytes
        self.total_ns += elapsed_ns
        if not ok:
            self.errors += 1
        self.hist[min((elapsed_ns // 1000).bit_length(), BUCKETS - 1)] += 1

    def snapshot(self) -> tuple[int, int]:
        """(count, bytes) now, for rate sampling."""
        return self.count, self.bytes

    def percentile(self, q: float) -> float | None:
        """Upper bound in microseconds of the bucket holding the ``q`` quantile."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.hist):
            seen += n
            if seen >= rank:
                return float(1 << i)
        return float(1 << (BUCKETS - 1))

    def to_json(self) -> dict[str, Any]:
        """Totals, mean latency, p50/p99 bounds and the raw histogram."""
        return {
            "count": self.count,
            "errors": self.errors,
            "bytes": self.bytes,
            "mean_us": round(self.total_ns / self.count / 1000, 1) if self.count else None,
            "p50_us": self.percentile(0.50),
            "p99_us": self.percentile(0.99),
            "histogram_us": {str(1 << i): n for i, n in enumerate(self.hist) if n},
        }


class _Counted:
    """A ``done`` callback that counts the request it completes."""

    __slots__ = ("done", "nbytes", "op", "t")

    def __init__(self, op: OpStats, nbytes: int, done: eager.Done) -> None:
        self.op = op
        self.nbytes = nbytes
        self.done = done
        self.t = time.perf_counter_ns()

    def __call__(self, value: Any, exc: BaseException | None) -> None:
        self.op.record(self.nbytes if exc is None else 0, time.perf_counter_ns() - self.t,
                       exc is None)
        self.done(value, exc)


class StatsLayer(Layer):
    """Counts every request passing to ``inner``."""

    def __init__(self, inner: CoroutineExport, window: int = 60) -> None:
        super().__init__(inner)
        self.ops = {op: OpStats() for op in OPS}
        self._by_cmd = {eager.READ: self.ops["read"], eager.WRITE: self.ops["write"],
                        eager.FLUSH: self.ops["flush"]}
        self.started = time.time()
        # (monotonic time, {op: (count, bytes)}) samples for recent rates.
        self._samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque(maxlen=window + 1)
        self.sample()

    def sample(self) -> None:
        """Record the counters now (call about once a second for rates)."""
        self._samples.append(
            (time.monotonic(), {op: s.snapshot() for op, s in self.ops.items()}))

    def rates(self, seconds: float = 10.0) -> dict[str, dict[str, float]]:
        """Operations and bytes per second over about the last ``seconds``."""
        now = time.monotonic()
        current = {op: s.snapshot() for op, s in self.ops.items()}
        base_t, base = self._samples[0]
        for t, sample in self._samples:
            if now - t <= seconds:
                base_t, base = t, sample
                break
        dt = max(now - base_t, 1e-3)
        return {
            op: {"iops": round((c - base[op][0]) / dt, 1),
                 "bytes_per_second": round((b - base[op][1]) / dt, 1)}
            for op, (c, b) in current.items()
        }

    def to_json(self) -> dict[str, Any]:
        """Everything the control API reports."""
        return {
            "since": self.started,
            "ops": {op: s.to_json() for op, s in self.ops.items()},
            "rates_10s": self.rates(10.0),
        }

    async def _counted(self, op: str, nbytes: int, call: Awaitable[Any]) -> Any:
        """Await ``call`` and count it under ``op`` (failures count as errors, 0 bytes)."""
        t = time.perf_counter_ns()
        try:
            result = await call
        except BaseException:
            self.ops[op].record(0, time.perf_counter_ns() - t, False)
            raise
        self.ops[op].record(nbytes, time.perf_counter_ns() - t, True)
        return result

    def submit(self, cmd: int, offset: int, length: int, data: Any, fua: bool,
               done: eager.Done) -> None:
        """READ, WRITE or FLUSH in callback style (see :mod:`drove.nbd.eager`), counted."""
        self.below(cmd, offset, length, data, fua, _Counted(self._by_cmd[cmd], length, done))

    # The forwarding methods are plain functions returning the counting coroutine:
    # one coroutine frame less on every request, which the loop resumes per reply.

    def read(self, offset: int, length: int) -> Awaitable[Any]:
        """Read, counted."""
        return self._counted("read", length, self.inner.read(offset, length))

    def write(self, offset: int, data: memoryview, fua: bool = False) -> Awaitable[None]:
        """Write, counted."""
        return self._counted("write", len(data), self.inner.write(offset, data, fua))

    def zero(self, offset: int, length: int, fua: bool = False, may_trim: bool = True,
             fast: bool = False) -> Awaitable[None]:
        """Write zeroes, counted."""
        return self._counted("zero", length, self.inner.zero(offset, length, fua, may_trim, fast))

    def trim(self, offset: int, length: int, fua: bool = False) -> Awaitable[None]:
        """Trim, counted."""
        return self._counted("trim", length, self.inner.trim(offset, length, fua))

    def flush(self) -> Awaitable[None]:
        """Flush, counted."""
        return self._counted("flush", 0, self.inner.flush())

    def block_status(self, offset: int, length: int) -> Awaitable[Sequence[Extent]]:
        """Block status, counted."""
        return self._counted("block_status", 0, self.inner.block_status(offset, length))
