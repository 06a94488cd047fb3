"""`drove task ...`: long operations (backups, restores, verifies, backup deletes) on the manager.

Also home of :func:`wait` and :func:`check`, which the commands that start tasks
(`drove backup ...`) use to follow a task with a progress bar.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from drove.cli.client import Manager, ManagerError, local_time, show_table, with_manager
from drove.cli.output import JsonOpt, console, emit, err_console, fail
from drove.units import format_size

app = typer.Typer(help="Tasks: long operations (backup, restore, verify, backup delete) the "
                       "manager runs in the background.", no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(help="task id (task-...)", show_default=False)]

#: Seconds between polls of a task (tests set it to 0).
POLL_INTERVAL = 0.5
#: States a task never leaves; anything else counts as still running.
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: Task kinds whose progress counts bytes (shown with sizes and a transfer speed).
BYTE_KINDS = frozenset({"backup-create", "backup-restore", "backup-verify", "volume-scrub"})
STATE_STYLE = {"running": "cyan", "succeeded": "green", "failed": "bold red",
               "cancelled": "yellow"}


class State(StrEnum):
    """Task states."""

    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


def _path(task_id: str, rest: str = "") -> str:
    return f"/v1/tasks/{task_id}{rest}"


def describe(task: dict[str, Any]) -> str:
    """What the task does, in words: ``backup of db``, ``restore of backup-1 to db2``, ..."""
    kind, volume, backup = task.get("kind"), task.get("volume"), task.get("backup")
    if kind == "backup-create":
        return f"backup {backup} of {volume}" if backup else f"backup of {volume}"
    if kind == "backup-restore":
        return f"restore of {backup} to {volume}"
    if kind == "backup-verify":
        return f"verify of {backup}"
    if kind == "instant-restore":
        return f"fill of {volume} from {backup}"
    if kind == "backup-delete":
        return f"delete of {backup}"
    if kind == "node-drain" and task.get("node"):
        return f"drain of node {task['node']}"
    return f"{kind} {task.get('id')}"


def styled_state(state: str | None) -> str:
    """The state in its colour (escaped)."""
    text = escape(state or "")
    style = STATE_STYLE.get(state or "")
    return f"[{style}]{text}[/]" if style else text


def progress_text(task: dict[str, Any]) -> str:
    """``1.5 GiB/10 GiB (15%)`` for byte tasks, ``12/40 (30%)`` for others; "" if unknown."""
    p = task.get("progress") or {}
    done, total = p.get("done") or 0, p.get("total") or 0
    if not total and not done:
        return ""
    if task.get("kind") in BYTE_KINDS:
        text = f"{format_size(done)}/{format_size(total)}"
    else:
        text = f"{done}/{total}"
    return text + (f" ({100 * done / total:.0f}%)" if total else "")


def wait(mgr: Manager, task: dict[str, Any], *, quiet: bool = False,
         cancel_on_interrupt: bool = True, timeout: float | None = None) -> dict[str, Any]:
    """Poll ``task`` with a progress bar until it is no longer running; the final Task.

    The bar shows bytes done/total and the transfer speed (counts for tasks that
    do not move bytes) and the task's ``message`` when it has one; ``quiet``
    hides it (for --json). Ctrl-C cancels the task when ``cancel_on_interrupt``
    (the command started it), else only stops watching; either exits 130. Still
    running after ``timeout`` seconds: exit 1, the task goes on.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    task_id, what = task["id"], describe(task)
    if task.get("kind") in BYTE_KINDS:
        columns: list[Any] = [DownloadColumn(binary_units=True), TransferSpeedColumn()]
    else:
        columns = [MofNCompleteColumn()]
    progress = Progress(SpinnerColumn(), "{task.description}", BarColumn(), *columns,
                        TimeRemainingColumn(), TextColumn("[dim]{task.fields[message]}"),
                        console=err_console, transient=True,
                        disable=quiet or not err_console.is_terminal)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with progress:
            bar = progress.add_task(escape(what), total=None, message="")
            while task.get("state") not in FINAL_STATES:
                p = task.get("progress") or {}
                progress.update(bar, total=p.get("total") or None, completed=p.get("done") or 0,
                                message=escape(task.get("message") or ""))
                if deadline is not None and time.monotonic() >= deadline:
                    fail(f"task {task_id} ({escape(what)}) is still running after {timeout:g} s; "
                         f"`drove task wait {task_id}` watches again")
                time.sleep(POLL_INTERVAL)
                task = mgr.get(_path(task_id))
    except KeyboardInterrupt:
        if not cancel_on_interrupt:
            fail(f"stopped watching; task {task_id} ({escape(what)}) goes on: "
                 f"`drove task wait {task_id}` watches again, `drove task cancel {task_id}` "
                 "cancels it", code=130)
        _cancel_on_interrupt(mgr, task_id, what)
    return task


def _cancel_on_interrupt(mgr: Manager, task_id: str, what: str) -> None:
    try:
        task = mgr.post(_path(task_id, "/cancel"))
    except ManagerError as exc:
        fail(f"interrupted, and cancelling task {task_id} ({escape(what)}) failed: "
             f"{escape(str(exc))}; `drove task cancel {task_id}` tries again", code=130)
    state = (task or {}).get("state")
    if state in ("succeeded", "failed"):
        err_console.print(f"interrupted: task {task_id} ({escape(what)}) had already {state}",
                          style="yellow", highlight=False)
    else:
        err_console.print(f"interrupted: cancelled task {task_id} ({escape(what)})",
                          style="yellow", highlight=False)
    raise typer.Exit(130)


def check(task: dict[str, Any]) -> Any:
    """The result of a succeeded task; a failed one prints its error in red and exits 1,
    a cancelled one exits 1 saying so."""
    state, what = task.get("state"), describe(task)
    if state == "failed":
        fail(f"[red]{escape(what)} failed: {escape(task.get('error') or 'no reason given')}[/]")
    if state == "cancelled":
        fail(f"{escape(what)} was cancelled (task {task.get('id')})")
    return task.get("result")


@app.command("list")
@with_manager
def list_tasks(
    mgr: Manager,
    state: Annotated[State | None, typer.Option(
        show_default=False, help="only the tasks in this state")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List tasks, newest first: kind, state, progress, what they wait for or why they failed.

    Example: drove task list --state running
    """
    tasks = mgr.get("/v1/tasks", state=state.value if state else None)
    if emit(tasks, json_out):
        return
    if not tasks:
        console.print(f"no {state.value} tasks" if state else "no tasks", highlight=False)
        return
    rows = [[escape(t["id"]), escape(t.get("kind") or ""), styled_state(t.get("state")),
             escape(t.get("volume") or ""), escape(t.get("backup") or ""), progress_text(t),
             escape(t.get("error") or t.get("message") or ""), local_time(t.get("created"))]
            for t in tasks]
    show_table("tasks", ["id", "kind", "state", "volume", "backup", "progress>",
                         "message / error", "created"], rows)


@app.command()
@with_manager
def get(mgr: Manager, task_id: IdArg, json_out: JsonOpt = False) -> None:
    """Show task ID: what it does, its state and progress, its result or error.

    With --json prints the API's Task object (docs/api.md), e.g.

        drove task get task-1a2b --json | jq -r .state
    """
    task = mgr.get(_path(task_id))
    if emit(task, json_out):
        return
    show_task(task)


def show_task(task: dict[str, Any]) -> None:
    """The task's facts as a grid, its result as JSON."""
    console.print(f"[bold]{escape(task['id'])}[/]  {escape(describe(task))}  "
                  f"{styled_state(task.get('state'))}", highlight=False)
    facts = [("kind", task.get("kind") or "")]
    for key in ("volume", "backup", "message"):
        if task.get(key):
            facts.append((key, task[key]))
    if progress_text(task):
        facts.append(("progress", progress_text(task)))
    facts.append(("created", local_time(task.get("created"))))
    if task.get("finished"):
        facts.append(("finished", local_time(task["finished"])))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    for key, value in facts:
        grid.add_row(key, escape(str(value)))
    if task.get("error"):
        grid.add_row("error", f"[red]{escape(task['error'])}[/]")
    if task.get("result") is not None:
        grid.add_row("result", escape(json.dumps(task["result"], indent=2, sort_keys=True)))
    console.print(grid)


@app.command()
@with_manager
def cancel(mgr: Manager, task_id: IdArg, json_out: JsonOpt = False) -> None:
    """Cancel task ID (a restore that is cancelled deletes the volume it was making)."""
    task = mgr.post(_path(task_id, "/cancel"))
    if emit(task, json_out):
        return
    state, what = task.get("state"), escape(describe(task))
    if state == "cancelled":
        console.print(f"task {escape(task_id)} ({what}) cancelled", highlight=False)
    elif state in FINAL_STATES:
        console.print(f"task {escape(task_id)} ({what}) had already {state}", highlight=False)
    else:
        console.print(f"task {escape(task_id)} ({what}) is being cancelled: "
                      f"`drove task wait {escape(task_id)}` waits for it to stop",
                      highlight=False)


@app.command("wait")
@with_manager
def wait_command(
    mgr: Manager,
    task_id: IdArg,
    timeout: Annotated[float | None, typer.Option(
        help="give up after this many seconds (default: wait until done)",
        show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Follow task ID with a progress bar until it ends.

    Exits 1 with the error if it failed or was cancelled (Ctrl-C only stops
    watching). With --json prints the final Task object.

    Example: drove task wait task-1a2b && echo done
    """
    task = wait(mgr, mgr.get(_path(task_id)), quiet=json_out, cancel_on_interrupt=False,
                timeout=timeout)
    if json_out:
        emit(task, True)
        if task.get("state") != "succeeded":
            raise typer.Exit(1)
        return
    check(task)
    console.print(f"task {escape(task_id)} ({escape(describe(task))}) succeeded",
                  highlight=False)
