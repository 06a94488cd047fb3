"""The disks of a node: directories holding replicas, with capacity and an identity marker.

A disk is recognised by a marker file holding its id, written when it is added.
A path whose marker is missing or different (the disk was unmounted, replaced or
removed) is *unavailable*: no replica is started or placed there, which is what
keeps a manager from writing a fresh replica onto an empty mount point.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

MARKER = ".drove-disk"


class DiskError(Exception):
    """A path cannot serve as a disk; the message says why."""


def init_disk(path: Path, name: str) -> str:
    """Make ``path`` a drove disk (or recognise it as one); its id."""
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise DiskError(f"{path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiskError(f"cannot create {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise DiskError(f"{path} is not writable")
    marker = path / MARKER
    if marker.exists():
        try:
            return str(json.loads(marker.read_text())["id"])
        except (OSError, ValueError, KeyError) as exc:
            raise DiskError(f"{marker} is damaged ({exc}); remove it to reuse the disk") from exc
    disk_id = uuid.uuid4().hex
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"id": disk_id, "name": name}) + "\n")
    os.replace(tmp, marker)
    return disk_id


def disk_status(path: str, disk_id: str) -> dict[str, Any]:
    """``state`` (ready or unavailable, with ``error``), ``capacity`` and ``available`` bytes."""
    try:
        found = json.loads((Path(path) / MARKER).read_text())["id"]
    except (OSError, ValueError, KeyError) as exc:
        return {"state": "unavailable", "capacity": 0, "available": 0,
                "error": f"disk marker unreadable: {exc}"}
    if found != disk_id:
        return {"state": "unavailable", "capacity": 0, "available": 0,
                "error": f"{path} holds another disk ({found})"}
    if not os.access(path, os.W_OK | os.X_OK):
        return {"state": "unavailable", "capacity": 0, "available": 0,
                "error": f"{path} is not writable"}
    st = os.statvfs(path)
    return {"state": "ready", "capacity": st.f_blocks * st.f_frsize,
            "available": st.f_bavail * st.f_frsize, "error": None}


def allocated_bytes(path: Path) -> int:
    """Bytes allocated on disk by the files under ``path`` (sparse holes excluded)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                continue
    return total
