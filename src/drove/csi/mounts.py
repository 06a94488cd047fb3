"""Bind mounts for NodePublish: a staged filesystem or a block device at a target path."""

from __future__ import annotations

import os
import subprocess
import time

BUSY_RETRY = 2.0
"""Seconds a busy umount is retried (the kernel may release a file lazily)."""


class MountError(Exception):
    """A mount command failed; the message holds its error."""


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise MountError(f"{' '.join(cmd)}: {res.stderr.strip() or res.returncode}")


def is_mount(path: str) -> bool:
    """Whether something is mounted at ``path`` (a directory or a file)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == real:
                return True
    return False


def bind(source: str, target: str, *, readonly: bool, flags: list[str]) -> None:
    """Bind ``source`` at ``target``; read-only and with ``flags`` (nosuid, noatime...)
    when asked: a bind mount takes them by a remount, the staged mount stays as it is."""
    _run(["mount", "--bind", source, target])
    options = (["ro"] if readonly else []) + [f for f in flags if f not in ("bind", "rw")]
    if options:
        try:
            _run(["mount", "-o", ",".join(["remount", "bind", *options]), target])
        except MountError:
            unmount(target)
            raise


def unmount(target: str) -> None:
    """Unmount ``target``; a busy one is retried for BUSY_RETRY seconds."""
    deadline = time.monotonic() + BUSY_RETRY
    while True:
        try:
            _run(["umount", target])
            return
        except MountError as exc:
            if "busy" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)  # a retry interval: the release has no event to wait on


def device_size(device: str) -> int:
    """The size in bytes of a block device."""
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def remount(target: str, flags: list[str]) -> None:
    """Remount ``target`` with the mount ``flags`` (a staged filesystem's mount_flags)."""
    _run(["mount", "-o", ",".join(["remount", *flags]), target])



def readonly_device(device: str) -> str:
    """A new read-only loop device over ``device``: what a read-only block publish binds.

    A read-only mount does not stop writes through a device node on it, so the node
    must be a device the kernel itself refuses writes to."""
    res = subprocess.run(["losetup", "--read-only", "--find", "--show", device],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise MountError(f"losetup --read-only {device}: {res.stderr.strip()}")
    return res.stdout.strip()


def release_device(loop: str) -> None:
    """Detach a loop device made by :func:`readonly_device`."""
    _run(["losetup", "--detach", loop])


def refresh_size(loop: str) -> None:
    """Make a loop device take its backing device's new size (after a growth)."""
    _run(["losetup", "--set-capacity", loop])
