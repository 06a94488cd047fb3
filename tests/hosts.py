"""Hosts made of network namespaces on one bridge, and an etcd cluster on them, for tests.

Usage (the `hosts` fixture of conftest.py gives a Hosts already entered)::

    a = hosts.add("a")                      # 10.213.0.11, data dir tmp/hosts/a
    etcd = EtcdCluster([a, b, c]).start()   # etcd.store_url == "etcd://A:2379,B:2379,C:2379"
    p = a.run(["drove", "serve", "--store", etcd.store_url, "--listen", f"{a.address}:7000"],
              env={**os.environ, "DROVE_URL": ...}, stdout=log, stderr=log)
    a.kill()        # SIGKILL everything of host a; a.cut() / a.restore() for its link

Processes share the machine's filesystem and mounts (nsenter enters only the network
namespace); bind every listener to the host's address, never 0.0.0.0.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFIX = "drv-"  # every namespace this harness makes; links use "drvv"/"drv-br"
BRIDGE = "drv-br0"
VETH_PREFIX = "drvv"
NETWORK = "10.213.0"  # a private /24 used only inside namespaces made here
LOCK = Path("/run/drove-test-hosts.lock")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; raise with its stderr when check and it fails."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _netns_pids(ns: str) -> list[int]:
    """Pids of every process living in namespace ns (children included)."""
    res = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def _kill_until_gone(pids: Callable[[], list[int]], deadline: float, what: str) -> None:
    """SIGKILL what ``pids()`` lists until it lists nothing (raise after ``deadline``)."""
    while left := pids():
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: processes left {left}")
        time.sleep(0.02)  # poll interval while the kernel reaps them


def _kill_netns(ns: str, timeout: float = 10) -> None:
    """SIGKILL every process in ns until none is left (raise after timeout)."""
    _kill_until_gone(lambda: _netns_pids(ns), time.monotonic() + timeout, ns)


def _alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie (read from /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cleanup_leftovers() -> None:
    """Remove every namespace, veth and bridge with the harness prefix (a crashed run's)."""
    for line in _ip("netns", "list").stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(PREFIX):
            _kill_netns(ns)
            _ip("netns", "del", ns, check=False)
    for link in leftover_links():
        _ip("link", "del", link, check=False)


def leftover_links() -> list[str]:
    """Names of links in the root namespace made by this harness."""
    out = _ip("-o", "link", "show").stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
    return [n for n in names if n.startswith((VETH_PREFIX, BRIDGE))]


def leftover_namespaces() -> list[str]:
    """Names of namespaces made by this harness that still exist."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines()
            if line.split() and line.split()[0].startswith(PREFIX)]


class Host:
    """One simulated host: a network namespace with its own address and data directory."""

    def __init__(self, name: str, index: int, data_dir: Path) -> None:
        self.name = name
        self.netns = PREFIX + name
        self.veth = f"{VETH_PREFIX}{index}"
        self.address = f"{NETWORK}.{index + 10}"
        self.data_dir = data_dir
        self.procs: list[subprocess.Popen[Any]] = []

    def _create(self) -> None:
        """Make the namespace, its veth on the bridge, its address; bring lo and eth0 up."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
            "netns", self.netns)
        _ip("link", "set", self.veth, "master", BRIDGE, "up")
        _ip("-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        _ip("-n", self.netns, "link", "set", "eth0", "up")

    def _argv(self, argv: list[str]) -> list[str]:
        # nsenter, not `ip netns exec`: the latter gives every command a private mount
        # namespace, so a mount an agent makes on this host would be invisible to fio
        # started later on the same host and to the test. Hosts share the filesystem and its
        # mounts, as the notes say; only the network is theirs.
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    def run(self, argv: list[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside this host, in its own process group; kept for kill()."""
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._argv(argv), start_new_session=True, **popen_kw)
        self.procs.append(proc)
        return proc

    def call(self, argv: list[str], timeout: float = 30, **kw: Any
             ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside this host; its result whatever its exit status."""
        return subprocess.run(self._argv(argv), timeout=timeout, capture_output=True,
                              text=True, **kw)

    def check_call(self, argv: list[str], timeout: float = 30, **kw: Any) -> None:
        """Run a short command inside this host; raise when it fails."""
        subprocess.run(self._argv(argv), check=True, timeout=timeout, **kw)

    def check_output(self, argv: list[str], timeout: float = 30, **kw: Any) -> str:
        """Run a short command inside this host and return its stdout (text)."""
        return subprocess.run(self._argv(argv), check=True, timeout=timeout,
                              capture_output=True, text=True, **kw).stdout

    def pids(self) -> list[int]:
        """Live processes of this host: in its namespace or in a group started by run()."""
        groups = {p.pid for p in self.procs}
        found = set(_netns_pids(self.netns))
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError):
                    if os.getpgid(int(entry.name)) in groups and _alive(int(entry.name)):
                        found.add(int(entry.name))
        return sorted(p for p in found if _alive(p))

    def kill(self, timeout: float = 10) -> None:
        """SIGKILL every process started on this host, children included, and check none
        is left: a power cut. Mounts its processes made are the test's to tear down."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        _kill_until_gone(self.pids, deadline, f"host {self.name}")
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.procs.clear()

    def cut(self) -> None:
        """Pull this host's cable: its processes run on, its peers see it go silent."""
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        """Plug the cable back in."""
        _ip("link", "set", self.veth, "up")

    def block(self, other: Host) -> None:
        """Cut the link between this host and ``other`` only (a partial partition): what
        this host sends to ``other`` is dropped silently, so no connection between them
        forms in either direction, while both still reach every other host."""
        _ip("-n", self.netns, "route", "add", "blackhole", f"{other.address}/32")

    def unblock(self, other: Host) -> None:
        """Heal what block(other) cut."""
        _ip("-n", self.netns, "route", "del", "blackhole", f"{other.address}/32")


class Hosts:
    """A bridge and hosts on it; a context manager that removes everything at exit.

    Only one Hosts exists at a time on the machine (a lock file), so the leftovers it
    removes at start can only be those of a run that died."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hosts: dict[str, Host] = {}
        self._lock: Any = None

    def __enter__(self) -> Hosts:
        self._lock = open(LOCK, "w")  # held until __exit__
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            cleanup_leftovers()
            _ip("link", "add", BRIDGE, "type", "bridge")
            _ip("link", "set", BRIDGE, "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def add(self, name: str) -> Host:
        """A new host called name with the next address."""
        if name in self.hosts or not name.replace("-", "").isalnum() or len(name) > 20:
            raise ValueError(f"bad or duplicate host name {name!r}")
        host = Host(name, len(self.hosts) + 1, self.root / name)
        self.hosts[name] = host
        host._create()
        return host

    def __getitem__(self, name: str) -> Host:
        """The host called name."""
        return self.hosts[name]

    def __iter__(self):
        """Every host, in the order added."""
        return iter(self.hosts.values())

    def __exit__(self, *exc: object) -> None:
        try:
            for host in self.hosts.values():
                with contextlib.suppress(RuntimeError):
                    host.kill()
            cleanup_leftovers()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None


class EtcdCluster:
    """A 3-member (or n-member) etcd cluster, one member per host, bound to host addresses."""

    def __init__(self, hosts: list[Host], token: str = "drove-test") -> None:
        self.hosts = list(hosts)
        self.token = token
        self.procs: dict[str, subprocess.Popen[Any]] = {}

    def member(self, host: Host) -> str:
        """The etcd member name of host."""
        return f"etcd-{host.name}"

    @property
    def endpoints(self) -> str:
        """Client URLs: "http://A:2379,http://B:2379,..."."""
        return ",".join(f"http://{h.address}:2379" for h in self.hosts)

    @property
    def store_url(self) -> str:
        """The form drove serve --store takes: "etcd://A:2379,B:2379,C:2379"."""
        return "etcd://" + ",".join(f"{h.address}:2379" for h in self.hosts)

    def _start(self, host: Host, state: str) -> None:
        initial = ",".join(f"{self.member(h)}=http://{h.address}:2380" for h in self.hosts)
        url = f"http://{host.address}"
        log = open(host.data_dir / "etcd.log", "ab")  # noqa: SIM115 (child keeps it)
        self.procs[host.name] = host.run(
            ["etcd", "--name", self.member(host), "--data-dir", str(host.data_dir / "etcd"),
             "--listen-client-urls", f"{url}:2379", "--advertise-client-urls", f"{url}:2379",
             "--listen-peer-urls", f"{url}:2380",
             "--initial-advertise-peer-urls", f"{url}:2380",
             "--initial-cluster", initial, "--initial-cluster-state", state,
             "--initial-cluster-token", self.token],
            stdout=log, stderr=log)
        log.close()

    def start(self, timeout: float = 30) -> EtcdCluster:
        """Start every member and wait until each is healthy."""
        for host in self.hosts:
            self._start(host, "new")
        self.wait_healthy(self.hosts, timeout)
        return self

    def etcdctl(self, via: Host, *args: str, endpoints: str | None = None,
                timeout: float = 10) -> str:
        """Run etcdctl (v3) inside host via and return its output."""
        return via.check_output(
            ["etcdctl", "--endpoints", endpoints or self.endpoints, "--command-timeout=5s",
             *args], timeout=timeout, env={**os.environ, "ETCDCTL_API": "3"})

    def wait_healthy(self, hosts: list[Host], timeout: float = 30) -> None:
        """Wait until each member on hosts answers `endpoint health` (deadline, then raise)."""
        deadline = time.monotonic() + timeout
        for host in hosts:
            while True:
                proc = self.procs.get(host.name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"etcd on {host.name} exited {proc.returncode}; "
                                       f"see {host.data_dir / 'etcd.log'}")
                try:
                    self.etcdctl(host, "endpoint", "health",
                                 endpoints=f"http://{host.address}:2379")
                    break
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"etcd on {host.name} not healthy") from None
                    time.sleep(0.1)  # poll interval

    def kill(self, host: Host) -> None:
        """SIGKILL the member on host (its data dir stays)."""
        proc = self.procs.pop(host.name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def restart(self, host: Host, timeout: float = 30) -> None:
        """Start the member on host again from its data dir and wait until it is healthy."""
        self._start(host, "existing")
        self.wait_healthy([host], timeout)

    def stop(self) -> None:
        """Kill every member."""
        for name in list(self.procs):
            self.kill(next(h for h in self.hosts if h.name == name))
