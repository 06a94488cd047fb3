"""The read index against a per-block model: run insertion, splitting, chunk borders."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drove.replica.index import HOLE, ReadIndex, RunMap, build_chunk, overlay


class SetSource:
    """A layer whose data blocks are a set (the index only sees data_extents)."""

    def __init__(self, blocks: set[int] | None = None) -> None:
        self.blocks = set(blocks or ())
        self.calls = 0

    def data_extents(self, start: int, end: int) -> list[tuple[int, int]]:
        self.calls += 1
        out: list[tuple[int, int]] = []
        for b in sorted(x for x in self.blocks if start <= x < end):
            if out and out[-1][1] == b:
                out[-1] = (out[-1][0], b + 1)
            else:
                out.append((b, b + 1))
        return out


def flatten(runs: list[tuple[int, int, int]], start: int, end: int) -> list[int]:
    """Per-block values of runs, checking they tile [start, end) with merged neighbours."""
    assert runs[0][0] == start and runs[-1][1] == end
    out: list[int] = []
    for i, (s, e, v) in enumerate(runs):
        assert s < e
        if i:
            assert runs[i - 1][1] == s, "runs must be contiguous"
            assert runs[i - 1][2] != v, "equal neighbours must be merged"
        out.extend([v] * (e - s))
    return out


def model_newest(layers: list[set[int]], n: int) -> list[int]:
    """Newest layer (highest index) holding each block, HOLE if none."""
    out = []
    for b in range(n):
        holders = [i for i, blocks in enumerate(layers) if b in blocks]
        out.append(max(holders) if holders else HOLE)
    return out


def check_chunks_normalised(m: RunMap) -> None:
    """Loaded chunks: uniform ints, or arrays of >1 runs starting at 0 with no equal neighbours."""
    for ch in m._chunks:
        if ch is None or isinstance(ch, int):
            continue
        starts, vals = ch
        assert isinstance(starts, array) and isinstance(vals, array)
        assert len(starts) == len(vals) > 1
        assert starts[0] == 0
        assert list(starts) == sorted(set(starts))
        assert all(vals[i] != vals[i + 1] for i in range(len(vals) - 1))


layer_sets = st.lists(st.sets(st.integers(0, 63), max_size=40), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(layers=layer_sets, n=st.integers(1, 64), chunk=st.integers(1, 9),
       queries=st.lists(st.tuples(st.integers(0, 63), st.integers(1, 64)), max_size=5))
def test_index_matches_newest_layer_model(layers, n, chunk, queries):
    layers = [{b for b in s if b < n} for s in layers]
    idx = ReadIndex([SetSource(s) for s in layers], n, chunk)
    model = model_newest(layers, n)
    for s, length in queries:
        s = min(s, n - 1)
        e = min(n, s + length)
        assert flatten(idx.runs(s, e), s, e) == model[s:e]
    assert flatten(idx.runs(0, n), 0, n) == model
    assert [idx.layer_of(b) for b in range(n)] == model  # the single-block fast path
    below = model_newest(layers[:-1], n) if len(layers) > 1 else [HOLE] * n
    assert flatten(idx.below_runs(0, n), 0, n) == below
    check_chunks_normalised(idx.top_map)
    check_chunks_normalised(idx.below_map)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 80), chunk=st.integers(1, 17), data=st.data())
@pytest.mark.slow
def test_runmap_assign_and_invalidate_vs_model(n, chunk, data):
    model = [HOLE] * n

    def load(start: int, end: int):
        return build_chunk(((b, b + 1, model[b]) for b in range(start, end) if model[b] != HOLE),
                           start, end - start)

    m = RunMap(n, load, chunk)
    for _ in range(data.draw(st.integers(1, 25))):
        s = data.draw(st.integers(0, n - 1))
        e = data.draw(st.integers(s + 1, n))
        op = data.draw(st.sampled_from(["assign", "assign", "query", "invalidate"]))
        if op == "assign":
            v = data.draw(st.sampled_from([HOLE, 0, 1, 2]))
            # The loader sees the model: assign must agree with it (it only updates
            # loaded chunks and leaves the rest to the loader).
            model[s:e] = [v] * (e - s)
            m.assign(s, e, v)
        elif op == "query":
            assert flatten(m.runs(s, e), s, e) == model[s:e]
            assert [m.value(b) for b in range(s, e)] == model[s:e]
        else:
            m.invalidate(s, e)
        check_chunks_normalised(m)
    assert flatten(m.runs(0, n), 0, n) == model


@settings(max_examples=200, deadline=None)
@given(layers=layer_sets, n=st.integers(1, 48), chunk=st.integers(1, 7), data=st.data())
def test_set_top_push_rebase(layers, n, chunk, data):
    layers = [{b for b in s if b < n} for s in layers]
    sources = [SetSource(s) for s in layers]
    idx = ReadIndex(sources, n, chunk)
    # Touch some chunks so push() finds a mix of loaded and unloaded ones.
    for _ in range(data.draw(st.integers(0, 3))):
        b = data.draw(st.integers(0, n - 1))
        idx.runs(b, b + 1)
    for _ in range(data.draw(st.integers(0, 6))):
        s = data.draw(st.integers(0, n - 1))
        e = data.draw(st.integers(s + 1, n))
        alloc = data.draw(st.booleans())
        # The top source changes as the file would; the index is told too.
        if alloc:
            sources[-1].blocks |= set(range(s, e))
            layers[-1] |= set(range(s, e))
        else:
            sources[-1].blocks -= set(range(s, e))
            layers[-1] -= set(range(s, e))
        idx.set_top(s, e, alloc)
        assert flatten(idx.runs(0, n), 0, n) == model_newest(layers, n)
    new = SetSource()
    idx.push(new)
    sources.append(new)
    layers.append(set())
    assert flatten(idx.runs(0, n), 0, n) == model_newest(layers, n)
    assert flatten(idx.top_runs(0, n), 0, n) == [HOLE] * n
    assert flatten(idx.below_runs(0, n), 0, n) == model_newest(layers[:-1], n)
    idx.set_top(0, 1, True)
    new.blocks.add(0)
    layers[-1].add(0)
    # Drop a layer under the top (as a fold does): ids shift, the top keeps its runs.
    k = data.draw(st.integers(0, len(layers) - 2))
    del layers[k]
    del sources[k]
    idx.rebase(sources[:-1])
    assert flatten(idx.runs(0, n), 0, n) == model_newest(layers, n)
    idx.set_top(n - 1, n, True)
    new.blocks.add(n - 1)
    layers[-1].add(n - 1)
    assert flatten(idx.runs(0, n), 0, n) == model_newest(layers, n)


@settings(max_examples=200, deadline=None)
@given(layers=layer_sets, n=st.integers(1, 64))
def test_overlay_newest_wins(layers, n):
    layers = [{b for b in s if b < n} for s in layers]
    newest_first = [(i, SetSource(s)) for i, s in reversed(list(enumerate(layers)))]
    chunk = overlay(newest_first, 0, n)
    want = model_newest(layers, n)
    if isinstance(chunk, int):
        assert want == [chunk] * n
    else:
        starts, vals = chunk
        got = []
        for i, (s, v) in enumerate(zip(starts, vals, strict=True)):
            e = starts[i + 1] if i + 1 < len(starts) else n
            got.extend([v] * (e - s))
        assert got == want


def test_uniform_chunks_cost_one_int_and_stop_at_full_cover():
    n = 4 * 16
    full = SetSource(set(range(n)))
    older = SetSource({3, 5})
    idx = ReadIndex([older, full, SetSource()], n, 16)
    assert idx.runs(0, n) == [(0, n, 1)]
    # Every below chunk is the int 1; the layer under the full one was never asked.
    assert idx.below_map._chunks == [1, 1, 1, 1]
    assert older.calls == 0
    assert idx.stats()["below_runs"] == 4


def test_chunk_border_splits():
    idx = ReadIndex([SetSource(), SetSource()], 12, 4)
    idx.runs(0, 12)  # load everything
    idx.set_top(3, 9, True)
    assert idx.runs(0, 12) == [(0, 3, HOLE), (3, 9, 1), (9, 12, HOLE)]
    # Whole chunk 1 became the int 1, chunks 0 and 2 hold two runs each.
    assert idx.top_map._chunks[1] == 1
    idx.set_top(4, 5, False)
    assert idx.runs(0, 12) == [(0, 3, HOLE), (3, 4, 1), (4, 5, HOLE), (5, 9, 1), (9, 12, HOLE)]
    idx.set_top(0, 12, False)
    assert idx.top_map._chunks == [HOLE, HOLE, HOLE]


def test_resize_grows_with_holes():
    top = SetSource({0, 1})
    idx = ReadIndex([SetSource({2}), top], 6, 4)
    assert flatten(idx.runs(0, 6), 0, 6) == [1, 1, 0, HOLE, HOLE, HOLE]
    idx.resize(11)
    assert flatten(idx.runs(0, 11), 0, 11) == [1, 1, 0] + [HOLE] * 8
