"""Start a real `drove serve` (manager + agent) for tests and talk to it over its API and CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


class ManagerProc:
    """A running `drove serve --data-dir DIR` with helpers for its API and CLI."""

    def __init__(self, data_dir: Path, log: Path, root: Path | None = None) -> None:
        self.data_dir = data_dir
        self.root = root or data_dir  # every path this manager's processes use is under it
        from drove.agent.node import NodeAgent

        self.run_dir = str(NodeAgent._socket_dir(data_dir / "run"))
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.token = ""

    def start(self, timeout: float = 120, listen: str = "127.0.0.1:0",
              extra: tuple[str, ...] = ()) -> ManagerProc:
        """Start the manager (on a free port unless ``listen`` says; ``extra``: more options
        of `drove serve`) and wait until it serves."""
        (self.data_dir / "manager.json").unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "drove", "serve", "--data-dir", str(self.data_dir),
                 "--listen", listen, *extra], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        info = self.data_dir / "manager.json"
        while not info.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"drove serve exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"drove serve not ready: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        self.url = json.loads(info.read_text())["url"]
        self.token = (self.data_dir / "token").read_text().strip()
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> None:
        """Stop the manager (SIGTERM: clean; SIGKILL: a crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("drove serve did not stop in time") from None

    # ------------------------------------------------------------ API

    def api(self, method: str, path: str, *, token: str | None = None,
            **kwargs: Any) -> httpx.Response:
        """One API call (with the token unless ``token`` is given)."""
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=600, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        """An API call that must succeed; its JSON."""
        r = self.api(method, path, **kwargs)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def volume(self, name: str) -> dict[str, Any]:
        """GET /v1/volumes/NAME."""
        return self.ok("GET", f"/v1/volumes/{name}")

    def wait_volume(self, name: str, predicate, timeout: float = 120,
                    what: str = "condition") -> dict[str, Any]:
        """Poll the volume until ``predicate(volume)`` holds."""
        deadline = time.monotonic() + timeout
        v = self.volume(name)
        while not predicate(v):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {json.dumps(v, indent=1)}")
            time.sleep(0.2)
            v = self.volume(name)
        return v

    def events(self, volume: str | None = None) -> list[dict[str, Any]]:
        """The event log."""
        return self.ok("GET", "/v1/events", params={"volume": volume} if volume else {})

    # ------------------------------------------------------------ CLI

    def cli(self, *args: str, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `drove ARGS` finding this manager through its data dir, like a user would."""
        full_env = {**os.environ, "DROVE_DATA_DIR": str(self.data_dir), **(env or {})}
        full_env.pop("DROVE_URL", None)
        full_env.pop("DROVE_TOKEN", None)
        r = subprocess.run([sys.executable, "-m", "drove", *args], capture_output=True,
                           text=True, timeout=timeout, env=full_env)
        if check:
            assert r.returncode == 0, \
                f"drove {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def cli_json(self, *args: str) -> Any:
        """`drove ARGS --json`, parsed."""
        return json.loads(self.cli(*args, "--json").stdout)

    # ------------------------------------------------------------ cleanup

    def pids(self) -> list[int]:
        """Processes (engines, replicas, nbdfuse) whose command line names a path under root."""
        out = []
        me = self.proc.pid if self.proc else -1
        root = str(self.root).encode()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) in (me, os.getpid()):
                continue
            with contextlib.suppress(OSError):
                cmd = (p / "cmdline").read_bytes()
                if root in cmd or self.run_dir.encode() in cmd:
                    out.append(int(p.name))
        return out

    def loops(self) -> list[str]:
        """Loop devices backed by a file under root or a FUSE file of this manager."""
        r = subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True)
        devs = json.loads(r.stdout or '{"loopdevices": []}')["loopdevices"]
        return [d["name"] for d in devs
                if str(self.root) in (d.get("back-file") or "")
                or self.run_dir in (d.get("back-file") or "")]

    def mounts(self) -> list[str]:
        """Mount points under root (FUSE exports and filesystems)."""
        out = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mnt = line.split()[4]
            if mnt.startswith((str(self.root), self.run_dir)):
                out.append(mnt)
        return out

    def kill_everything(self) -> None:
        """SIGKILL the manager and every process it started; unmount what it mounted."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # Find the loop devices before anything is unmounted: once its FUSE mount is
        # lazily unmounted, a loop device over nbdfuse's file names its backing file
        # "/disk" (no path under root), and it would be left bound for ever.
        loops = self.loops()
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mnt in reversed(self.mounts()):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
