"""Start real `drove replica serve` processes for tests and talk to them."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass
class ReplicaProc:
    """A running replica process and its addresses."""

    proc: subprocess.Popen
    dir: Path
    addresses: dict[str, Any]
    log: Path
    extra: list[str] = field(default_factory=list)

    @property
    def control(self) -> str:
        """Base URL of the control API."""
        return self.addresses["control"]

    def uri(self, export: str = "") -> str:
        """NBD URI of an export (TCP)."""
        return f"nbd://{self.addresses['nbd_host']}:{self.addresses['nbd_port']}/{export}"

    def unix_uri(self, export: str = "") -> str:
        """NBD URI of an export over the unix socket."""
        return f"nbd+unix:///{export}?socket={self.addresses['nbd_unix']}"

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call the control API."""
        return httpx.request(method, self.control + path, timeout=120, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the control API and insist on success."""
        resp = self.api(method, path, **kwargs)
        assert resp.status_code < 300, (resp.status_code, resp.text)
        return resp.json()

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` and wait for the process to end."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> int:
        """Stop cleanly (SIGTERM)."""
        return self.kill(signal.SIGTERM)


def drove_cmd(*args: str) -> list[str]:
    """The argv that runs the drove CLI of this checkout."""
    return [sys.executable, "-m", "drove", *args]


def start_replica(directory: Path, size: str | int | None = None, *extra: str,
                  unix: bool = True, timeout: float = 30) -> ReplicaProc:
    """Start `drove replica serve` on free ports and wait for its ready line."""
    directory = Path(directory)
    args = ["replica", "serve", str(directory), "--nbd", "127.0.0.1:0",
            "--control", "127.0.0.1:0", "--log-level", "warning", *extra]
    if size is not None:
        args += ["--size", str(size)]
    if unix:
        args += ["--nbd-unix", str(directory.parent / f"{directory.name}.sock")]
    log = directory.parent / f"{directory.name}.log"
    proc, addresses = launch(args, log, timeout, what="replica")
    return ReplicaProc(proc, directory, addresses, log, list(extra))


def launch(args: list[str], log: Path, timeout: float, what: str
           ) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start `drove ARGS`, logging stderr to ``log``; wait for its JSON ready line."""
    logf = open(log, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(drove_cmd(*args), stdout=subprocess.PIPE, stderr=logf,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    logf.close()
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not start: {log.read_text()[-3000:]}")
    return proc, json.loads(line)


def run(cmd: list[str], *, check: bool = True, timeout: float = 300,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a client command, failing the test with its output if it fails."""
    res = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {res.returncode}\n"
            f"stdout: {res.stdout.decode(errors='replace')[-3000:]}\n"
            f"stderr: {res.stderr.decode(errors='replace')[-3000:]}"
        )
    return res


def qemu_io(uri: str, *commands: str, read_only: bool = False) -> str:
    """Run qemu-io commands on ``uri``; its output. Any failed command fails the test:
    qemu-io reports a failed command or pattern check in its output and still exits 0."""
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for c in commands:
        args += ["-c", c]
    out = run([*args, uri])
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert "failed" not in text and "Pattern verification" not in text, text
    return text


def kill_all(procs: list[ReplicaProc]) -> None:
    """Stop every process still running (test teardown)."""
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGKILL)
            p.proc.wait()


# nbdsh is `python3 -m nbd`; libnbd's bindings live in Debian's python, which a
# pyenv or venv python3 earlier on PATH would shadow.
NBDSH = ["/usr/bin/python3", "-m", "nbd"]


def nbdsh(uri: str, script: str, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run a libnbd python snippet against ``uri`` (``h`` is the connected handle)."""
    # Connect in the script: `nbdsh -u` refuses URIs naming local files (TLS certificates).
    connect = f"h.set_uri_allow_local_file(True)\nh.connect_uri({uri!r})\n"
    return run([*NBDSH, "-c", connect + script], check=check)


def nbdinfo_json(uri: str, *args: str) -> Any:
    """nbdinfo --json output as Python data."""
    return json.loads(run(["nbdinfo", "--json", *args, uri]).stdout)
