"""The agent's side of space honesty: the space report of a replica directory no process
serves (a detached volume's), and fstrim on a filesystem drove mounted on this host."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from drove.agent.hostattach import HostAttachError
from drove.replica import usage

FSTRIM_TIMEOUT = 600.0
"""Seconds fstrim may take (the first trim of a large filesystem sends every free range)."""

_TRIMMED = re.compile(r"\((\d+) bytes\) trimmed")


def replica_space(path: str) -> dict[str, Any]:
    """The space report (drove.replica.usage.space_json) of replica directory ``path``,
    opened here for the call: ValueError when it is not a replica directory or a process
    holds it (ask that process's control API)."""
    from drove.replica.chain import Replica
    from drove.replica.errors import ReplicaError

    p = Path(path)
    if p.parent.name != "replicas" or not p.is_absolute() or p.name in ("", ".", ".."):
        raise ValueError(f"{path} is not a replica directory (DISK/replicas/NAME)")
    if not (p / "volume.meta").exists():
        raise ValueError(f"{path} holds no replica on this node")
    try:
        rep = Replica.open(p)
    except ReplicaError as exc:
        raise ValueError(f"{path} cannot be read here: {exc}") from exc
    try:
        return usage.space_json(rep.dir, rep.layers(), rep.size)
    finally:
        rep.close()


def mounted_source(mountpoint: str) -> str | None:
    """What is mounted at ``mountpoint`` in this mount namespace (its source, e.g. the
    device), or None when nothing is."""
    want = os.path.realpath(mountpoint)
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == want and "-" in fields[5:]:
            rest = fields[fields.index("-", 5) + 1:]
            found = _unescape(rest[1]) if len(rest) > 1 else ""  # the last mount wins
    return found


def trim_host(attachment: dict[str, Any], timeout: float = FSTRIM_TIMEOUT) -> dict[str, Any]:
    """Run ``fstrim -v`` on the filesystem a host attachment mounted; ``trimmed``: the bytes
    fstrim reports (what the filesystem discarded; the engine punches them out of the
    replicas' heads)."""
    mnt, device = attachment.get("mountpoint"), attachment.get("device")
    if not mnt or not os.path.isabs(mnt):
        raise HostAttachError("the volume has no filesystem mounted by drove on this host: "
                              "attach it with --mount to trim it")
    source = mounted_source(mnt)
    if source is None:
        raise HostAttachError(f"nothing is mounted at {mnt} on this host any more: attach the "
                              "volume again with --mount to trim it")
    if device and source != device:
        raise HostAttachError(f"{mnt} now mounts {source}, not the volume's device {device}: "
                              "not trimming another filesystem")
    try:
        res = subprocess.run(["fstrim", "-v", mnt], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise HostAttachError("fstrim not found; install util-linux") from exc
    except subprocess.TimeoutExpired as exc:
        raise HostAttachError(f"fstrim {mnt} did not finish within {timeout:g} s") from exc
    out = (res.stdout + res.stderr).strip()
    if res.returncode != 0:
        raise HostAttachError(f"fstrim {mnt} failed (exit {res.returncode}): {out}")
    m = _TRIMMED.search(out)
    if m is None:
        raise HostAttachError(f"cannot read what fstrim trimmed from its output: {out!r}")
    return {"mountpoint": mnt, "trimmed": int(m.group(1)), "output": out}


def _unescape(s: str) -> str:
    """A mountinfo field with its octal escapes (\\040 for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
