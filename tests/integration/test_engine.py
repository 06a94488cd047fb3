"""The engine process over real replica processes, driven by real NBD clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from replicatools import drove_cmd, nbdinfo_json, nbdsh, run

MiB = 1 << 20
pytestmark = pytest.mark.timeout(300)

# Run a test over remote replicas only, and again with the first replica served by the
# engine itself (--local-replica: reads from it, writes to it in-process).
LOCAL = pytest.mark.parametrize("local", [False, True], ids=["remote", "local"])
# The same, with the local variant among the slow tests (a long test).
LOCAL_SLOW = pytest.mark.parametrize(
    "local", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["remote", "local"])


def random_image(path: Path, size: int, seed: int) -> bytes:
    """A raw image with random data, some holes and some zero runs."""
    import random

    rnd = random.Random(seed)
    data = bytearray(size)
    for _ in range(64):
        off = rnd.randrange(0, size - 300_000)
        n = rnd.randrange(1, 300_000)
        data[off:off + n] = rnd.randbytes(n)
    path.write_bytes(data)
    return bytes(data)


def fio(uri: str, *args: str, timeout: float = 300) -> dict:
    """Run fio's nbd engine; return the first job's JSON result."""
    cmd = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
           "--verify_state_save=0", *args]
    out = run(cmd, timeout=timeout, check=False)
    text = out.stdout.decode()
    assert "{" in text, out.stderr.decode()[-3000:]
    return json.loads(text[text.index("{"):])["jobs"][0]


def compare(a: str, b: str) -> None:
    """qemu-img compare two NBD exports (raises with the difference)."""
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b])


@LOCAL_SLOW  # test_local_replica.py checks the same quickly
def test_volume_serves_clients_and_every_replica_holds_the_data(cluster, tmp_path, local):
    eng = cluster.start(3, "32M", local=local)
    assert [r.get("local", False) for r in eng.info()["replicas"]] == [False] * 2 + [local]
    info = nbdinfo_json(eng.uri())
    assert info["exports"][0]["export-size"] == 32 * MiB
    assert info["exports"][0]["can_multi_conn"] is True
    assert eng.info()["health"] == "healthy"
    src = tmp_path / "src.raw"
    random_image(src, 32 * MiB, seed=1)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), eng.uri()])
    compare(str(src), eng.uri())
    out = tmp_path / "out.raw"
    run(["nbdcopy", "--connections=4", eng.uri(), str(out)])
    assert out.read_bytes() == src.read_bytes()
    for r in cluster.replicas:
        compare(str(src), r.uri("head"))
    stats = eng.ok("GET", "/v1/stats")
    assert stats["ops"]["write"]["count"] > 0 and stats["ops"]["read"]["bytes"] >= 32 * MiB
    assert stats["ops"]["write"]["p99_us"] is not None


@LOCAL_SLOW
def test_multi_conn_flushed_write_is_seen_on_another_connection(cluster, local):
    eng = cluster.start(2, "8M", local=local)
    script = (
        "h2 = nbd.NBD()\n"
        f"h2.connect_uri({eng.uri()!r})\n"
        "assert h.can_multi_conn()\n"
        "for i in range(64):\n"
        "    data = bytes([i % 251]) * 4096\n"
        "    h.pwrite(data, i * 65536 + 123)\n"
        "    h.flush()\n"
        "    assert h2.pread(4096, i * 65536 + 123) == data, i\n"
    )
    nbdsh(eng.uri(), script)


@LOCAL
def test_nbdsh_edge_cases(cluster, local):
    eng = cluster.start(2, "4M", local=local)
    script = (
        "import errno\n"
        "size = h.get_size()\n"
        "assert size == 4 * 1024 * 1024\n"
        "h.pwrite(b'a' * 10, 4090)\n"           # crosses a block boundary
        "assert h.pread(20, 4085) == bytes(5) + b'a' * 10 + bytes(5)\n"
        "h.pwrite(b'b' * 8192, 0, nbd.CMD_FLAG_FUA)\n"
        "h.zero(50, 100)\n"
        "assert h.pread(200, 0) == b'b' * 100 + bytes(50) + b'b' * 50\n"
        "h.trim(4096, 0)\n"
        "h.zero(8192, 8192, nbd.CMD_FLAG_NO_HOLE)\n"
        "h.pwrite(b'c', size - 1)\n"
        "assert h.pread(1, size - 1) == b'c'\n"
        "for off, n in ((size, 1), (size - 1, 2)):\n"
        "    try:\n"
        "        h.pread(n, off)\n"
        "        raise SystemExit('read past the end succeeded')\n"
        "    except nbd.Error as e:\n"
        "        assert e.errnum in (errno.EINVAL, errno.ENOSPC), e\n"
        "seen = []\n"
        "h3 = nbd.NBD()\n"
        "h3.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n"
        f"h3.connect_uri({eng.uri()!r})\n"
        "h3.block_status(size, 0, lambda ctx, off, ents, err: seen.append(ents))\n"
        "assert sum(seen[0][0::2]) > 0\n"
        "h.flush()\n"
        "h.cache(4096, 0)\n"
    )
    nbdsh(eng.uri(), script)
    for r in cluster.replicas:
        compare(eng.uri(), r.uri("head"))


@LOCAL
def test_snapshot_delete_revert_expand_through_the_engine(cluster, tmp_path, local):
    eng = cluster.start(2, "8M", local=local)
    nbdsh(eng.uri(), "h.pwrite(b'1' * 65536, 0)")
    snap = eng.ok("POST", "/v1/snapshots", json={"name": "one", "labels": {"k": "v"}})
    assert snap["pause_ms"] < 1000
    nbdsh(eng.uri(), "h.pwrite(b'2' * 65536, 0)")
    eng.ok("POST", "/v1/snapshots", json={"name": "two"})
    for r in cluster.replicas:
        names = {la["name"] for la in r.ok("GET", "/v1/layers")}
        assert {"one", "two"} <= names
    assert eng.api("POST", "/v1/snapshots", json={"name": "one"}).status_code == 409
    assert eng.api("POST", "/v1/snapshots", json={"name": "bad/name"}).status_code in (400, 422)
    eng.ok("DELETE", "/v1/snapshots/two")
    assert eng.api("DELETE", "/v1/snapshots/two").status_code == 404
    eng.ok("POST", "/v1/revert", json={"snapshot": "one"})
    nbdsh(eng.uri(), "assert h.pread(65536, 0) == b'1' * 65536")
    eng.ok("POST", "/v1/expand", json={"size": 16 * MiB})
    assert eng.api("POST", "/v1/expand", json={"size": 8 * MiB}).status_code == 400
    nbdsh(eng.uri(), "assert h.get_size() == 16 << 20\nh.pwrite(b'e', (16 << 20) - 1)")
    for r in cluster.replicas:
        assert r.ok("GET", "/v1/info")["size"] == 16 * MiB
        compare(eng.uri(), r.uri("head"))
    kinds = [e["kind"] for e in eng.ok("GET", "/v1/events")]
    assert {"snapshot", "snapshot-deleted", "reverted", "expanded"} <= set(kinds)


def test_cli_reports_and_refuses_clearly(cluster):
    eng = cluster.start(1, "4M")
    out = run(drove_cmd("engine", "info", "--url", eng.control, "--json"))
    assert json.loads(out.stdout)["health"] == "healthy"
    out = run(drove_cmd("engine", "snapshot", "--url", eng.control, "s1", "--json"))
    assert "pause_ms" in json.loads(out.stdout)
    res = run(drove_cmd("engine", "delete", "--url", eng.control, "nope"), check=False)
    assert res.returncode != 0 and b"no snapshot 'nope'" in res.stderr
    res = run(drove_cmd("engine", "serve", "v", "--replica", "127.0.0.1:1"), check=False)
    assert res.returncode != 0 and b"control URL" in res.stderr


@LOCAL
@pytest.mark.slow
def test_replica_killed_under_fio_verify_then_rebuilt_under_load(cluster, tmp_path, local):
    eng = cluster.start(3, "64M", local=local)
    eng.ok("POST", "/v1/snapshots", json={"name": "base"})
    verify = ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=48M",
              "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=0"]
    job = subprocess.Popen(
        ["fio", "--name=job", "--ioengine=nbd", f"--uri={eng.uri()}", "--output-format=json",
         "--verify_state_save=0", *verify], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    cluster.replicas[1].kill()
    out, err = job.communicate(timeout=300)
    text = out.decode()
    result = json.loads(text[text.index("{"):])["jobs"][0]
    assert result["error"] == 0, err.decode()[-2000:]
    info = eng.info()
    assert info["health"] == "degraded"
    assert {r["name"]: r["mode"] for r in info["replicas"]}["r1"] == "ERR"

    # Rebuild onto a fresh replica process while a writer keeps going.
    fresh = cluster.replica("r1b", "64M")
    load = subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", f"--uri={eng.uri()}", "--rw=randwrite",
         "--bs=4k", "--iodepth=8", "--size=48M", "--time_based", "--runtime=30",
         "--verify_state_save=0", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    eng.ok("DELETE", "/v1/replicas/r1")
    eng.ok("POST", "/v1/replicas", json={"name": "r1b", "url": fresh.control})
    rb = eng.wait_rebuilt()
    assert rb["bytes_done"] == rb["bytes_total"] > 0
    load.send_signal(signal.SIGINT)
    load.communicate(timeout=60)
    assert eng.wait_for(lambda i: i["health"] == "healthy", what="healthy")["health"]
    # I/O quiesced: every replica's head and snapshots are byte-identical.
    live = [cluster.replicas[0], cluster.replicas[2], fresh]
    for r in live[1:]:
        compare(live[0].uri("head"), r.uri("head"))
        compare(live[0].uri("snapshot/base"), r.uri("snapshot/base"))
    compare(eng.uri(), live[2].uri("head"))


@LOCAL
@pytest.mark.slow
def test_stopped_replica_is_dropped_within_the_timeout(cluster, local):
    # With a local replica, a third one: the local one alone acknowledges nothing (write
    # quorum, test_write_quorum.py), the other remote carries on.
    eng = cluster.start(3 if local else 2, "32M", "--timeout", "2", local=local)
    job = subprocess.Popen(
        ["fio", "--name=job", "--ioengine=nbd", f"--uri={eng.uri()}", "--rw=randrw",
         "--bs=4k", "--iodepth=8", "--size=16M", "--time_based", "--runtime=8",
         "--verify_state_save=0", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    stopped = cluster.replicas[1]
    os.kill(stopped.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        eng.wait_for(lambda i: i["health"] == "degraded", timeout=6, what="degraded")
        dropped_after = time.monotonic() - t0
        out, err = job.communicate(timeout=60)
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)
    text = out.decode()
    result = json.loads(text[text.index("{"):])["jobs"][0]
    assert result["error"] == 0, err.decode()[-2000:]
    assert dropped_after < 5
    # fio kept going after the drop: it ran its full time with I/O throughout.
    assert result["write"]["total_ios"] > 0 and result["job_runtime"] >= 7000


@LOCAL_SLOW
def test_a_replica_that_dies_while_the_volume_is_idle_leaves_at_once(cluster, local):
    # A long timeout spaces the health pings 5 s apart: the drop must come sooner, from
    # the closed socket alone (no I/O at all).
    eng = cluster.start(2, "8M", "--timeout", "60", "--quorum-wait", "1", local=local)
    assert eng.info()["health"] == "healthy"
    cluster.replicas[1].kill()
    t0 = time.monotonic()
    info = eng.wait_for(lambda i: i["health"] == "degraded", timeout=10, what="degraded")
    assert time.monotonic() - t0 < 2.5
    by_name = {r["name"]: r for r in info["replicas"]}
    gone = by_name["r1"]
    assert gone["mode"] == "ERR" and "lost" in gone["error"], gone
    assert by_name["r0"]["mode"] == "RW"
    kinds = [e["kind"] for e in eng.ok("GET", "/v1/events")]
    assert "replica-failed" in kinds, kinds
    if local:
        # The local replica alone acknowledges nothing (write quorum, test_write_quorum.py);
        # reads go on.
        res = nbdsh(eng.uri(), "h.pwrite(b'z' * 4096, 8192)", check=False)
        assert res.returncode != 0 and b"Input/output error" in res.stderr, res
        nbdsh(eng.uri(), "assert h.pread(4096, 8192) == bytes(4096)")
        return
    nbdsh(eng.uri(), "h.pwrite(b'z' * 4096, 8192)\nassert h.pread(4096, 8192) == b'z' * 4096\n")


def test_losing_every_replica_fails_io_with_eio_not_a_hang(cluster):
    eng = cluster.start(2, "4M", "--timeout", "2")
    for r in cluster.replicas:
        r.kill()
    script = (
        "import errno\n"
        "for op in (lambda: h.pwrite(b'x' * 4096, 0), lambda: h.pread(4096, 0)):\n"
        "    try:\n"
        "        op()\n"
        "        raise SystemExit('I/O on a volume without replicas succeeded')\n"
        "    except nbd.Error as e:\n"
        "        assert e.errnum == errno.EIO, e\n"
    )
    t0 = time.monotonic()
    nbdsh(eng.uri(), script)
    assert time.monotonic() - t0 < 10
    assert eng.info()["health"] == "faulted"


@LOCAL
@pytest.mark.slow
def test_interrupted_rebuild_leaves_the_replica_out_then_a_delta_rebuild_finishes(
        cluster, local):
    # With a local replica, r0 is served by the engine, and r2 joins it: the local replica
    # alone acknowledges no write (write quorum) while r1 is out.
    eng = cluster.start(3 if local else 2, "256M", "--timeout", "2", local=local)
    run(["nbdcopy", "--", "[", "nbdkit", "random", "256M", "]", eng.uri()])
    eng.ok("POST", "/v1/snapshots", json={"name": "s1"})
    nbdsh(eng.uri(), "h.pwrite(b'x' * (1 << 20), 0)")
    victim = cluster.replicas[1]
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        eng.wait_for(lambda i: i["health"] == "degraded", timeout=10, what="degraded")
        nbdsh(eng.uri(), "h.pwrite(b'y' * (1 << 20), 1 << 20)")  # r1 misses this
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    # A rebuild of r1 that dies half-way (its process is stopped again) leaves r1 out.
    eng.ok("POST", "/v1/replicas", json={"name": "r1"})
    deadline = time.monotonic() + 20
    while eng.ok("GET", "/v1/rebuild")["state"] in ("starting", "preparing"):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        rb = eng.wait_for(lambda i: i["rebuild"]["state"] in ("done", "failed"),
                          timeout=30, what="rebuild end")["rebuild"]
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    assert rb["state"] == "failed", rb
    assert eng.modes()["r1"] == "ERR"
    assert victim.ok("GET", "/v1/info")["rebuilding"] is True  # never half-in
    eng.ok("POST", "/v1/replicas", json={"name": "r1"})
    rb = eng.wait_rebuilt()
    assert rb["source"] in (("r0", "r2") if local else ("r0",)), rb  # an RW replica
    assert rb["bytes_copied"] < 128 << 20, rb["layers"]  # a delta: most ranges matched already
    assert eng.wait_for(lambda i: i["health"] == "healthy", what="healthy")
    compare(cluster.replicas[0].uri("head"), victim.uri("head"))
    compare(cluster.replicas[0].uri("snapshot/s1"), victim.uri("snapshot/s1"))
    assert eng.api("POST", "/v1/replicas", json={"name": "r1"}).status_code == 409


@pytest.fixture
def small_fs(tmp_path):
    """A factory of 12 MiB tmpfs mounts (real ENOSPC), unmounted at teardown."""
    mounts: list[Path] = []

    def make(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        run(["mount", "-t", "tmpfs", "-o", "size=12M", "tmpfs", str(d)])
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_enospc_drops_a_full_replica_then_reaches_the_client_when_all_are_full(
        cluster, small_fs, tmp_path):
    from replicatools import start_replica

    # r0 on the real disk, r1 on a 12 MiB filesystem: a 32 MiB volume overflows r1 only.
    cluster.replicas = [cluster.replica("r0", "32M"),
                        start_replica(small_fs("fs1") / "r1", "32M")]
    cluster.track(cluster.replicas[1])
    eng = cluster.start_engine(names=["r0", "r1"])
    run(["nbdcopy", "--", "[", "nbdkit", "random", "24M", "]", eng.uri()])
    assert eng.modes() == {"r0": "RW", "r1": "ERR"}
    assert "ENOSPC" in eng.info()["replicas"][1]["error"]
    compare(eng.uri(), cluster.replicas[0].uri("head"))


@LOCAL_SLOW
def test_enospc_on_every_replica_is_returned_and_the_volume_stays_readable(
        cluster, small_fs, local):
    from replicatools import start_replica

    # With a local replica, r0 is served by the engine from its full filesystem.
    if local:
        cluster.add_local("r0", small_fs("fs0") / "r0", "32M")
    cluster.replicas += [start_replica(small_fs(f"fs{i}") / f"r{i}", "32M")
                         for i in range(1 if local else 0, 2)]
    for r in cluster.remote:
        cluster.track(r)
    eng = cluster.start_engine()
    nbdsh(eng.uri(), "h.pwrite(b'k' * 65536, 0)")
    script = (
        "import errno, os\n"
        "hit = None\n"
        "for i in range(1, 512):\n"
        "    try:\n"
        "        h.pwrite(os.urandom(65536), i * 65536)\n"
        "    except nbd.Error as e:\n"
        "        hit = e\n"
        "        break\n"
        "assert hit is not None and hit.errnum == errno.ENOSPC, hit\n"
        "assert h.pread(65536, 0) == b'k' * 65536\n"
    )
    nbdsh(eng.uri(), script)
    info = eng.info()
    assert info["health"] == "healthy", info  # full is not failed: both stay RW
    nbdsh(eng.uri(), "assert h.pread(65536, 0) == b'k' * 65536")


def test_tls_required_volume(cluster, tmp_path):
    from nbdtools import make_tls_dir

    certs = make_tls_dir(tmp_path / "tls")
    eng = cluster.start(1, "4M", "--tls-cert", str(certs / "server-cert.pem"),
                        "--tls-key", str(certs / "server-key.pem"),
                        "--tls-ca", str(certs / "ca-cert.pem"), "--tls-required")
    host, port = eng.addresses["nbd_host"], eng.addresses["nbd_port"]
    secure = f"nbds://{host}:{port}/vol?tls-certificates={certs}"
    nbdsh(secure, "h.pwrite(b't' * 4096, 0)\nassert h.pread(4096, 0) == b't' * 4096")
    plain = run(["nbdinfo", eng.uri()], check=False)
    assert plain.returncode != 0


def test_engine_refuses_a_size_the_replicas_do_not_have(cluster, tmp_path):
    from enginetools import start_engine

    r = cluster.replica("r0", "8M")
    with pytest.raises(RuntimeError, match="not 16777216"):
        start_engine(tmp_path / "e", "vol", [r], size="16M", timeout=15)
    eng = start_engine(tmp_path / "e2", "vol", [r], size="8M")
    cluster.track(eng)
    assert eng.info()["size"] == 8 << 20


@pytest.mark.slow
def test_large_writes_go_through_the_shared_arena_and_a_stale_replica_is_rebuilt(cluster):
    """Large writes reach same-host replicas by arena offset (drove.nbd.arena).

    A replica stopped with arena writes queued is dropped; when it runs again it
    may apply them with whatever the reused slots hold by then.  It stays ERR,
    and a delta rebuild makes it byte-identical again.
    """
    eng = cluster.start(2, "64M", "--timeout", "2")
    assert all(r["arena"] for r in eng.info()["replicas"])
    verify = ["--rw=randwrite", "--bsrange=64k-1m", "--bs_unaligned", "--iodepth=16",
              "--size=48M", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
              "--randrepeat=0"]
    job = subprocess.Popen(
        ["fio", "--name=job", "--ioengine=nbd", f"--uri={eng.uri()}", "--output-format=json",
         "--verify_state_save=0", "--loops=3", *verify],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    victim = cluster.replicas[1]
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        eng.wait_for(lambda i: i["health"] == "degraded", timeout=10, what="degraded")
        time.sleep(1.0)  # the arena slots the victim still has queued are reused meanwhile
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    out, err = job.communicate(timeout=300)
    text = out.decode()
    result = json.loads(text[text.index("{"):])["jobs"][0]
    assert result["error"] == 0, err.decode()[-2000:]
    assert result["write"]["io_bytes"] >= 48 * MiB
    assert eng.modes()["r1"] == "ERR"
    eng.ok("POST", "/v1/replicas", json={"name": "r1"})
    eng.wait_rebuilt()
    assert eng.wait_for(lambda i: i["health"] == "healthy", what="healthy")
    compare(cluster.replicas[0].uri("head"), victim.uri("head"))
    compare(eng.uri(), victim.uri("head"))
    # Large reads come back through the arena too, and every slot is free again.
    out = Path(cluster.tmp) / "out.raw"
    run(["nbdcopy", "--connections=4", "--request-size=1048576", eng.uri(), str(out)])
    compare(str(out), victim.uri("head"))
    arena = eng.wait_for(lambda i: i["arena"]["in_use"] == 0, what="arena slots free")["arena"]
    assert arena["retired"] == 0


@pytest.mark.slow
def test_reads_cut_off_by_a_stopped_replica_retire_slots_until_its_process_exits(cluster):
    """A large read into the arena that times out leaves its slot retired: the stopped
    replica may still write there.  Once that process is gone the slots come back."""
    eng = cluster.start(2, "64M", "--timeout", "2")
    job = subprocess.Popen(
        ["fio", "--name=job", "--ioengine=nbd", f"--uri={eng.uri()}", "--output-format=json",
         "--rw=randread", "--bs=1M", "--iodepth=8", "--size=64M", "--time_based",
         "--runtime=8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    victim = cluster.replicas[1]
    os.kill(victim.proc.pid, signal.SIGSTOP)
    try:
        eng.wait_for(lambda i: i["health"] == "degraded", timeout=10, what="degraded")
        # Round-robin reads were in flight to the victim when it stopped.
        retired = eng.wait_for(lambda i: i["arena"]["retired"] > 0, timeout=10,
                               what="slots retired")["arena"]["retired"]
        time.sleep(2.5)  # the victim still exists, so nothing may be reclaimed
        assert eng.info()["arena"]["retired"] == retired
    finally:
        victim.kill(signal.SIGKILL)
    out, err = job.communicate(timeout=120)
    text = out.decode()
    result = json.loads(text[text.index("{"):])["jobs"][0]
    assert result["error"] == 0, err.decode()[-2000:]  # reads went on from r0
    # Some work, then idle: the idle hook reclaims the slots of the exited process.
    run(["nbdcopy", "--request-size=1048576", eng.uri(), "null:"])
    arena = eng.wait_for(lambda i: i["arena"]["retired"] == 0 and i["arena"]["in_use"] == 0,
                         timeout=20, what="retired slots reclaimed")["arena"]
    assert arena["slots"] == 64
    assert "reclaimed: their replica process has exited" in cluster.engine.log.read_text()
