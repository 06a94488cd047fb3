"""The node agent: starts and stops a node's replica and engine processes, attaches hosts.

Blocking calls (they wait for processes and run mount tools); the manager runs
them in worker threads.  On one machine the manager holds the agent in-process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from drove.agent import clones, orphans, processes
from drove.agent.orphans import option
from drove.agent.processes import EngineUpgradeError, Proc
from drove.engine.hostview import view_name

# sun_path holds 108 bytes; deep data dirs (pytest's tmp paths) would overflow it.
_MAX_SOCKET_DIR = 80

PYTHON_ENV = "DROVE_AGENT_PYTHON"
"""The Python interpreter an agent runs ``-m drove`` with for its engines and replicas
(default: its own): another environment's drove, e.g. a newer one to upgrade engines to."""

# Seconds an engine that handed over to its successor has to exit (it only closes its
# handles), before it is stopped: fenced by the new epoch, it can no longer write.
_HANDED_OVER_EXIT = 30.0


class NodeAgent:
    """One node's processes and host attachments, under ``data_dir``."""

    def __init__(self, data_dir: Path, name: str | None = None,
                 address: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.name = name or socket.gethostname()
        # Where this node's processes listen: other hosts reach its replicas there.
        self.address = address
        self.logs = data_dir / "logs"
        self.run_dir = self._socket_dir(data_dir / "run")
        self.python = os.environ.get(PYTHON_ENV) or sys.executable

    @staticmethod
    def _socket_dir(preferred: Path) -> Path:
        if len(str(preferred)) <= _MAX_SOCKET_DIR:
            preferred.mkdir(parents=True, exist_ok=True)
            return preferred
        tag = hashlib.sha256(str(preferred).encode()).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"drove-{os.getuid()}-{tag}"
        short.mkdir(mode=0o700, exist_ok=True)
        return short

    # ------------------------------------------------------------ processes

    def _drove(self, *args: str) -> list[str]:
        return [self.python, "-m", "drove", *args]

    def _any_port(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:0"

    @staticmethod
    def _env(key: str | None) -> dict[str, str] | None:
        """The environment handing a process its volume's NBD access key (not its argv,
        which ``ps`` shows every user)."""
        if key is None:
            return None
        from drove.replica.access import KEY_ENV

        return {**os.environ, KEY_ENV: key}

    def start_replica(self, volume: str, replica: dict[str, Any], size: int,
                      key: str | None = None) -> Proc:
        """Start the process serving ``replica`` (creating its directory on first start);
        ``key``: the volume's access key its NBD exports demand (drove.replica.access)."""
        path = Path(replica["path"])
        argv = self._drove("replica", "serve", str(path), "--nbd", self._any_port(),
                           "--control", self._any_port(), "--log-level", "warning")
        if not (path / "volume.meta").exists():
            argv += ["--size", str(size)]
        return processes.spawn(argv, self.run_dir / f"{replica['name']}.ready",
                               self.logs / f"{replica['name']}.log", env=self._env(key))

    @staticmethod
    def remove_replica_data(path: str) -> None:
        """Delete the directory of a replica that was replaced (only a replica's directory)."""
        p = Path(path)
        if p.parent.name != "replicas" or not p.is_absolute():
            raise ValueError(f"{path} is not a replica directory (DISK/replicas/NAME)")
        shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def clone_replica(src: str, dst: str, snapshot: str, base: dict[str, str],
                      within: dict[str, str] | None = None) -> dict[str, Any]:
        """Make replica directory ``dst`` a linked clone of ``snapshot`` in replica ``src``."""
        return clones.clone_replica(src, dst, snapshot, base, within)

    @staticmethod
    def replica_usage(path: str) -> dict[str, int]:
        """Bytes of a replica directory shared with others (hard links) and its own."""
        return clones.replica_usage(path)

    @staticmethod
    def replica_space(path: str) -> dict[str, Any]:
        """The space report of a replica directory no process serves (drove.agent.space)."""
        from drove.agent import space

        return space.replica_space(path)

    @staticmethod
    def trim_host(attachment: dict[str, Any]) -> dict[str, Any]:
        """fstrim the filesystem a host attachment mounted (drove.agent.space.trim_host)."""
        from drove.agent import space

        return space.trim_host(attachment)

    def engine_socket(self, volume: str) -> Path:
        """The unix socket the engine of ``volume`` serves NBD on."""
        return processes.engine_socket(self.run_dir, volume)

    def handoff_socket(self, volume: str) -> Path:
        """The unix socket the engine of ``volume`` listens on for its successor."""
        return processes.handoff_socket(self.run_dir, volume)

    def start_engine(self, volume: str, replicas: list[tuple[str, str]], *, timeout: float,
                     state_file: Path, epoch: int, local: tuple[str, str] | None = None,
                     size: int | None = None, key: str | None = None,
                     fence_all: bool = False, nbd_remote: bool = False,
                     data_key: bytes | None = None) -> Proc:
        """Start the engine of ``volume`` over ``replicas`` (name, control URL) with ``epoch``
        (and ``key``, the volume's NBD access key its replicas demand).

        ``data_key``: the volume is encrypted with it (drove.engine.crypt); it goes to
        the engine in a file only this user reads (0600), deleted once the engine is
        ready, never on its command line or in its environment.

        The epoch is the manager's, persisted before this call: the replicas
        refuse every older engine from the moment this one claims them.
        ``local`` (name, directory) is the replica the engine serves itself (data
        locality: no replica process for it); ``size`` creates it when its
        directory holds none yet.  ``fence_all``: the engine exits, claiming nothing,
        unless every replica answers (a forced takeover).  Its NBD export listens on
        loopback and a unix socket, for clients on this host (host attach among them),
        and on this node's address only with ``nbd_remote``: whoever reaches it reads
        and writes the volume.  Its control API listens on the node's address (the
        manager calls it) and demands ``key``.  It listens for a successor on
        :meth:`handoff_socket` (:meth:`upgrade_engine`).
        """
        # A crashed engine's sockets: this one binds them anew.
        self.engine_socket(volume).unlink(missing_ok=True)
        self.handoff_socket(volume).unlink(missing_ok=True)
        nbd = self._any_port() if nbd_remote else "127.0.0.1:0"
        argv = self._engine_argv(volume, replicas, nbd=nbd, timeout=timeout,
                                 state_file=state_file, epoch=epoch, local=local)
        if fence_all:  # a forced takeover: serve only once every replica is fenced
            argv.append("--fence-all")
        if local is not None and size is not None and not (
                Path(local[1]) / "volume.meta").exists():
            argv += ["--size", str(size)]
        return self._spawn_engine(volume, argv, self.run_dir / f"{volume}.engine.ready",
                                  key, data_key)

    def upgrade_engine(self, volume: str, old: Proc | dict[str, Any],
                       replicas: list[tuple[str, str]], *, timeout: float, state_file: Path,
                       epoch: int, local: tuple[str, str] | None = None,
                       key: str | None = None, data_key: bytes | None = None) -> Proc:
        """Replace ``old``, the running engine of ``volume``, by an engine of this agent's
        drove, live; the new engine's process.

        The new engine is started as :meth:`start_engine` starts one, over ``replicas``
        and ``local`` (those the old one serves) with the new ``epoch`` (the manager's,
        stored first), and takes over ``old`` through its handoff socket: ``old`` drains,
        hands it its NBD listening sockets and client connections, and exits.
        EngineUpgradeError when ``old`` cannot hand over (not running, or started
        without a handoff socket); ProcessStartError when the new engine failed or did
        not report ready (``old`` then serves on).
        """
        if isinstance(old, dict):
            try:
                old = Proc.from_json(old)
            except (KeyError, TypeError) as exc:
                raise ValueError(f"not a process record (pid, start_time, argv, log, ready): "
                                 f"{exc!r}") from exc
        handoff = option(old.argv, "--handoff")
        if handoff is None:
            raise EngineUpgradeError(f"the engine of volume {volume} (pid {old.pid}) was "
                                     "started without --handoff: it cannot hand over")
        if handoff != str(self.handoff_socket(volume)):
            # Only an engine of this agent's is taken over, through the socket it made.
            raise EngineUpgradeError(f"process {old.pid} listens for a successor on "
                                     f"{handoff}, not on this agent's handoff socket of "
                                     f"volume {volume}: not an engine it started")
        if not processes.alive(old):
            raise EngineUpgradeError(f"the engine of volume {volume} (pid {old.pid}) is not "
                                     "running")
        # Its NBD sockets are the old engine's: the same addresses whatever --nbd says.
        argv = self._engine_argv(volume, replicas, nbd=option(old.argv, "--nbd") or
                                 "127.0.0.1:0", timeout=timeout, state_file=state_file,
                                 epoch=epoch, local=local)
        argv += ["--takeover", handoff]
        # Its own ready file until it serves: the old engine's stays while it may resume.
        ready = self.run_dir / f"{volume}.engine.next.ready"
        proc = self._spawn_engine(volume, argv, ready, key, data_key)
        os.replace(ready, self.run_dir / f"{volume}.engine.ready")
        processes.wait_exit(old, _HANDED_OVER_EXIT)
        processes.stop(old, timeout=5)  # still there: it handed over, and is fenced
        return proc

    def find_engine(self, volume: str, epoch: int, wait: float = 15.0) -> Proc | None:
        """The engine of ``volume`` this agent runs that was started with ``epoch`` (one no
        record names yet: a live upgrade whose manager stopped before it recorded the new
        engine), once it reported ready (waiting up to ``wait`` s while it starts); None
        when there is none."""
        deadline = time.monotonic() + wait
        while True:
            found = [f.proc for f in orphans.find(self.run_dir, volume, {})
                     if option(f.proc.argv, "--epoch") == str(epoch)]
            for proc in found:
                # Its ready line went to its standard output, a file in the run directory.
                out = orphans.stdout_path(proc.pid)
                ready = processes.read_ready(Path(out)) if out else None
                if ready is not None and processes.alive(proc):
                    proc.ready = ready
                    proc.log = str(self.logs / f"{volume}.engine.log")
                    return proc
            if not found or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def _engine_argv(self, volume: str, replicas: list[tuple[str, str]], *, nbd: str,
                     timeout: float, state_file: Path, epoch: int,
                     local: tuple[str, str] | None) -> list[str]:
        """The command line of an engine of ``volume`` (see :meth:`start_engine`)."""
        state_file.parent.mkdir(parents=True, exist_ok=True)
        argv = self._drove("engine", "serve", volume, "--nbd", nbd,
                           "--nbd-unix", str(self.engine_socket(volume)),
                           "--control", self._any_port(),
                           "--timeout", str(timeout), "--state-file", str(state_file),
                           "--epoch", str(epoch), "--log-level", "warning",
                           "--handoff", str(self.handoff_socket(volume)))
        for name, url in replicas:
            argv += ["--replica", f"{name}={url}"]
        if local is not None:
            name, directory = local
            # Its exports and control API, keyed like a replica process's, on the node's
            # address: replicas on other hosts rebuild from it, the manager backs it up.
            argv += ["--local-replica", f"{name}={directory}",
                     "--local-nbd", self._any_port(), "--local-control", self._any_port()]
        return argv

    def _spawn_engine(self, volume: str, argv: list[str], ready: Path, key: str | None,
                      data_key: bytes | None) -> Proc:
        """Start engine ``argv`` (its data key in a 0600 file it reads while it starts)."""
        key_file = self.run_dir / f"{volume}.engine.key"
        if data_key is not None:
            from drove.engine.crypt import write_key_file

            write_key_file(key_file, data_key)
            argv = [*argv, "--key-file", str(key_file)]
        try:
            return processes.spawn(argv, ready, self.logs / f"{volume}.engine.log",
                                   timeout=120, env=self._env(key))
        finally:
            key_file.unlink(missing_ok=True)  # the engine read it before it was ready

    def stop(self, proc: Proc | dict[str, Any] | None, timeout: float = 30.0) -> None:
        """Stop a process cleanly (SIGTERM, then SIGKILL after ``timeout``)."""
        if isinstance(proc, dict):
            proc = Proc.from_json(proc)
        processes.stop(proc, timeout)

    @staticmethod
    def alive(proc: Proc | dict[str, Any] | None) -> bool:
        """True while the process runs."""
        if isinstance(proc, dict):
            proc = Proc.from_json(proc)
        return processes.alive(proc)

    def stop_unrecorded(self, volume: str, replicas: dict[str, str], keep: list[int],
                        reason: str, engines: bool = True) -> list[dict[str, Any]]:
        """Stop the engines of ``volume`` (with ``engines``) and the processes of its
        ``replicas`` (name -> directory) that this agent runs but whose pid is not in
        ``keep`` (those its manager's record names), engines first; [{kind, name, pid}]
        of those stopped (a process another agent or a person started is never one)."""
        return [f.to_json() for f in orphans.stop_unrecorded(self.run_dir, volume, replicas,
                                                               set(keep), reason, engines)]

    # ----------------------------------------------------------- host attach

    def host_workdir(self, volume: str) -> Path:
        """Where the host attachment of ``volume`` keeps its FUSE mount."""
        return self.run_dir / "attach" / volume

    def attach_host(self, volume: str, mount: str | None, fs: str) -> dict[str, Any]:
        """Give the host a block device for ``volume`` (and mount it); the attachment."""
        from drove.agent import hostattach

        sock = self.engine_socket(volume)
        # nbdfuse serves the engine's growable view: the device can grow while mounted.
        att = hostattach.attach(f"nbd+unix:///{volume}?socket={sock}", self.host_workdir(volume),
                                mount=Path(mount) if mount else None, fs=fs,
                                fuse_uri=f"nbd+unix:///{view_name(volume)}?socket={sock}")
        return att.to_json()

    @staticmethod
    def grow_host(attachment: dict[str, Any], size: int | None = None) -> dict[str, Any]:
        """Grow a host attachment's device to ``size`` (None: the volume's) and its mounted
        filesystem, online (:func:`drove.agent.hostattach.grow`); the attachment after."""
        from drove.agent import hostattach

        return hostattach.grow(hostattach.HostAttachment.from_json(attachment), size).to_json()

    def detach_host(self, volume: str, attachment: dict[str, Any] | None, *,
                    force: bool = False) -> None:
        """Unmount and release every device of ``volume``'s host attachment.

        With ``force``, an attachment that cannot be detached cleanly (its engine is
        gone, so nothing more can be flushed) is torn down anyway.
        """
        if not attachment and not self.host_workdir(volume).exists():
            return
        from drove.agent import hostattach

        if attachment:
            try:
                hostattach.detach(hostattach.HostAttachment.from_json(attachment))
            except hostattach.HostAttachError:
                if not force:
                    raise
        hostattach.cleanup_stale(self.host_workdir(volume))
