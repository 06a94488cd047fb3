"""A drove cluster on namespace hosts (tests/hosts.py): etcd, managers, agents, the CLI, fio.

Everything runs inside a host's network namespace (the bridge has no address in the
root namespace, so the test itself cannot reach 10.213.0.x): the CLI runs on an
operator host, fio on the host of the engine it writes to.

Usage::

    etcd = EtcdCluster([m1, m2, m3]).start()
    mgr = ManagerOnHost(m1, etcd.store_url, "--no-agent").start()
    agents = [AgentOnHost(h, [mgr.url], mgr.cluster_token_file).start() for h in (a, b)]
    cli = Cli(ops, [mgr.url], mgr.token)
    cli.json("node", "list")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from drove.agent.processes import rss_bytes
from hosts import Host

T = TypeVar("T")

MANAGER_PORT = 10800
AGENT_PORT = 10900


def poll(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call ``predicate`` until it returns something true (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # poll interval: each try runs a process or an API call
    return result


def rss_mib(proc: subprocess.Popen[Any] | None) -> float:
    """Resident memory of a process started with Host.run, in MiB (0 when it is gone)."""
    # nsenter execs the command in place: the Popen's pid is the drove process itself.
    return (rss_bytes(proc.pid) or 0) / (1 << 20) if proc is not None else 0.0


def drove_argv(*args: str) -> list[str]:
    """The command line of `drove ARGS` with this interpreter."""
    return [sys.executable, "-m", "drove", *args]


class Cli:
    """The `drove` CLI run inside a host with DROVE_URL (several managers) and DROVE_TOKEN."""

    def __init__(self, host: Host, urls: list[str], token: str) -> None:
        self.host = host
        self.env = {**os.environ, "DROVE_URL": ",".join(urls), "DROVE_TOKEN": token}
        self.env.pop("DROVE_DATA_DIR", None)

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `drove ARGS` (``env``: more variables); with check, fail with its output when
        it exits non-zero."""
        r = self.host.call(drove_argv(*args), timeout=timeout, env={**self.env, **(env or {})})
        if check:
            assert r.returncode == 0, \
                f"drove {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def json(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Any:
        """`drove ARGS --json`, parsed."""
        return json.loads(self.run(*args, "--json", timeout=timeout, env=env).stdout)

    def volume(self, name: str) -> dict[str, Any]:
        """`drove volume get NAME --json`."""
        return self.json("volume", "get", name)

    def node(self, name: str) -> dict[str, Any]:
        """One node of `drove node list --json`."""
        return next(n for n in self.json("node", "list") if n["name"] == name)

    def wait_volume(self, name: str, predicate: Callable[[dict[str, Any]], bool],
                    timeout: float, what: str) -> dict[str, Any]:
        """Poll `drove volume get` until ``predicate(volume)`` holds; the volume."""
        last: list[dict[str, Any]] = [{}]

        def check() -> dict[str, Any] | None:
            last[0] = self.volume(name)
            return last[0] if predicate(last[0]) else None

        try:
            return poll(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last: {json.dumps(last[0], indent=1)}") from None


def _wait_file_json(path: Path, proc: subprocess.Popen[Any], log: Path, timeout: float,
                    what: str) -> dict[str, Any]:
    """The JSON a starting process writes (a file, or the first JSON line of its log)."""
    def ready() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}: "
                                 f"{log.read_text(errors='replace')[-3000:]}")
        if path == log:
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    return json.loads(line)
            return None
        return json.loads(path.read_text()) if path.exists() else None

    return poll(ready, timeout, what, interval=0.05)


class ManagerOnHost:
    """`drove serve --store etcd://...` on a host, listening on the host's address."""

    def __init__(self, host: Host, store_url: str, *extra: str) -> None:
        self.host = host
        self.store_url = store_url
        self.extra = extra
        self.data_dir = host.data_dir / "manager"
        self.log = host.data_dir / "manager.log"
        self.url = f"http://{host.address}:{MANAGER_PORT}"
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 60) -> ManagerOnHost:
        """Start it and wait until it serves (its manager.json appears)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        info = self.data_dir / "manager.json"
        info.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = self.host.run(
                drove_argv("serve", "--data-dir", str(self.data_dir), "--store", self.store_url,
                           "--listen", f"{self.host.address}:{MANAGER_PORT}",
                           "--log-level", "warning", *self.extra),
                stdout=log, stderr=log)
        _wait_file_json(info, self.proc, self.log, timeout, f"drove serve on {self.host.name}")
        return self

    @property
    def token(self) -> str:
        """The API token of this manager's data dir."""
        return (self.data_dir / "token").read_text().strip()

    @property
    def cluster_token_file(self) -> Path:
        """The file agents authenticate with: DATA_DIR/cluster-token where the manager makes
        one (several managers), else its API token file."""
        path = self.data_dir / "cluster-token"
        return path if path.exists() else self.data_dir / "token"

    def alive(self) -> bool:
        """Whether its process still runs."""
        return self.proc is not None and self.proc.poll() is None


class AgentOnHost:
    """`drove agent` on a host, its API and processes on the host's address."""

    def __init__(self, host: Host, managers: list[str], token_file: Path, *,
                 role: str = "both", zone: str | None = None) -> None:
        self.host = host
        self.managers = managers
        self.token_file = token_file
        self.role = role
        self.zone = zone
        self.data_dir = host.data_dir / "agent"
        self.log = host.data_dir / "agent.log"
        self.info: dict[str, Any] = {}
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def name(self) -> str:
        """The node name: the host's name."""
        return self.host.name

    def start(self, timeout: float = 60, wait: bool = True) -> AgentOnHost:
        """Start the agent; with wait, wait for the JSON line it prints once it serves."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")  # the ready line of this start, not of an earlier one
        extra = ("--zone", self.zone) if self.zone else ()
        with open(self.log, "ab") as log:
            self.proc = self.host.run(
                drove_argv("agent", "--manager", ",".join(self.managers), "--node", self.name,
                           "--listen", f"{self.host.address}:{AGENT_PORT}",
                           "--data-dir", str(self.data_dir), "--token-file",
                           str(self.token_file), "--role", self.role,
                           "--log-level", "warning", *extra),
                stdout=log, stderr=log)
        return self.wait_ready(timeout) if wait else self

    def wait_ready(self, timeout: float = 60) -> AgentOnHost:
        """Wait for the JSON line the agent prints once it serves (kept in ``info``)."""
        assert self.proc is not None, "start() first"
        self.info = _wait_file_json(self.log, self.proc, self.log, timeout,
                                    f"drove agent on {self.host.name}")
        return self


def fio_verify_argv(uri: str, size: str = "16M", *extra: str) -> list[str]:
    """One fio job: random 4k writes over ``size`` of the NBD export, each read back and
    checked (crc32c), stopping at the first error."""
    return ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", f"--size={size}", "--verify=crc32c",
            "--verify_fatal=1", "--do_verify=1", "--randrepeat=0", "--verify_state_save=0",
            "--output-format=json", *extra]


class FioLoop:
    """fio verify jobs run back to back on a host against an NBD URI until stopped.

    Each round writes and verifies the region anew (a new random seed), so a round
    overlaps every fault the test makes while it runs.
    """

    def __init__(self, host: Host, uri: str, size: str = "16M") -> None:
        self.host = host
        self.uri = uri
        self.size = size
        self.rounds: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FioLoop:
        """Start the rounds in a thread."""
        self._thread.start()
        return self

    def _round(self) -> None:
        proc = self.host.run(fio_verify_argv(self.uri, self.size), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=600)
        try:
            (job,) = json.loads(out[out.index("{"):])["jobs"]
        except ValueError:
            self.failures.append(f"fio exited {proc.returncode}: {out[-1000:]} {err[-2000:]}")
            return
        if proc.returncode != 0 or job["error"] != 0:
            self.failures.append(f"fio exited {proc.returncode}, error {job['error']}: "
                                 f"{err[-2000:]}")
        self.rounds.append(job)

    def _run(self) -> None:
        while not self._stop.is_set() and not self.failures:
            self._round()

    def wait_rounds(self, n: int, timeout: float) -> None:
        """Wait until ``n`` rounds more than now have ended (each covering what happened)."""
        target = len(self.rounds) + n
        poll(lambda: len(self.rounds) >= target or self.failures, timeout, f"{n} fio rounds")

    def stop(self, timeout: float = 300) -> None:
        """Let the running round finish, then stop."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "fio did not stop in time"
