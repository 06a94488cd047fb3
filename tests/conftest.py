"""Fixtures shared by all tests."""

from __future__ import annotations

import fcntl
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import toolstable
from etcd import etcd_server  # noqa: F401  (fixture: a real single-member etcd)
from radosgw import radosgw  # noqa: F401  (session fixture: real S3 from Ceph radosgw)
from replicatools import ReplicaProc, kill_all, start_replica

# tools.tsv, the table ./dev installs from, names every command the tests and benches run.
TOOLS = toolstable.load()
REQUIRED_TOOLS = tuple(TOOLS)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fail loudly (never skip) when a command the tests rely on is missing."""
    missing = [f"{t} (Debian package {TOOLS[t].package})"
               for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(
            f"missing test tools: {', '.join(missing)}; run ./dev test, which installs them"
        )


# Test modules on network-namespace hosts (the `hosts` fixture): they share the bridge and
# the namespace names (tests/hosts.py serialises them by a lock), so one worker runs them all.
NETNS_MODULES = frozenset({
    "test_cluster_e2e.py", "test_engine_access.py", "test_hosts.py", "test_takeover.py",
    "test_takeover_partition.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test on netns hosts whose module NETNS_MODULES does not name."""
    stray = sorted({Path(item.path).name for item in items if "hosts" in item.fixturenames}
                   - NETNS_MODULES)
    if stray:
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(stray)} to NETNS_MODULES "
                                "(their tests use the netns hosts)")


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Units of work for ``pytest -n N`` (./dev test): a test module stays on one worker (its
    module fixtures start once), and every module of NETNS_MODULES on one worker."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        """xdist's loadfile, with the netns-host modules as one unit."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "netns-hosts" if Path(module).name in NETNS_MODULES else module

    return ModuleScheduling(config, log)


@pytest.fixture(autouse=True)
def _exclusive_under_xdist(request: pytest.FixtureRequest,
                           tmp_path_factory: pytest.TempPathFactory):
    """Under xdist a test marked ``exclusive`` (it measures rates or timings) runs alone:
    it takes a lock every other test holds shared while it runs."""
    if getattr(request.config, "workerinput", None) is None:
        yield
        return
    # The workers' base temp dirs are popen-gwN/ in the run's one pytest-N/ directory.
    lock = tmp_path_factory.getbasetemp().parent / "exclusive.lock"
    exclusive = request.node.get_closest_marker("exclusive") is not None
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


@pytest.fixture
def replicas(tmp_path: Path):
    """A factory starting replica processes in tmp_path; all are killed at teardown."""
    started: list[ReplicaProc] = []

    def start(name: str = "r1", size: str | int | None = "64M", *extra: str,
              **kwargs) -> ReplicaProc:
        proc = start_replica(tmp_path / name, size, *extra, **kwargs)
        started.append(proc)
        return proc

    yield start
    kill_all(started)


@pytest.fixture
def cluster(tmp_path: Path):
    """Replica processes and an engine over them (tests/enginetools.py); killed at teardown."""
    from enginetools import Cluster

    c = Cluster(tmp_path)
    yield c
    c.close()


@pytest.fixture
def manager(tmp_path: Path):
    """A running `drove serve` on tmp_path/data (tests/managertools.py); everything it
    started is killed and unmounted at teardown."""
    from managertools import ManagerProc

    m = ManagerProc(tmp_path / "data", tmp_path / "manager.log", root=tmp_path)
    m.start()
    yield m
    m.kill_everything()


@pytest.fixture
def hosts(tmp_path: Path):
    """Hosts made of network namespaces on a bridge (tests/hosts.py); all removed at teardown."""
    from hosts import Hosts

    with Hosts(tmp_path / "hosts") as h:
        yield h


@pytest.fixture(scope="module")
def moto():
    """One moto S3 server (a light stand-in for quick unit tests) for the module."""
    from backuptools import MotoS3

    server = MotoS3()
    yield server
    server.stop()
