"""The QoS layer's token buckets and queues (drove.engine.qos), over a memory export.

Rates are checked against the clock; fio through a real engine checks them at
scale (tests/integration/test_qos.py).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from drove.engine.qos import QosLayer, QosLimits
from drove.nbd import eager
from drove.nbd.memory import MemoryExport
from drove.tokenbucket import Pacer

SIZE = 1 << 20


class Requests:
    """Submits requests to a layer and records the order and time of completions."""

    def __init__(self, layer: QosLayer) -> None:
        self.layer = layer
        self.done: list[tuple[str, float, BaseException | None]] = []
        self.t0 = time.monotonic()

    def submit(self, tag: str, cmd: int, length: int = 4096) -> None:
        """One request; its completion is recorded under ``tag``."""
        data = memoryview(bytes(length)) if cmd == eager.WRITE else None
        self.layer.submit(cmd, 0, length, data, False,
                          lambda v, e: self.done.append((tag, time.monotonic() - self.t0, e)))

    async def wait(self, n: int, timeout: float = 10) -> None:
        """Until ``n`` requests completed."""
        deadline = time.monotonic() + timeout
        while len(self.done) < n:
            assert time.monotonic() < deadline, self.done
            await asyncio.sleep(0.005)


def test_iops_limit_paces_in_order_and_never_fails() -> None:
    async def main() -> None:
        layer = QosLayer(MemoryExport(SIZE), QosLimits(write_iops=200, burst=0.05))
        reqs = Requests(layer)
        for i in range(60):
            reqs.submit(f"w{i}", eager.WRITE)
        await reqs.wait(60)
        took = reqs.done[-1][1]
        # 10 in the burst, 50 more at 200/s: 0.25 s
        assert 0.23 <= took <= 0.6, took
        assert [t for t, _, _ in reqs.done] == [f"w{i}" for i in range(60)]
        assert all(e is None for _, _, e in reqs.done)
        assert layer.to_json()["throttled"]["write"] >= 49

    asyncio.run(main())


def test_bandwidth_limit_with_requests_larger_than_the_bucket() -> None:
    async def main() -> None:
        layer = QosLayer(MemoryExport(SIZE), QosLimits(bandwidth=1 << 20, burst=0.1))
        reqs = Requests(layer)
        for i in range(5):
            reqs.submit(f"r{i}", eager.READ, 256 * 1024)
        await reqs.wait(5)
        # 1.25 MiB at 1 MiB/s, the first from a full (0.1 MiB) bucket: about 1.1 s
        assert 1.0 <= reqs.done[-1][1] <= 1.6, reqs.done

    asyncio.run(main())


def test_flush_is_not_queued_behind_throttled_writes() -> None:
    async def main() -> None:
        layer = QosLayer(MemoryExport(SIZE), QosLimits(write_iops=10, burst=0.1))
        reqs = Requests(layer)
        for i in range(5):
            reqs.submit(f"w{i}", eager.WRITE)
        reqs.submit("flush", eager.FLUSH)
        await reqs.wait(2)
        assert [t for t, _, _ in reqs.done] == ["w0", "flush"]
        assert layer.to_json()["waiting"]["write"] == 4

    asyncio.run(main())


def test_reads_are_not_held_back_by_throttled_writes() -> None:
    async def main() -> None:
        layer = QosLayer(MemoryExport(SIZE), QosLimits(write_iops=5, burst=0.2))
        reqs = Requests(layer)
        for i in range(4):
            reqs.submit(f"w{i}", eager.WRITE)
        reqs.submit("r", eager.READ)
        await reqs.wait(2)
        assert [t for t, _, _ in reqs.done] == ["w0", "r"]

    asyncio.run(main())


def test_live_change_releases_the_queue_at_once() -> None:
    async def main() -> None:
        layer = QosLayer(MemoryExport(SIZE), QosLimits(iops=2, burst=0.5))
        reqs = Requests(layer)
        for i in range(20):
            reqs.submit(f"w{i}", eager.WRITE)
        await reqs.wait(1)
        t = time.monotonic()
        layer.set_limits(QosLimits(iops=1000))
        await reqs.wait(20)
        assert time.monotonic() - t < 0.2
        assert [x for x, _, _ in reqs.done] == [f"w{i}" for i in range(20)]
        layer.set_limits(QosLimits())  # unlimited: straight through
        reqs.submit("last", eager.WRITE)
        assert reqs.done[-1][0] == "last"

    asyncio.run(main())


def test_coroutine_form_is_throttled_too() -> None:
    async def main() -> None:
        layer = QosLayer(MemoryExport(SIZE), QosLimits(iops=100, burst=0.01))
        t = time.monotonic()
        await asyncio.gather(*(layer.write(0, memoryview(bytes(512))) for _ in range(21)),
                             *(layer.zero(0, 4096) for _ in range(10)))
        assert 0.25 <= time.monotonic() - t <= 0.7

    asyncio.run(main())


@pytest.mark.parametrize("doc, message", [
    ({"iops": -1}, "iops must be a number >= 0"),
    ({"bandwidth": "fast"}, "bandwidth must be a number"),
    ({"burst": 3600}, "burst is at most"),
    ({"iopps": 5}, "unknown QoS field"),
    ({"read_iops": True}, "read_iops must be a number"),
])
def test_bad_limits_are_refused(doc: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QosLimits.from_json(doc)


def test_pacer_holds_a_copier_to_its_rate() -> None:
    async def main() -> None:
        pacer = Pacer(4 << 20, burst=0.1)
        t = time.monotonic()
        for _ in range(16):
            await pacer.take(256 * 1024)  # 4 MiB in all
        assert 0.8 <= time.monotonic() - t <= 1.4
        pacer.set_rate(0)
        t = time.monotonic()
        await pacer.take(1 << 30)
        assert time.monotonic() - t < 0.05

    asyncio.run(main())


def test_stop_throttling_lets_the_queue_through_in_order() -> None:
    async def main() -> None:
        layer = QosLayer(MemoryExport(SIZE), QosLimits(iops=1, burst=0.1))
        reqs = Requests(layer)
        for i in range(10):
            reqs.submit(f"w{i}", eager.WRITE)
        assert len(reqs.done) == 1
        layer.stop_throttling()
        assert [x for x, _, _ in reqs.done] == [f"w{i}" for i in range(10)]

    asyncio.run(main())
