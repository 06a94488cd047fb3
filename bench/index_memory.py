"""Read-index memory and load time for a 1 TiB volume, beside Longhorn's one byte per block.

The index is fed synthetic extents through the same per-layer interface it uses
on real layer files (``data_extents(start, end)``), so a terabyte needs no disk.
Every chunk is loaded (both the head's map and the map of the older layers),
then tracemalloc reports what the index holds.  Scenarios, each a chain of
``--layers`` layers (the last is the head):

  empty        nothing written anywhere
  sequential   the whole volume written front to back, a snapshot after each
               1/layers of it: each layer holds one contiguous slice
  random-1%    1% of the blocks written at random 4 KiB blocks, spread evenly
               and randomly over the layers
  base+random  a fully written base layer, then 1% random blocks over the others

Longhorn keeps one byte per 4 KiB block (its read index): 256 MiB per TiB.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from array import array
from bisect import bisect_right
from collections.abc import Callable

from drove.replica.index import CHUNK_BLOCKS, ReadIndex

BLOCK = 4096
TiB = 1 << 40


class SyntheticLayer:
    """A layer whose data extents are given as sorted block ranges."""

    def __init__(self, starts: list[int], ends: list[int]) -> None:
        """Extents [starts[i], ends[i]) in blocks, sorted and disjoint."""
        self.starts = array("Q", starts)
        self.ends = array("Q", ends)

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        """Extents clipped to [start, end)."""
        i = bisect_right(self.ends, start)
        out = []
        starts, ends = self.starts, self.ends
        while i < len(starts) and starts[i] < end:
            out.append((max(starts[i], start), min(ends[i], end)))
            i += 1
        return out


def blocks_layer(blocks: list[int]) -> SyntheticLayer:
    """A layer holding the given single blocks (adjacent ones merged into one extent)."""
    blocks.sort()
    starts: list[int] = []
    ends: list[int] = []
    for b in blocks:
        if ends and ends[-1] == b:
            ends[-1] = b + 1
        else:
            starts.append(b)
            ends.append(b + 1)
    return SyntheticLayer(starts, ends)


def scenario_empty(nblocks: int, layers: int, rnd: random.Random) -> list[SyntheticLayer]:
    """No data in any layer."""
    return [SyntheticLayer([], []) for _ in range(layers)]


def scenario_sequential(nblocks: int, layers: int, rnd: random.Random) -> list[SyntheticLayer]:
    """Layer i holds the i-th contiguous slice of the volume."""
    cut = [nblocks * i // layers for i in range(layers + 1)]
    return [SyntheticLayer([cut[i]], [cut[i + 1]]) for i in range(layers)]


def random_blocks(nblocks: int, layers: int, rnd: random.Random) -> list[SyntheticLayer]:
    """1% of all blocks, sampled without repetition, dealt out over ``layers`` layers."""
    sample = rnd.sample(range(nblocks), nblocks // 100)
    # The sample comes in random order, so equal slices are a random assignment.
    step = -(-len(sample) // layers)
    return [blocks_layer(sample[i * step:(i + 1) * step]) for i in range(layers)]


def scenario_random(nblocks: int, layers: int, rnd: random.Random) -> list[SyntheticLayer]:
    """1% random 4 KiB blocks spread over all layers."""
    return random_blocks(nblocks, layers, rnd)


def scenario_base_random(nblocks: int, layers: int, rnd: random.Random) -> list[SyntheticLayer]:
    """A full base layer under 1% random blocks in the other layers."""
    return [SyntheticLayer([0], [nblocks]), *random_blocks(nblocks, layers - 1, rnd)]


SCENARIOS: dict[str, Callable[[int, int, random.Random], list[SyntheticLayer]]] = {
    "empty": scenario_empty,
    "sequential": scenario_sequential,
    "random-1%": scenario_random,
    "base+random": scenario_base_random,
}


def load_all(layers: list[SyntheticLayer], nblocks: int, chunk: int) -> ReadIndex:
    """Build an index and load every chunk of both of its maps."""
    idx = ReadIndex(layers, nblocks, chunk)
    idx.preload(0, nblocks)
    return idx


def measure(layers: list[SyntheticLayer], nblocks: int, chunk: int) -> tuple[int, float, dict]:
    """(bytes the loaded index holds, seconds to load it untraced, run counts)."""
    gc.collect()
    started = time.perf_counter()
    idx = load_all(layers, nblocks, chunk)
    seconds = time.perf_counter() - started
    stats = idx.stats()
    del idx
    gc.collect()
    tracemalloc.start()
    idx = load_all(layers, nblocks, chunk)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del idx
    return held, seconds, stats


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=TiB, help="volume size in bytes (1 TiB)")
    ap.add_argument("--layers", type=int, default=10, help="layers in the chain (10)")
    ap.add_argument("--chunk-blocks", type=int, default=CHUNK_BLOCKS)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    args = ap.parse_args()
    nblocks = args.size // BLOCK
    longhorn = nblocks  # one byte per block
    print(f"volume {args.size / TiB:g} TiB = {nblocks} blocks of 4 KiB, {args.layers} layers, "
          f"chunks of {args.chunk_blocks} blocks; Longhorn's index: {longhorn / 2**20:.0f} MiB")
    print(f"{'scenario':<12} {'extents':>10} {'runs':>10} {'index':>11} {'vs Longhorn':>12} "
          f"{'load s':>7}")
    for name in args.only or list(SCENARIOS):
        layers = SCENARIOS[name](nblocks, args.layers, random.Random(args.seed))
        extents = sum(len(layer.starts) for layer in layers)
        held, seconds, stats = measure(layers, nblocks, args.chunk_blocks)
        runs = stats["top_runs"] + stats["below_runs"]
        ratio = f"1/{longhorn / held:.0f}" if held else "-"
        print(f"{name:<12} {extents:>10} {runs:>10} {held / 2**20:>7.2f} MiB {ratio:>12} "
              f"{seconds:>7.2f}")


if __name__ == "__main__":
    main()
