"""Start real `drove engine serve` processes (over real replica processes) for tests."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from drove.replica.access import KEY_ENV, bearer
from replicatools import ReplicaProc, kill_all, launch, start_replica


def process_env(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with ({} once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(e.decode(errors="replace").partition("=")[::2] for e in raw.split(b"\0") if e)


class EngineProc(ReplicaProc):
    """A running engine process: same handles as a replica (control API, NBD URIs)."""

    argv: list[str]  # `drove ARGV` started it (a successor takes the same: start_successor)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call the control API; with the volume's access key when the engine was started
        with one (DROVE_NBD_KEY), which its API then demands."""
        key = process_env(self.proc.pid).get(KEY_ENV)
        if key:
            kwargs["headers"] = {**bearer(key), **kwargs.get("headers", {})}
        return super().api(method, path, **kwargs)

    def uri(self, export: str = "") -> str:
        """NBD URI of the volume over TCP."""
        return super().uri(export or self.addresses["name"])

    def info(self) -> dict[str, Any]:
        """GET /v1/info."""
        return self.ok("GET", "/v1/info")

    def modes(self) -> dict[str, str]:
        """Replica name -> mode."""
        return {r["name"]: r["mode"] for r in self.info()["replicas"]}

    def wait_for(self, predicate, timeout: float = 60, what: str = "condition") -> dict:
        """Poll /v1/info until ``predicate(info)`` holds; the info is returned."""
        deadline = time.monotonic() + timeout
        info = self.info()
        while not predicate(info):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {info}")
            time.sleep(0.1)
            info = self.info()
        return info

    def wait_rebuilt(self, timeout: float = 120) -> dict:
        """Wait until the last rebuild ended; insist it succeeded."""
        deadline = time.monotonic() + timeout
        while True:
            rb = self.ok("GET", "/v1/rebuild")
            if rb and rb["state"] in ("done", "failed", "cancelled"):
                assert rb["state"] == "done", rb
                return rb
            if time.monotonic() > deadline:
                raise AssertionError(f"rebuild did not finish: {rb}")
            time.sleep(0.1)


def start_engine(directory: Path, name: str, replicas: list[ReplicaProc], *extra: str,
                 size: str | int | None = None, timeout: float = 30,
                 names: list[str] | None = None,
                 local: tuple[str, Path] | None = None) -> EngineProc:
    """Start `drove engine serve NAME` over ``replicas`` on free ports.

    ``local``: (name, directory) of a replica the engine serves itself (data locality).
    """
    args = engine_argv(directory, name, replicas, *extra, size=size, names=names, local=local)
    log = directory / f"engine-{name}.log"
    proc, addresses = launch(args, log, timeout, what="engine")
    addresses["name"] = name
    engine = EngineProc(proc, directory, addresses, log, list(extra))
    engine.argv = args
    return engine


def engine_argv(directory: Path, name: str, replicas: list[ReplicaProc], *extra: str,
                size: str | int | None = None, names: list[str] | None = None,
                local: tuple[str, Path] | None = None) -> list[str]:
    """The arguments of `drove engine serve NAME` over ``replicas`` (see start_engine)."""
    directory.mkdir(parents=True, exist_ok=True)
    args = ["engine", "serve", name, "--nbd", "127.0.0.1:0", "--control", "127.0.0.1:0",
            "--nbd-unix", str(directory / f"{name}.sock"), "--log-level", "info",
            "--state-file", str(directory / f"{name}.state")]
    for i, r in enumerate(replicas):
        label = names[i] if names else f"r{i}"
        args += ["--replica", f"{label}={r.control}"]
    if local is not None:
        args += ["--local-replica", f"{local[0]}={local[1]}"]
    if size is not None:
        args += ["--size", str(size)]
    return args + list(extra)


def start_successor(cluster: Cluster, sock: Path, epoch: int, *extra: str,
                    timeout: float = 60) -> EngineProc:
    """Start a new engine with the running one's arguments that takes its volume over
    through the handoff socket ``sock`` (a live upgrade); it becomes the cluster's engine."""
    old = cluster.engine
    assert old is not None, "no engine"
    name = old.addresses["name"]
    log = old.dir / f"engine-{name}-epoch{epoch}.log"
    proc, addresses = launch([*old.argv, "--takeover", str(sock), "--epoch", str(epoch),
                              *extra], log, timeout, what="successor engine")
    addresses["name"] = name
    new = EngineProc(proc, old.dir, addresses, log, old.extra)
    new.argv = old.argv
    cluster.engine = new
    cluster.track(new)
    return new


class LocalReplicaView:
    """The replica an engine serves itself, with a replica process's handles (uri, control).

    Its addresses are asked of the running engine each time (they change when the
    engine restarts or opens the replica again), so the view stays valid.  It has no
    process of its own: killing it is refused, a test that means to stop the engine
    stops the engine.
    """

    local = True

    def __init__(self, cluster: Cluster, name: str, directory: Path) -> None:
        self.cluster = cluster
        self.name = name
        self.dir = directory

    @property
    def addresses(self) -> dict[str, Any]:
        """The local replica's control URL and NBD address, as the engine reports them now."""
        engine = self.cluster.engine
        assert engine is not None, "no engine"
        mine = next((r for r in engine.info()["replicas"] if r["name"] == self.name), None)
        assert mine is not None and mine.get("local") and mine["nbd"], \
            f"the engine serves no local replica {self.name}: {mine}"
        nbd = urlsplit(mine["nbd"])
        return {"control": mine["url"], "nbd_host": nbd.hostname, "nbd_port": nbd.port}

    @property
    def control(self) -> str:
        """Base URL of the local replica's control API (served by the engine)."""
        return self.addresses["control"]

    def uri(self, export: str = "") -> str:
        """NBD URI of an export of the local replica (served by the engine)."""
        addresses = self.addresses
        return f"nbd://{addresses['nbd_host']}:{addresses['nbd_port']}/{export}"

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call the local replica's control API."""
        return httpx.request(method, self.control + path, timeout=120, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the local replica's control API and insist on success."""
        resp = self.api(method, path, **kwargs)
        assert resp.status_code < 300, (resp.status_code, resp.text)
        return resp.json()

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Refused: the local replica lives and dies with its engine."""
        raise AssertionError(f"local replica {self.name} has no process; stop the engine")


class Cluster:
    """N replicas and one engine over them, in one directory; killed at teardown.

    With ``local``, ``replicas[0]`` is a :class:`LocalReplicaView`: the engine
    serves that replica itself (``--local-replica``), the others are processes.
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.replicas: list[Any] = []  # ReplicaProc, and LocalReplicaView first if local
        self.engine: EngineProc | None = None
        self.local: LocalReplicaView | None = None
        self._size: str | int | None = None
        self._all: list[ReplicaProc] = []

    @property
    def remote(self) -> list[ReplicaProc]:
        """The replicas that run as processes of their own."""
        return [r for r in self.replicas if not getattr(r, "local", False)]

    def replica(self, name: str, size: str | int | None = "64M") -> ReplicaProc:
        """Start (or restart) replica ``name``."""
        r = start_replica(self.tmp / name, size)
        self._all.append(r)
        return r

    def add_local(self, name: str, directory: Path, size: str | int) -> LocalReplicaView:
        """Have the next engine serve replica ``name`` from ``directory`` itself (made at
        ``size`` when it holds none); it becomes ``replicas[0]``."""
        self.local = LocalReplicaView(self, name, directory)
        self.replicas.insert(0, self.local)
        self._size = size
        return self.local

    def start(self, n: int = 3, size: str = "64M", *extra: str,
              names: list[str] | None = None, local: bool = False) -> EngineProc:
        """Start ``n`` fresh replicas and an engine over them.

        ``local``: the first of the ``n`` is served by the engine itself.
        """
        names = names or [f"r{i}" for i in range(n)]
        self.replicas = [self.replica(nm, size) for nm in names[1 if local else 0:]]
        if local:
            self.add_local(names[0], self.tmp / names[0], size)
        return self.start_engine(*extra)

    def start_engine(self, *extra: str, names: list[str] | None = None) -> EngineProc:
        """Start the engine over the current replicas (and the local one, if any)."""
        remote = self.remote
        local = None if self.local is None else (self.local.name, self.local.dir)
        size = self._size if self.local is not None and not (self.local.dir / "volume.meta"
                                                               ).exists() else None
        self.engine = start_engine(self.tmp / "engine", "vol", remote, *extra,
                                   names=names or [r.dir.name for r in remote],
                                   local=local, size=size)
        self._all.append(self.engine)
        return self.engine

    def track(self, proc: ReplicaProc) -> ReplicaProc:
        """Kill ``proc`` (started by the test) with the rest at teardown."""
        self._all.append(proc)
        return proc

    def close(self) -> None:
        """Kill everything still running."""
        kill_all(self._all)
