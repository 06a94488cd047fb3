"""The engine's local replica (data locality): served in the engine process, a member like any.

Real processes and real clients throughout: qemu-io, qemu-img, nbdcopy, nbdsh and
fio talk to the engine; the remote replicas are `drove replica serve` processes;
the local one is reached through the exports and control API the engine serves
for it (its ready line's ``local_replica``).  The crash tests with a local
replica are in test_engine_crash.py, the model test's in test_engine_model.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from drove.replica.chain import Replica
from enginetools import start_engine
from replicatools import NBDSH, nbdsh, qemu_io, run

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)


def compare(a: str, b: str) -> None:
    """qemu-img compare two images or NBD exports (raises with the difference)."""
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b])


def fill_random(uri: str, size: str) -> None:
    """Write ``size`` of random data through the volume (nbdkit's random plugin)."""
    run(["nbdcopy", "--", "[", "nbdkit", "random", size, "]", uri])


def fio_result(job: subprocess.Popen) -> dict:
    """The first job of a finished fio run (JSON output); stderr in the failure message."""
    out, err = job.communicate(timeout=300)
    text = out.decode()
    assert "{" in text, err.decode()[-3000:]
    result = json.loads(text[text.index("{"):])["jobs"][0]
    assert result["error"] == 0, err.decode()[-3000:]
    return result


def by_name(info: dict) -> dict[str, dict]:
    """The engine's replicas by name."""
    return {r["name"]: r for r in info["replicas"]}


def test_written_data_is_in_the_local_directory_and_on_the_remote_replicas(cluster, tmp_path):
    eng = cluster.start(3, "16M", local=True)
    assert by_name(eng.info())["r0"]["local"] is True
    src = tmp_path / "src.raw"
    run(["qemu-img", "create", "-f", "raw", str(src), "16M"])
    qemu_io(str(src), "write -P 0x11 0 3M", "write -P 0x22 5M 1M", "write -P 0x33 15M 1M")
    qemu_io(eng.uri(), "write -P 0x11 0 3M", "write -P 0x22 5M 1M", "write -P 0x33 15M 1M",
            "flush")
    for r in cluster.replicas:  # the local head through the engine's export, then the others
        compare(str(src), r.uri("head"))
    local = cluster.local
    assert local.ok("GET", "/v1/info")["dir"] == str(local.dir)
    assert eng.stop() == 0
    # The engine is gone: its directory is an ordinary replica holding every write.
    replica = Replica.open(local.dir)
    try:
        assert replica.read(0, 16 * MiB) == src.read_bytes()
        state = replica.engine_state
        assert state["clean"] is True and "r0" in state["members"], state
    finally:
        replica.close()


def test_reads_are_served_by_the_local_replica_while_writes_wait_for_the_remote(cluster):
    """A stopped remote replica stalls writes (until the timeout) but never a read."""
    eng = cluster.start(2, "8M", "--timeout", "30", local=True)
    qemu_io(eng.uri(), "write -P 0x5a 0 8M", "flush")
    remote = cluster.replicas[1]
    script = """
import sys, time
t0 = time.monotonic()
for off in range(0, 8 << 20, 1 << 20):
    assert h.pread(1 << 20, off) == b'\\x5a' * (1 << 20), off
print("read", time.monotonic() - t0, flush=True)
buf = nbd.Buffer.from_bytearray(bytearray(b'w' * 4096))
cmd = h.aio_pwrite(buf, 0)
deadline = time.monotonic() + 0.5
while time.monotonic() < deadline:
    h.poll(50)
    if h.aio_command_completed(cmd):
        sys.exit("a write completed while a replica is stopped")
print("stalled", flush=True)
deadline = time.monotonic() + 25
while not h.aio_command_completed(cmd):
    assert time.monotonic() < deadline, "the write never completed"
    h.poll(100)
assert h.pread(4096, 0) == b'w' * 4096
print("written", flush=True)
"""
    connect = f"h.connect_uri({eng.uri()!r})\n"
    os.kill(remote.proc.pid, signal.SIGSTOP)
    try:
        client = subprocess.Popen([*NBDSH, "-c", connect + script], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        line = client.stdout.readline().split()
        assert line[:1] == [b"read"], (line, client.stderr.read())
        # Round robin would have sent half the reads to the stopped replica: 30 s each.
        assert float(line[1]) < 5, line
        assert client.stdout.readline().strip() == b"stalled", client.stderr.read()
    finally:
        os.kill(remote.proc.pid, signal.SIGCONT)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0 and out.strip() == b"written", err.decode()
    assert eng.info()["health"] == "healthy"
    compare(cluster.local.uri("head"), remote.uri("head"))


@pytest.mark.slow
def test_local_replica_rebuilt_as_target_under_unaligned_writes(cluster, tmp_path):
    """A local replica added to a running volume is rebuilt from a remote one.

    Unaligned writes keep coming while it is write-only (the mirror completes
    its edge blocks from the remote), and at the end all copies are identical.
    """
    eng = cluster.start(1, "64M")
    fill_random(eng.uri(), "48M")
    eng.ok("POST", "/v1/snapshots", json={"name": "s1"})
    qemu_io(eng.uri(), "write -P 0x44 1M 2M")
    load = subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", f"--uri={eng.uri()}", "--rw=randwrite",
         "--bsrange=512-64k", "--bs_unaligned", "--iodepth=8", "--size=64M", "--time_based",
         "--runtime=60", "--verify_state_save=0", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        eng.ok("POST", "/v1/replicas", json={"name": "loc", "directory": str(tmp_path / "loc")})
        rb = eng.wait_rebuilt()
        assert rb["replica"] == "loc" and rb["source"] == "r0", rb
        assert rb["bytes_copied"] >= 48 * MiB, rb
    finally:
        load.send_signal(signal.SIGINT)
    result = fio_result(load)
    assert result["write"]["total_ios"] > 0
    info = eng.wait_for(lambda i: i["health"] == "healthy", what="healthy")
    loc = by_name(info)["loc"]
    assert loc["local"] is True and loc["mode"] == "RW", loc
    head = loc["nbd"]  # the local replica's head, exported by the engine
    compare(cluster.replicas[0].uri("head"), head)
    compare(cluster.replicas[0].uri("snapshot/s1"), head.replace("/head", "/snapshot/s1"))
    compare(eng.uri(), head)


def test_local_replica_added_and_refusals(cluster, tmp_path):
    """POST /v1/replicas {"name", "directory"} adds a local replica; bad requests change nothing."""
    eng = cluster.start(1, "8M")
    qemu_io(eng.uri(), "write -P 0x61 0 4M")
    eng.ok("POST", "/v1/snapshots", json={"name": "s1"})
    qemu_io(eng.uri(), "write -P 0x62 1M 1M")
    assert eng.api("POST", "/v1/replicas", json={
        "name": "x", "url": cluster.replicas[0].control,
        "directory": str(tmp_path / "x")}).status_code == 400
    assert eng.api("POST", "/v1/replicas", json={
        "name": "r0", "directory": str(tmp_path / "y")}).status_code == 409
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    eng.ok("POST", "/v1/replicas", json={"name": "loc", "directory": str(tmp_path / "loc")})
    eng.wait_rebuilt()
    info = eng.wait_for(lambda i: i["health"] == "healthy", what="healthy")
    # One local replica per engine: a second is refused, and nothing is made for it.
    res = eng.api("POST", "/v1/replicas", json={"name": "loc2",
                                                "directory": str(tmp_path / "loc2")})
    assert res.status_code == 409 and "local replica already" in res.json()["detail"], res.text
    assert not (tmp_path / "loc2").exists()
    assert set(by_name(eng.info())) == {"r0", "loc"}
    head = by_name(info)["loc"]["nbd"]
    compare(cluster.replicas[0].uri("head"), head)
    compare(cluster.replicas[0].uri("snapshot/s1"), head.replace("/head", "/snapshot/s1"))


def test_a_directory_holding_another_volumes_replica_is_never_overwritten(cluster, tmp_path):
    """A mistyped directory (or URL) naming another volume's replica: the rebuild refuses."""
    other = start_engine(tmp_path / "other", "other", [], size="8M",
                         local=("o0", tmp_path / "o0"))
    cluster.track(other)
    qemu_io(other.uri(), "write -P 0x4f 0 1M", "flush")
    assert other.stop() == 0
    eng = cluster.start(1, "8M")
    qemu_io(eng.uri(), "write -P 0x01 0 2M")
    eng.ok("POST", "/v1/replicas", json={"name": "x", "directory": str(tmp_path / "o0")})
    rb = eng.wait_for(lambda i: i["rebuild"]["state"] not in ("starting", "preparing",
                                                              "copying", "joining"),
                      what="the rebuild to end")["rebuild"]
    assert rb["state"] == "failed" and "holds volume 'other'" in rb["error"], rb
    assert by_name(eng.info())["x"]["mode"] == "ERR"
    eng.ok("DELETE", "/v1/replicas/x")  # closes the directory again
    replica = Replica.open(tmp_path / "o0")
    try:
        assert replica.read(0, MiB) == b"\x4f" * MiB and len(replica.layers()) == 1
    finally:
        replica.close()


@pytest.mark.slow
def test_local_replica_that_cannot_be_opened_at_start_is_opened_and_rebuilt_later(cluster):
    """The local directory is locked by another process when the engine starts: the
    volume serves from the remote replica, and a later rebuild opens it in place."""
    eng = cluster.start(2, "8M", local=True)
    qemu_io(eng.uri(), "write -P 0x21 0 4M")
    assert eng.stop() == 0
    squatter = cluster.replica(cluster.local.name, None)  # holds the directory's lock
    eng = cluster.start_engine()
    info = eng.info()
    r0 = by_name(info)["r0"]
    assert r0["mode"] == "ERR" and "cannot open" in r0["error"], r0
    assert info["health"] == "degraded"
    qemu_io(eng.uri(), "write -P 0x22 1M 2M")  # r0 misses this
    res = eng.api("POST", "/v1/replicas", json={"name": "r0"})
    assert res.status_code == 409 and "cannot open" in res.json()["detail"], res.text
    assert squatter.stop() == 0
    eng.ok("POST", "/v1/replicas", json={"name": "r0"})
    eng.wait_rebuilt()
    info = eng.wait_for(lambda i: i["health"] == "healthy", what="healthy")
    assert by_name(info)["r0"]["local"] is True
    qemu_io(eng.uri(), "read -P 0x21 0 1M", "read -P 0x22 1M 2M", "read -P 0x21 3M 1M")
    compare(cluster.local.uri("head"), cluster.replicas[1].uri("head"))


def test_local_replica_is_the_rebuild_source_of_a_remote_one(cluster, tmp_path):
    """A volume whose only RW replica is local: a new remote replica pulls its layers
    from the engine's own NBD server."""
    eng = cluster.start(1, "16M", local=True)
    fill_random(eng.uri(), "12M")
    eng.ok("POST", "/v1/snapshots", json={"name": "s1"})
    qemu_io(eng.uri(), "write -P 0x71 2M 1M", "write -z 8M 1M")
    fresh = cluster.replica("r9", "16M")
    eng.ok("POST", "/v1/replicas", json={"name": "r9", "url": fresh.control})
    rb = eng.wait_rebuilt()
    assert rb["source"] == "r0", rb
    assert rb["bytes_copied"] >= 12 * MiB, rb
    eng.wait_for(lambda i: i["health"] == "healthy", what="healthy")
    local = cluster.local
    for export in ("head", "snapshot/s1"):
        compare(local.uri(export), fresh.uri(export))
    compare(eng.uri(), fresh.uri("head"))
    # The local replica served the copy: its layer export is on the engine's NBD address.
    layer = next(la for la in local.ok("GET", "/v1/layers") if la["name"] == "s1")
    compare(local.uri(f"layer/{layer['file']}"), fresh.uri(f"layer/{layer['file']}"))


@pytest.mark.slow
def test_snapshots_delete_purge_revert_expand_and_checksums_with_a_local_replica(
        cluster, tmp_path):
    eng = cluster.start(3, "8M", local=True)
    replicas = cluster.replicas
    qemu_io(eng.uri(), "write -P 0x01 0 4M")
    eng.ok("POST", "/v1/snapshots", json={"name": "a"})
    qemu_io(eng.uri(), "write -P 0x02 1M 1M")
    eng.ok("POST", "/v1/snapshots", json={"name": "b"})
    qemu_io(eng.uri(), "write -P 0x03 3M 2M")
    eng.ok("POST", "/v1/snapshots", json={"name": "c"})

    def checksums(name: str) -> set[str]:
        return {r.ok("GET", f"/v1/snapshots/{name}/checksum")["checksum"] for r in replicas}

    for name in ("a", "b", "c"):
        assert len(checksums(name)) == 1, name  # the local replica's equals the others'
    # Deleting a middle snapshot folds its data into its child on every replica.
    eng.ok("DELETE", "/v1/snapshots/b")
    for r in replicas:
        layers = r.ok("GET", "/v1/layers", params={"removed": "true"})
        assert "b" not in {la["name"] for la in layers}, (r.dir.name, layers)
        compare(replicas[1].uri("snapshot/c"), r.uri("snapshot/c"))
    assert len(checksums("c")) == 1
    tmp = tmp_path / "c.raw"
    run(["nbdcopy", replicas[0].uri("snapshot/c"), str(tmp)])
    expected = bytearray(8 * MiB)
    expected[0:4 * MiB] = b"\x01" * (4 * MiB)
    expected[1 * MiB:2 * MiB] = b"\x02" * MiB
    expected[3 * MiB:5 * MiB] = b"\x03" * (2 * MiB)
    assert tmp.read_bytes() == expected
    # Revert: a new head on "a" on every replica; the local one serves it at once.
    eng.ok("POST", "/v1/revert", json={"snapshot": "a"})
    qemu_io(eng.uri(), "read -P 0x01 0 4M", "read -P 0x00 4M 4M")
    for r in replicas:
        compare(eng.uri(), r.uri("head"))
    # Expand: every replica grows, the local one included, and takes writes at the end.
    eng.ok("POST", "/v1/expand", json={"size": 16 * MiB})
    qemu_io(eng.uri(), "write -P 0x0e 15M 1M", "flush")
    for r in replicas:
        assert r.ok("GET", "/v1/info")["size"] == 16 * MiB
        compare(eng.uri(), r.uri("head"))
    assert by_name(eng.info())["r0"]["mode"] == "RW"


@pytest.fixture
def tmpfs(tmp_path):
    """A factory of small tmpfs mounts (a disk that fills up for real), unmounted at teardown."""
    mounts: list[Path] = []

    def make(name: str, size: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)])
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill_up(path: Path) -> int:
    """Allocate a file at ``path`` until its filesystem is full; the bytes taken."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    taken = 0
    try:
        for step in (MiB, 4096):
            while True:
                try:
                    os.posix_fallocate(fd, taken, step)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                taken += step
    finally:
        os.close(fd)
    return taken


def written_bytes(eng) -> int:
    """Bytes the engine's clients wrote so far."""
    return eng.ok("GET", "/v1/stats")["ops"]["write"]["bytes"]


@pytest.mark.slow
def test_local_disk_full_under_fio_verify_then_rebuilt_in_place(cluster, tmpfs):
    """The local replica's filesystem fills while fio writes and verifies: fio sees no
    error, the engine drops the local replica (reads go to the remote ones), and once
    there is room again it is rebuilt in place and the volume is healthy."""
    disk = tmpfs("r0", "40M")  # the local replica's directory (Cluster names it r0)
    eng = cluster.start(3, "32M", local=True)
    assert cluster.local.dir == disk
    # Rate-limited so the fill lands in the middle of the write phase.
    job = subprocess.Popen(
        ["fio", "--name=job", "--ioengine=nbd", f"--uri={eng.uri()}", "--output-format=json",
         "--verify_state_save=0", "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=24M",
         "--rate_iops=2000", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
         "--randrepeat=0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while written_bytes(eng) < 2 * MiB:
            assert time.monotonic() < deadline and job.poll() is None, "fio wrote nothing"
            time.sleep(0.05)
        filler = disk / "filler"
        fill_up(filler)
        info = eng.wait_for(lambda i: i["health"] == "degraded", timeout=20,
                            what="the local replica dropped")
    finally:
        result = fio_result(job)
    assert result["write"]["io_bytes"] == 24 * MiB and result["read"]["io_bytes"] == 24 * MiB
    assert written_bytes(eng) >= 24 * MiB
    r0 = by_name(info)["r0"]
    assert r0["mode"] == "ERR" and "No space left" in r0["error"], r0
    assert {r["name"]: r["mode"] for r in info["replicas"] if r["name"] != "r0"} == {
        "r1": "RW", "r2": "RW"}
    compare(cluster.replicas[1].uri("head"), cluster.replicas[2].uri("head"))
    compare(eng.uri(), cluster.replicas[1].uri("head"))  # reads now from the remote ones

    # Room again: the same local replica is rebuilt in place.
    filler.unlink()
    eng.ok("POST", "/v1/replicas", json={"name": "r0"})
    rb = eng.wait_rebuilt()
    assert rb["replica"] == "r0" and rb["source"] in ("r1", "r2"), rb
    info = eng.wait_for(lambda i: i["health"] == "healthy", what="healthy")
    assert by_name(info)["r0"]["local"] is True
    for r in cluster.replicas[1:]:
        compare(cluster.local.uri("head"), r.uri("head"))
    compare(eng.uri(), cluster.local.uri("head"))
    # Reads came from the local replica on its tmpfs again, and it served them all.
    info = eng.info()
    assert info["health"] == "healthy", info


def test_second_engine_claims_the_local_replica_and_fences_the_first(cluster, tmp_path):
    """Engine B, started by hand with A's local replica as a remote one (its control URL
    on A's process) and a higher epoch, takes the volume: A is fenced for good."""
    a = cluster.start(2, "16M", local=True)
    qemu_io(a.uri(), "write -P 0xaa 0 1M", "flush")
    epoch = a.info()["epoch"]
    local, remote = cluster.local, cluster.replicas[1]
    b = start_engine(tmp_path / "engine-b", "vol", [remote, local], "--epoch", str(epoch + 5),
                     names=["r1", "r0"])
    cluster.track(b)
    # A never stopped cleanly: B reconciles (rebuilds) one replica from the other, here
    # maybe the one A's process serves, which B reaches like any remote replica.
    info = b.wait_for(lambda i: i["health"] == "healthy", what="B healthy")
    assert info["epoch"] == epoch + 5, info
    assert local.ok("GET", "/v1/info")["epoch"] == epoch + 5
    qemu_io(b.uri(), "write -P 0xbb 0 64k", "flush")

    # A's writes fail from now on, on its open connection and on new ones alike.
    res = nbdsh(a.uri(), "h.pwrite(b'\\xcc' * 65536, 0)\nh.flush()", check=False)
    assert res.returncode != 0, "the fenced engine acknowledged a write"
    fenced = a.wait_for(lambda i: i["fenced"] is not None, timeout=30, what="A fenced")
    assert fenced["health"] == "faulted", fenced
    res = nbdsh(a.uri(), "h.pwrite(b'\\xcd' * 4096, 1 << 20)", check=False)
    assert res.returncode != 0
    # A's process still serves the local replica's exports, now for B: B's data, and
    # A's first write, are on both replicas; nothing A tried after B took over is.
    for uri in (local.uri("head"), remote.uri("head"), b.uri()):
        qemu_io(uri, "read -P 0xbb 0 64k", "read -P 0xaa 64k 960k", "read -P 0 1M 1M",
                read_only=True)
    assert b.info()["health"] == "healthy"
    assert a.info()["fenced"] == fenced["fenced"]


@pytest.mark.slow
def test_a_frozen_engine_woken_after_a_takeover_acknowledges_nothing(cluster, tmp_path):
    """Engine A (local r0 + remote r1) is frozen; B takes r1 (A's process, and so r0, does
    not answer it) and writes.  A, woken, loses r1: it must learn that B owns r1 before it
    acknowledges anything on r0 alone.  At the next start, B's replica wins over r0 even
    if r0's generation were higher: the newer writer's state comes first."""
    a = cluster.start(2, "16M", local=True)
    qemu_io(a.uri(), "write -P 0xaa 0 1M", "flush")
    epoch, local_control = a.info()["epoch"], cluster.local.control
    local_dir, remote = cluster.local.dir, cluster.replicas[1]
    a.proc.send_signal(signal.SIGSTOP)
    try:
        b = start_engine(tmp_path / "engine-b", "vol", [remote], "--epoch", str(epoch + 5),
                         "--replica", f"r0={local_control}", "--timeout", "2",
                         names=["r1"])
        cluster.track(b)
        assert {r["name"]: r["mode"] for r in b.info()["replicas"]} == {"r1": "RW",
                                                                        "r0": "ERR"}
        qemu_io(b.uri(), "write -P 0xbb 0 64k", "flush")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    res = nbdsh(a.uri(), "h.pwrite(b'\\xcc' * 4096, 0)\nh.flush()", check=False)
    assert res.returncode != 0, "the engine B fenced acknowledged a write on its local replica"
    info = a.wait_for(lambda i: i["fenced"] is not None, timeout=30, what="A fenced")
    assert "r1" in info["fenced"], info

    # Restart on both replicas: r1 (written by B's epoch) is current, r0 is rebuilt from it.
    a.kill()
    b.stop()
    c = start_engine(tmp_path / "engine-c", "vol", [remote], names=["r1"],
                     local=("r0", local_dir))
    cluster.track(c)
    c.wait_for(lambda i: i["health"] == "healthy", what="r0 rebuilt from r1")
    events = c.ok("GET", "/v1/events")
    assert any(e["kind"] == "replica-excluded" and e.get("replica") == "r0" for e in events)
    qemu_io(c.uri(), "read -P 0xbb 0 64k", "read -P 0xaa 64k 960k")
    c.stop()
    r0 = Replica.open(local_dir)
    try:
        assert r0.read(0, 65536) == b"\xbb" * 65536
        assert r0.read(65536, MiB - 65536) == b"\xaa" * (MiB - 65536)
    finally:
        r0.close()
