"""Live engine upgrade through a real `drove serve`: `drove volume upgrade-engine` replaces a
volume's engine while a mounted filesystem and fio keep using it; refusals; a successor that
fails leaves the old engine serving; an engine older than its agent is upgraded by itself.

Engines run from another drove through the agent's documented launch setting
(``DROVE_AGENT_PYTHON``, drove.agent.node) or a PYTHONPATH naming another source tree, both
real processes: no hook in the product.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import drove
from accesstools import engine_headers
from cluster import fio_verify_argv
from drove.agent.node import PYTHON_ENV
from drove.replica.access import KEY_ENV
from replicatools import nbdsh

SRC = Path(drove.__file__).resolve().parent


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_for(predicate: Any, what: str, timeout: float = 60) -> None:
    """Poll ``predicate()`` until it holds (AssertionError naming ``what`` at the deadline)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kinds(manager, volume: str) -> list[str]:
    """The kinds of the volume's events, oldest first."""
    return [e["kind"] for e in manager.events(volume)]


class Writer:
    """Files of random data written (and fsynced) into a mounted volume one after another, in
    a thread, until stopped, overwriting the oldest past ``keep`` files (the volume does
    not fill up); the checksum of each file's last contents is kept to read them back."""

    def __init__(self, directory: Path, size: int = 256 << 10, keep: int = 64) -> None:
        self.directory = directory
        self.size = size
        self.keep = keep
        self.written = 0
        self.sums: dict[str, str] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        """Start writing."""
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            name = f"w{self.written % self.keep:03d}"
            data = os.urandom(self.size)
            try:
                with open(self.directory / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                self.errors.append(f"{name}: {exc!r}")
                return
            self.sums[name] = hashlib.sha256(data).hexdigest()
            self.written += 1

    def wait_files(self, count: int) -> None:
        """Wait until ``count`` files are written in all (or the writer failed)."""
        wait_for(lambda: self.written >= count or self.errors, f"{count} files written")

    def stop(self) -> None:
        """Stop after the file being written."""
        self._stop.set()
        self._thread.join(60)

    def verify(self) -> None:
        """Every file written reads back with its checksum."""
        assert self.sums
        for name, digest in self.sums.items():
            assert hashlib.sha256((self.directory / name).read_bytes()).hexdigest() == digest, \
                name


class Fio:
    """One fio job against an NBD URI, in the background until interrupted: random 4k
    writes, each read back and checked while it runs (verify_backlog), stopping at the first
    error."""

    def __init__(self, uri: str) -> None:
        argv = fio_verify_argv(uri, "32M", "--time_based", "--runtime=300",
                               "--verify_backlog=64")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def running(self) -> bool:
        """Whether the job still runs (it ends early only on an error)."""
        return self.proc.poll() is None

    def interrupt(self) -> dict[str, Any]:
        """End the job (SIGINT: fio stops and reports, exit status 128); its report
        (AssertionError with fio's output if it had ended, or ends, another way)."""
        assert self.running(), f"fio ended early: {self.proc.communicate()}"
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 128, f"fio: {self.proc.returncode}\n{out}\n{err}"
        return json.loads(out[out.index("{"):])["jobs"][0]

    def kill(self) -> None:
        """Stop it (a test that failed before its end)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def engine_writes(manager, volume: str) -> int:
    """How many writes the volume's engine (the one recorded now) has served."""
    eng = manager.volume(volume)["engine"]
    r = httpx.get(eng["control_url"] + "/v1/stats", headers=engine_headers(eng["pid"]),
                  timeout=10)
    r.raise_for_status()
    return int(r.json()["ops"]["write"]["count"])


@pytest.mark.slow  # 8-30 s: a mounted volume written through an upgrade, detached, attached
def test_upgrade_keeps_a_mounted_volume_and_every_write(manager, tmp_path):
    mnt = tmp_path / "mnt"
    (tmp_path / "disk2").mkdir()
    manager.cli("disk", "add", str(tmp_path / "disk2"))
    manager.cli("volume", "create", "up", "--size", "128M", "--replicas", "2")
    manager.cli("volume", "attach", "up", "--mount", str(mnt))
    before = manager.cli_json("volume", "get", "up")
    assert before["engine"]["version"] == drove.__version__

    writer = Writer(mnt).start()
    try:
        writer.wait_files(8)
        out = manager.cli_json("volume", "upgrade-engine", "up")
        writer.wait_files(writer.written + 8)  # the filesystem takes writes after it too
    finally:
        writer.stop()
    assert writer.errors == []

    old, new = before["engine"], out["engine"]
    assert out["upgrade"]["from"] == {"pid": old["pid"], "version": old["version"],
                                      "epoch": old["epoch"]}
    assert out["upgrade"]["to"] == {"pid": new["pid"], "version": drove.__version__,
                                    "epoch": old["epoch"] + 1}
    got = manager.cli_json("volume", "get", "up")
    assert got["engine"]["pid"] == new["pid"] != old["pid"]
    assert got["engine"]["epoch"] == old["epoch"] + 1
    assert got["state"] == "attached" and got["health"] == "healthy"
    assert got["nbd_uri"] == before["nbd_uri"]  # the same listening socket, handed over
    assert pid_alive(new["pid"]) and not pid_alive(old["pid"])
    assert os.path.ismount(mnt)
    writer.verify()
    upgraded = [e for e in manager.events("up") if e["kind"] == "engine-upgraded"]
    assert len(upgraded) == 1 and f"{old['pid']} -> {new['pid']}" in upgraded[0]["message"]

    # What the new engine acknowledged is on the replicas: read back after a new start.
    manager.cli("volume", "detach", "up")
    manager.cli("volume", "attach", "up", "--mount", str(mnt))
    writer.verify()


@pytest.mark.slow  # 8-20 s: fio writing and verifying through two upgrades in a row
def test_fio_sees_no_error_through_two_upgrades(manager, tmp_path):
    # Encrypted: a new engine without the volume's data key would serve ciphertext.
    kek = tmp_path / "kek"
    kek.write_text(os.urandom(32).hex())
    kek.chmod(0o600)
    manager.stop()
    manager.start(extra=("--kek-file", str(kek)))
    (tmp_path / "disk2").mkdir()
    manager.cli("disk", "add", str(tmp_path / "disk2"))
    manager.cli("volume", "create", "f", "--size", "64M", "--replicas", "2",
                "--data-locality", "disabled", "--encrypted")
    manager.cli("volume", "attach", "f")
    uri = manager.volume("f")["nbd_uri"]
    fio = Fio(uri)
    try:
        pids = [manager.volume("f")["engine"]["pid"]]
        for _ in range(2):
            manager.cli("volume", "upgrade-engine", "f")
            pids.append(manager.volume("f")["engine"]["pid"])
        # fio goes on through the last engine: many writes there, each one checked.
        wait_for(lambda: engine_writes(manager, "f") >= 2000 or not fio.running(),
                 "fio's writes through the last engine")
        job = fio.interrupt()
    finally:
        fio.kill()
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0  # written, verified
    assert len(set(pids)) == 3 and not any(pid_alive(p) for p in pids[:2]), pids
    assert manager.volume("f")["engine"]["epoch"] == 3  # attach 1, then one per upgrade


def test_upgrade_is_refused_while_detached(manager):
    manager.cli("volume", "create", "d", "--size", "16M", "--replicas", "1")
    before = manager.volume("d")
    r = manager.cli("volume", "upgrade-engine", "d", check=False)
    assert r.returncode != 0
    assert "volume d is detached" in r.stderr and "409" in r.stderr, r.stderr
    assert manager.api("POST", "/v1/volumes/d/upgrade-engine").status_code == 409
    assert manager.api("POST", "/v1/volumes/nope/upgrade-engine").status_code == 404
    assert manager.volume("d") == before
    assert not [k for k in kinds(manager, "d") if k.startswith("engine-upgrade")]


def broken_python(path: Path) -> Path:
    """An interpreter that exits at once, saying so (a broken installation of drove)."""
    path.write_text(f"#!{sys.executable}\nimport sys\n"
                    "sys.exit('this python cannot run drove: its installation is broken')\n")
    path.chmod(0o755)
    return path


def python_with_another_key(path: Path) -> Path:
    """The real interpreter, run with another volume access key than the agent gives (a
    new engine that takes the sockets over, then cannot open its replicas)."""
    path.write_text(f"#!{sys.executable}\nimport os, sys\n"
                    f"os.environ[{KEY_ENV!r}] = {os.urandom(32).hex()!r}\n"
                    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")
    path.chmod(0o755)
    return path


@pytest.mark.slow  # 5-20 s each: a manager restarted, a successor that fails
@pytest.mark.parametrize(("python", "claimed", "says"), [
    # It never reaches the old engine: nothing claimed, the epoch stays.
    (broken_python, False, "installation is broken"),
    # It took the sockets and connections over, then could not open its replicas (they
    # refused its key before it claimed any): the old engine takes them back, epoch kept.
    (python_with_another_key, False, "no replica is reachable"),
], ids=["exits-at-once", "fails-after-the-handoff"])
def test_a_failed_upgrade_leaves_the_old_engine_serving(manager, tmp_path, monkeypatch,
                                                        python, claimed, says):
    mnt = tmp_path / "mnt"
    manager.cli("volume", "create", "keep", "--size", "64M", "--replicas", "1",
                "--data-locality", "disabled")
    manager.cli("volume", "attach", "keep", "--mount", str(mnt))
    writer = Writer(mnt)
    (mnt / "before").write_bytes(b"x" * 4096)
    before = manager.volume("keep")
    # The manager restarts (a crash: its volumes keep serving, adopted at its start) with
    # a drove for new processes that fails.
    manager.stop(signal.SIGKILL)
    monkeypatch.setenv(PYTHON_ENV, str(python(tmp_path / "python")))
    manager.start()
    assert manager.volume("keep")["engine"]["pid"] == before["engine"]["pid"]

    r = manager.cli("volume", "upgrade-engine", "keep", check=False)
    assert r.returncode != 0 and "HTTP 409" in r.stderr, r.stderr
    assert says in r.stderr and "serves on" in r.stderr, r.stderr
    after = manager.volume("keep")
    epoch = before["engine"]["epoch"] + (1 if claimed else 0)
    # The same pid and control URL; the epoch the old engine reports holding (the new
    # one's once that one had claimed a replica).
    assert after["engine"] == {**before["engine"], "epoch": epoch}
    assert after["state"] == "attached" and after["health"] == "healthy"
    assert pid_alive(before["engine"]["pid"])
    assert "engine-upgrade-failed" in kinds(manager, "keep")
    assert "engine-upgraded" not in kinds(manager, "keep")
    # The old engine serves the mount as before.
    writer.start()
    try:
        writer.wait_files(4)
    finally:
        writer.stop()
    assert writer.errors == []
    writer.verify()
    assert (mnt / "before").read_bytes() == b"x" * 4096


def older_drove(root: Path, version: str) -> Path:
    """A copy of this drove's source tree whose ``__version__`` is ``version``; the
    directory to put on PYTHONPATH."""
    tree = root / "old-drove"
    shutil.copytree(SRC, tree / "drove", ignore=shutil.ignore_patterns("__pycache__"))
    init = tree / "drove" / "__init__.py"
    text = init.read_text()
    assert f'__version__ = "{drove.__version__}"' in text
    init.write_text(text.replace(f'__version__ = "{drove.__version__}"',
                                 f'__version__ = "{version}"'))
    return tree


@pytest.mark.slow  # 10-30 s: two manager restarts around a mounted volume
def test_an_engine_older_than_its_agent_is_upgraded_when_the_manager_starts(
        manager, tmp_path, monkeypatch):
    mnt = tmp_path / "mnt"
    # The manager, and so its agent and every engine it starts, runs an older drove.
    manager.stop(signal.SIGKILL)
    monkeypatch.setenv("PYTHONPATH", str(older_drove(tmp_path, "0.0.1")))
    manager.start()
    manager.cli("volume", "create", "auto", "--size", "64M", "--replicas", "1")
    manager.cli("volume", "attach", "auto", "--mount", str(mnt))
    before = manager.volume("auto")
    assert before["engine"]["version"] == "0.0.1"
    (mnt / "kept").write_bytes(b"k" * 8192)
    os.sync()

    # This drove's manager starts on the same data: it adopts the engine, then upgrades it.
    manager.stop(signal.SIGKILL)
    monkeypatch.delenv("PYTHONPATH")
    manager.start()
    after = manager.wait_volume(
        "auto", lambda v: (v["engine"] or {}).get("version") == drove.__version__,
        timeout=60, what="the engine upgraded to this drove")
    assert after["engine"]["pid"] != before["engine"]["pid"]
    assert after["engine"]["epoch"] == before["engine"]["epoch"] + 1
    assert not pid_alive(before["engine"]["pid"])
    assert os.path.ismount(mnt) and (mnt / "kept").read_bytes() == b"k" * 8192
    (mnt / "after").write_bytes(b"a" * 8192)
    os.sync()
    assert (mnt / "after").read_bytes() == b"a" * 8192
    upgraded = [e["message"] for e in manager.events("auto") if e["kind"] == "engine-upgraded"]
    assert len(upgraded) == 1 and "0.0.1" in upgraded[0] and drove.__version__ in upgraded[0]
    shown = manager.cli("volume", "get", "auto", env={"COLUMNS": "300"}).stdout
    assert f"pid {after['engine']['pid']}, drove {drove.__version__}, epoch" in shown, shown


def start_agent(manager, name: str, data_dir: Path, address: str,
                env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A `drove agent` for node ``name`` on ``address`` (a loopback address of its own
    standing in for another host's), once it serves; ``env``: more of its environment."""
    out = data_dir.with_suffix(".out")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "drove", "agent", "--manager", manager.url, "--node", name,
             "--listen", f"{address}:0", "--data-dir", str(data_dir),
             "--token-file", str(manager.data_dir / "cluster-token"),
             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    wait_for(lambda: '{"' in out.read_text() or proc.poll() is not None,
             f"agent {name} to serve")
    assert proc.poll() is None, out.read_text()[-2000:]
    return proc


@pytest.mark.slow  # 5-20 s: an agent of its own, a mount through it
def test_an_engine_on_another_nodes_agent_is_upgraded_through_it(manager, tmp_path):
    mnt = tmp_path / "mnt"
    agent = start_agent(manager, "n2", tmp_path / "n2", "127.0.0.2")
    try:
        wait_for(lambda: any(d["state"] == "ready" for n in manager.ok("GET", "/v1/nodes")
                             if n["name"] == "n2" for d in n["disks"]), "n2's disk")
        manager.cli("volume", "create", "far", "--size", "64M", "--replicas", "2")
        # The engine and the mount on n2, through its agent.
        before = manager.cli_json("volume", "attach", "far", "--node", "n2", "--mount",
                                  str(mnt))
        assert before["engine"]["control_url"].startswith("http://127.0.0.2:")
        writer = Writer(mnt).start()
        try:
            writer.wait_files(4)
            after = manager.cli_json("volume", "upgrade-engine", "far")
            writer.wait_files(writer.written + 4)
        finally:
            writer.stop()
        assert writer.errors == []
        assert after["node"] == "n2" and after["health"] == "healthy"
        assert after["engine"]["control_url"].startswith("http://127.0.0.2:")
        assert after["engine"]["pid"] != before["engine"]["pid"]
        assert after["engine"]["epoch"] == before["engine"]["epoch"] + 1
        assert not pid_alive(before["engine"]["pid"]) and pid_alive(after["engine"]["pid"])
        # n2's agent follows the manager's changes all along: the engine the upgrade
        # replaced is never named stale (its agent would release the mount with it).
        stale = [e["message"] for e in manager.events("far") if e["kind"] == "engine-stale"]
        assert stale == []
        assert os.path.ismount(mnt)
        writer.verify()
        manager.cli("volume", "detach", "far")
    finally:
        agent.terminate()
        agent.wait(30)


def successor_pids(run_dir: str) -> list[int]:
    """Engines of this manager's agent started to take another over (``--takeover``)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--takeover" in argv and any(run_dir.encode() in a for a in argv):
                found.append(int(p.name))
    return found


def test_a_manager_killed_during_an_upgrade_adopts_the_new_engine(manager, tmp_path):
    mnt = tmp_path / "mnt"
    manager.cli("volume", "create", "mid", "--size", "64M", "--replicas", "1")
    manager.cli("volume", "attach", "mid", "--mount", str(mnt))
    (mnt / "kept").write_bytes(b"m" * 8192)
    os.sync()
    before = manager.volume("mid")
    answers: list[Any] = []

    def ask() -> None:
        try:
            answers.append(manager.api("POST", "/v1/volumes/mid/upgrade-engine").status_code)
        except Exception as exc:  # the manager is killed while it works on the answer
            answers.append(exc)

    call = threading.Thread(target=ask, daemon=True)
    call.start()
    # The new engine runs (it takes the volume over on its own): the manager dies before
    # it can record it.
    wait_for(lambda: successor_pids(manager.run_dir), "the new engine's process")
    (new_pid,) = successor_pids(manager.run_dir)
    manager.stop(signal.SIGKILL)
    call.join(60)
    assert answers and not isinstance(answers[0], int), answers
    manager.start()

    after = manager.volume("mid")
    assert after["state"] == "attached" and after["engine"]["pid"] == new_pid
    assert after["engine"]["epoch"] == before["engine"]["epoch"] + 1
    assert not pid_alive(before["engine"]["pid"])
    adopted = [e["message"] for e in manager.events("mid") if e["kind"] == "volume-adopted"]
    assert adopted and "a live upgrade started" in adopted[-1], adopted
    assert os.path.ismount(mnt) and (mnt / "kept").read_bytes() == b"m" * 8192
    (mnt / "after").write_bytes(b"n" * 8192)
    os.sync()
    assert (mnt / "after").read_bytes() == b"n" * 8192


def test_an_agent_restarted_with_a_newer_drove_has_its_engines_upgraded(manager, tmp_path):
    old_tree = older_drove(tmp_path, "0.0.1")
    agent = start_agent(manager, "n2", tmp_path / "n2", "127.0.0.2",
                        env={"PYTHONPATH": str(old_tree)})
    try:
        wait_for(lambda: any(d["state"] == "ready" for n in manager.ok("GET", "/v1/nodes")
                             if n["name"] == "n2" for d in n["disks"]), "n2's disk")
        manager.cli("volume", "create", "n2v", "--size", "32M", "--replicas", "2")
        before = manager.cli_json("volume", "attach", "n2v", "--node", "n2")
        assert before["engine"]["version"] == "0.0.1"
        nbd_write = "h.pwrite(b'\\x6b' * 65536, 0)"
        assert nbdsh(before["nbd_uri"], nbd_write).returncode == 0
        # The agent stops (its engine serves on) and starts again from this drove.
        agent.terminate()
        agent.wait(30)
        assert pid_alive(before["engine"]["pid"])
        agent = start_agent(manager, "n2", tmp_path / "n2", "127.0.0.2")
        after = manager.wait_volume(
            "n2v", lambda v: (v["engine"] or {}).get("version") == drove.__version__,
            timeout=60, what="n2's engine upgraded to its agent's drove")
        assert after["engine"]["pid"] != before["engine"]["pid"]
        assert after["engine"]["epoch"] == before["engine"]["epoch"] + 1
        assert after["nbd_uri"] == before["nbd_uri"] and after["health"] == "healthy"
        nbdsh(after["nbd_uri"], "assert h.pread(65536, 0) == b'\\x6b' * 65536")
        upgraded = [e["message"] for e in manager.events("n2v")
                    if e["kind"] == "engine-upgraded"]
        assert len(upgraded) == 1 and f"its agent runs drove {drove.__version__}" in upgraded[0]
        manager.cli("volume", "detach", "n2v")
    finally:
        agent.terminate()
        agent.wait(30)
