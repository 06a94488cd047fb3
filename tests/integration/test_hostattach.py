"""Host attach with real processes: a drove replica, nbdfuse, loop devices, mkfs, mount."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drove.agent import hostattach
from drove.agent.hostattach import (
    HostAttachError,
    HostAttachment,
    cleanup_stale,
    detach,
    filesystem_type,
    is_blank,
)
from replicatools import nbdinfo_json, nbdsh, run

MiB = 1 << 20


# ---------------------------------------------------------------- host state, seen independently


def loops_under(root: Path) -> list[dict]:
    """Loop devices (losetup's view) whose backing file is under ``root``."""
    out = run(["losetup", "--list", "--json"]).stdout.decode()
    loops = json.loads(out)["loopdevices"] if out.strip() else []
    prefix = os.path.realpath(root) + "/"
    return [lo for lo in loops if (lo.get("back-file") or "").startswith(prefix)]


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, type, source) of every mount, in mount order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4].replace("\\040", " ")
        fstype, source = right.split()[:2]
        found.append((point, fstype, source))
    return found


def nbdfuse_procs(root: Path) -> list[int]:
    """Live (not zombie) nbdfuse processes whose arguments name a path under ``root``."""
    prefix = os.path.realpath(root) + "/"
    pids = []
    for p in Path("/proc").iterdir():
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"nbdfuse") and any(a.startswith(prefix.encode()) for a in argv):
            pids.append(int(p.name))
    return pids


def leftovers(root: Path) -> list[str]:
    """Anything of an attachment under ``root`` still on the host."""
    loops = loops_under(root)
    names = {lo["name"] for lo in loops}
    prefix = os.path.realpath(root) + "/"
    found = [f"loop {lo['name']} on {lo['back-file']}" for lo in loops]
    found += [f"mount {p} ({t} from {s})" for p, t, s in mounts()
              if p.startswith(prefix) or s in names]
    found += [f"nbdfuse pid {pid}" for pid in nbdfuse_procs(root)]
    return found


def force_cleanup(root: Path) -> None:
    """Last resort at teardown: lazily unmount and detach whatever is left under ``root``."""
    names = {lo["name"] for lo in loops_under(root)}
    prefix = os.path.realpath(root) + "/"
    for point, _, source in reversed(mounts()):
        if point.startswith(prefix) or source in names:
            subprocess.run(["umount", "-l", point], capture_output=True)
    for name in names:
        subprocess.run(["losetup", "-d", name], capture_output=True)
    for pid in nbdfuse_procs(root):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- fixtures


class Host:
    """Attaches through hostattach in tmp_path; remembers every workdir for teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workdirs: list[Path] = []

    def workdir(self, name: str = "att") -> Path:
        """A workdir that teardown will clean up."""
        wd = self.root / name
        self.workdirs.append(wd)
        return wd

    def attach(self, uri: str, name: str = "att", **kwargs) -> HostAttachment:
        """hostattach.attach into workdir ``name``."""
        return hostattach.attach(uri, self.workdir(name), **kwargs)


@pytest.fixture
def host(replicas, tmp_path: Path):
    """Host attach helper; torn down (before the replicas stop) even when a test fails."""
    h = Host(tmp_path)
    try:
        yield h
    finally:
        try:
            for wd in h.workdirs:
                cleanup_stale(wd, timeout=5)
        finally:
            # Never let pytest's tmp_path removal descend into a mounted filesystem.
            force_cleanup(tmp_path)


@pytest.fixture
def logged_server(tmp_path: Path):
    """nbdkit's memory disk behind its log filter: (URI, log file); stopped at teardown."""
    sock, log, pidfile = tmp_path / "nbdkit.sock", tmp_path / "nbdkit.log", tmp_path / "nbdkit.pid"
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock),
                             "-P", str(pidfile), "--filter=log", "memory", "size=32M",
                             f"logfile={log}"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pidfile.exists(), proc.stderr.read() if proc.poll() is not None else "slow"
        yield f"nbd+unix:///?socket={sock}", log
    finally:
        proc.kill()
        proc.wait()


def server_read(uri: str, offset: int, length: int) -> bytes:
    """Bytes of the export, read by libnbd straight from the server."""
    return bytes.fromhex(nbdsh(uri, f"print(h.pread({length}, {offset}).hex())").stdout.decode())


def server_write(uri: str, offset: int, data: bytes) -> None:
    """Write ``data`` to the export with libnbd, flushed."""
    nbdsh(uri, f"h.pwrite(bytes.fromhex({data.hex()!r}), {offset})\nh.flush()")


def mbr() -> bytes:
    """A DOS partition table with one Linux partition (what sfdisk would write)."""
    sector = bytearray(512)
    sector[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 4096)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- tests


def test_blank_volume_is_formatted_once_and_data_reaches_the_server(replicas, host, tmp_path):
    r = replicas("vol", "64M")
    mnt = tmp_path / "mnt"
    att = host.attach(r.unix_uri("head"), mount=mnt)
    assert (att.method, att.fs, att.formatted) == ("nbdfuse", "ext4", True)
    assert att.device == att.loop and att.mountpoint == os.path.realpath(mnt)
    assert os.path.ismount(mnt) and filesystem_type(att.device) == "ext4"
    (mnt / "marker").write_text("drove\n")
    payload = mnt / "payload.bin"
    payload.write_bytes(os.urandom(5 * MiB))  # no fsync: detach must get it to the server
    digest = sha256(payload)

    # detach from the JSON a manager would have stored
    detach(HostAttachment.from_json(json.loads(json.dumps(att.to_json()))))
    assert leftovers(tmp_path) == []
    assert not Path(att.workdir).exists()
    assert mnt.is_dir() and not os.path.ismount(mnt)
    detach(att)  # idempotent

    # on the server, durably: SIGKILL the replica and start it again on its directory
    r.kill()
    r = replicas("vol", None)
    att = host.attach(r.unix_uri("head"), mount=mnt)
    assert (att.fs, att.formatted) == ("ext4", False)
    assert (mnt / "marker").read_text() == "drove\n"
    assert sha256(payload) == digest
    detach(att)
    assert leftovers(tmp_path) == []


def test_through_the_engine_over_two_replicas(cluster, host, tmp_path):
    engine = cluster.start(2, "64M")  # (cluster before host: host is torn down first)
    uri = engine.unix_uri(engine.addresses["name"])
    mnt = tmp_path / "mnt"
    att = host.attach(uri, mount=mnt)
    assert att.formatted  # the engine reports the fresh volume as zeros
    (mnt / "f").write_bytes(os.urandom(3 * MiB))
    digest = sha256(mnt / "f")
    detach(att)
    att = host.attach(engine.uri(), mount=mnt)  # TCP
    assert not att.formatted and sha256(mnt / "f") == digest
    detach(att)
    assert leftovers(tmp_path) == []


def test_attach_without_mount_is_the_export(replicas, host, tmp_path):
    r = replicas("vol", "16M")
    uri = r.uri("head")  # TCP this time
    before = os.urandom(16 << 10)
    server_write(uri, MiB, before)
    att = host.attach(uri)
    assert att.mountpoint is None and att.fs is None and not att.formatted
    assert att.fuse_file and os.path.getsize(att.fuse_file) == 16 * MiB
    with open(att.device, "rb") as dev:
        assert dev.seek(0, os.SEEK_END) == 16 * MiB
        dev.seek(MiB)
        assert dev.read(len(before)) == before
    after = os.urandom(16 << 10)
    fd = os.open(att.device, os.O_WRONLY)
    try:
        os.pwrite(fd, after, 4 * MiB)  # page cache only: detach's flush must send it
    finally:
        os.close(fd)
    detach(att)
    assert leftovers(tmp_path) == []
    assert server_read(uri, 4 * MiB, len(after)) == after


@pytest.mark.parametrize("mounted", [False, True])
def test_detach_flushes_every_write_to_the_server(logged_server, host, tmp_path, mounted):
    uri, log = logged_server
    if mounted:
        mnt = tmp_path / "mnt"
        att = host.attach(uri, mount=mnt)
        (mnt / "f").write_bytes(os.urandom(2 * MiB))
    else:
        att = host.attach(uri)
        fd = os.open(att.device, os.O_WRONLY)
        try:
            os.pwrite(fd, os.urandom(2 * MiB), 4 * MiB)
        finally:
            os.close(fd)
    detach(att)
    assert leftovers(tmp_path) == []
    # The server saw writes, and a flush sent after the last of them completed
    # (the export is multi-conn: a flush on any connection covers them all).
    events = [line.split()[3:5] for line in log.read_text().splitlines()
              if " Write id=" in line or " Flush id=" in line or "...Write id=" in line]
    last_write_done = max(i for i, (op, _) in enumerate(events) if op == "...Write")
    flushes = [i for i, (op, _) in enumerate(events) if op == "Flush"]
    assert flushes and flushes[-1] > last_write_done, events[-10:]


def test_partition_table_is_refused_and_left_alone(replicas, host, tmp_path):
    r = replicas("vol", "16M")
    uri = r.unix_uri("head")
    server_write(uri, 0, mbr())
    mnt = tmp_path / "mnt"
    with pytest.raises(HostAttachError, match="not a filesystem") as err:
        host.attach(uri, mount=mnt)
    assert "PTTYPE=dos" in str(err.value)
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "att").exists() and not mnt.exists()
    assert server_read(uri, 0, 512) == mbr()
    att = host.attach(uri)
    assert not is_blank(att.device) and filesystem_type(att.device) is None
    detach(att)


def test_data_without_a_signature_is_not_formatted(replicas, host, tmp_path):
    r = replicas("vol", "16M")
    uri = r.unix_uri("head")
    data = os.urandom(4096)
    server_write(uri, 8 * MiB, data)
    with pytest.raises(HostAttachError, match="do not read as zeros"):
        host.attach(uri, mount=tmp_path / "mnt")
    assert leftovers(tmp_path) == []
    assert server_read(uri, 8 * MiB, 4096) == data
    assert server_read(uri, 0, 4096) == bytes(4096)


def test_existing_filesystem_of_another_type_is_mounted_as_it_is(replicas, host, tmp_path):
    r = replicas("vol", "32M")
    uri = r.unix_uri("head")
    att = host.attach(uri)
    assert is_blank(att.device)
    run(["mkfs.ext2", "-q", att.device])
    detach(att)
    mnt = tmp_path / "mnt"
    att = host.attach(uri, mount=mnt, fs="ext4")
    assert (att.fs, att.formatted) == ("ext2", False)
    assert (os.path.realpath(mnt), "ext2", att.device) in mounts()
    detach(att)


@pytest.mark.parametrize("failure", ["mountpoint-is-a-file", "no-mkfs", "mount-fails"])
def test_a_failing_step_undoes_everything(replicas, host, tmp_path, monkeypatch, failure):
    r = replicas("vol", "32M")
    uri = r.unix_uri("head")
    mnt = tmp_path / "a" / "b" / "mnt"
    fs = "ext4"
    if failure == "mountpoint-is-a-file":
        mnt = tmp_path / "file"
        mnt.write_text("keep me")
        match = "is not a directory"
    elif failure == "no-mkfs":
        fs, match = "nosuchfs", "mkfs.nosuchfs not found"
    else:  # a `mount` that fails, after mkfs and mkdir succeeded
        shim = tmp_path / "bin"
        shim.mkdir()
        (shim / "mount").write_text("#!/bin/sh\necho 'mount: injected failure' >&2\nexit 32\n")
        (shim / "mount").chmod(0o755)
        monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
        match = r"mount \(ext4 from /dev/loop\d+ on .*\) failed.*injected failure"
    with pytest.raises(HostAttachError, match=match):
        host.attach(uri, mount=mnt, fs=fs)
    monkeypatch.undo()
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "att").exists()
    if failure == "mountpoint-is-a-file":
        assert mnt.read_text() == "keep me"
    else:
        assert not (tmp_path / "a").exists()  # the mount point directories it made
    if failure == "no-mkfs":  # nothing was written: the whole export still reads as zeros
        assert all(e["type"] & 2 for e in nbdinfo_json(uri, "--map"))
    formatted_before = failure == "mount-fails"  # mkfs cannot be undone, and need not be
    att = host.attach(uri, mount=tmp_path / "mnt")
    assert att.formatted is not formatted_before
    detach(att)


@pytest.mark.parametrize("nbdfuse_killed", [False, True])
def test_cleanup_stale_after_the_manager_crashed(replicas, host, tmp_path, nbdfuse_killed):
    r = replicas("vol", "32M")
    uri = r.unix_uri("head")
    wd, mnt = host.workdir(), tmp_path / "mnt"
    # A manager that attaches, writes and fsyncs a file, then dies without a trace.
    script = f"""
import json, os
from pathlib import Path
from drove.agent.hostattach import attach
att = attach({uri!r}, Path({str(wd)!r}), mount=Path({str(mnt)!r}))
with open(Path({str(mnt)!r}) / "f", "wb") as f:
    f.write(b"x" * 100000)
    f.flush()
    os.fsync(f.fileno())
print(json.dumps(att.to_json()), flush=True)
os.kill(os.getpid(), 9)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr
    att = json.loads(res.stdout)
    assert os.path.ismount(mnt) and nbdfuse_procs(tmp_path) == [att["fuse_pid"]]
    if nbdfuse_killed:
        os.kill(att["fuse_pid"], signal.SIGKILL)

    cleaned = cleanup_stale(wd)
    text = "\n".join(cleaned)
    assert f"unmounted {os.path.realpath(mnt)} ({att['loop']})" in text
    assert f"detached {att['loop']}" in text
    assert f"unmounted FUSE mount {wd}/fuse" in text
    assert f"removed {wd}" in text
    assert ("flushing" in text) is nbdfuse_killed  # EIO from the dead FUSE file is reported
    assert leftovers(tmp_path) == []
    assert not wd.exists()
    assert cleanup_stale(wd) == []

    again = host.attach(uri, mount=mnt)
    assert not again.formatted
    assert (mnt / "f").read_bytes() == b"x" * 100000  # fsynced before the crash
    detach(again)


def test_detach_refuses_to_drop_writes_when_the_server_went_away(replicas, host, tmp_path):
    r = replicas("vol", "16M")
    att = host.attach(r.unix_uri("head"))
    fd = os.open(att.device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
    finally:
        os.close(fd)
    r.kill()
    with pytest.raises(HostAttachError, match=r"flushing .* failed.*cleanup_stale"):
        detach(att)
    # Nothing torn down behind the caller's back (nbdfuse 1.14 itself aborts on an
    # assertion once its server is gone and I/O fails, so only the loop device is checked).
    assert loops_under(tmp_path)
    cleaned = cleanup_stale(Path(att.workdir))
    assert any("unflushed writes may be lost" in c for c in cleaned)
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_detach_refuses_while_the_mount_is_in_use(replicas, host, tmp_path):
    r = replicas("vol", "32M")
    mnt = tmp_path / "mnt"
    att = host.attach(r.unix_uri("head"), mount=mnt)
    user = subprocess.Popen(["sleep", "60"], cwd=mnt)
    try:
        with pytest.raises(HostAttachError, match=rf"busy.*held by: {user.pid} \(sleep\)"):
            detach(att, timeout=5)
        assert os.path.ismount(mnt) and Path(att.workdir).exists()  # nothing pulled away
    finally:
        user.kill()
        user.wait()
    detach(att)
    assert leftovers(tmp_path) == []


def test_a_workdir_in_use_is_refused(replicas, host, tmp_path):
    r = replicas("vol", "16M")
    att = host.attach(r.unix_uri("head"))
    with pytest.raises(HostAttachError, match="still holds an attachment"):
        hostattach.attach(r.unix_uri("head"), Path(att.workdir))
    with open(att.device, "rb") as dev:  # the first attachment is untouched
        assert dev.read(4096) == bytes(4096)
    detach(att)
    assert leftovers(tmp_path) == []


def test_unreachable_server_and_unsupported_method(host, tmp_path):
    with pytest.raises(HostAttachError, match=r"nbdfuse could not connect.*No such file"):
        host.attach(f"nbd+unix:///head?socket={tmp_path}/nothing.sock", mount=tmp_path / "m")
    assert leftovers(tmp_path) == [] and not (tmp_path / "att").exists()
    with pytest.raises(HostAttachError, match="not supported yet"):
        host.attach("nbd://127.0.0.1:1/x", method="kernel")
