"""The Docker plugin's mounts on this host, kept in a file so they outlive the plugin.

For each volume the plugin mounted here: where, and the IDs of the containers
(as Docker or Podman sent them) that use it. A volume is unmounted when its last
ID is gone. Every change is written at once, atomically (temporary file, fsync,
rename, fsync of the directory), so a plugin killed at any instant restarts with
the mounts it had, and a restarted dockerd finds them as it left them.

A volume whose last ID left but whose detach failed stays recorded with no IDs
(``pending``): the next mount reuses it, and the next remove or restart detaches it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = 1


@dataclass
class Mounted:
    """One volume mounted here by the plugin."""

    mountpoint: str
    ids: list[str] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        """True when no container uses it any more but it is still to be detached."""
        return not self.ids


class MountState:
    """The plugin's mounts, as stored in ``path`` (JSON)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.volumes: dict[str, Mounted] = {}
        self._load()

    def _load(self) -> None:
        """Read the file (a missing file is no mounts; a corrupt one is an error)."""
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the plugin's mount state {self.path}: {exc}; "
                             "fix or move it away (the mounts it lists stay mounted)") from exc
        if doc.get("version") != VERSION:
            raise ValueError(f"{self.path}: unknown mount state version {doc.get('version')!r}")
        self.volumes = {name: Mounted(v["mountpoint"], list(v.get("ids", [])))
                        for name, v in doc.get("volumes", {}).items()}

    def get(self, volume: str) -> Mounted | None:
        """The volume's mount, or None."""
        return self.volumes.get(volume)

    def add(self, volume: str, mountpoint: str, container: str) -> Mounted:
        """Record that ``container`` uses ``volume`` mounted at ``mountpoint``; saved."""
        m = self.volumes.setdefault(volume, Mounted(mountpoint))
        m.mountpoint = mountpoint
        if container not in m.ids:
            m.ids.append(container)
        self.save()
        return m

    def release(self, volume: str, container: str) -> Mounted | None:
        """``container`` stopped using ``volume``; the mount after (None: not recorded)."""
        m = self.volumes.get(volume)
        if m is None:
            return None
        if container in m.ids:
            m.ids.remove(container)
            self.save()
        return m

    def forget(self, volume: str) -> None:
        """The volume is not mounted here any more; saved."""
        if self.volumes.pop(volume, None) is not None:
            self.save()

    def to_json(self) -> dict[str, Any]:
        """The stored document."""
        return {"version": VERSION, "volumes": {
            name: {"mountpoint": m.mountpoint, "ids": m.ids}
            for name, m in sorted(self.volumes.items())}}

    def save(self) -> None:
        """Write the state atomically and durably."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps(self.to_json(), indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
