"""Snapshot exports as image files and snapshot diffs as tables, for `drove snapshot`.

A qcow2 file is written by ``qemu-img convert`` from the snapshot's NBD export on
this machine.  A delta (``--since FROM --backing FROM.qcow2``) is read from the
``@holes=backing`` flavour of the delta export: its unchanged extents are plain
holes, which ``qemu-img convert -B`` leaves to the backing file, and zero data in
changed extents becomes zero clusters that hide the backing file's data there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeElapsedColumn
from rich.table import Table

from drove.cli.output import console, fail
from drove.units import format_size

MAX_ROWS = 200
"""Most extents `drove snapshot diff` prints as a table (--json lists them all)."""

_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def diff_table(d: dict[str, Any], limit: int = MAX_ROWS) -> Table:
    """The extents of a diff (the API's answer) as a rich table with a total."""
    to = "the head" if d.get("head") else d["to"]
    title = f"{d['volume']}: changed from {d['since']} to {to}"
    if d.get("branch"):
        title += f" (a branch: through their common ancestor {d.get('ancestor')})"
    t = Table(title=escape(title), title_justify="left", show_footer=True)
    extents = d["extents"]
    t.add_column("offset", justify="right", footer="total")
    t.add_column("length", justify="right", footer=f"{d['bytes']:,}")
    t.add_column("size", justify="right",
                 footer=f"{format_size(d['bytes'])} in {len(extents):,} extents")
    for offset, length in extents[:limit]:
        t.add_row(f"{offset:,}", f"{length:,}", format_size(length))
    if len(extents) > limit:
        t.add_row("...", "", f"{len(extents) - limit:,} more (--json lists all)")
    return t


def image_format(path: Path) -> str:
    """The format qemu-img finds in ``path`` (fails with its message)."""
    r = _run_qemu_img(subprocess.run, ["qemu-img", "info", "--output=json", str(path)],
                      capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"--backing {path}: qemu-img cannot read it: {r.stderr.strip()}")
    return json.loads(r.stdout)["format"]


def _run_qemu_img(run: Any, cmd: list[str], **kwargs: Any) -> Any:
    """``run(cmd, **kwargs)``; a clear message where qemu-img is not installed."""
    try:
        return run(cmd, **kwargs)
    except FileNotFoundError:
        fail("qemu-img is not installed (Debian package qemu-utils, which ./dev serve installs)")


def write_qcow2(uri: str, output: Path, *, backing: Path | None = None,
                quiet: bool = False) -> None:
    """Write the export at ``uri`` to the qcow2 file ``output`` (over ``backing`` when
    given), with a progress bar; nothing is left behind when it fails."""
    cmd = ["qemu-img", "convert", "-p", "-f", "raw", "-O", "qcow2"]
    if backing is not None:
        # Stored relative to the output, as qemu-img resolves it: the pair can move together.
        rel = os.path.relpath(backing.resolve(), output.resolve().parent)
        cmd += ["-B", rel, "-F", image_format(backing)]
    cmd += [uri, str(output)]
    proc = _run_qemu_img(subprocess.Popen, cmd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        code, err = _follow(proc, output, quiet)
    except BaseException:  # Ctrl-C: no half-written file stays behind
        proc.kill()
        proc.wait()
        output.unlink(missing_ok=True)
        raise
    if code != 0:
        output.unlink(missing_ok=True)
        fail(f"qemu-img convert failed ({code}): {err}")


def _follow(proc: subprocess.Popen[bytes], output: Path, quiet: bool) -> tuple[int, str]:
    """Show qemu-img's progress until it exits; its exit code and error output."""
    assert proc.stdout is not None and proc.stderr is not None
    with Progress("{task.description}", BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), console=console, disable=quiet,
                  transient=True) as progress:
        task = progress.add_task(f"writing {escape(output.name)}", total=100)
        buf = b""
        # qemu-img -p rewrites "    (12.34/100%)" with carriage returns.
        while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
            buf = (buf + chunk)[-256:]
            found = _PERCENT.findall(buf)
            if found:
                progress.update(task, completed=float(found[-1]))
        err = proc.stderr.read().decode(errors="replace").strip()
        return proc.wait(), err
