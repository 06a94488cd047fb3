"""Online growth: `drove volume expand` on a mounted volume grows its device and filesystem
without a detach (a real drove serve, nbdfuse, a loop device, xfs and ext4)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from replicatools import nbdsh

MiB = 1 << 20


def cap_sys_resource() -> bool:
    """Whether this process holds CAP_SYS_RESOURCE (ext4 online resize needs it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def df_total(path: str) -> int:
    """The filesystem's size at ``path`` as statvfs (and df) reports it."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def device_size(device: str) -> int:
    """A block device's size in bytes."""
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def write_file(path: Path, size: int) -> str:
    """Write ``size`` bytes of pseudo-random data, fsync them; their sha256."""
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def sha(path: Path) -> str:
    """sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # 20-40 s: 380 MiB written through nbdfuse, then a detach and attach
@pytest.mark.parametrize("fs", [
    "xfs",
    pytest.param("ext4", marks=pytest.mark.skipif(
        not cap_sys_resource(), reason="ext4 online resize needs CAP_SYS_RESOURCE, which this "
        "machine's root lacks (test_ext4_growth_without_the_capability covers it here)")),
])
def test_expand_grows_device_and_filesystem_while_mounted(manager, tmp_path, fs):
    mnt = tmp_path / "mnt"
    (tmp_path / "disk2").mkdir()
    manager.cli("disk", "add", str(tmp_path / "disk2"))
    manager.cli("volume", "create", "grow", "--size", "320M", "--replicas", "2")
    manager.cli("volume", "attach", "grow", "--mount", str(mnt), "--fs", fs)
    dev = manager.volume("grow")["device"]
    assert device_size(dev) == 320 * MiB
    before = df_total(str(mnt))
    digest = write_file(mnt / "before", 8 * MiB)

    # Something holds the mount all along: a process with its cwd and a file open there.
    holder = subprocess.Popen(["sleep", "600"], cwd=mnt)
    try:
        with open(mnt / "open", "wb") as kept:
            manager.cli("volume", "expand", "grow", "--size", "640M")
            kept.write(b"still writable")
            kept.flush()
            os.fsync(kept.fileno())
        v = manager.volume("grow")
        assert v["state"] == "attached" and v["size"] == 640 * MiB
        assert v["device"] == dev  # the same device, grown in place
        assert device_size(dev) == 640 * MiB
        after = df_total(str(mnt))
        assert after > before + 250 * MiB, (before, after)
        df = subprocess.run(["df", "-B1", str(mnt)], capture_output=True, text=True,
                            check=True).stdout.splitlines()[-1].split()
        assert int(df[1]) == after
        assert sha(mnt / "before") == digest
        # The new space is usable: fill past the old size.
        big = write_file(mnt / "after", 380 * MiB)
        assert sha(mnt / "after") == big
        assert (mnt / "open").read_bytes() == b"still writable"
    finally:
        holder.kill()
        holder.wait()
    kinds = [e["kind"] for e in manager.events("grow")]
    assert "volume-host-grown" in kinds

    # Detached and attached again, everything is there at the new size.
    manager.cli("volume", "detach", "grow")
    manager.cli("volume", "attach", "grow", "--mount", str(mnt), "--fs", fs)
    assert sha(mnt / "before") == digest and sha(mnt / "after") == big
    assert df_total(str(mnt)) == after
    manager.cli("volume", "detach", "grow")


@pytest.mark.skipif(cap_sys_resource(), reason="only where ext4 online resize is refused")
def test_ext4_growth_without_the_capability(manager, tmp_path):
    """Where the kernel refuses ext4 online resize, expand says so, the device has grown
    and nothing is lost; the filesystem grows at the next attach's resize or a retry."""
    mnt = tmp_path / "mnt"
    manager.cli("volume", "create", "e4", "--size", "64M", "--replicas", "1")
    manager.cli("volume", "attach", "e4", "--mount", str(mnt))
    dev = manager.volume("e4")["device"]
    digest = write_file(mnt / "f", 4 * MiB)
    r = manager.cli("volume", "expand", "e4", "--size", "128M", check=False)
    assert r.returncode != 0
    assert "CAP_SYS_RESOURCE" in r.stderr and "again finishes it" in r.stderr, r.stderr
    v = manager.volume("e4")
    assert v["size"] == 128 * MiB and v["state"] == "attached"
    assert device_size(dev) == 128 * MiB
    assert sha(mnt / "f") == digest
    assert any(e["kind"] == "volume-host-grow-failed" for e in manager.events("e4"))
    manager.cli("volume", "detach", "e4")


def engine_uris(manager, volume: str) -> tuple[str, str]:
    """The NBD URIs of ``volume``'s engine on this host: the volume and its growable view."""
    from drove.agent.node import NodeAgent
    from drove.engine.hostview import view_name

    sock = NodeAgent(manager.data_dir).engine_socket(volume)
    return (f"nbd+unix:///{volume}?socket={sock}",
            f"nbd+unix:///{view_name(volume)}?socket={sock}")


def test_a_raw_device_grows_and_takes_writes_past_the_old_end(manager, tmp_path):
    """A device without a filesystem (as CSI's block access has it): grow() after the
    volume's expand; the new range takes writes that reach the volume."""
    from drove.agent import hostattach

    manager.cli("volume", "create", "raw", "--size", "16M", "--replicas", "1")
    manager.cli("volume", "attach", "raw")
    uri, view = engine_uris(manager, "raw")
    att = hostattach.attach(uri, tmp_path / "att", fuse_uri=view)
    try:
        assert att.size == 16 * MiB and device_size(att.device) == 16 * MiB
        manager.cli("volume", "expand", "raw", "--size", "32M")
        assert device_size(att.device) == 16 * MiB  # not recorded by the manager: untouched
        assert hostattach.grow(att).size == 32 * MiB
        assert device_size(att.device) == 32 * MiB
        payload = os.urandom(MiB)
        fd = os.open(att.device, os.O_RDWR)
        try:
            os.pwrite(fd, payload, 30 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        hostattach.detach(att)
    got = nbdsh(uri, f"import sys; sys.stdout.buffer.write(h.pread({MiB}, {30 * MiB}))")
    assert got.stdout == payload
    manager.cli("volume", "detach", "raw")


def test_a_device_never_grows_past_what_the_volume_serves(manager, tmp_path):
    """grow() asked for more than the engine serves changes nothing and says why."""
    from drove.agent import hostattach

    manager.cli("volume", "create", "small", "--size", "16M", "--replicas", "1")
    manager.cli("volume", "attach", "small")
    uri, view = engine_uris(manager, "small")
    att = hostattach.attach(uri, tmp_path / "att", mount=tmp_path / "mnt", fuse_uri=view)
    try:
        with pytest.raises(hostattach.HostAttachError, match="expand the volume first"):
            hostattach.grow(att, 32 * MiB)
        assert device_size(att.device) == 16 * MiB
        assert hostattach.grow(att).size == 16 * MiB  # what it serves already: a no-op
        old = hostattach.attach(uri, tmp_path / "old")  # no view: cannot grow online
        try:
            with pytest.raises(hostattach.HostAttachError, match="attach the volume again"):
                hostattach.grow(old)
        finally:
            hostattach.detach(old)
    finally:
        hostattach.detach(att)
    manager.cli("volume", "detach", "small")


def test_the_growable_view_holds_nothing_past_the_volume(manager, tmp_path):
    """The engine's view for host attach: advertised large, zeros past the end, writes
    there refused (nbdsh, a real libnbd client)."""
    from drove.engine.hostview import VIEW_SIZE

    manager.cli("volume", "create", "view", "--size", "8M", "--replicas", "1")
    manager.cli("volume", "attach", "view")
    _, uri = engine_uris(manager, "view")
    end = 8 * MiB
    script = (
        f"assert h.get_size() == {VIEW_SIZE}\n"
        f"h.pwrite(b'x' * 4096, {end - 4096})\n"
        f"assert h.pread(8192, {end - 4096}) == b'x' * 4096 + bytes(4096)\n"
        f"assert h.pread(4096, {VIEW_SIZE - 4096}) == bytes(4096)\n"
        "try:\n"
        f"    h.pwrite(b'y' * 4096, {end})\n"
        "    raise SystemExit('a write past the end was accepted')\n"
        "except nbd.Error as e:\n"
        "    assert 'ENOSPC' in str(e), e\n"
    )
    r = nbdsh(uri, script, check=False)
    assert r.returncode == 0, r.stderr
    manager.cli("volume", "detach", "view")


def test_growth_on_another_node_goes_through_its_agent(manager, tmp_path):
    """Attached on node "other" (an agent of its own), the expand grows the device and the
    filesystem there, through that agent's API (POST /v1/host/grow)."""
    from agenttools import agent_node

    mnt = tmp_path / "on-other"
    with agent_node(manager, tmp_path) as other:
        manager.cli("volume", "create", "far", "--size", "320M", "--replicas", "1")
        manager.ok("POST", "/v1/volumes/far/attach",
                   json={"node": other, "mount": str(mnt), "fs": "xfs"})
        digest = write_file(mnt / "f", 4 * MiB)
        before = df_total(str(mnt))
        manager.cli("volume", "expand", "far", "--size", "512M")
        v = manager.volume("far")
        assert v["node"] == other and device_size(v["device"]) == 512 * MiB
        assert df_total(str(mnt)) > before + 150 * MiB
        assert sha(mnt / "f") == digest
        manager.cli("volume", "detach", "far")
