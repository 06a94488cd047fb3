"""CSI names and IDs <-> drove names, sizes from capacity ranges, access modes.

A CSI name is any string up to 128 characters; a drove name is 1-63 characters of
``a-z 0-9 . _ -``. A CSI name that is a valid drove name is used as it is; any other is
made one (lower case, other characters as ``-``) and ends in a hash of the whole name, so
two CSI names never meet on one drove name. The CSI name itself is kept in a label.
A snapshot's ID is ``VOLUME@SNAPSHOT`` (``@`` is in no drove name).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import grpc

from drove.csi.errors import CsiError, invalid
from drove.csi.proto import pb
from drove.manager.errors import NAME_RE

BLOCK = 4096
DEFAULT_SIZE = 1 << 30
"""Size of a volume whose request names no capacity (volumes are thin: it costs nothing)."""

LABEL_NAME = "csi.drove.io/name"
LABEL_SOURCE = "csi.drove.io/source"
LABEL_PARAMS = "csi.drove.io/parameters"

Mode = pb.VolumeCapability.AccessMode
# drove attaches a volume on one node at a time: single-node modes only.
SINGLE_NODE_MODES = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                     Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER}
FILESYSTEMS = ("ext4", "xfs")
OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE


def drove_name(csi_name: str) -> str:
    """The drove volume or snapshot name for a CSI name."""
    if NAME_RE.match(csi_name):
        return csi_name
    digest = hashlib.sha256(csi_name.encode()).hexdigest()[:12]
    stem = re.sub(r"[^a-z0-9_.-]+", "-", csi_name.lower()).strip("-._")[:50]
    return f"{stem}-{digest}" if stem else f"csi-{digest}"


def snapshot_id(volume: str, snapshot: str) -> str:
    """The CSI snapshot ID of ``snapshot`` of ``volume``."""
    return f"{volume}@{snapshot}"


def parse_snapshot_id(snap_id: str) -> tuple[str, str] | None:
    """(volume, snapshot) of a CSI snapshot ID; None when it cannot be one of ours."""
    volume, sep, snapshot = snap_id.partition("@")
    if not sep or not NAME_RE.match(volume) or not NAME_RE.match(snapshot):
        return None
    return volume, snapshot


def round_up(n: int) -> int:
    """``n`` rounded up to whole 4 KiB blocks."""
    return -(-n // BLOCK) * BLOCK


def size_for(capacity: Any, minimum: int = 0) -> int:
    """The size to give a volume for a CapacityRange (at least ``minimum``: a source's size).

    OUT_OF_RANGE when no multiple of 4 KiB fits the range; INVALID_ARGUMENT for negative
    bounds."""
    required, limit = capacity.required_bytes, capacity.limit_bytes
    if required < 0 or limit < 0:
        raise invalid("capacity_range: required_bytes and limit_bytes must not be negative")
    if limit and required > limit:
        raise CsiError(OUT_OF_RANGE, f"capacity_range: required_bytes {required} is above "
                                     f"limit_bytes {limit}")
    size = round_up(max(required, minimum) if required or minimum else DEFAULT_SIZE)
    if limit and size > limit:
        if required or minimum:
            raise CsiError(OUT_OF_RANGE,
                           f"capacity_range: {size} bytes needed (4 KiB blocks"
                           f"{', the source' if minimum else ''}) is above limit_bytes {limit}")
        size = limit // BLOCK * BLOCK
        if not size:
            raise CsiError(OUT_OF_RANGE, f"capacity_range: limit_bytes {limit} is below "
                                         "one 4 KiB block")
    return size


def fits(size: int, capacity: Any) -> bool:
    """Whether a volume of ``size`` bytes satisfies a CapacityRange."""
    required, limit = capacity.required_bytes, capacity.limit_bytes
    return size >= required and (not limit or size <= limit)


def check_capability(cap: Any, what: str = "volume_capability") -> str | None:
    """INVALID_ARGUMENT unless drove can serve ``cap``; its filesystem ('' if none named,
    None for block access)."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise invalid(f"{what}: access_type missing: set block or mount")
    if cap.access_mode.mode == Mode.UNKNOWN:
        raise invalid(f"{what}: access_mode missing")
    if cap.access_mode.mode not in SINGLE_NODE_MODES:
        raise invalid(f"{what}: access mode {Mode.Mode.Name(cap.access_mode.mode)} is not "
                      "supported: a drove volume is attached on one node at a time "
                      "(use a SINGLE_NODE_* mode)")
    if kind == "block":
        return None
    fs = cap.mount.fs_type
    if fs and fs not in FILESYSTEMS:
        raise invalid(f"{what}: filesystem {fs!r} is not supported: use ext4 or xfs")
    return fs


def capability_problem(cap: Any) -> str | None:
    """Why drove cannot serve ``cap`` (None when it can)."""
    try:
        check_capability(cap)
    except CsiError as exc:
        return str(exc)
    return None
