"""Replica and engine processes started as the agent starts them load no CLI library.

`python -m drove replica serve` / `engine serve` parse with argparse (drove.launch):
typer, click and rich would otherwise stay resident in every serving process.
PYTHONPROFILEIMPORTTIME makes each process log every import it does to its stderr,
which the test tools keep in the process's log file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from enginetools import start_engine
from replicatools import ReplicaProc, kill_all, nbdinfo_json, start_replica

CLI_LIBRARIES = {"typer", "click", "rich"}


def imported(log: Path) -> set[str]:
    """Top-level packages a process's import-time log shows it imported."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in log.read_text().splitlines() if line.startswith("import time:")}


def test_serving_processes_load_no_cli_library(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica and an engine (given --epoch) serve a volume without typer, click, rich."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    procs: list[ReplicaProc] = []
    try:
        replica = start_replica(tmp_path / "r1", "4M")
        procs.append(replica)
        engine = start_engine(tmp_path / "e", "vol", [replica], "--epoch", "3")
        procs.append(engine)
        assert nbdinfo_json(engine.uri())["exports"][0]["export-size"] == 4 << 20
        for proc in procs:
            mods = imported(proc.log)
            assert {"drove", "asyncio"} <= mods, f"no import log in {proc.log}"
            assert not mods & CLI_LIBRARIES, f"{proc.log}: {sorted(mods & CLI_LIBRARIES)}"
    finally:
        kill_all(procs)
