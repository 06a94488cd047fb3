"""The agent's side of linked clones: make a clone replica directory beside a replica of this
host, and tell how much of a replica directory is shared with others (hard links)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from drove.replica.clone import CloneError, make_clone


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
    return make_clone(s, d, snapshot, base, within).to_json()


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
