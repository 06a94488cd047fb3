"""Helpers for tests of incremental snapshot export: compare images, copy a delta export."""

from __future__ import annotations

import re
from pathlib import Path

from replicatools import run


def same_image(a: Path, b: Path, fmt_a: str = "raw") -> bool:
    """Whether image ``a`` (of format ``fmt_a``) reads the same as the raw image ``b``."""
    return run(["qemu-img", "compare", "-f", fmt_a, "-F", "raw", str(a), str(b)],
               check=False).returncode == 0


def delta_copy(uri: str, target: Path, stats: Path) -> int:
    """Copy the delta export ``uri`` onto the raw image ``target`` with nbdcopy, through an
    nbdkit stats filter; the bytes nbdcopy read.

    nbdcopy truncates a plain file target, so the target is served by qemu-nbd.  It
    skips the HOLE|ZERO extents (--destination-is-zero: the target holds FROM there),
    writes zero data as data (--sparse=0) and, as libnbd 1.14 reads whole requests
    around any data, asks in 4 KiB requests (the delta's granularity).
    """
    run(["nbdcopy", "--destination-is-zero", "--sparse=0", "--request-size=4096", "--",
         "[", "nbdkit", "--filter=stats", "nbd", f"uri={uri}", f"statsfile={stats}", "]",
         "[", "qemu-nbd", "-f", "raw", str(target), "]"])
    text = stats.read_text()
    m = re.search(r"^read: (\d+) ops", text, re.M)
    assert m, text
    return int(m.group(1)) * 4096
