"""Live engine upgrade: a new engine process takes the volume, its listeners and its open
client connections over from the running one (drove.engine.handoff), under real clients."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from enginetools import EngineProc, start_successor
from replicatools import drove_cmd, nbdsh, qemu_io, run

MiB = 1 << 20
pytestmark = pytest.mark.timeout(180)


def fio_verify(uri: str, size: str, rate: int, jobs: int = 1) -> subprocess.Popen:
    """fio: random 4 KiB writes at ``rate`` IOPS over ``size``, 16 deep, each block read
    back and checked (crc32c) after the writes, stopping at the first error; ``jobs``
    connections, each on its own ``size`` of the volume."""
    return subprocess.Popen(
        ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
         "--bs=4k", "--iodepth=16", f"--size={size}", f"--rate_iops={rate}",
         f"--numjobs={jobs}", f"--offset_increment={size}",
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=0",
         "--verify_state_save=0", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fio_result(proc: subprocess.Popen) -> list[dict]:
    """Wait for fio; insist it exited 0 with no error in any job; the jobs' JSON."""
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err[-3000:]
    jobs = json.loads(out[out.index("{"):])["jobs"]
    for job in jobs:
        assert job["error"] == 0, job
        assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0, job
    return jobs


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    """Poll ``predicate()`` until true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def writes_served(eng: EngineProc) -> int:
    """Writes the engine has served."""
    return eng.ok("GET", "/v1/stats")["ops"]["write"]["count"]


def upgrade(cluster, sock: Path, epoch: int) -> EngineProc:
    """Replace the running engine by a new process with ``epoch``; the old one exits 0."""
    old = cluster.engine
    new = start_successor(cluster, sock, epoch)
    assert old.proc.wait(timeout=30) == 0, old.log.read_text()[-3000:]
    assert new.addresses["nbd_port"] == old.addresses["nbd_port"]
    assert new.addresses["nbd_unix"] == old.addresses["nbd_unix"]
    info = new.info()
    assert info["epoch"] == epoch and info["health"] == "healthy", info
    return new


def took_over(eng: EngineProc) -> dict:
    """The engine's took-over event."""
    return next(e for e in eng.ok("GET", "/v1/events") if e["kind"] == "took-over")


def compare(a: str, b: str) -> None:
    """qemu-img compare two NBD exports (raises with the difference)."""
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b])


@pytest.mark.parametrize("local", [False, True], ids=["remote", "local"])
def test_fio_verify_runs_through_two_upgrades_in_a_row(cluster, tmp_path, local):
    sock = tmp_path / "handoff.sock"
    eng = cluster.start(3 if local else 2, "64M", "--handoff", str(sock), local=local)
    epoch = eng.info()["epoch"]
    fio = fio_verify(eng.uri(), "24M", 800, jobs=2)
    try:
        wait_until(lambda: writes_served(eng) > 200, "fio writing")
        for step in (1, 2):
            eng = upgrade(cluster, sock, epoch + step)
            # fio's connections, with their requests queued, went over: no new ones.
            assert took_over(eng)["connections"] == 2
    finally:
        jobs = fio_result(fio)
    assert [job["write"]["io_bytes"] for job in jobs] == [24 * MiB] * 2
    assert writes_served(eng) > 0  # the last engine served some of them
    # Every replica holds what the clients read through the engine.
    for r in cluster.replicas:
        compare(eng.uri(), r.uri("head"))


class HangingReplica:
    """An HTTP server answering a replica's info (epoch 0) that never answers a claim:
    an engine claiming it waits there, after claiming the real replicas."""

    def __init__(self) -> None:
        release = self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server names its handlers so
                body = b'{"epoch": 0}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                release.wait(120)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Let the held claims go and stop."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_successor_killed_after_claiming_leaves_the_old_engine_serving(cluster, tmp_path):
    """The successor claims the replicas (it waits on one more that never answers) and is
    SIGKILLed there: the old engine takes the volume back for the successor's epoch."""
    sock = tmp_path / "handoff.sock"
    eng = cluster.start(2, "64M", "--handoff", str(sock))
    held = eng.info()["epoch"]
    fio = fio_verify(eng.uri(), "16M", 1000)
    hanging = HangingReplica()
    try:
        wait_until(lambda: writes_served(eng) > 200, "fio writing")
        with open(tmp_path / "successor.log", "wb") as logf:
            proc = subprocess.Popen(
                drove_cmd(*eng.argv, "--takeover", str(sock), "--epoch", str(held + 1),
                          "--replica", f"hanging={hanging.url}", "--timeout", "60"),
                stdout=subprocess.DEVNULL, stderr=logf)
        try:
            wait_until(lambda: all(r.ok("GET", "/v1/info")["epoch"] == held + 1
                                   for r in cluster.replicas), "the successor's claims")
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
        info = eng.wait_for(lambda i: (i["upgrade"] or {}).get("state") == "aborted",
                            timeout=40, what="the old engine to resume")
    finally:
        hanging.close()
        fio_result(fio)
    # It holds the epoch the successor claimed: the replicas take its requests again.
    assert info["epoch"] == held + 1, info
    assert set(eng.modes().values()) == {"RW"}
    aborted = [e for e in eng.ok("GET", "/v1/events") if e["kind"] == "upgrade-aborted"]
    assert len(aborted) == 1 and aborted[0]["epoch"] == held + 1, aborted
    qemu_io(eng.uri(), "write -P 0x5a 1M 1M", "flush")
    for r in cluster.replicas:
        assert r.ok("GET", "/v1/info")["epoch"] == held + 1
        qemu_io(r.uri("head"), "read -P 0x5a 1M 1M", read_only=True)
        compare(eng.uri(), r.uri("head"))


def test_a_successor_that_cannot_fence_every_replica_gives_the_volume_back(cluster, tmp_path):
    """--fence-all with a replica it cannot reach: the successor claims none and exits
    non-zero, saying so; the old engine serves on with its own epoch."""
    sock = tmp_path / "handoff.sock"
    eng = cluster.start(2, "64M", "--handoff", str(sock))
    held = eng.info()["epoch"]
    qemu_io(eng.uri(), "write -P 0x11 0 1M")
    res = run(drove_cmd(*eng.argv, "--takeover", str(sock), "--epoch", str(held + 1),
                        "--fence-all", "--replica", "gone=http://127.0.0.1:9"),
              check=False, timeout=60)
    assert res.returncode != 0
    assert "gone" in res.stderr.decode(), res.stderr.decode()[-2000:]
    info = eng.wait_for(lambda i: (i["upgrade"] or {}).get("state") == "aborted",
                        what="the old engine to resume")
    assert info["epoch"] == held and info["health"] == "healthy", info
    for r in cluster.replicas:
        assert r.ok("GET", "/v1/info")["epoch"] == held
    shown = run(drove_cmd("engine", "info", "--url", eng.control)).stdout.decode()
    assert "upgrade to pid" in shown and ": aborted (" in shown and "gone" in shown, shown
    qemu_io(eng.uri(), "read -P 0x11 0 1M", "write -P 0x22 1M 1M", "flush")
    for r in cluster.replicas:
        qemu_io(r.uri("head"), "read -P 0x11 0 1M", "read -P 0x22 1M 1M", read_only=True)


def test_a_takeover_of_nothing_or_of_another_volume_is_refused_and_changes_nothing(
        cluster, tmp_path):
    sock = tmp_path / "handoff.sock"
    eng = cluster.start(2, "64M", "--handoff", str(sock))
    held = eng.info()["epoch"]
    qemu_io(eng.uri(), "write -P 0x33 0 1M")

    def refused(argv: list[str], why: str) -> None:
        res = run(drove_cmd(*argv), check=False, timeout=60)
        assert res.returncode != 0
        assert why in res.stderr.decode(), res.stderr.decode()[-2000:]

    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600  # the user's alone
    # Garbage on the handoff socket: the engine hangs up, nothing else happens.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
        peer.settimeout(30)
        peer.connect(str(sock))
        peer.sendall(b"\0\0\0\x05\0\0\0\0hello")
        assert peer.recv(100) == b""
    nothing = tmp_path / "nothing.sock"
    refused([*eng.argv, "--takeover", str(nothing), "--epoch", str(held + 1)],
            "no engine listens there")
    other = [a if a != "vol" else "other" for a in eng.argv]
    refused([*other, "--takeover", str(sock), "--epoch", str(held + 1)],
            "this engine serves volume 'vol', not 'other'")
    refused([*eng.argv, "--takeover", str(sock), "--epoch", str(held)], "is not above")
    refused([*eng.argv, "--takeover", str(sock)], "--takeover needs --epoch")
    info = eng.info()
    assert info["epoch"] == held and info["health"] == "healthy" and info["upgrade"] is None
    for r in cluster.replicas:
        assert r.ok("GET", "/v1/info")["epoch"] == held
    assert not nothing.exists()
    kinds = [e["kind"] for e in eng.ok("GET", "/v1/events")]
    assert kinds.count("upgrade-refused") == 2, kinds
    qemu_io(eng.uri(), "read -P 0x33 0 1M", "write -P 0x44 1M 1M")


def sha256(path: Path) -> str:
    """The file's sha256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_mounted_ext4_written_during_an_upgrade_stays_whole(cluster, tmp_path):
    from drove.agent import hostattach

    sock = tmp_path / "handoff.sock"
    eng = cluster.start(2, "128M", "--handoff", str(sock))
    uri = f"nbd+unix:///vol?socket={eng.addresses['nbd_unix']}"
    view = f"nbd+unix:///vol:host?socket={eng.addresses['nbd_unix']}"  # as host attach does
    mnt = tmp_path / "mnt"
    # Limits set live (on no command line) go over too.
    eng.ok("PUT", "/v1/qos", json={"limits": {"iops": 50000}, "rebuild_bandwidth": 1 << 30})
    att = hostattach.attach(uri, tmp_path / "att", mount=mnt, fuse_uri=view)
    written: dict[str, str] = {}
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set() or i < 8:
                data = os.urandom(256 * 1024)
                path = mnt / f"f{i:04d}"
                with open(path, "wb") as f:
                    f.write(data)
                    if i % 4 == 0:
                        os.fsync(f.fileno())
                written[path.name] = hashlib.sha256(data).hexdigest()
                i += 1
        except BaseException as exc:  # the test fails with it below
            failures.append(exc)

    thread = threading.Thread(target=writer)
    try:
        thread.start()
        wait_until(lambda: len(written) >= 8, "files written")
        before = len(written)
        new = upgrade(cluster, sock, eng.info()["epoch"] + 1)
        assert took_over(new)["connections"] >= 1  # nbdfuse's, not a new one
        qos = new.ok("GET", "/v1/qos")
        assert (qos["limits"]["iops"], qos["rebuild_bandwidth"]) == (50000, 1 << 30), qos
        wait_until(lambda: len(written) >= before + 8 or failures, "files written after")
    finally:
        stop.set()
        thread.join(timeout=60)
        hostattach.detach(att)
    assert not failures, failures
    image = tmp_path / "volume.img"
    eng = cluster.engine
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", eng.uri(), str(image)])
    run(["e2fsck", "-fn", str(image)])
    again = hostattach.attach(uri, tmp_path / "again", mount=tmp_path / "mnt2")
    try:
        assert not again.formatted
        assert {p.name: sha256(p) for p in (tmp_path / "mnt2").glob("f*")} == written
    finally:
        hostattach.detach(again)


def test_a_tls_client_makes_the_upgrade_refused_and_keeps_being_served(cluster, tmp_path):
    """A TLS session lives in the engine's process: the upgrade is refused, saying so."""
    from nbdtools import make_tls_dir
    from replicatools import NBDSH

    certs = make_tls_dir(tmp_path / "tls")
    sock = tmp_path / "handoff.sock"
    eng = cluster.start(1, "16M", "--tls-cert", str(certs / "server-cert.pem"),
                        "--tls-key", str(certs / "server-key.pem"),
                        "--tls-ca", str(certs / "ca-cert.pem"), "--handoff", str(sock))
    held = eng.info()["epoch"]
    secure = (f"nbds://{eng.addresses['nbd_host']}:{eng.addresses['nbd_port']}/vol"
              f"?tls-certificates={certs}")
    script = (f"h.set_uri_allow_local_file(True)\nh.connect_uri({secure!r})\n"
              "h.pwrite(b't' * 4096, 0)\nprint('connected', flush=True)\n"
              "import sys\nsys.stdin.readline()\nassert h.pread(4096, 0) == b't' * 4096\n")
    client = subprocess.Popen([*NBDSH, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "connected", client.stderr.read()
        res = run(drove_cmd(*eng.argv, "--takeover", str(sock), "--epoch", str(held + 1)),
                  check=False, timeout=60)
        assert res.returncode != 0
        assert "a TLS connection cannot be handed over" in res.stderr.decode(), res.stderr
    finally:
        _, err = client.communicate("go\n", timeout=30)
    assert client.returncode == 0, err
    info = eng.info()
    assert info["epoch"] == held and info["upgrade"]["state"] == "refused", info


def test_a_client_of_an_encrypted_volume_keeps_its_connection_and_block_status(
        cluster, tmp_path):
    """One nbdsh connection, with structured replies and base:allocation negotiated, held
    through the upgrade of an encrypted volume: it reads, writes and asks block status
    of the new engine as of the old."""
    from drove.engine.crypt import write_key_file
    from replicatools import NBDSH

    key = tmp_path / "data.key"
    write_key_file(key, os.urandom(64))
    sock = tmp_path / "handoff.sock"
    eng = cluster.start(2, "64M", "--key-file", str(key), "--handoff", str(sock))
    script = (f"h.add_meta_context('base:allocation')\nh.connect_uri({eng.uri()!r})\n"
              "assert h.can_meta_context('base:allocation')\n"
              "h.pwrite(b'e' * 65536, 0)\nh.flush()\nprint('connected', flush=True)\n"
              "import sys\nsys.stdin.readline()\n"
              "assert h.pread(65536, 0) == b'e' * 65536\n"
              "h.pwrite(b'f' * 65536, 1 << 20)\nh.flush()\n"
              "seen = []\n"
              "h.block_status(2 << 20, 0, lambda ctx, off, ents, err: seen.append(ents))\n"
              "assert seen and seen[0][0] > 0, seen\nprint('ok', flush=True)\n")
    client = subprocess.Popen([*NBDSH, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "connected", client.stderr.read()
        new = upgrade(cluster, sock, eng.info()["epoch"] + 1)
        assert took_over(new)["connections"] == 1
    finally:
        out, err = client.communicate("go\n", timeout=30)
    assert client.returncode == 0 and out.strip() == "ok", err
    qemu_io(new.uri(), "read -P 0x65 0 64k", "read -P 0x66 1M 64k")
    # Only ciphertext on the replicas.
    for r in cluster.replicas:
        nbdsh(r.uri("head"), "data = h.pread(65536, 0)\n"
                             "assert any(data) and b'e' * 16 not in data")


def test_an_upgrade_is_refused_while_a_replica_rebuilds(cluster, tmp_path):
    sock = tmp_path / "handoff.sock"
    eng = cluster.start(1, "64M", "--handoff", str(sock))
    held = eng.info()["epoch"]
    qemu_io(eng.uri(), "write -P 0x77 0 16M", "flush")
    eng.ok("PUT", "/v1/qos", json={"rebuild_bandwidth": 1 << 20})  # a rebuild of 16 s
    fresh = cluster.replica("r9", "64M")
    eng.ok("POST", "/v1/replicas", json={"name": "r9", "url": fresh.control})
    res = run(drove_cmd(*eng.argv, "--takeover", str(sock), "--epoch", str(held + 1)),
              check=False, timeout=60)
    assert res.returncode != 0
    assert "replica r9 is rebuilding; upgrade once the rebuild is done" in \
        res.stderr.decode(), res.stderr.decode()[-2000:]
    info = eng.info()
    assert info["epoch"] == held, info
    assert info["rebuild"]["state"] not in ("done", "failed", "cancelled"), info
    eng.ok("DELETE", "/v1/replicas/r9")
    qemu_io(eng.uri(), "read -P 0x77 0 16M")
