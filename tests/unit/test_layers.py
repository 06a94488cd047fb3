"""The engine's layer contract (drove.engine.layers) and the stats layer on it, over memory."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from drove.engine.layers import Layer
from drove.engine.qos import QosLayer, QosLimits
from drove.engine.stack import LayerSettings, build_stack
from drove.engine.stats import StatsLayer
from drove.nbd import eager
from drove.nbd.export import Export
from drove.nbd.memory import MemoryExport

SIZE = 1 << 20


def sync(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run the coroutine test in its own event loop."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def submitted(layer: Layer, cmd: int, offset: int = 0, length: int = 0,
              data: bytes | None = None) -> asyncio.Future:
    """Submit one request; a future of its (value, error)."""
    fut = asyncio.get_running_loop().create_future()
    layer.submit(cmd, offset, length, None if data is None else memoryview(data), False,
                 lambda v, e: fut.done() or fut.set_result((v, e)))
    return fut


@sync
async def test_base_layer_passes_every_operation_both_forms() -> None:
    mem = MemoryExport(SIZE, "vol", "a volume")
    layer = Layer(mem)
    assert isinstance(layer, Export)
    assert (layer.name, layer.description, layer.size) == ("vol", "a volume", SIZE)
    await layer.write(0, memoryview(b"a" * 4096))
    v, e = await submitted(layer, eager.WRITE, 4096, 4096, b"b" * 4096)
    assert e is None
    assert bytes(await layer.read(0, 8192)) == b"a" * 4096 + b"b" * 4096
    v, e = await submitted(layer, eager.READ, 4096, 4096)
    assert bytes(v) == b"b" * 4096 and e is None
    assert (await submitted(layer, eager.FLUSH))[1] is None
    await layer.flush()
    await layer.zero(0, 4096)
    await layer.trim(4096, 4096)
    await layer.cache(0, 4096)
    assert bytes(mem.data[:8192]) == bytes(8192)
    assert sum(x.length for x in await layer.block_status(0, SIZE)) == SIZE


@sync
async def test_size_and_capabilities_below_show_through_live() -> None:
    mem = MemoryExport(SIZE)
    top = build_stack(LayerSettings(), mem).top  # stats -> qos -> memory
    mem.data.extend(bytes(SIZE))  # grows below, as the mirror does on expand
    assert top.size == 2 * SIZE
    mem.caps = dataclasses.replace(mem.caps, trim=False, min_block=512)
    assert top.caps.trim is False and top.caps.min_block == 512


@sync
async def test_a_layer_overriding_submit_must_override_the_coroutines() -> None:
    with pytest.raises(TypeError, match="overrides submit but not read"):
        class OnlySubmit(Layer):
            def submit(self, cmd, offset, length, data, fua, done):
                super().submit(cmd, offset, length, data, fua, done)


@sync
async def test_a_coroutine_override_is_not_bypassed_by_the_fast_path() -> None:
    class Upper(Layer):
        """Writes upper-case; reads untouched."""

        async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
            await self.inner.write(offset, memoryview(bytes(data).upper()), fua)

    class Sub(Upper):
        """Inherits the routing."""

    mem = MemoryExport(SIZE)
    for cls in (Upper, Sub):
        layer = cls(mem)
        assert (await submitted(layer, eager.WRITE, 0, 3, b"abc"))[1] is None
        assert bytes(mem.data[:3]) == b"ABC"
        mem.data[:3] = b"xyz"
        v, _ = await submitted(layer, eager.READ, 0, 3)
        assert bytes(v) == b"xyz"  # reads keep the direct path


@sync
async def test_stats_counts_both_forms() -> None:
    mem = MemoryExport(SIZE)
    stats = StatsLayer(mem)
    await stats.write(0, memoryview(bytes(4096)))
    await submitted(stats, eager.WRITE, 0, 512, bytes(512))
    await submitted(stats, eager.READ, 0, 100)
    await stats.read(0, 100)
    await submitted(stats, eager.FLUSH)
    ops = stats.to_json()["ops"]
    assert (ops["write"]["count"], ops["write"]["bytes"]) == (2, 4608)
    assert (ops["read"]["count"], ops["read"]["bytes"]) == (2, 200)
    assert ops["flush"]["count"] == 1


@sync
async def test_stack_is_stats_over_qos_over_bottom() -> None:
    mem = MemoryExport(SIZE)
    stack = build_stack(LayerSettings(qos=QosLimits(iops=10)), mem)
    assert isinstance(stack.top, StatsLayer) and stack.top.inner is stack.qos
    assert isinstance(stack.qos, QosLayer) and stack.qos.inner is mem
    assert stack.qos.limits.iops == 10



@sync
async def test_qos_is_wired_past_while_it_has_no_limit() -> None:
    mem = MemoryExport(SIZE)
    stack = build_stack(LayerSettings(), mem)
    assert stack.stats.below != stack.qos.submit
    stack.qos.set_limits(QosLimits(write_iops=1, burst=0.1))
    assert stack.stats.below == stack.qos.submit
    first = submitted(stack.top, eager.WRITE, 0, 512, bytes(512))
    second = submitted(stack.top, eager.WRITE, 0, 512, bytes(512))
    assert (await first)[1] is None and not second.done()  # throttled through the stack
    stack.qos.set_limits(QosLimits())
    assert (await second)[1] is None
    assert stack.stats.below != stack.qos.submit
    assert stack.stats.to_json()["ops"]["write"]["count"] == 2
