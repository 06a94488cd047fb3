"""Live engine upgrade, the parts that need no running engine: the successor's command line,
the handoff socket's path, versions, and the refusals that change nothing."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from drove.agent import processes
from drove.agent.node import PYTHON_ENV, NodeAgent
from drove.agent.orphans import option
from drove.agent.processes import EngineUpgradeError, Proc
from drove.manager.agents import Agents
from drove.manager.datakeys import DataKeys
from drove.manager.engines import Engines, launch_epoch
from drove.manager.errors import ApiError
from drove.manager.records import Records
from drove.manager.settings import Settings
from drove.manager.store import SqliteStore
from drove.manager.upgrade import EngineUpgrades, older, version_key


class NoTasks:
    """A volume guard with no task holding any volume."""

    def busy(self, volume: str) -> str | None:
        """Nothing holds it."""
        return None

    def restore_task(self, volume: str) -> str | None:
        """No restore."""
        return None


class Events(list):
    """The events recorded, as (kind, message, volume)."""

    def __call__(self, kind: str, message: str, volume: str | None = None,
                 level: str = "info") -> None:
        self.append((kind, message, volume))


def test_versions_compare_by_release_numbers() -> None:
    assert version_key("0.10.1") > version_key("0.9.7") > version_key("0.9")
    assert older("0.0.1", "0.1.0") and not older("0.1.0", "0.1.0")
    assert older(None, "0.1.0")  # an engine from before versions were reported
    assert not older("0.1.0", None)  # an agent that did not say: nothing to do


def test_every_engine_listens_for_a_successor_next_to_its_socket(tmp_path: Path) -> None:
    data = tmp_path / ("d" * max(1, 70 - len(str(tmp_path))))
    agent = NodeAgent(data)
    assert agent.handoff_socket("v") == agent.run_dir / "v.handoff.sock"
    long = "x" * 63  # the longest name drove accepts: hashed, and still a unix address
    path = agent.handoff_socket(long)
    assert len(os.fsencode(path)) <= processes.SOCKET_PATH_MAX
    assert path.parent == agent.run_dir and path != agent.engine_socket(long)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    argv = agent._engine_argv("v", [("r1", "http://h:1")], nbd="127.0.0.1:0", timeout=8.0,
                              state_file=tmp_path / "engine.state", epoch=4,
                              local=("r0", str(tmp_path / "r0")))
    assert option(argv, "--handoff") == str(agent.handoff_socket("v"))
    assert option(argv, "--epoch") == "4" and option(argv, "--replica") == "r1=http://h:1"


def test_the_agents_python_runs_its_engines(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PYTHON_ENV, "/opt/other/bin/python3")
    agent = NodeAgent(tmp_path)
    argv = agent._engine_argv("v", [], nbd="127.0.0.1:0", timeout=8.0,
                              state_file=tmp_path / "s", epoch=1, local=None)
    # The shape the agents' /proc scans know engines by (drove.agent.orphans).
    assert argv[:5] == ["/opt/other/bin/python3", "-m", "drove", "engine", "serve"]


def test_an_engine_without_a_handoff_socket_is_refused(tmp_path: Path) -> None:
    agent = NodeAgent(tmp_path)
    old = Proc(os.getpid(), processes.start_time(os.getpid()) or 0,
               ["python", "-m", "drove", "engine", "serve", "v", "--epoch", "3"], "")
    with pytest.raises(EngineUpgradeError, match="without --handoff"):
        agent.upgrade_engine("v", old, [], timeout=8.0, state_file=tmp_path / "s", epoch=4)
    elsewhere = Proc(old.pid, old.start_time, [*old.argv, "--handoff", "/tmp/x.sock"], "")
    with pytest.raises(EngineUpgradeError, match="not on this agent's handoff socket"):
        agent.upgrade_engine("v", elsewhere, [], timeout=8.0, state_file=tmp_path / "s",
                             epoch=4)
    mine = [*old.argv, "--handoff", str(agent.handoff_socket("v"))]
    gone = Proc(old.pid, old.start_time + 1, mine, "")
    with pytest.raises(EngineUpgradeError, match="not running"):
        agent.upgrade_engine("v", gone, [], timeout=8.0, state_file=tmp_path / "s", epoch=4)
    with pytest.raises(ValueError, match="not a process record"):
        agent.upgrade_engine("v", {"pid": 1}, [], timeout=8.0, state_file=tmp_path / "s",
                             epoch=4)
    assert not (agent.run_dir / "v.engine.next.ready").exists()  # nothing was started


def test_launch_epoch_is_the_first_epoch_on_the_command_line() -> None:
    assert launch_epoch({"argv": ["x", "--epoch", "7", "--handoff", "/s"]}) == 7
    assert launch_epoch({"argv": ["x"]}) is None and launch_epoch(None) is None


def _parts(tmp_path: Path) -> tuple[EngineUpgrades, Records, Settings, Events]:
    store = SqliteStore(tmp_path / "state.db")
    events = Events()
    settings = Settings(store, events)
    records = Records(store, settings, "n1", tmp_path)
    agent = NodeAgent(tmp_path / "agent", name="n1")
    (tmp_path / "token").write_text("t")
    upgrades = EngineUpgrades(records=records, engines=Engines(),
                              agents=Agents(store, agent, tmp_path / "token"),
                              settings=settings, keys=DataKeys(), guard=NoTasks(),
                              event=events)
    return upgrades, records, settings, events


def _volume(name: str, state: str, engine: dict[str, Any] | None) -> dict[str, Any]:
    return {"name": name, "size": 1 << 26, "replica_count": 1, "pool": None, "labels": {},
            "created": "now", "desired": state, "state": state, "mount": None,
            "engine": engine, "host": None, "replicas": [], "next_replica": 0,
            "initialized": True, "epoch": 3, "node": "n1" if engine else None}


def test_refusals_change_nothing(tmp_path: Path) -> None:
    upgrades, records, _, events = _parts(tmp_path)
    records.add(_volume("d", "detached", None))
    # An engine from before live upgrades: no --handoff on its command line.
    engine = {"pid": 1, "start_time": 1, "log": "", "ready": {"version": "0.0.1"},
              "argv": ["python", "-m", "drove", "engine", "serve", "a", "--epoch", "3"]}
    records.add(_volume("a", "attached", engine))
    before = {n: records.get(n) for n in ("d", "a")}
    with pytest.raises(ApiError) as refused:
        asyncio.run(upgrades.upgrade("d"))
    assert refused.value.status == 409 and "is detached" in str(refused.value)
    with pytest.raises(ApiError) as refused:
        asyncio.run(upgrades.upgrade("a"))
    assert refused.value.status == 409 and "detach and attach" in str(refused.value)
    with pytest.raises(ApiError) as refused:
        asyncio.run(upgrades.upgrade("nothing"))
    assert refused.value.status == 404
    assert {n: records.get(n) for n in ("d", "a")} == before
    assert events == []


def test_automatic_upgrades_follow_the_setting(tmp_path: Path) -> None:
    upgrades, records, settings, events = _parts(tmp_path)
    engine = {"pid": 1, "start_time": 1, "log": "", "ready": {"version": "0.0.1"},
              "argv": ["python", "-m", "drove", "engine", "serve", "a", "--epoch", "3"]}
    records.add(_volume("a", "attached", engine))
    settings.update({"engine_auto_upgrade": False})
    assert asyncio.run(upgrades.auto_pass()) == [] and events[-1][0] == "settings-changed"
    settings.update({"engine_auto_upgrade": True})
    # Older than its agent, but it cannot hand over: said once, not tried.
    assert asyncio.run(upgrades.auto_pass()) == []
    assert [e[0] for e in events].count("engine-upgrade-needed") == 1
    assert asyncio.run(upgrades.auto_pass()) == []
    assert [e[0] for e in events].count("engine-upgrade-needed") == 1
    assert records.get("a")["epoch"] == 3
    with pytest.raises(ApiError, match="true or false"):
        settings.update({"engine_auto_upgrade": "maybe"})
