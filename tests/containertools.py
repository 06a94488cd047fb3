"""Real container engines for tests: dockerd with a scratch data root, podman with its own
containers.conf, a busybox image made with `import`, and `drove plugin docker` between them
and a real manager (../shared/notes/containers.md has the facts these follow)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

APPLETS = ("sh", "cat", "ls", "dd", "sync", "df", "echo", "sleep", "test", "sha256sum",
           "mountpoint", "touch", "rm", "head")
IMAGE = "bb:latest"
PLUGIN_DIR = Path("/run/docker/plugins")  # where dockerd looks for plugin sockets


def busybox_tar(path: Path) -> Path:
    """A tar of a busybox rootfs (/bin/busybox and applet links) at ``path``."""
    root = path.with_suffix(".root")
    (root / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in APPLETS:
        link = root / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    (root / "tmp").mkdir(exist_ok=True)
    with tarfile.open(path, "w") as tar:
        tar.add(root, arcname=".")
    return path


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate()`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Dockerd:
    """A dockerd of the test's own: scratch data root, exec root, socket and pid file."""

    def __init__(self, root: Path) -> None:
        # The exec root holds containerd's sockets: keep it short (sun_path is 108 bytes).
        self.short = Path(tempfile.mkdtemp(prefix="dk", dir="/tmp"))
        self.data_root = root / "docker-data"
        self.log = root / "dockerd.log"
        self.sock = self.short / "docker.sock"
        self.pidfile = self.short / "docker.pid"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment pointing the docker client at this daemon."""
        return {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}

    def start(self, timeout: float = 60) -> Dockerd:
        """Start dockerd and wait until its API answers."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
                 "--storage-driver=vfs", "--data-root", str(self.data_root),
                 "--exec-root", str(self.short / "exec"), "-H", f"unix://{self.sock}",
                 "--pidfile", str(self.pidfile)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"dockerd exited: {self.log.read_text()[-3000:]}")
            return self.sock.exists() and self.docker("version", check=False).returncode == 0
        wait_for(up, timeout, "dockerd to serve", interval=0.2)
        return self

    def stop(self, timeout: float = 60) -> None:
        """Stop dockerd (SIGTERM: it stops its containers and containerd) and wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        # containerd and its shims go with dockerd; wait until its pid file is gone.
        wait_for(lambda: not self.pidfile.exists(), 30, "dockerd's pid file to go")

    def kill(self) -> None:
        """SIGKILL dockerd (a crash: containerd goes with it, the containers' shims stay)."""
        assert self.proc is not None
        containerd = self.short / "exec" / "containerd" / "containerd.pid"
        pid = int(containerd.read_text()) if containerd.exists() else None
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self.pidfile.unlink(missing_ok=True)  # left by the crash; the next start refuses it
        # containerd dies with it; until init reaps it, a new dockerd would wait for it.
        if pid is not None:
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, "containerd to go")

    def close(self) -> None:
        """Stop and remove everything (containers first, so their mounts go)."""
        with contextlib.suppress(Exception):
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False)
        self.stop()
        for pid in _pids_under(str(self.short)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # dockerd mounts its data root on itself and the containers' netns files.
        unmount_under(self.data_root, self.short)
        shutil.rmtree(self.short, ignore_errors=True)

    def docker(self, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the docker client against this daemon."""
        r = subprocess.run(["docker", *args], capture_output=True, text=True,
                           env=self.env, timeout=timeout)
        if check:
            assert r.returncode == 0, f"docker {' '.join(args)}: {r.returncode}\n{r.stderr}"
        return r

    def run(self, volume_spec: str, script: str, *extra: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """`docker run --rm` of the busybox image with ``-v volume_spec``, running ``script``."""
        return self.docker("run", "--rm", "--network=none", "-v", volume_spec, *extra, IMAGE,
                           "/bin/sh", "-c", script, check=check)


class Podman:
    """podman with a containers.conf of the test's own naming the plugin's socket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "containers.conf"
        self.storage = root / "storage.conf"
        self.run_root = Path(tempfile.mkdtemp(prefix="pm", dir="/tmp"))

    def configure(self, plugins: dict[str, Path]) -> None:
        """Write containers.conf (the volume plugins) and a scratch storage.conf."""
        lines = ["[containers]", "default_ulimits = []", "", "[engine]",
                 'runtime = "runc"', 'cgroup_manager = "cgroupfs"',
                 'events_logger = "file"', f'tmp_dir = "{self.run_root / "libpod"}"',
                 f'volume_path = "{self.root / "podman-volumes"}"', "",
                 "[engine.volume_plugins]"]
        lines += [f'{name} = "{sock}"' for name, sock in plugins.items()]
        self.conf.write_text("\n".join(lines) + "\n")
        self.storage.write_text(
            '[storage]\ndriver = "vfs"\n'
            f'graphroot = "{self.root / "podman-storage"}"\nrunroot = "{self.run_root}"\n')

    @property
    def env(self) -> dict[str, str]:
        """The environment pointing podman at this test's configuration."""
        return {**os.environ, "CONTAINERS_CONF": str(self.conf),
                "CONTAINERS_STORAGE_CONF": str(self.storage)}

    def podman(self, *args: str, check: bool = True,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run podman with this test's configuration."""
        r = subprocess.run(["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs", *args],
                           capture_output=True, text=True, env=self.env, timeout=timeout)
        if check:
            assert r.returncode == 0, f"podman {' '.join(args)}: {r.returncode}\n{r.stderr}"
        return r

    def close(self) -> None:
        """Remove every container and what podman left under its roots."""
        with contextlib.suppress(Exception):
            self.podman("rm", "-af", "-t", "0", check=False)
        unmount_under(self.run_root, self.root / "podman-storage")
        shutil.rmtree(self.run_root, ignore_errors=True)


class PluginProc:
    """`drove plugin docker` for one manager, under a driver name of its own."""

    def __init__(self, manager, root: Path, name: str | None = None) -> None:
        self.manager = manager
        self.name = name or f"drove-{secrets.token_hex(4)}"  # tests share /run/docker/plugins
        self.sock = PLUGIN_DIR / f"{self.name}.sock"
        self.state_dir = root / f"plugin-{self.name}"
        self.log = root / f"plugin-{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> PluginProc:
        """Start the plugin and wait for its ready line."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "drove", "plugin", "docker", "--socket", str(self.sock),
                 "--data-dir", str(self.manager.data_dir), "--state-dir", str(self.state_dir),
                 "--default-size", "64M"],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the ready line, or EOF when it failed
        if not line:
            self.proc.wait(timeout)
            raise AssertionError(f"the plugin exited: {self.log.read_text()[-3000:]}")
        assert json.loads(line)["ready"], line
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the plugin (SIGKILL: a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def state(self) -> dict:
        """The plugin's mount state file."""
        path = self.state_dir / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"volumes": {}}

    def mountpoint(self, volume: str) -> str:
        """Where the plugin mounts ``volume``."""
        return str(self.state_dir / "mounts" / volume)


def unmount_under(*roots: Path) -> None:
    """Lazily unmount every mount at or below ``roots``, deepest first."""
    prefixes = [os.path.realpath(r) for r in roots]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _pids_under(path: str) -> list[int]:
    """Processes whose command line names ``path``."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if path.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
    return out
