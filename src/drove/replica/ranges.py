"""Sorted, disjoint [start, end) ranges and where a file holds data: the chain's rebuild and
the space report count on the same arithmetic."""

from __future__ import annotations

import errno
import os

Ranges = list[tuple[int, int]]
"""Sorted, disjoint [start, end) ranges (bytes or blocks: the caller's unit)."""


def seek_data(fd: int, pos: int) -> int | None:
    """Offset of the first data at or after ``pos``, or None when only holes follow."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise


def block_extents(fd: int, start: int, end: int, block: int) -> Ranges:
    """Blocks (of ``block`` bytes) of [start, end) where the file holds any data, in block
    numbers, rounded outward, merged."""
    out: Ranges = []
    pos = start * block
    stop = end * block
    while pos < stop:
        d = seek_data(fd, pos)
        if d is None or d >= stop:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        s, e = d // block, min(-(-h // block), end)
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
        pos = h
    return out


def total(a: Ranges) -> int:
    """How much the ranges cover."""
    return sum(e - s for s, e in a)


def intersect(a: Ranges, b: Ranges) -> Ranges:
    """The ranges both ``a`` and ``b`` cover."""
    out: Ranges = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: Ranges, b: Ranges) -> Ranges:
    """What ``a`` covers and ``b`` does not."""
    out: Ranges = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while s < e:
            if k >= len(b) or b[k][0] >= e:
                out.append((s, e))
                break
            if b[k][0] > s:
                out.append((s, b[k][0]))
            s = max(s, b[k][1])
            k += 1
    return out


def union(a: Ranges, b: Ranges) -> Ranges:
    """What ``a`` or ``b`` covers, merged where ranges touch."""
    out: Ranges = []
    for s, e in sorted(a + b):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out
