"""Whether a mounted volume is really in use: other mounts of its device, in any namespace.

A container engine that crashes (dockerd killed) never sends the Unmount of the
containers it lost, so the plugin's count of mount IDs can outlive every container.
What a container really holds is a bind mount of the volume in its own mount
namespace; this module finds those, so a volume no namespace uses any more can be
released even though its IDs were never unmounted.
"""

from __future__ import annotations

import os
from pathlib import Path


def other_mounts(mountpoint: str) -> list[str]:
    """Mounts of the filesystem mounted at ``mountpoint`` other than that one mount, in
    every mount namespace of this host: "PID (COMM): PATH" for each (one PID per namespace).
    """
    try:
        st = os.stat(mountpoint)
    except OSError:
        return []
    devno = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    mine = _namespace("self")
    real = os.path.realpath(mountpoint)
    found: list[str] = []
    seen: set[str] = set()
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        ns = _namespace(str(pid))
        if ns is None or ns in seen:
            continue
        seen.add(ns)
        for point in _points_of(pid, devno):
            if ns == mine and point == real:
                continue  # the plugin's own mount
            found.append(f"{pid} ({_comm(pid)}): {point}")
    return found


def _namespace(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _points_of(pid: int, devno: str) -> list[str]:
    """Where process ``pid``'s mount namespace mounts device ``devno``."""
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[2] == devno:
            out.append(fields[4].replace("\\040", " "))
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
