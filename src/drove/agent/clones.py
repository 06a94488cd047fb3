"""The agent's side of linked clones: make a clone replica directory beside a replica of this
host, and tell how much of a replica directory is shared with others (hard links)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from drove.replica.clone import CLONE_TMP_SUFFIX, CloneError, make_clone

STALE_TEMP = 600.0
"""Seconds after which a half-built clone directory is a crash's leftover."""


def _replica_dir(path: str) -> Path:
    """``path`` if it names a replica directory (DISK/replicas/NAME), else ValueError."""
    p = Path(path)
    if p.parent.name != "replicas" or not p.is_absolute() or p.name in ("", ".", ".."):
        raise ValueError(f"{path} is not a replica directory (DISK/replicas/NAME)")
    return p


def clone_replica(src: str, dst: str, snapshot: str, base: Mapping[str, str],
                  within: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Make replica directory ``dst`` a linked clone of ``snapshot`` in replica ``src``
    (both on this host, one filesystem); what was made (drove.replica.clone.CloneResult)."""
    s, d = _replica_dir(src), _replica_dir(dst)
    if s.parent.resolve() != d.parent.resolve():
        raise CloneError(f"{dst} is not on the disk of {src}: a linked clone shares the "
                         "base layers' files on one disk")
    _remove_stale_temps(d.parent)
    return make_clone(s, d, snapshot, base, within).to_json()


def _remove_stale_temps(replicas: Path) -> None:
    """Remove clone directories a crash left half-built (their temporary names) that are
    older than :data:`STALE_TEMP`: a clone takes well under a second."""
    now = time.time()
    for e in os.scandir(replicas):
        if not (e.name.startswith(".") and e.name.endswith(CLONE_TMP_SUFFIX)):
            continue
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False) and now - e.stat().st_mtime > STALE_TEMP:
                shutil.rmtree(e.path)


def replica_usage(path: str) -> dict[str, int]:
    """Bytes allocated in ``path``'s layer files shared with another directory (more than
    one link) and in files of its own; zeros when the directory is not here."""
    shared = owned = 0
    try:
        entries = list(os.scandir(_replica_dir(path)))
    except FileNotFoundError:
        return {"shared": 0, "owned": 0}
    for e in entries:
        if not e.name.endswith(".img") or not e.is_file(follow_symlinks=False):
            continue
        st = e.stat(follow_symlinks=False)
        if st.st_nlink > 1:
            shared += st.st_blocks * 512
        else:
            owned += st.st_blocks * 512
    return {"shared": shared, "owned": owned}
