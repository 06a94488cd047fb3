"""tools.tsv names every external command the code runs, with the package that provides it."""

from __future__ import annotations

import functools
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

import commandscan
import conftest
import toolstable

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("src", "tests", "bench")
BIN_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")


@functools.cache
def modules() -> list[commandscan.Module]:
    """Every Python file under src/, tests/ and bench/, parsed (once for all the tests)."""
    return commandscan.parse(sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py")), REPO)


def test_every_command_the_code_runs_is_in_the_table():
    tools = toolstable.load()
    uses = commandscan.scan(modules())
    missing = [str(u) for u in uses if u.command not in tools]
    assert not missing, (
        "commands run but not in tools.tsv (add 'command<TAB>Debian package<TAB>serve|test'):\n"
        + "\n".join(missing))
    # The scan does find the commands it must (a scan finding nothing would pass above).
    found = {u.command for u in uses}
    assert {"nbdfuse", "losetup", "nbdsh", "qemu-img", "fio", "radosgw", "socat"} <= found


def test_the_scan_reads_every_way_of_running_a_command(tmp_path):
    (tmp_path / "runner.py").write_text(textwrap.dedent("""
        import subprocess

        def run_tool(argv, timeout=5):
            return subprocess.run(argv, timeout=timeout)

        class Daemon:
            def _spawn(self, name, argv):
                return subprocess.Popen(argv)
    """))
    (tmp_path / "user.py").write_text(textwrap.dedent("""
        import asyncio
        import shutil
        import subprocess as sp
        import sys
        from runner import run_tool

        PREFIX = ["nbdkit", "-f"]
        CHECK_TOOLS = ("mkfs.xfs", "blkid")
        TOOL_PACKAGE = {"losetup": "mount"}

        def wrapper(cmd):
            return run_tool(cmd)

        async def main(d):
            sp.check_call(["alpha", "-x"])
            argv = ["beta", "--y"]
            sp.Popen(argv)
            sp.run([*PREFIX, "memory", "1G"])
            run_tool(["gamma"])
            wrapper(["delta"])
            d._spawn("mon", ["epsilon"])
            await asyncio.create_subprocess_exec("zeta", "-v")
            for tool in ("eta", "theta"):
                shutil.which(tool)
            sp.run([sys.executable, "-m", "drove"])
            shutil.which("venv-tool", path=str(sys.executable))
            sp.run("iota --now", shell=True)
            sp.run([f"mkfs.{d}"])
            not_a_runner(["kappa"])
    """))
    uses = commandscan.scan(commandscan.parse([tmp_path / "runner.py", tmp_path / "user.py"],
                                              tmp_path))
    assert {u.command for u in uses} == {
        "alpha", "beta", "nbdkit", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
        "iota", "mkfs.xfs", "blkid", "losetup"}
    assert "user.py:16: alpha" in {str(u) for u in uses}


def test_the_test_session_requires_every_command_of_the_table():
    assert set(conftest.REQUIRED_TOOLS) == set(toolstable.load())


def dpkg_owners(paths: list[str]) -> dict[str, set[str]]:
    """The packages dpkg says own each of ``paths`` (one dpkg-query for all)."""
    res = subprocess.run(["dpkg-query", "-S", *paths], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "LC_ALL": "C"})
    owners: dict[str, set[str]] = {}
    for line in res.stdout.splitlines():
        packages, sep, path = line.rpartition(": ")
        if sep and not packages.startswith("diversion"):
            owners[path] = {p.split(":")[0] for p in packages.split(", ")}
    return owners


def test_each_row_names_the_package_that_provides_its_command():
    tools = toolstable.load()
    candidates = {
        t.command: [t.command] if t.command.startswith("/")
        else [p for d in BIN_DIRS if os.path.lexists(p := f"{d}/{t.command}")]
        for t in tools.values()
    }
    installed = {cmd: paths for cmd, paths in candidates.items() if paths}
    # Every command is installed (conftest checks it), so every row is checked here.
    assert installed.keys() == tools.keys()
    owners = dpkg_owners([p for paths in installed.values() for p in paths])
    wrong = []
    for cmd, paths in installed.items():
        packages = set().union(*(owners.get(p, set()) for p in paths))
        if tools[cmd].package not in packages:
            wrong.append(f"tools.tsv:{tools[cmd].line}: {cmd} is from "
                         f"{', '.join(sorted(packages)) or 'no package'}, "
                         f"not {tools[cmd].package}")
    assert not wrong, "\n".join(wrong)


def test_package_hints_in_the_code_agree_with_the_table():
    tools = toolstable.load()
    stated = commandscan.tool_packages(modules())
    assert stated, "the scan finds no TOOL_PACKAGE table in the code"
    wrong = [f"{use}: says {package}, tools.tsv says {tools[use.command].package}"
             for use, package in stated
             if use.command in tools and tools[use.command].package != package]
    assert not wrong, "\n".join(wrong)


def dev_debs(*scopes: str) -> list[str]:
    """The Debian packages ./dev installs for ``scopes`` (as it prints them)."""
    res = subprocess.run([str(REPO / "dev"), "debs", *scopes], capture_output=True,
                         text=True, timeout=60, check=True)
    return res.stdout.split()


def test_dev_installs_what_the_table_says():
    tools = toolstable.load().values()
    serve = dev_debs("serve")
    everything = dev_debs()
    assert set(serve) == {t.package for t in tools if t.scope == "serve"}
    assert set(everything) == {t.package for t in tools}
    assert "python3-libnbd" in everything
    # Test-only packages stay out of `./dev serve` (qemu-utils is in: drove snapshot export
    # --format qcow2 runs qemu-img).
    assert not {"python3-libnbd", "radosgw", "socat"} & set(serve)


def test_a_malformed_row_is_refused_with_its_line(tmp_path):
    table = tmp_path / "tools.tsv"
    table.write_text("# comment\nfio\tfio\ttest\nqemu-img\tqemu-utils\tsometimes\n")
    with pytest.raises(toolstable.TableError, match=r"tools.tsv:3:"):
        toolstable.load(table)
    table.write_text("fio\tfio\ttest\nfio\tfio\tserve\n")
    with pytest.raises(toolstable.TableError, match=r"fio again"):
        toolstable.load(table)
