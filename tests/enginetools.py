"""Start real `drove engine serve` processes (over real replica processes) for tests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from replicatools import ReplicaProc, kill_all, launch, start_replica


class EngineProc(ReplicaProc):
    """A running engine process: same handles as a replica (control API, NBD URIs)."""

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
    args += list(extra)
    log = directory / f"engine-{name}.log"
    proc, addresses = launch(args, log, timeout, what="engine")
    addresses["name"] = name
    return EngineProc(proc, directory, addresses, log, list(extra))


class Cluster:
    """N replica processes and one engine over them, in one directory; killed at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.replicas: list[ReplicaProc] = []
        self.engine: EngineProc | None = None
        self._all: list[ReplicaProc] = []

    def replica(self, name: str, size: str | int | None = "64M") -> ReplicaProc:
        """Start (or restart) replica ``name``."""
        r = start_replica(self.tmp / name, size)
        self._all.append(r)
        return r

    def start(self, n: int = 3, size: str = "64M", *extra: str,
              names: list[str] | None = None) -> EngineProc:
        """Start ``n`` fresh replicas and an engine over them."""
        names = names or [f"r{i}" for i in range(n)]
        self.replicas = [self.replica(nm, size) for nm in names]
        return self.start_engine(*extra, names=names)

    def start_engine(self, *extra: str, names: list[str] | None = None) -> EngineProc:
        """Start the engine over the current replicas."""
        self.engine = start_engine(self.tmp / "engine", "vol", self.replicas, *extra,
                                   names=names or [r.dir.name for r in self.replicas])
        self._all.append(self.engine)
        return self.engine

    def close(self) -> None:
        """Kill everything still running."""
        kill_all(self._all)
