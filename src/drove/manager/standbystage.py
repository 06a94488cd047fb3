"""A DR standby's staging area on the manager's disk: the blocks of the next backup,
fetched and verified before any of them is written into the volume, and the block map of
the backup the volume holds.

One directory per standby (``DATA_DIR/standby/NAME``):

* ``staged.img``: a sparse file the volume's size; each changed block at its offset;
* ``staged.json``: written (atomically) once every block is in ``staged.img`` and
  durable: the backup, its size and block map, and the :class:`~drove.backup.delta.Delta`;
  a staging without it is incomplete and thrown away;
* ``restored.json``: the block map of the backup the volume holds (what the next delta is
  computed against, even once that backup is deleted from the target).

Every method blocks (file I/O): call them in a thread.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

IMAGE = "staged.img"
STAGED = "staged.json"
RESTORED = "restored.json"


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Replace ``path`` with ``doc`` atomically and durably (temp, fsync, rename, fsync dir)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path`` (None when absent or unreadable: it is then redone)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def blocks_from_json(raw: object) -> dict[int, str] | None:
    """An offset → hash map stored as JSON (None when it is not one)."""
    if not isinstance(raw, dict):
        return None
    try:
        return {int(o): str(h) for o, h in raw.items()}
    except ValueError:
        return None


def blocks_to_json(blocks: dict[int, str]) -> dict[str, str]:
    """An offset → hash map as JSON."""
    return {str(o): blocks[o] for o in sorted(blocks)}


class StagingArea:
    """The staging directory of one standby."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def start(self, size: int) -> None:
        """Throw away any earlier staging and start an empty one for a ``size`` byte volume."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / STAGED).unlink(missing_ok=True)
        with open(self.root / IMAGE, "wb") as f:
            f.truncate(size)

    def put(self, offset: int, data: bytes) -> None:
        """Stage ``data`` (one verified block) at ``offset``."""
        fd = os.open(self.root / IMAGE, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def seal(self, doc: dict[str, Any]) -> None:
        """Make the staged blocks durable, then record ``doc``: the staging is complete."""
        fd = os.open(self.root / IMAGE, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _write_json(self.root / STAGED, doc)

    def sealed(self) -> dict[str, Any] | None:
        """What a complete staging holds (None when there is none)."""
        if not (self.root / IMAGE).exists():
            return None
        return _read_json(self.root / STAGED)

    def read(self, offset: int, length: int) -> bytes:
        """Staged bytes."""
        fd = os.open(self.root / IMAGE, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def clear(self) -> None:
        """Remove the staged blocks (the backup they belong to is in the volume now)."""
        (self.root / STAGED).unlink(missing_ok=True)
        (self.root / IMAGE).unlink(missing_ok=True)

    def save_restored(self, backup: str, blocks: dict[int, str]) -> None:
        """Record the block map of ``backup``, which the volume now holds."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_json(self.root / RESTORED, {"backup": backup, "blocks": blocks_to_json(blocks)})

    def restored(self, backup: str) -> dict[int, str] | None:
        """The block map of ``backup`` if it is the one recorded (None otherwise)."""
        doc = _read_json(self.root / RESTORED)
        if doc is None or doc.get("backup") != backup:
            return None
        return blocks_from_json(doc.get("blocks"))

    def remove(self) -> None:
        """Remove the whole directory (the volume is no standby any more)."""
        shutil.rmtree(self.root, ignore_errors=True)
