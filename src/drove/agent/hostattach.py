"""Host attach: a volume's NBD export as a block device on this host, with a filesystem.

The kernel NBD client is not everywhere (containers, hosts without the module), so the
path implemented here is `nbdfuse` (the export as one file on a FUSE mount) plus a
loop device over that file. Every attachment owns a work directory::

    WORKDIR/fuse/disk      the file nbdfuse exposes (WORKDIR/fuse is the FUSE mount)
    WORKDIR/nbdfuse.pid    written by nbdfuse when it serves
    WORKDIR/nbdfuse.log    nbdfuse's stderr

Everything an attachment leaves on the host can be found again from that directory
(mountinfo, the loop devices' backing files, nbdfuse's command line), which is what
lets `cleanup_stale` undo an attach after its manager crashed.

Data is sacred: an existing signature is never formatted over, a blank-looking device is
formatted only when the server says the whole export reads as zeros, and `detach`
flushes the device through to the NBD server before it disconnects anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

FUSE_DIR = "fuse"
FUSE_NAME = "disk"
PID_FILE = "nbdfuse.pid"
LOG_FILE = "nbdfuse.log"

# How long a busy umount / fusermount / loop detach is retried before giving up: long
# enough for a lazily released file (the kernel defers some fput()s), short enough that
# a real user of the mount is reported promptly.
BUSY_RETRY = 2.0
POLL = 0.01

# ext*: the export was checked to read as zeros (see _require_zero_export), so mke2fs
# need not zero inode tables and journal, nor discard a device that is already thin;
# nor will the kernel's ext4lazyinit thread write them later. 1T: 0.27 s, no lazy init.
EXT_OPTS = ["-q", "-E", "nodiscard,assume_storage_prezeroed=1"]
# e2fsprogs < 1.47 lacks assume_storage_prezeroed: zero them now with WRITE_ZEROES instead.
EXT_OPTS_OLD = ["-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
MKFS_OPTS = {"ext2": EXT_OPTS, "ext3": EXT_OPTS, "ext4": EXT_OPTS,
             "xfs": ["-q", "-K"], "btrfs": ["-q", "-K"]}
MKFS_PACKAGE = {"ext2": "e2fsprogs", "ext3": "e2fsprogs", "ext4": "e2fsprogs",
                "xfs": "xfsprogs", "btrfs": "btrfs-progs"}
TOOL_PACKAGE = {"losetup": "mount", "mount": "mount", "umount": "mount",
                "blkid": "util-linux", "fusermount3": "fuse3", "nbdinfo": "libnbd-bin",
                "resize2fs": "e2fsprogs", "xfs_growfs": "xfsprogs", "btrfs": "btrfs-progs"}

# struct loop_info64 (linux/loop.h) and the ioctls that read and change it.
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
_LO_SIZELIMIT = 4
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_GET_STATUS64 = 0x4C05

# nbdfuse processes started by this process, kept so they can be reaped (no zombies,
# no ResourceWarning) whichever HostAttachment object later detaches them.
_CHILDREN: dict[int, subprocess.Popen] = {}


class HostAttachError(Exception):
    """Attach/detach failed; the message says what and what to do."""


@dataclass
class HostAttachment:
    """What one attach set up on this host; enough to detach it, also from JSON."""

    nbd_uri: str
    workdir: str
    method: str
    fuse_pid: int | None
    fuse_file: str | None
    loop: str | None
    device: str
    mountpoint: str | None
    fs: str | None
    formatted: bool
    # Online growth: nbdfuse serves ``fuse_uri`` (an export advertised larger than the
    # volume, drove.engine.hostview) and the loop device is limited to ``size`` bytes,
    # the volume's; None for both when nbdfuse serves ``nbd_uri`` at its own size.
    fuse_uri: str | None = None
    size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The attachment as JSON-ready data."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HostAttachment:
        """An attachment from `to_json` output (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        defaults: dict[str, Any] = {"method": "nbdfuse", "fuse_pid": None, "fuse_file": None,
                                    "loop": None, "device": "", "mountpoint": None,
                                    "fs": None, "formatted": False, "fuse_uri": None,
                                    "size": None}
        return cls(**{**defaults, **{k: v for k, v in d.items() if k in names}})


# ---------------------------------------------------------------- public API


def attach(nbd_uri: str, workdir: Path, *, mount: Path | None = None, fs: str = "ext4",
           timeout: float = 30.0, method: str = "auto",
           fuse_uri: str | None = None) -> HostAttachment:
    """Connect ``nbd_uri`` as a block device; with ``mount``, mount its filesystem there.

    ``fuse_uri``: the same data advertised at a larger size (the engine's growable view,
    :mod:`drove.engine.hostview`); nbdfuse then serves it and the device is limited to
    ``nbd_uri``'s size, so that :func:`grow` can grow it while it is mounted.
    """
    method = _choose_method(method)
    wd = os.path.realpath(workdir)
    mnt = _check_mountpoint(mount) if mount is not None else None
    if mnt is not None:
        _check_fs_name(fs)
    _claim_workdir(wd)
    att = HostAttachment(nbd_uri=nbd_uri, workdir=wd, method=method, fuse_pid=None,
                         fuse_file=None, loop=None, device="", mountpoint=None, fs=None,
                         formatted=False, fuse_uri=fuse_uri)
    created: list[str] = []
    try:
        if fuse_uri is not None:
            att.size = _export_size(nbd_uri, timeout)
        _start_nbdfuse(att, timeout)
        _setup_loop(att, timeout)
        if mnt is not None:
            _prepare_filesystem(att, fs, timeout)
            created = _makedirs(mnt)
            _mount(att, mnt, timeout)
    except BaseException as exc:  # KeyboardInterrupt too: never leave half an attach
        undo_problem = _undo(att, created, timeout)
        if isinstance(exc, HostAttachError) and undo_problem:
            raise HostAttachError(f"{exc}; undoing the attach also failed: {undo_problem}"
                                  ) from exc
        raise
    return att


def detach(att: HostAttachment, *, timeout: float = 30.0) -> None:
    """Unmount, flush to the server, remove the loop device, stop nbdfuse, remove workdir."""
    _teardown(att, timeout, flush_required=True)


def grow(att: HostAttachment, size: int | None = None, *,
         timeout: float = 120.0) -> HostAttachment:
    """Grow the device to ``size`` bytes (None: all the export serves now) and its mounted
    filesystem with it, online; the attachment, updated (store it).

    The volume must have grown first: the device never gets larger than what the
    export serves, and never shrinks. Called again after a failure (a filesystem that
    could not grow), it finishes the job.
    """
    if att.fuse_uri is None or att.loop is None or att.fuse_file is None:
        raise HostAttachError(f"{att.device or att.nbd_uri} was attached without online "
                              "growth (by an older drove); detach and attach the volume again "
                              "to see its new size")
    if _loop_backing(att.loop) != att.fuse_file:
        raise HostAttachError(f"{att.loop} is no longer the device over {att.fuse_file}: "
                              "the attachment is gone")
    served = _export_size(att.nbd_uri, timeout)
    target = served if size is None else size
    if target > served:
        raise HostAttachError(f"{att.nbd_uri} serves {served} bytes, fewer than {target}: "
                              "expand the volume first")
    if target > _size(att.fuse_file):
        raise HostAttachError(f"{target} bytes is more than {att.fuse_file} can show "
                              f"({_size(att.fuse_file)}); detach and attach the volume again")
    if target > _device_size(att.loop):
        _set_loop_limit(att.loop, target)
    att.size = max(target, att.size or 0)
    if att.mountpoint and any(m.point == att.mountpoint and m.devno == _devno(att.loop)
                              for m in _mounts()):
        grow_filesystem(att.loop, att.mountpoint, att.fs, timeout=timeout)
    return att


def grow_filesystem(device: str, mountpoint: str, fs: str | None = None, *,
                    timeout: float = 120.0) -> None:
    """Grow the filesystem of ``device``, mounted at ``mountpoint``, to fill the device."""
    fs = fs or filesystem_type(device)
    if fs in ("ext2", "ext3", "ext4"):
        cmd = ["resize2fs", device]  # on a mounted filesystem: online resize
    elif fs == "xfs":
        cmd = ["xfs_growfs", mountpoint]
    elif fs == "btrfs":
        cmd = ["btrfs", "filesystem", "resize", "max", mountpoint]
    else:
        raise HostAttachError(f"cannot grow a {fs or 'unknown'} filesystem online "
                              f"({device} at {mountpoint}); ext4, xfs and btrfs can")
    res = _run(cmd, timeout)
    if res.returncode != 0:
        err = _failed(f"{cmd[0]} (grow the {fs} filesystem at {mountpoint})", res)
        if "Permission denied" in res.stderr or "Operation not permitted" in res.stderr:
            # The kernel wants CAP_SYS_RESOURCE for ext4 online resize (some containers
            # drop it); the device has grown, a later call grows the filesystem.
            raise HostAttachError(f"{err}; the kernel refused: growing {fs} online needs "
                                  "CAP_SYS_RESOURCE (and xfs CAP_SYS_ADMIN), which this "
                                  "process lacks; the device has grown already") from None
        raise err


def cleanup_stale(workdir: Path, *, timeout: float = 30.0) -> list[str]:
    """Remove whatever an earlier attach in ``workdir`` left behind; what was cleaned."""
    wd = os.path.realpath(workdir)
    done: list[str] = []
    for loop, backing in sorted(_loops().items()):
        if _under(backing, wd):
            done += _unmount_device(loop, timeout, everywhere=True)
            done += _flush_loop(loop, f"the server behind {backing}", required=False)
            _detach_loop(loop, backing, timeout)
            done.append(f"detached {loop} (backed by {backing})")
    fuse_mounts = [m for m in _mounts() if m.fstype.startswith("fuse") and _under(m.point, wd)]
    for m in sorted(fuse_mounts, key=lambda m: len(m.point), reverse=True):
        _unmount_fuse(m.point, timeout)
        done.append(f"unmounted FUSE mount {m.point}")
    for pid in _nbdfuse_pids(wd):
        done.append(f"stopped nbdfuse pid {pid} ({_stop_process(pid, wd, timeout)})")
    if os.path.lexists(wd):
        _remove_workdir(wd)
        done.append(f"removed {wd}")
    return done


def is_blank(device: str) -> bool:
    """True only if ``device`` carries no filesystem, partition table or other signature."""
    rc, _, _ = _probe(device)
    return rc == 2


def filesystem_type(device: str) -> str | None:
    """The type of the one filesystem on ``device`` (e.g. "ext4"), or None if there is none."""
    rc, info, _ = _probe(device)
    if rc == 0 and info.get("USAGE") == "filesystem":
        return info.get("TYPE")
    return None


def kernel_nbd_available() -> bool:
    """True if this host has kernel NBD devices (/dev/nbdN) and nbd-client."""
    return any(Path("/dev").glob("nbd[0-9]*")) and shutil.which("nbd-client") is not None


# ---------------------------------------------------------------- attach steps


def _choose_method(method: str) -> str:
    """The attach method to use; only nbdfuse is implemented so far."""
    if method in ("auto", "nbdfuse"):
        # "auto" should prefer the kernel client when kernel_nbd_available(); until that
        # path exists nbdfuse works on every host with FUSE, including those.
        if shutil.which("nbdfuse") is None:
            raise HostAttachError("nbdfuse not found; install the Debian package libnbd-bin")
        return "nbdfuse"
    if method == "kernel":
        why = "" if kernel_nbd_available() else " (and this host has no /dev/nbdN or nbd-client)"
        raise HostAttachError(f"kernel NBD attach is not supported yet{why}; "
                              "use method='nbdfuse'")
    raise HostAttachError(f"unknown attach method {method!r} (auto, nbdfuse or kernel)")


def _check_mountpoint(mount: Path) -> str:
    """The absolute mount point; refuse a non-directory or a path already mounted on."""
    mnt = os.path.realpath(mount)
    if os.path.lexists(mnt) and not os.path.isdir(mnt):
        raise HostAttachError(f"mount point {mnt} exists and is not a directory")
    if os.path.isdir(mnt) and os.path.ismount(mnt):
        raise HostAttachError(f"mount point {mnt} is already a mount point; unmount it first")
    return mnt


def _check_fs_name(fs: str) -> None:
    """Refuse filesystem names that cannot be a mkfs.TYPE (they end up in a command name)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", fs):
        raise HostAttachError(f"bad filesystem type {fs!r}")


def _claim_workdir(wd: str) -> None:
    """Create ``wd``; refuse one that still holds an earlier attachment."""
    leftovers = [f"mount {m.point}" for m in _mounts() if _under(m.point, wd)]
    leftovers += [f"{loop} on {b}" for loop, b in _loops().items() if _under(b, wd)]
    leftovers += [f"nbdfuse pid {pid}" for pid in _nbdfuse_pids(wd)]
    if leftovers:
        raise HostAttachError(f"{wd} still holds an attachment ({', '.join(leftovers)}); "
                              "detach it or run cleanup_stale on it first")
    try:
        os.makedirs(os.path.join(wd, FUSE_DIR), exist_ok=True)
    except OSError as exc:
        raise HostAttachError(f"cannot create work directory {wd}: {exc}") from exc


def _start_nbdfuse(att: HostAttachment, timeout: float) -> None:
    """Start nbdfuse on WORKDIR/fuse/disk; wait until the file serves the export."""
    fuse_dir = os.path.join(att.workdir, FUSE_DIR)
    fuse_file = os.path.join(fuse_dir, FUSE_NAME)
    pidfile = os.path.join(att.workdir, PID_FILE)
    log = os.path.join(att.workdir, LOG_FILE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    # nbdfuse stays in the foreground (it has no daemon mode); its own session keeps a
    # Ctrl-C aimed at the manager from reaching it: the mount must outlive the manager.
    # fsname/subtype make the mount show as type fuse.nbdfuse in mountinfo and findmnt.
    cmd = ["nbdfuse", "-P", pidfile, "-o", "fsname=nbdfuse", "-o", "subtype=nbdfuse",
           fuse_file, att.fuse_uri or att.nbd_uri]
    with open(log, "wb") as logf:
        # cwd "/": a long-lived process must not pin the manager's cwd's filesystem.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=logf, start_new_session=True, cwd="/")
    _CHILDREN[proc.pid] = proc
    att.fuse_pid = proc.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HostAttachError(f"nbdfuse could not connect to {att.nbd_uri} "
                                  f"(exit {proc.returncode}): {_tail(log)}")
        # nbdfuse writes the pid file once it serves; the file's size is then the
        # export's size, which nbdfuse read from the server while connecting.
        if _read_int(pidfile) == proc.pid and _size(fuse_file) > 0:
            att.fuse_file = fuse_file
            return
        time.sleep(POLL)
    raise HostAttachError(f"nbdfuse did not serve {att.nbd_uri} within {timeout:g}s: "
                          f"{_tail(log) or 'no output'}")


def _setup_loop(att: HostAttachment, timeout: float) -> None:
    """Put a loop device over the nbdfuse file."""
    assert att.fuse_file is not None
    # Direct I/O: the loop device does not keep a second page cache of the FUSE file
    # (less memory, less of the writeback deadlock nbdfuse(1) warns about), and it was
    # faster here (100 MiB write+fsync 0.2 s vs 0.3-0.4 s). If the kernel refuses it,
    # losetup only warns and the device works buffered, which is just as correct.
    limit = [] if att.size is None else ["--sizelimit", str(att.size)]
    res = _run(["losetup", "--find", "--show", "--direct-io=on", *limit, att.fuse_file],
               timeout)
    if res.returncode != 0 or not res.stdout.strip().startswith("/dev/"):
        raise _failed("losetup (create the loop device)", res)
    att.loop = att.device = res.stdout.strip()


def _prepare_filesystem(att: HostAttachment, fs: str, timeout: float) -> None:
    """Find the filesystem on the device, or create one if the volume is really blank."""
    rc, info, err = _probe(att.device)
    if rc == 2:
        _require_zero_export(att.nbd_uri, timeout)
        _mkfs(att.device, fs, timeout)
        att.fs, att.formatted = fs, True
    elif rc == 0 and info.get("USAGE") == "filesystem" and info.get("TYPE"):
        att.fs = info["TYPE"]  # may differ from fs: mount what is there, never reformat
    else:
        what = err.strip() or " ".join(f"{k}={v}" for k, v in info.items() if k != "DEVNAME")
        raise HostAttachError(f"{att.nbd_uri} holds something that is not a filesystem "
                              f"({what}); refusing to mount or format it")


def _export_size(uri: str, timeout: float) -> int:
    """The size ``uri`` serves, in bytes (nbdinfo --size)."""
    res = _run(["nbdinfo", "--size", uri], timeout)
    try:
        if res.returncode == 0:
            return int(res.stdout.strip())
    except ValueError:
        pass
    raise _failed(f"nbdinfo --size (the size of {uri})", res)


def _device_size(device: str) -> int:
    """A block device's size in bytes."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _set_loop_limit(loop: str, size: int) -> None:
    """Set ``loop``'s size limit to ``size`` bytes, online (LOOP_SET_STATUS64).

    losetup can set --sizelimit only when it creates a device; the kernel lets the
    limit change on a bound, open, mounted device and announces the new capacity.
    """
    try:
        fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = bytearray(_LOOP_INFO64.size)
            fcntl.ioctl(fd, _LOOP_GET_STATUS64, info)
            fields_ = list(_LOOP_INFO64.unpack(info))
            fields_[_LO_SIZELIMIT] = size
            fcntl.ioctl(fd, _LOOP_SET_STATUS64, _LOOP_INFO64.pack(*fields_))
        finally:
            os.close(fd)
    except OSError as exc:
        raise HostAttachError(f"cannot grow {loop} to {size} bytes: {exc.strerror}") from exc
    if (now := _device_size(loop)) != size:
        raise HostAttachError(f"{loop} is {now} bytes after growing it to {size}")


def _require_zero_export(uri: str, timeout: float) -> None:
    """Refuse to format unless the server reports the whole export as reading zeros."""
    # No signature does not mean no data (a raw-used volume, a filesystem blkid does
    # not know): ask the server's block status (base:allocation) that it is all zeros.
    res = _run(["nbdinfo", "--map", "--totals", "--json", uri], timeout)
    if res.returncode != 0:
        raise _failed("nbdinfo --map (check the volume is empty before formatting)", res)
    try:
        data = sum(e["size"] for e in json.loads(res.stdout) if not e["type"] & 2)
    except (ValueError, KeyError, TypeError) as exc:
        raise HostAttachError(f"cannot read nbdinfo --map output: {exc}") from exc
    if data:
        raise HostAttachError(
            f"{uri} has no filesystem signature but {data} bytes that do not read as zeros "
            "(or its server reports no block status); refusing to format it. If its "
            "contents are not needed, zero or trim the whole volume, then attach again")


def _mkfs(device: str, fs: str, timeout: float) -> None:
    """Create a filesystem of type ``fs`` on the (blank) ``device``."""
    prog = f"mkfs.{fs}"
    if shutil.which(prog) is None:
        pkg = MKFS_PACKAGE.get(fs, f"the package that provides {prog}")
        raise HostAttachError(f"{prog} not found; install {pkg}")
    # Never -F: mke2fs then still refuses a device that is mounted or in use.
    res = _run([prog, *MKFS_OPTS.get(fs, []), device], timeout)
    if res.returncode != 0 and "assume_storage_prezeroed" in res.stderr:
        res = _run([prog, *EXT_OPTS_OLD, device], timeout)
    if res.returncode != 0:
        raise _failed(f"{prog} (create the filesystem)", res)


def _makedirs(path: str) -> list[str]:
    """mkdir -p ``path``; the directories it created, outermost first."""
    missing: list[str] = []
    p = path
    while not os.path.lexists(p):
        missing.insert(0, p)
        p = os.path.dirname(p)
    created: list[str] = []
    try:
        for d in missing:
            os.mkdir(d)
            created.append(d)
    except OSError as exc:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise HostAttachError(f"cannot create mount point {path}: {exc}") from exc
    return created


def _mount(att: HostAttachment, mnt: str, timeout: float) -> None:
    """Mount the device's filesystem on ``mnt``."""
    assert att.fs is not None
    res = _run(["mount", "-t", att.fs, att.device, mnt], timeout)
    if res.returncode != 0:
        raise _failed(f"mount ({att.fs} from {att.device} on {mnt})", res)
    att.mountpoint = mnt


def _undo(att: HostAttachment, created: list[str], timeout: float) -> str | None:
    """Undo a failed attach; a description of what could not be undone, or None."""
    try:
        # Nothing acknowledged to a user yet (mkfs fsyncs its own writes), and nbdfuse
        # may be stuck connecting: do not wait long for it.
        _teardown(att, min(timeout, 5.0), flush_required=False)
    except HostAttachError as exc:
        return str(exc)
    for d in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(d)
    return None


# ---------------------------------------------------------------- detach steps


def _teardown(att: HostAttachment, timeout: float, *, flush_required: bool) -> None:
    """Take an attachment apart, newest step first; stop at the first step that fails."""
    fuse_file = att.fuse_file or os.path.join(att.workdir, FUSE_DIR, FUSE_NAME)
    # Every loop device over our file, not just att.loop: that one may have been
    # detached and reused since, and an interrupted attach may not have recorded it.
    for loop in sorted(lo for lo, backing in _loops().items() if backing == fuse_file):
        if att.mountpoint:
            _unmount_at(loop, att.mountpoint, timeout)
        _unmount_device(loop, timeout, everywhere=False)
        _flush_loop(loop, att.nbd_uri, required=flush_required)
        _detach_loop(loop, fuse_file, timeout)
    _unmount_fuse(os.path.dirname(fuse_file), timeout)
    pids = set(_nbdfuse_pids(att.workdir))
    if att.fuse_pid:
        pids.add(att.fuse_pid)
    for pid in sorted(pids):
        _stop_process(pid, att.workdir, timeout)
    if os.path.lexists(att.workdir):
        _remove_workdir(att.workdir)


def _unmount_at(loop: str, mountpoint: str, timeout: float) -> None:
    """Unmount ``loop``'s filesystem from ``mountpoint`` if it is mounted there."""
    devno = _devno(loop)
    mnt = os.path.realpath(mountpoint)
    while True:
        at = [m for m in _mounts() if m.point == mnt]
        if not any(m.devno == devno for m in at):
            return
        if at[-1].devno != devno:  # the last one listed is on top
            raise HostAttachError(f"something else ({at[-1].source}) is mounted over {mnt}; "
                                  "unmount it first")
        _umount(mnt, loop, timeout)


def _unmount_device(loop: str, timeout: float, *, everywhere: bool) -> list[str]:
    """Check (or, with ``everywhere``, unmount) every other mount of ``loop``."""
    devno = _devno(loop)
    done = []
    while left := [m for m in _mounts() if m.devno == devno]:
        if not everywhere:
            points = ", ".join(m.point for m in left)
            raise HostAttachError(f"{loop} is still mounted at {points}; unmount it there "
                                  "first (it is in use, detaching would lose writes)")
        deepest = max(left, key=lambda m: len(m.point)).point
        _umount(deepest, loop, timeout)
        done.append(f"unmounted {deepest} ({loop})")
    return done


def _umount(mnt: str, what: str, timeout: float) -> None:
    """umount ``mnt``, retrying briefly while it is busy."""
    deadline = time.monotonic() + min(BUSY_RETRY, timeout)
    while True:
        res = _run(["umount", mnt], timeout)
        if res.returncode == 0:
            return
        if "busy" not in res.stderr or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    holders = ", ".join(_holders(under=mnt)) or "no process found (a mount under it?)"
    raise HostAttachError(f"umount {mnt} ({what}) failed: {res.stderr.strip()}; "
                          f"held by: {holders}")


def _flush_loop(loop: str, target: str, *, required: bool) -> list[str]:
    """fsync the loop device: its writes and a flush reach the NBD server (via nbdfuse)."""
    # Not `blockdev --flushbufs`: BLKFLSBUF writes dirty pages but sends no flush, so
    # nothing makes the server persist them (checked with nbdfuse -v); fsync() does.
    try:
        fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if required:
            # nbdfuse does not reconnect: once its connection broke (server restarted or
            # gone) the device only answers EIO and a retry cannot succeed. Say so, and
            # leave the decision to drop those writes to the caller (cleanup_stale).
            raise HostAttachError(
                f"flushing {loop} to {target} failed ({exc.strerror}): writes may not have "
                "reached the server. The device stays connected; if the server restarted "
                "or is gone, nbdfuse's connection is lost for good and cleanup_stale on "
                "the workdir removes the attachment (dropping those writes)") from exc
        return [f"flushing {loop} failed ({exc.strerror}); unflushed writes may be lost"]
    return []


def _detach_loop(loop: str, backing: str, timeout: float) -> None:
    """losetup -d ``loop`` (if it is still the one over ``backing``) and wait until gone."""
    res = _run(["losetup", "-d", loop], timeout)
    deadline = time.monotonic() + min(BUSY_RETRY, timeout)
    while _loop_backing(loop) == backing:
        if time.monotonic() >= deadline:
            # The kernel turns LOOP_CLR_FD on an open device into "detach on last close".
            holders = ", ".join(_holders(devno=_devno(loop))) or (
                "no process found (a mount in another mount namespace?)")
            raise HostAttachError(
                f"{loop} is still open ({res.stderr.strip() or 'in use'}), by: {holders}; it "
                "detaches when they close it, run detach again then")
        time.sleep(POLL)


def _unmount_fuse(fuse_dir: str, timeout: float) -> None:
    """fusermount3 -u the nbdfuse mount at ``fuse_dir`` if it is mounted."""
    deadline = time.monotonic() + min(BUSY_RETRY, timeout)
    for _ in range(1000):  # bounded: one pass per stacked mount or busy retry
        if not any(m.point == fuse_dir and m.fstype.startswith("fuse") for m in _mounts()):
            return
        res = _run(["fusermount3", "-u", fuse_dir], timeout)
        if res.returncode == 0:
            continue
        # A loop device lets go of its backing file a moment after losetup -d returns.
        if "busy" in res.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
            continue
        holders = ", ".join(_holders(under=fuse_dir)) or "no process found"
        raise HostAttachError(f"fusermount3 -u {fuse_dir} failed: {res.stderr.strip()}; "
                              f"held by: {holders}")
    raise HostAttachError(f"{fuse_dir} stays mounted after fusermount3 -u")


def _stop_process(pid: int, workdir: str, timeout: float) -> str:
    """Wait for nbdfuse ``pid`` to exit, then SIGTERM, then SIGKILL; how it ended."""
    for sig, wait in ((None, timeout), (signal.SIGTERM, min(5.0, timeout)),
                      (signal.SIGKILL, 5.0)):
        if sig is not None and _is_nbdfuse_of(pid, workdir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid, workdir):
                return "exited" if sig is None else f"sent {signal.Signals(sig).name}"
            time.sleep(POLL)
    raise HostAttachError(f"nbdfuse pid {pid} does not exit even after SIGKILL")


def _remove_workdir(wd: str) -> None:
    """Remove ``wd``, but never while anything is mounted in it (rmtree would descend)."""
    inside = [m.point for m in _mounts() if _under(m.point, wd)]
    if inside:
        raise HostAttachError(f"not removing {wd}: still mounted in it: {', '.join(inside)}")
    try:
        shutil.rmtree(wd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise HostAttachError(f"cannot remove {wd}: {exc}") from exc


# ---------------------------------------------------------------- host state


@dataclass(frozen=True)
class _Mount:
    """One line of /proc/self/mountinfo."""

    devno: str  # "major:minor" of the mounted device
    point: str
    fstype: str
    source: str


def _mounts() -> list[_Mount]:
    """This mount namespace's mounts, in mount order (later ones on top)."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            mounts.append(_Mount(a[2], _unescape(a[4]), b[0], _unescape(b[1])))
    return mounts


def _unescape(s: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _loops() -> dict[str, str]:
    """Bound loop devices: {"/dev/loopN": backing file}."""
    found = {}
    for sysdir in Path("/sys/block").glob("loop*"):
        backing = _loop_backing(f"/dev/{sysdir.name}")
        if backing is not None:
            found[f"/dev/{sysdir.name}"] = backing
    return found


def _loop_backing(loop: str) -> str | None:
    """The file behind ``loop``, or None when it is not bound."""
    try:
        text = Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file").read_text()
    except OSError:
        return None
    return text.rstrip("\n").removesuffix(" (deleted)")


def _devno(device: str) -> str:
    """"major:minor" of a block device, as mountinfo writes it."""
    try:
        return Path(f"/sys/block/{os.path.basename(device)}/dev").read_text().strip()
    except OSError:
        rdev = os.stat(device).st_rdev
        return f"{os.major(rdev)}:{os.minor(rdev)}"


def _nbdfuse_pids(workdir: str) -> list[int]:
    """nbdfuse processes serving a file under ``workdir`` (and our children that did)."""
    pids = {pid for pid in _pids() if _is_nbdfuse_of(pid, workdir)}
    # Our own exited children have an empty cmdline until reaped; list them to reap them.
    pids |= {pid for pid, proc in _CHILDREN.items()
             if any(_under(str(a), workdir) for a in proc.args[1:])}
    return sorted(pids)


def _is_nbdfuse_of(pid: int, workdir: str) -> bool:
    """True if ``pid`` is an nbdfuse whose mount point is under ``workdir``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv if a]
    if not args or os.path.basename(args[0]) != "nbdfuse":
        return False
    return any(_under(a, workdir) for a in args[1:])


def _alive(pid: int, workdir: str) -> bool:
    """True while nbdfuse ``pid`` runs (reaping it if it is our child)."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    # Not our child (the manager restarted): a zombie has an empty cmdline, and a
    # recycled pid is not an nbdfuse of this workdir; both count as gone.
    return _is_nbdfuse_of(pid, workdir)


def _pids() -> list[int]:
    """Every process id in /proc."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _holders(*, under: str | None = None, devno: str | None = None) -> list[str]:
    """Processes using a path under ``under`` or having device ``devno`` open: "PID (comm)"."""
    found = []
    for pid in _pids():
        base = f"/proc/{pid}"
        try:
            links = [f"{base}/cwd", f"{base}/root", f"{base}/exe"]
            links += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        except OSError:
            continue  # gone, or not ours to look at
        if any(_uses(link, under, devno) for link in links):
            found.append(f"{pid} ({_comm(pid)})")
    if devno is not None:
        name = _devname(devno)
        with contextlib.suppress(OSError):
            found += [f"{h} (stacked device)" for h in os.listdir(f"/sys/block/{name}/holders")]
    return found


def _uses(link: str, under: str | None, devno: str | None) -> bool:
    """True if /proc link ``link`` points under ``under`` or at device ``devno``."""
    try:
        target = os.readlink(link)
        if under is not None and _under(target, under):
            return True
        # stat() only device nodes: stat on a file of a hung FUSE mount would hang too.
        if devno is not None and target.startswith("/dev/"):
            rdev = os.stat(link).st_rdev
            return rdev != 0 and f"{os.major(rdev)}:{os.minor(rdev)}" == devno
    except OSError:
        pass
    return False


def _devname(devno: str) -> str:
    """Kernel name (e.g. loop3) of block device ``devno``."""
    with contextlib.suppress(OSError):
        return os.path.basename(os.readlink(f"/sys/dev/block/{devno}"))
    return devno


def _comm(pid: int) -> str:
    """A process's command name."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _probe(device: str) -> tuple[int, dict[str, str], str]:
    """`blkid -p` of ``device``: (0 found / 2 nothing / 8 ambivalent, KEY=VALUE, stderr)."""
    # blkid says "nothing found" for a missing or empty device too: make sure it is there.
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    except OSError as exc:
        raise HostAttachError(f"cannot open {device}: {exc.strerror}") from exc
    if size == 0:
        raise HostAttachError(f"{device} has size 0 (not connected?)")
    # -p probes the device itself (no cache), superblocks and partition tables alike.
    res = _run(["blkid", "-p", "-o", "export", device], 60.0)
    if res.returncode not in (0, 2, 8):
        raise _failed(f"blkid (probe {device})", res)
    info = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return res.returncode, info, res.stderr


# ---------------------------------------------------------------- small helpers


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a host tool; a missing tool or a hang becomes a HostAttachError."""
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except FileNotFoundError as exc:
        pkg = TOOL_PACKAGE.get(cmd[0], "the package that provides it")
        raise HostAttachError(f"{cmd[0]} not found; install {pkg}") from exc
    except subprocess.TimeoutExpired as exc:
        raise HostAttachError(f"{' '.join(cmd)} did not finish within {timeout:g}s") from exc


def _failed(what: str, res: subprocess.CompletedProcess[str]) -> HostAttachError:
    """An error naming the failed step, its command and its stderr."""
    out = (res.stderr.strip() or res.stdout.strip())[-2000:] or "no output"
    return HostAttachError(f"{what} failed: `{' '.join(res.args)}` exited "
                           f"{res.returncode}: {out}")


def _under(path: str, root: str) -> bool:
    """True if ``path`` is ``root`` or inside it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _read_int(path: str) -> int | None:
    """The integer in a small file, or None."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _size(path: str) -> int:
    """A file's size, 0 if it cannot be stat'ed."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _tail(path: str, limit: int = 2000) -> str:
    """The end of a log file, on one line."""
    try:
        return Path(path).read_text(errors="replace")[-limit:].strip().replace("\n", " | ")
    except OSError:
        return ""
