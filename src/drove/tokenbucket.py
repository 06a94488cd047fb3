"""Token buckets: the QoS layer's limits, and the pacing of rebuild and backup copies.

A bucket earns ``rate`` tokens per second up to ``capacity``; a request of
``n`` tokens passes when the bucket holds ``min(n, capacity)`` (so one larger
than the bucket passes when it is full) and takes all ``n``, perhaps leaving
the bucket in debt: the long-run rate stays exact whatever the request sizes.
"""

from __future__ import annotations

import asyncio
import time


def capacity(rate: float, burst: float, minimum: float) -> float:
    """A bucket's capacity for ``burst`` seconds at ``rate`` (at least ``minimum``)."""
    return max(rate * burst, minimum)


class TokenBucket:
    """``rate`` tokens per second, holding at most ``capacity``; may go into debt."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        """Add what accrued since the last refill."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def allows(self, n: float) -> bool:
        """Whether a request of ``n`` tokens may pass now (a big one: when full)."""
        return self.tokens >= min(n, self.capacity)

    def wait(self, n: float) -> float:
        """Seconds until :meth:`allows` holds for ``n`` (0 when it does)."""
        return max(0.0, (min(n, self.capacity) - self.tokens) / self.rate)

    def change(self, rate: float, capacity: float, now: float) -> None:
        """New rate and capacity from now on (what accrued so far at the old rate)."""
        self.refill(now)
        self.rate, self.capacity = rate, capacity
        self.tokens = min(self.tokens, capacity)


class Pacer:
    """One token bucket for one sequential copier (rebuild, backup): bytes per second."""

    def __init__(self, rate: int, burst: float = 1.0) -> None:
        self._bucket = TokenBucket(rate or 1, capacity(rate, burst, 0), time.monotonic())
        self.rate = rate

    def set_rate(self, rate: int, burst: float = 1.0) -> None:
        """A new rate from now on (0: no limit)."""
        self.rate = rate
        if rate:
            self._bucket.change(rate, capacity(rate, burst, 0), time.monotonic())

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be copied (at once when there is no limit)."""
        while self.rate:
            self._bucket.refill(time.monotonic())
            if self._bucket.allows(nbytes):
                self._bucket.tokens -= nbytes
                return
            # Pacing, not synchronisation: the wait is what the limit is for.
            await asyncio.sleep(self._bucket.wait(nbytes))
