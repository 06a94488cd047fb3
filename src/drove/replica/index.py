"""The read index: which layer of a chain holds each 4 KiB block.

The index is split into chunks of ``chunk_blocks`` blocks (65536 = 256 MiB by
default), each loaded on first access from the layers' extents.  A loaded chunk
is either a plain int (one value covers the whole chunk: O(1) memory) or two
``array('H')``: run starts relative to the chunk and the value of each run.
Memory therefore grows with the number of data extents, never with the size of
the volume (Longhorn keeps one byte per block: 256 MiB per TiB).

:class:`ReadIndex` keeps two such maps over a chain of layers: the *top* map
(where the top layer, the head, holds data) and the *below* map (the newest
layer under the top that holds each block).  Writes only touch the top map; the
below map only changes with the structure of the chain.  Keeping them apart also
answers the question zero/trim need: does an older layer hold this block?
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import Protocol

HOLE = 0xFFFF
"""Value of blocks no layer holds."""

MAX_LAYERS = HOLE
"""Layer ids are uint16 below HOLE."""

CHUNK_BLOCKS = 65536
"""Default chunk: 65536 blocks of 4 KiB = 256 MiB; uint16 run starts fit it exactly."""

Chunk = int | tuple[array, array]
Run = tuple[int, int, int]


class ExtentSource(Protocol):
    """What the index needs of a layer: where it holds data."""

    def data_extents(self, start: int, end: int) -> Iterable[tuple[int, int]]:
        """Sorted, disjoint ``(start, end)`` block ranges holding data within [start, end)."""
        ...


def build_chunk(runs: Iterable[Run], start: int, n: int) -> Chunk:
    """A chunk of ``n`` blocks at ``start`` from sorted disjoint absolute (s, e, value) runs.

    The runs must lie within [start, start + n); gaps between them are holes.
    """
    starts: list[int] = []
    vals: list[int] = []
    cur = start
    last = -1
    for s, e, v in runs:
        if s >= e:
            continue
        if s > cur and last != HOLE:
            starts.append(cur - start)
            vals.append(HOLE)
            last = HOLE
        if v != last:
            starts.append(s - start)
            vals.append(v)
            last = v
        cur = e
    if cur < start + n and last != HOLE:
        starts.append(cur - start)
        vals.append(HOLE)
    if len(vals) <= 1:
        return vals[0] if vals else HOLE
    # Built from lists so the arrays get exactly their size (no growth slack).
    return array("H", starts), array("H", vals)


def overlay(layers: Sequence[tuple[int, ExtentSource]], start: int, end: int) -> Chunk:
    """Chunk [start, end) mapping each block to the newest of ``layers`` holding it.

    ``layers`` are (id, source) pairs, newest first; a larger id must mean newer.
    """
    found: list[tuple[int, list[tuple[int, int]]]] = []
    for lid, src in layers:
        ext = list(src.data_extents(start, end))
        if not ext:
            continue
        found.append((lid, ext))
        if len(ext) == 1 and ext[0][0] <= start and ext[0][1] >= end:
            break  # this layer covers the whole chunk: older ones are hidden
    if not found:
        return HOLE
    if len(found) == 1:
        lid, ext = found[0]
        return build_chunk(((s, e, lid) for s, e in ext), start, end - start)
    tagged = sorted((s, e, lid) for lid, ext in found for s, e in ext)
    out: list[Run] = []
    for s, e, lid in tagged:
        if not out or s >= out[-1][1]:
            out.append((s, e, lid))
            continue
        # Overlap: it can only touch runs at the end of ``out`` (starts are sorted).
        ts, te, tl = out[-1]
        if len(out) == 1 or out[-2][1] <= s:
            # The common case (say, a block written over a base layer): it
            # overlaps the last run only, and ts <= s as starts are sorted.
            if lid > tl:
                out.pop()
                if ts < s:
                    out.append((ts, s, tl))
                out.append((s, e, lid))
                if e < te:
                    out.append((e, te, tl))
            elif e > te:
                out.append((te, e, lid))
            continue
        k = len(out)
        while k and out[k - 1][1] > s:
            k -= 1
        tail = out[k:]
        del out[k:]
        out.extend(_resolve([*tail, (s, e, lid)]))
    return build_chunk(out, start, end - start)


def _resolve(runs: list[Run]) -> list[Run]:
    """Disjoint sorted runs from a few overlapping ones, the largest id winning."""
    cuts = sorted({p for s, e, _ in runs for p in (s, e)})
    out: list[Run] = []
    for a, b in pairwise(cuts):
        best = -1
        for s, e, lid in runs:
            if s <= a and b <= e and lid > best:
                best = lid
        if best < 0:
            continue
        if out and out[-1][2] == best and out[-1][1] == a:
            out[-1] = (out[-1][0], b, best)
        else:
            out.append((a, b, best))
    return out


def _splice(starts: array, vals: array, s: int, e: int, v: int, n: int) -> None:
    """Set chunk-relative blocks [s, e) to ``v`` in place (0 <= s < e <= n)."""
    i = bisect_right(starts, s) - 1  # run holding s
    j = bisect_right(starts, e - 1) - 1  # run holding e - 1
    count = len(starts)
    end_j = starts[j + 1] if j + 1 < count else n
    # Rewrite runs i..j plus one neighbour each side, so equal neighbours merge.
    lo = i - 1 if i > 0 else i
    hi = j + 2 if j + 1 < count else j + 1
    new: list[tuple[int, int]] = []
    if lo < i:
        new.append((starts[lo], vals[lo]))
    if starts[i] < s:
        new.append((starts[i], vals[i]))
    new.append((s, v))
    if e < end_j:
        new.append((e, vals[j]))
    if hi > j + 1:
        new.append((starts[j + 1], vals[j + 1]))
    out_s: list[int] = []
    out_v: list[int] = []
    for st, va in new:
        if out_v and out_v[-1] == va:
            continue
        out_s.append(st)
        out_v.append(va)
    starts[lo:hi] = array("H", out_s)
    vals[lo:hi] = array("H", out_v)


class RunMap:
    """A value per block, as lazily loaded per-chunk runs."""

    __slots__ = ("_chunks", "_load", "chunk_blocks", "nblocks")

    def __init__(self, nblocks: int, load: Callable[[int, int], Chunk],
                 chunk_blocks: int = CHUNK_BLOCKS, fill: int | None = None) -> None:
        """Map ``nblocks`` blocks; ``load(start, end)`` builds a chunk; ``fill`` preloads all."""
        if not 1 <= chunk_blocks <= 65536:
            raise ValueError("chunk_blocks must be within 1..65536 (uint16 run starts)")
        self.nblocks = nblocks
        self.chunk_blocks = chunk_blocks
        self._load = load
        self._chunks: list[Chunk | None] = [fill] * self._nchunks(nblocks)

    def _nchunks(self, nblocks: int) -> int:
        """Number of chunks covering ``nblocks``."""
        return -(-nblocks // self.chunk_blocks)

    def _chunk(self, c: int) -> Chunk:
        """Chunk ``c``, loading it on first access."""
        ch = self._chunks[c]
        if ch is None:
            s = c * self.chunk_blocks
            ch = self._load(s, min(s + self.chunk_blocks, self.nblocks))
            self._chunks[c] = ch
        return ch

    def value(self, block: int) -> int:
        """The value of one block: a bisect, no lists or tuples built."""
        ch = self._chunk(block // self.chunk_blocks)
        if isinstance(ch, int):
            return ch
        starts, vals = ch
        return vals[bisect_right(starts, block % self.chunk_blocks) - 1]

    def loaded(self, c: int) -> Chunk | None:
        """Chunk ``c`` if it is loaded, else None."""
        return self._chunks[c]

    def set_chunk(self, c: int, chunk: Chunk | None) -> None:
        """Replace chunk ``c`` (None: load it again on next access)."""
        self._chunks[c] = chunk

    def runs(self, start: int, end: int) -> list[Run]:
        """Runs (s, e, value) covering [start, end), adjacent equal values merged."""
        cb = self.chunk_blocks
        c0, c1 = start // cb, (end - 1) // cb
        if c0 == c1:  # the usual case, kept short: chunks are normalised already
            ch = self._chunk(c0)
            if isinstance(ch, int):
                return [(start, end, ch)]
            base = c0 * cb
            return _chunk_runs(ch, base, min(base + cb, self.nblocks), start, end)
        out: list[Run] = []
        for c in range(c0, c1 + 1):
            base = c * cb
            cend = min(base + cb, self.nblocks)
            lo = max(start, base)
            hi = min(end, cend)
            ch = self._chunk(c)
            if isinstance(ch, int):
                pieces: Iterable[Run] = ((lo, hi, ch),)
            else:
                pieces = _chunk_runs(ch, base, cend, lo, hi)
            for s, e, v in pieces:
                if out and out[-1][2] == v:
                    out[-1] = (out[-1][0], e, v)
                else:
                    out.append((s, e, v))
        return out

    def assign(self, start: int, end: int, value: int) -> None:
        """Set [start, end) to ``value`` in the chunks already loaded.

        Unloaded chunks are left alone: their loader reads the layers, which
        already show the change, whenever they are first needed.
        """
        cb = self.chunk_blocks
        for c in range((start // cb), (end - 1) // cb + 1):
            ch = self._chunks[c]
            if ch is None:
                continue
            base = c * cb
            n = min(base + cb, self.nblocks) - base
            s = max(start, base) - base
            e = min(end, base + n) - base
            if s == 0 and e == n:
                self._chunks[c] = value
                continue
            if isinstance(ch, int):
                if ch == value:
                    continue
                ch = (array("H", [0]), array("H", [ch]))
            else:
                # Rewriting blocks the head already holds is the common case of a
                # busy volume: one bisect instead of a splice.
                i = bisect_right(ch[0], s) - 1
                if ch[1][i] == value and (i + 1 == len(ch[0]) or ch[0][i + 1] >= e):
                    continue
            _splice(ch[0], ch[1], s, e, value, n)
            self._chunks[c] = ch[1][0] if len(ch[1]) == 1 else ch

    def preload(self, start: int, end: int) -> None:
        """Load the chunks overlapping [start, end) now rather than on first access."""
        for c in range(start // self.chunk_blocks, (end - 1) // self.chunk_blocks + 1):
            self._chunk(c)

    def invalidate(self, start: int = 0, end: int | None = None) -> None:
        """Forget the chunks overlapping [start, end) (all by default)."""
        end = self.nblocks if end is None else end
        cb = self.chunk_blocks
        for c in range(start // cb, (max(end, start + 1) - 1) // cb + 1):
            if c < len(self._chunks):
                self._chunks[c] = None

    def resize(self, nblocks: int) -> None:
        """Change the number of blocks, forgetting the chunks whose extent changes."""
        old = self.nblocks
        self.nblocks = nblocks
        n = self._nchunks(nblocks)
        del self._chunks[n:]
        self._chunks.extend([None] * (n - len(self._chunks)))
        if old % self.chunk_blocks and old // self.chunk_blocks < n:
            self._chunks[old // self.chunk_blocks] = None

    def stats(self) -> tuple[int, int]:
        """(loaded chunks, runs in loaded chunks)."""
        loaded = runs = 0
        for ch in self._chunks:
            if ch is None:
                continue
            loaded += 1
            runs += 1 if isinstance(ch, int) else len(ch[0])
        return loaded, runs


def _chunk_runs(ch: tuple[array, array], base: int, cend: int, lo: int, hi: int) -> list[Run]:
    """Absolute runs of a run-array chunk at ``base`` clipped to [lo, hi)."""
    starts, vals = ch
    out: list[Run] = []
    count = len(starts)
    i = bisect_right(starts, lo - base) - 1
    while i < count:
        s = base + starts[i]
        if s >= hi:
            break
        e = base + starts[i + 1] if i + 1 < count else cend
        out.append((max(s, lo), min(e, hi), vals[i]))
        i += 1
    return out


class ReadIndex:
    """Block → newest layer holding it, over a chain of layers (last = top, writable)."""

    def __init__(self, layers: Sequence[ExtentSource], nblocks: int,
                 chunk_blocks: int = CHUNK_BLOCKS, top_empty: bool = False) -> None:
        """Index ``layers`` (oldest first); ``top_empty`` says the top holds no data yet."""
        if not 1 <= len(layers) <= MAX_LAYERS:
            raise ValueError(f"a chain needs 1..{MAX_LAYERS} layers, got {len(layers)}")
        self._layers = list(layers)
        self.top = len(layers) - 1
        self.top_map = RunMap(nblocks, self._load_top, chunk_blocks,
                              fill=HOLE if top_empty else None)
        self.below_map = RunMap(nblocks, self._load_below, chunk_blocks,
                                fill=HOLE if self.top == 0 else None)

    @property
    def nblocks(self) -> int:
        """Blocks covered."""
        return self.top_map.nblocks

    @property
    def layers(self) -> list[ExtentSource]:
        """The indexed layers, oldest first."""
        return self._layers

    def _load_top(self, start: int, end: int) -> Chunk:
        """Load a chunk of the top map from the top layer's extents."""
        top = self.top
        ext = self._layers[top].data_extents(start, end)
        return build_chunk(((s, e, top) for s, e in ext), start, end - start)

    def _load_below(self, start: int, end: int) -> Chunk:
        """Load a chunk of the below map from the older layers' extents."""
        older = [(i, self._layers[i]) for i in range(self.top - 1, -1, -1)]
        return overlay(older, start, end)

    def runs(self, start: int, end: int) -> list[Run]:
        """Runs (s, e, layer id or HOLE) covering [start, end): the newest holder of each block."""
        top_runs = self.top_map.runs(start, end)
        if self.top == 0:
            return top_runs
        if len(top_runs) == 1:
            return top_runs if top_runs[0][2] != HOLE else self.below_map.runs(start, end)
        out: list[Run] = []
        for s, e, v in top_runs:
            pieces = [(s, e, v)] if v != HOLE else self.below_map.runs(s, e)
            for ps, pe, pv in pieces:
                if out and out[-1][2] == pv:
                    out[-1] = (out[-1][0], pe, pv)
                else:
                    out.append((ps, pe, pv))
        return out

    def layer_of(self, block: int) -> int:
        """The newest layer holding ``block`` (HOLE if none): the small-read fast path."""
        v = self.top_map.value(block)
        if v != HOLE or self.top == 0:
            return v
        return self.below_map.value(block)

    def below_runs(self, start: int, end: int) -> list[Run]:
        """Runs of the newest layer under the top holding each block of [start, end)."""
        return self.below_map.runs(start, end)

    def top_runs(self, start: int, end: int) -> list[Run]:
        """Runs of [start, end) where the top holds data (value top) or not (HOLE)."""
        return self.top_map.runs(start, end)

    def set_top(self, start: int, end: int, allocated: bool) -> None:
        """Record that the top now holds (or no longer holds) blocks [start, end)."""
        self.top_map.assign(start, end, self.top if allocated else HOLE)

    def push(self, new_top: ExtentSource) -> None:
        """The top became read-only and ``new_top`` (empty) was stacked on it.

        Layer ids stay; the below map of a chunk is the old top over the old
        below wherever both were loaded, so a snapshot does not cost a reload.
        """
        if len(self._layers) >= MAX_LAYERS:
            raise ValueError(f"a chain holds at most {MAX_LAYERS} layers")
        old_top = self.top
        top_map, below_map = self.top_map, self.below_map
        cb = top_map.chunk_blocks
        for c in range(len(top_map._chunks)):
            t = top_map.loaded(c)
            b = below_map.loaded(c)
            if t is None or b is None:
                below_map.set_chunk(c, None)
                continue
            base = c * cb
            end = min(base + cb, top_map.nblocks)
            if t == old_top or b == HOLE:
                below_map.set_chunk(c, t)
                continue
            merged = self.runs(base, end)
            below_map.set_chunk(c, build_chunk(merged, base, end - base))
        self._layers.append(new_top)
        self.top = len(self._layers) - 1
        self.top_map = RunMap(top_map.nblocks, self._load_top, cb, fill=HOLE)

    def rebase(self, layers: Sequence[ExtentSource]) -> None:
        """Replace the layers under the top (same top): the below map is reloaded lazily."""
        top = self._layers[-1]
        self._layers = [*layers, top]
        old_top = self.top
        self.top = len(self._layers) - 1
        if self.top != old_top:
            # The top's id changed: rewrite the values of loaded top chunks.
            for c, ch in enumerate(self.top_map._chunks):
                if ch is None or ch == HOLE:
                    continue
                if isinstance(ch, int):
                    self.top_map.set_chunk(c, self.top)
                else:
                    ch[1][:] = array("H", (self.top if v != HOLE else HOLE for v in ch[1]))
        nblocks = self.top_map.nblocks
        self.below_map = RunMap(nblocks, self._load_below, self.top_map.chunk_blocks,
                                fill=HOLE if self.top == 0 else None)

    def preload(self, start: int, end: int) -> None:
        """Load both maps over [start, end) now (benchmarks, warm-up)."""
        self.top_map.preload(start, end)
        self.below_map.preload(start, end)

    def invalidate_below(self, start: int, end: int) -> None:
        """Reload the below map over [start, end) (older layers changed there)."""
        self.below_map.invalidate(start, end)

    def resize(self, nblocks: int) -> None:
        """The volume grew or shrank to ``nblocks`` blocks."""
        self.top_map.resize(nblocks)
        self.below_map.resize(nblocks)

    def stats(self) -> dict[str, int]:
        """Loaded chunks and runs of both maps (for benchmarks and debugging)."""
        tc, tr = self.top_map.stats()
        bc, br = self.below_map.stats()
        return {"top_chunks": tc, "top_runs": tr, "below_chunks": bc, "below_runs": br}
