"""A real S3 server for tests: a one-node Ceph cluster and radosgw on 127.0.0.1.

`RadosGW(root)` builds a cluster from nothing under ``root`` (one mon, one mgr, one
bluestore OSD on a sparse file, one radosgw), all bound to 127.0.0.1 on ports picked
free at start, so two test sessions can run side by side.  Every daemon runs in the
foreground as our child and is stopped by pid; nothing is read from or written to
/etc/ceph or /var/lib/ceph.

Use it directly (``with RadosGW(tmp_path / "rgw") as gw: ...``) or through the
session-scoped pytest fixture `radosgw` defined at the bottom (import it into a
conftest.py).  The Debian packages come from ``./dev test`` / ``./dev setup``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

GiB = 1 << 30
MON_ID = "a"
MGR_ID = "x"
OSD_ID = 0
RGW_NAME = "client.rgw.gw"
DAEMONS = ("mon", "mgr", "osd", "rgw")  # start order; stopped in reverse
# Ceph daemons (mgr/osd) bind ports in ms_bind_port_min..max; keep our picks clear of it.
_CEPH_PORT_RANGE = range(6800, 7569)
# Directories and files under root that start() owns and wipes to begin from nothing.
_OWNED = ("ceph.conf", "keyring", "mon", "mgr", "osd", "rgw", "log", "run", "crash", "out")
_PR_SET_PDEATHSIG = 1
try:  # resolved here, in the parent: the forked child only calls it
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


class _PortClash(RuntimeError):
    """A daemon could not bind a port picked for it (someone else took it)."""

    daemon: str | None = None


def _pick_ports(n: int, exclude: set[int] = frozenset()) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (the kernel's picks)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in exclude and port not in _CEPH_PORT_RANGE and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGKILL the daemon if the test process dies
    without stopping it (SIGKILL of pytest, a crash): the last-resort safety net."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"--- {path}: {e} ---\n"
    body = "\n".join(text.splitlines()[-lines:])
    return f"--- tail of {path} ---\n{body}\n"


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class RadosGW:
    """A one-node Ceph cluster (mon, mgr, one bluestore OSD on a sparse file) and
    radosgw on 127.0.0.1."""

    region: str = "us-east-1"

    def __init__(self, root: Path, port: int = 0, *, osd_size: int = 10 * GiB,
                 osd_memory_target: int = GiB) -> None:
        """All state, logs, pid files and sockets live under ``root`` (created if
        needed).  ``port`` is radosgw's HTTP port; 0 picks a free one."""
        self.root = Path(root).absolute()
        self._fixed_port = port
        self.port = port or _pick_ports(1)[0]
        self.osd_size = osd_size
        self.osd_memory_target = osd_memory_target
        alnum = string.ascii_uppercase + string.digits
        self.access_key = "".join(secrets.choice(alnum) for _ in range(20))
        self.secret_key = "".join(secrets.choice(string.ascii_letters + string.digits)
                                  for _ in range(40))
        self.fsid = ""
        self.mon_ports: tuple[int, int] = (0, 0)  # (v2, v1)
        self.procs: dict[str, subprocess.Popen] = {}  # the daemons
        self._helpers: list[subprocess.Popen] = []  # e.g. the OSD's mkfs
        self._last_probe_error = ""
        self.start_seconds: float | None = None  # wall time of the last successful start
        self._run_dir: Path | None = None
        self._lock = threading.RLock()
        self._started = False

    # -- public API -------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def admin_keyring(self) -> Path:
        return self.root / "keyring" / "client.admin.keyring"

    def log(self, daemon: str) -> Path:
        """The log file of "mon", "mgr", "osd" or "rgw"."""
        return self.root / "log" / f"{self._name(daemon)}.log"

    def start(self, timeout: float = 180) -> None:
        """Build and start the cluster, returning once PGs are active+clean and
        radosgw has served a probe bucket.  Idempotent.  On failure everything
        started is stopped and RuntimeError carries the tail of the relevant log."""
        with self._lock:
            if self._started and all(p.poll() is None for p in self.procs.values()):
                return
            self.stop()
            if self._fixed_port:
                try:
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", self._fixed_port))
                except OSError as e:
                    raise RuntimeError(f"radosgw fixture: port {self._fixed_port} on "
                                       f"127.0.0.1 is not free: {e}") from None
            t0 = time.monotonic()
            deadline = t0 + timeout
            attempts = 3  # ports are picked free, but another process may grab one first
            for attempt in range(attempts):
                try:
                    self._start(deadline)
                except _PortClash as e:
                    self._kill_everything()
                    if attempt == attempts - 1 or (e.daemon == "rgw" and self._fixed_port):
                        raise RuntimeError(str(e)) from None
                    if not self._fixed_port:
                        self.port = _pick_ports(1)[0]
                    continue
                except BaseException:
                    self._kill_everything()
                    raise
                break
            self._started = True
            self.start_seconds = time.monotonic() - t0
            _LIVE.add(self)

    def stop(self) -> None:
        """Stop every daemon (SIGTERM, then SIGKILL after a grace period), wait for
        them, kill any stray process of this cluster, and free the bulky data (the
        OSD block file, the mon store).  Logs and ceph.conf stay for post-mortems."""
        with self._lock:
            self._started = False
            _LIVE.discard(self)
            self._kill_everything()
            for d in ("mon", "mgr", "osd", "rgw"):
                shutil.rmtree(self.root / d, ignore_errors=True)

    def client(self, **kwargs: Any):
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        config = Config(s3={"addressing_style": "path"},
                        retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=10, read_timeout=120)
        opts: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": config,
        }
        opts.update(kwargs)
        return boto3.client("s3", **opts)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return its name."""
        self.client().create_bucket(Bucket=name)
        return name

    def pids(self) -> dict[str, int]:
        """The pid of every daemon still running, by daemon ("mon", "mgr", ...)."""
        return {d: p.pid for d, p in self.procs.items() if p.poll() is None}

    def rss(self) -> dict[str, int]:
        """Resident memory (bytes) of each running daemon."""
        out: dict[str, int] = {}
        for d, pid in self.pids().items():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[d] = int(line.split()[1]) * 1024
        return out

    def ceph(self, *args: str, timeout: float = 60) -> str:
        """Run the ceph CLI against this cluster (explicit conf and admin keyring)."""
        return self._run(["ceph", "-c", str(self.conf), f"--keyring={self.admin_keyring}",
                          "--connect-timeout", str(int(max(5, timeout - 5))), *args],
                         timeout=timeout, what="ceph " + " ".join(args))

    def ceph_json(self, *args: str, timeout: float = 60) -> Any:
        return json.loads(self.ceph(*args, "-f", "json", timeout=timeout))

    def __enter__(self) -> RadosGW:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RadosGW({self.root}, endpoint={self.endpoint})"

    # -- start, step by step ----------------------------------------------------------

    def _start(self, deadline: float) -> None:
        self._fresh_dirs()
        self.fsid = str(uuid.uuid4())
        self.mon_ports = tuple(_pick_ports(2, {self.port}))  # type: ignore[assignment]
        keys = self._write_config_and_keyrings()

        # mon: monmap + mkfs, then run it; the OSD's mkfs runs meanwhile.
        monmap = self.root / "run" / "monmap"
        v2, v1 = self.mon_ports
        self._run(["monmaptool", "--create", "--fsid", self.fsid, "--addv", MON_ID,
                   f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]", str(monmap)], what="monmaptool")
        self._run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", MON_ID,
                   "--monmap", str(monmap), "--keyring", str(self.root / "keyring" / "mkfs")],
                  what="ceph-mon --mkfs", log="mon")
        self._spawn("mon", ["ceph-mon", "-f", "-c", str(self.conf), "-i", MON_ID])
        # mgr and radosgw only need the mon: they wait for it, then for the OSD.
        self._spawn("mgr", ["ceph-mgr", "-f", "-c", str(self.conf), "-i", MGR_ID])
        self._spawn("rgw", ["radosgw", "-f", "-c", str(self.conf), "-n", RGW_NAME])
        osd_uuid = str(uuid.uuid4())
        (self.root / "osd" / f"osd.{OSD_ID}").mkdir(parents=True)
        # --no-mon-config: mkfs needs nothing from the mon (fsid and all are in
        # ceph.conf), and osd.0 may not be registered yet when it would ask.
        mkfs = self._popen(["ceph-osd", "-c", str(self.conf), "-i", str(OSD_ID), "--mkfs",
                            "--no-mon-config", "--osd-uuid", osd_uuid],
                           self.root / "out" / "osd-mkfs.out")
        self._helpers.append(mkfs)

        # Register the OSD once the mon answers.
        secret = self.root / "run" / "osd-secret.json"
        secret.write_text(json.dumps({"cephx_secret": keys[f"osd.{OSD_ID}"]}))
        self._wait("the mon to answer", self._mon_up, deadline, "mon")
        self.ceph("osd", "new", osd_uuid, str(OSD_ID), "-i", str(secret),
                  timeout=self._left(deadline, 60))
        try:
            rc = mkfs.wait(timeout=self._left(deadline, 120))
        except subprocess.TimeoutExpired:
            mkfs.kill()
            mkfs.wait()
            raise self._error("ceph-osd --mkfs timed out", "osd", "osd-mkfs") from None
        if rc:
            raise self._error(f"ceph-osd --mkfs exited {rc}", "osd", "osd-mkfs")

        self._spawn("osd", ["ceph-osd", "-f", "-c", str(self.conf), "-i", str(OSD_ID)])

        # radosgw answers HTTP once its pools exist, which needs the OSD up.
        self._wait("radosgw to answer HTTP", self._http_up, deadline, "rgw")
        self._run(["radosgw-admin", "-c", str(self.conf), f"--keyring={self.admin_keyring}",
                   "user", "create", "--uid=drove-test", "--display-name=drove tests",
                   f"--access-key={self.access_key}", f"--secret-key={self.secret_key}"],
                  timeout=self._left(deadline, 60), what="radosgw-admin user create", log="rgw")
        # First S3 requests create the index, data and multipart pools: pay that here.
        self._wait("an S3 probe to succeed", self._probe, deadline, "rgw")
        self._wait("all PGs active+clean", self._pgs_clean, deadline, "osd")

    def _fresh_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for name in _OWNED:
            p = self.root / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        for d in ("keyring", "mon", "mgr", "osd", "rgw", "log", "crash", "out"):
            (self.root / d).mkdir()
        run = self.root / "run"
        # Admin sockets are unix sockets: their path must fit in 107 bytes.
        if len(str(run / f"{RGW_NAME}.asok")) > 100:
            self._run_dir = Path(tempfile.mkdtemp(prefix="rgw-run-"))
            run.symlink_to(self._run_dir)
        else:
            self._run_dir = None
            run.mkdir()

    def _write_config_and_keyrings(self) -> dict[str, str]:
        r = self.root
        run = self._run_dir or r / "run"
        v2, v1 = self.mon_ports

        def daemon_paths() -> str:
            return (f"log_file = {r}/log/$name.log\n"
                    f"admin_socket = {run}/$name.asok\n"
                    f"pid_file = {run}/$name.pid\n")

        conf = f"""\
# Written by tests/radosgw.py: a throwaway one-node cluster for tests.
[global]
fsid = {self.fsid}
mon_host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
mon_initial_members = {MON_ID}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
public_network = 127.0.0.1/32
cluster_network = 127.0.0.1/32
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {r}/keyring/$name.keyring
run_dir = {run}
crash_dir = {r}/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mgr_initial_modules = iostat
# A test cluster: commit map changes fast (each pool create, OSD boot step waited
# out a 1 s proposal interval) and report PG states to the mgr often.
paxos_propose_interval = 0.1
paxos_min_wait = 0.01
mgr_tick_period = 1
mgr_stats_period = 1

[mon]
mon_data = {r}/mon/$name
keyring = $mon_data/keyring
mon_cluster_log_file = {r}/log/cluster.log
{daemon_paths()}
[mgr]
mgr_data = {r}/mgr/$name
{daemon_paths()}
[osd]
osd_data = {r}/osd/$name
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = {self.osd_size}
bluestore_block_db_create = false
bluestore_block_wal_create = false
bluestore_fsck_on_mkfs = false
osd_memory_target = {self.osd_memory_target}
bluestore_cache_autotune = true
{daemon_paths()}
[{RGW_NAME}]
rgw_data = {r}/rgw/$name
rgw_frontends = beast endpoint=127.0.0.1:{self.port}
rgw_thread_pool_size = 64
# Reclaim the space of deleted objects within seconds, not rgw's default 2 hours,
# so a session of tests writing and deleting GiBs does not fill the OSD.
rgw_gc_obj_min_wait = 10
rgw_gc_processor_period = 15
{daemon_paths()}"""
        self.conf.write_text(conf)

        caps = {
            "mon.": {"mon": "allow *"},
            "client.admin": {"mon": "allow *", "osd": "allow *", "mgr": "allow *",
                             "mds": "allow *"},
            f"mgr.{MGR_ID}": {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"},
            RGW_NAME: {"mon": "allow rw", "osd": "allow rwx", "mgr": "allow rw"},
        }
        keys = {name: self._gen_key() for name in [*caps, f"osd.{OSD_ID}"]}

        def entry(name: str, with_caps: bool = True) -> str:
            text = f"[{name}]\n\tkey = {keys[name]}\n"
            if with_caps:
                for svc, cap in caps.get(name, {}).items():
                    text += f'\tcaps {svc} = "{cap}"\n'
            return text

        kdir = r / "keyring"
        # The mon's mkfs keyring seeds the auth database: mon., admin, mgr and rgw.
        (kdir / "mkfs").write_text("".join(entry(n) for n in caps))
        for name in [*caps, f"osd.{OSD_ID}"]:
            if name != "mon.":
                (kdir / f"{name}.keyring").write_text(entry(name, with_caps=False))
        for f in kdir.iterdir():
            f.chmod(0o600)
        return keys

    def _gen_key(self) -> str:
        return self._run(["ceph-authtool", "--gen-print-key"], what="ceph-authtool").strip()

    # -- readiness checks (return True when ready) ------------------------------------

    def _mon_up(self) -> bool:
        self.ceph("mon", "stat", timeout=8)
        return True

    def _http_up(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=3):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            return False

    def _probe(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = self.client()
        bucket = f"probe-{uuid.uuid4().hex[:12]}"
        try:
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="probe", Body=b"x" * 4096)
            mpu = s3.create_multipart_upload(Bucket=bucket, Key="mpu")
            part = s3.upload_part(Bucket=bucket, Key="mpu", UploadId=mpu["UploadId"],
                                  PartNumber=1, Body=b"y" * 4096)
            s3.complete_multipart_upload(
                Bucket=bucket, Key="mpu", UploadId=mpu["UploadId"],
                MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
            if s3.get_object(Bucket=bucket, Key="probe")["Body"].read() != b"x" * 4096:
                self._last_probe_error = "read back different data"
                return False
            for key in ("probe", "mpu"):
                s3.delete_object(Bucket=bucket, Key=key)
            s3.delete_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError) as e:
            self._last_probe_error = repr(e)
            return False
        return True

    def _pgs_clean(self) -> bool:
        pools = self.ceph_json("osd", "pool", "ls", "detail", timeout=30)
        want = sum(int(p["pg_num"]) for p in pools)
        stat = self.ceph_json("pg", "stat", timeout=30)
        stat = stat.get("pg_summary", stat)
        by_state = {s["name"]: int(s["num"]) for s in stat.get("num_pg_by_state", [])}
        return (int(stat.get("num_pgs", -1)) == want and by_state.get("active+clean", 0) == want)

    # -- processes --------------------------------------------------------------------

    def _name(self, daemon: str) -> str:
        return {"mon": f"mon.{MON_ID}", "mgr": f"mgr.{MGR_ID}", "osd": f"osd.{OSD_ID}",
                "rgw": RGW_NAME}[daemon]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}
        env["CEPH_CONF"] = str(self.conf)  # belt and braces: never /etc/ceph
        return env

    def _popen(self, argv: list[str], out: Path) -> subprocess.Popen:
        main = threading.current_thread() is threading.main_thread()
        with open(out, "ab") as f:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, env=self._env(),
                                    cwd=self.root, start_new_session=True,
                                    # PDEATHSIG follows the spawning *thread*: only
                                    # arm it from the main thread, which lives as
                                    # long as the process.
                                    preexec_fn=_die_with_parent if main else None)

    def _spawn(self, daemon: str, argv: list[str]) -> None:
        self.procs[daemon] = self._popen(argv, self.root / "out" / f"{daemon}.out")

    def _run(self, argv: list[str], timeout: float = 60, what: str = "",
             log: str | None = None) -> str:
        """Run a short command to completion; RuntimeError with its output on failure."""
        what = what or argv[0]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                 env=self._env(), cwd=self.root if self.root.exists() else None,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            out = ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace") \
                if isinstance(e.stdout, bytes) else f"{e.stdout or ''}{e.stderr or ''}"
            raise self._error(f"{what}: timed out after {timeout:.0f}s\n{out[-3000:]}",
                              log) from None
        if res.returncode:
            raise self._error(f"{what}: exit {res.returncode}\n"
                              f"{(res.stdout + res.stderr)[-3000:]}", log)
        return res.stdout

    def _check_alive(self) -> None:
        for daemon, proc in self.procs.items():
            rc = proc.poll()
            if rc is not None:
                raise self._error(f"{self._name(daemon)} exited with {rc}", daemon)
            # A mon that cannot bind retries for 10 s before exiting: notice at once.
            # (Daemons print only errors on stdout/stderr, so the file stays small.)
            with contextlib.suppress(OSError):
                if b"Address already in use" in (
                        self.root / "out" / f"{daemon}.out").read_bytes():
                    raise self._error(f"{self._name(daemon)} could not bind its port",
                                      daemon)

    def _wait(self, what: str, ready, deadline: float, log: str) -> None:
        self._last_probe_error = ""
        while True:
            self._check_alive()
            with contextlib.suppress(RuntimeError):  # a CLI call that failed: retry
                if ready():
                    return
            if time.monotonic() > deadline:
                extra = f" (last: {self._last_probe_error})" if self._last_probe_error else ""
                raise self._error(f"timed out waiting for {what}{extra}", log)
            time.sleep(0.5)

    def _left(self, deadline: float, cap: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._error("start timed out", None)
        return min(cap, left)

    def _error(self, msg: str, daemon: str | None, out: str | None = None) -> RuntimeError:
        """An error carrying the tails of the relevant daemon's log and output."""
        tails = ""
        if daemon:
            tails += _tail(self.log(daemon))
            tails += _tail(self.root / "out" / f"{out or daemon}.out", 15)
        text = f"radosgw fixture ({self.root}): {msg}\n{tails}"
        if "Address already in use" in tails:
            clash = _PortClash(text)
            clash.daemon = daemon
            return clash
        return RuntimeError(text)

    def _our_strays(self) -> list[int]:
        """Pids of processes running with our ceph.conf on their command line (daemons,
        mkfs, CLI calls): ours for sure, since the path is unique to this root."""
        conf = str(self.conf)
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                argv = _cmdline(int(entry.name))
                if any(conf in a for a in argv):
                    pids.append(int(entry.name))
        return pids

    def _kill_everything(self) -> None:
        # Polite first, in an order where each exits at once: rgw first (it hangs in
        # shutdown once the OSD is gone), then OSD and mgr, the mon last (the OSD
        # tells it that it is going down); SIGKILL whatever outlives the grace time.
        procs = self.procs
        for group in (("rgw",), ("osd", "mgr"), ("mon",)):
            live = [procs[d] for d in group if d in procs and procs[d].poll() is None]
            for p in live:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
            end = time.monotonic() + 10
            for p in live:
                try:
                    p.wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = {}
        for p in self._helpers:
            if p.poll() is None:
                p.kill()
            p.wait()
        self._helpers = []
        # Strays: anything else still running with our conf (a daemon from a failed
        # start, a hung CLI call).
        if self.root.exists():
            for _ in range(3):
                strays = self._our_strays()
                if not strays:
                    break
                for pid in strays:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                end = time.monotonic() + 10
                while any(_alive(p) for p in strays) and time.monotonic() < end:
                    time.sleep(0.05)
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.root / "run").unlink()
            self._run_dir = None


# Safety net: whatever is still running at interpreter exit gets stopped.
_LIVE: set[RadosGW] = set()


@atexit.register
def _stop_all() -> None:
    for gw in list(_LIVE):
        with contextlib.suppress(Exception):
            gw.stop()


def radosgw_fixture_root(base: Path | None = None) -> Path:
    """A fresh directory for a session-wide instance (under ``base``, else the system
    temp dir)."""
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="radosgw-", dir=base))


_shared: RadosGW | None = None
_shared_lock = threading.Lock()


def shared_radosgw(base: Path | None = None) -> RadosGW:
    """The one session-wide RadosGW, started on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = RadosGW(radosgw_fixture_root(base))
        _shared.start()
        return _shared


@pytest.fixture(scope="session")
def radosgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RadosGW]:
    """A running radosgw shared by the whole session: started when a test first asks
    for it, stopped at the end of the session."""
    gw = shared_radosgw(tmp_path_factory.getbasetemp())
    yield gw
    gw.stop()
