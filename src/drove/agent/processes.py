"""Starting, watching and stopping the engine and replica processes of a node.

Processes run in their own session, so a Ctrl-C meant for the manager does not
reach them and a manager that dies leaves them serving; a restarted manager
adopts them by pid *and* start time (a recycled pid is never mistaken for ours).
Each process prints one JSON line with its bound addresses when it is ready; it
goes to a file, so an adopting manager can read it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ProcessStartError(Exception):
    """A process exited or did not report ready; the message holds the end of its log."""


class EngineUpgradeError(Exception):
    """An engine cannot hand over to a successor (not running, or no handoff socket)."""


@dataclass
class Proc:
    """One supervised process: who it is, how it was started, what it reported."""

    pid: int
    start_time: int
    argv: list[str]
    log: str
    ready: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """As stored in the manager's state."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Proc:
        """From the stored form."""
        return cls(**{k: doc[k] for k in ("pid", "start_time", "argv", "log", "ready")})


SOCKET_PATH_MAX = 107
"""Longest unix socket path, in bytes (sun_path holds 108 with its terminating NUL)."""


def engine_socket(run_dir: Path, volume: str) -> Path:
    """Where the engine of ``volume`` started under ``run_dir`` serves NBD.

    ``RUN_DIR/VOLUME.nbd.sock``; where that would not fit a unix socket address (a long
    volume name, as CSI's generated ones are), a name made of a hash of the volume's
    instead, so that every volume name a user may give gets an engine.
    """
    return _volume_socket(run_dir, volume, "nbd", 16)


def handoff_socket(run_dir: Path, volume: str) -> Path:
    """Where the engine of ``volume`` started under ``run_dir`` listens for its successor
    (a live upgrade: ``RUN_DIR/VOLUME.handoff.sock``, hashed like :func:`engine_socket`)."""
    return _volume_socket(run_dir, volume, "handoff", 12)


def _volume_socket(run_dir: Path, volume: str, kind: str, digits: int) -> Path:
    """``RUN_DIR/VOLUME.KIND.sock``, or with ``digits`` of a hash of the volume's name for
    it where that would not fit a unix address (the run directory is at most 80 bytes)."""
    path = run_dir / f"{volume}.{kind}.sock"
    if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
        return path
    return run_dir / f"{hashlib.sha256(volume.encode()).hexdigest()[:digits]}.{kind}.sock"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        _reap(pid)
        return None
    return int(fields[19])


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot; with the pid, a process's identity)."""
    return _start_time(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(proc: Proc | None) -> bool:
    """True while ``proc`` runs (the same process, not a recycled pid)."""
    if proc is None:
        return False
    _reap(proc.pid)
    return _start_time(proc.pid) == proc.start_time


def spawn(argv: list[str], ready_file: Path, log: Path, *, timeout: float = 60.0,
          env: dict[str, str] | None = None) -> Proc:
    """Start ``argv`` in its own session and wait for its ready line (ProcessStartError if none)."""
    ready_file.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    ready_file.unlink(missing_ok=True)
    with open(ready_file, "wb") as out, open(log, "ab") as err:
        err.write(f"--- {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
        err.flush()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 start_new_session=True, env=env)
    start = _start_time(child.pid) or 0
    proc = Proc(child.pid, start, list(argv), str(log))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = read_ready(ready_file)
        if ready is not None:
            proc.ready = ready
            return proc
        if child.poll() is not None:
            raise ProcessStartError(f"{argv[3:5]} exited with status {child.returncode}: "
                                    f"{tail(log)}")
        time.sleep(0.02)
    stop(proc, timeout=5)
    raise ProcessStartError(f"{argv[3:5]} did not report ready within {timeout:.0f} s: "
                            f"{tail(log)}")


def read_ready(path: Path) -> dict[str, Any] | None:
    """The ready line a process wrote to ``path``, once it is complete."""
    try:
        text = path.read_text()
    except OSError:
        return None
    line, nl, _ = text.partition("\n")
    if not nl:
        return None
    try:
        return json.loads(line)
    except ValueError:
        return None


def wait_exit(proc: Proc, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``proc`` to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while alive(proc):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stop(proc: Proc | None, timeout: float = 15.0) -> None:
    """SIGTERM ``proc`` (it flushes and exits cleanly), SIGKILL after ``timeout``."""
    if proc is None or not alive(proc):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(proc):
                return
            time.sleep(0.02)


def tail(log: Path | str, lines: int = 5) -> str:
    """The last lines of a log, for error messages."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (VmRSS), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
