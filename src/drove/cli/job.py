"""`drove job ...`: recurring snapshots and backups on a cron schedule (via the manager)."""

from __future__ import annotations

from contextlib import nullcontext
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from drove.cli.client import Manager, labels_text, local_time, show_table, with_manager
from drove.cli.output import JsonOpt, console, emit, err_console, fail, parse_labels

app = typer.Typer(help="Jobs: snapshots, backups, scrubs or trims of volumes on a cron "
                       "schedule, keeping the newest N snapshots or backups.",
                  no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="job name", show_default=False)]


class Kind(StrEnum):
    """What a job makes."""

    snapshot = "snapshot"
    backup = "backup"
    scrub = "scrub"
    trim = "trim"  # fstrim a volume drove mounted; retain is not used


def _path(name: str, rest: str = "") -> str:
    return f"/v1/jobs/{name}{rest}"


def targets_text(job: dict[str, Any]) -> str:
    """The volumes a job runs on: ``db, web + tier=gold`` (named volumes, then the selector)."""
    parts = [", ".join(job.get("volumes") or []), labels_text(job.get("selector"))]
    return " + ".join(p for p in parts if p)


def last_run_text(job: dict[str, Any]) -> str:
    """When the job last ran and how it went (markup)."""
    result = job.get("last_result")
    when = local_time(job.get("last_run") or (result or {}).get("time"))
    if not result:
        return when or "never"
    if result.get("ok"):
        return f"{when} [green]ok[/]"
    return f"{when} [red]failed: {escape(result.get('message') or '')}[/]"


def next_run_text(job: dict[str, Any]) -> str:
    """When the job runs next, or that it is disabled (markup)."""
    if not job.get("enabled", True):
        return "[yellow]disabled[/]"
    return local_time(job.get("next_run"))


@app.command()
@with_manager
def create(
    mgr: Manager,
    kind: Annotated[Kind, typer.Option(
        show_default=False, help="what the job makes of each volume")],
    cron: Annotated[str, typer.Option(
        show_default=False, help='when it runs, a cron expression in UTC, e.g. "0 * * * *" '
                                 '(hourly) or "30 2 * * *" (daily at 02:30)')],
    retain: Annotated[int, typer.Option(
        min=1, show_default=False,
        help="keep the newest N snapshots/backups the job made, per volume; older ones "
             "are deleted after each run")],
    name: Annotated[str | None, typer.Option(
        show_default=False, help="job name (default: the manager picks one)")] = None,
    volume: Annotated[list[str] | None, typer.Option(
        "--volume", show_default=False, help="run on this volume, repeatable")] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label", show_default=False,
        help="run on every volume with label KEY=VALUE (now or later), repeatable: "
             "a volume needs them all")] = None,
    snapshot_label: Annotated[list[str] | None, typer.Option(
        "--snapshot-label", show_default=False,
        help="KEY=VALUE put on the snapshots/backups the job makes (besides drove.job=NAME), "
             "repeatable")] = None,
    disabled: Annotated[bool, typer.Option(
        "--disabled", help="create it without scheduling it (`drove job run` still runs it)")]
        = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a job that snapshots or backs up volumes on a schedule.

    It runs on the volumes named with --volume and on every volume whose
    labels include all the --label ones; give at least one of the two.

    Examples:

        drove job create --name hourly --kind snapshot --cron "0 * * * *" \\
            --retain 24 --volume db

        drove job create --kind backup --cron "30 2 * * *" \\
            --retain 7 --label tier=gold
    """
    if not volume and not label:
        fail("say which volumes the job runs on: --volume NAME (repeatable) and/or "
             "--label KEY=VALUE (every volume with that label)")
    body: dict[str, Any] = {"name": name, "kind": kind.value, "cron": cron, "retain": retain,
                            "volumes": volume or [], "selector": parse_labels(label),
                            "labels": parse_labels(snapshot_label), "enabled": not disabled}
    job = mgr.post("/v1/jobs", body)
    if emit(job, json_out):
        return
    console.print(f"job [bold]{escape(job['name'])}[/] created: {escape(job.get('kind') or '')} "
                  f"of {escape(targets_text(job))} at \"{escape(job.get('cron') or '')}\", "
                  f"keeping {job.get('retain')}; next run: {next_run_text(job)}",
                  highlight=False)


@app.command("list")
@with_manager
def list_jobs(mgr: Manager, json_out: JsonOpt = False) -> None:
    """List jobs: what they make, when, of which volumes, and how the last run went."""
    jobs = mgr.get("/v1/jobs")
    if emit(jobs, json_out):
        return
    if not jobs:
        console.print('no jobs: e.g. `drove job create --kind snapshot --cron "0 * * * *" '
                      '--retain 24 --volume db`', highlight=False)
        return
    rows = [[escape(j["name"]), escape(j.get("kind") or ""), escape(j.get("cron") or ""),
             j.get("retain"), escape(targets_text(j)), last_run_text(j), next_run_text(j)]
            for j in jobs]
    show_table("jobs", ["name", "kind", "cron", "retain>", "targets", "last run", "next run"],
               rows)


@app.command()
@with_manager
def get(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Show job NAME: schedule, volumes, labels, last and next run."""
    job = mgr.get(_path(name))
    if emit(job, json_out):
        return
    show_job(job)


def show_job(job: dict[str, Any]) -> None:
    """The job's facts as a grid."""
    console.print(f"[bold]{escape(job['name'])}[/]  {escape(job.get('kind') or '')}  "
                  f"\"{escape(job.get('cron') or '')}\"", highlight=False)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    grid.add_row("retain", f"{job.get('retain')} per volume")
    if job.get("volumes"):
        grid.add_row("volumes", escape(", ".join(job["volumes"])))
    if job.get("selector"):
        grid.add_row("selector", escape(labels_text(job["selector"])))
    if job.get("labels"):
        grid.add_row("labels", escape(labels_text(job["labels"])))
    grid.add_row("created", local_time(job.get("created")))
    grid.add_row("last run", last_run_text(job))
    grid.add_row("next run", next_run_text(job))
    console.print(grid)


@app.command()
@with_manager
def delete(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Delete job NAME (what it already made stays)."""
    res = mgr.delete(_path(name))
    if not emit(res, json_out):
        console.print(f"job {escape(name)} deleted", highlight=False)


@app.command()
@with_manager
def run(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Run job NAME once now and show how it went (exit 1 if it failed).

    With --json prints the Job object (its last_result is this run's).
    """
    with nullcontext() if json_out else err_console.status(f"running job {escape(name)}…"):
        job = mgr.post(_path(name, "/run"))
    result = job.get("last_result") or {}
    ok = result.get("ok", True)
    if emit(job, json_out):
        if not ok:
            raise typer.Exit(1)
        return
    message = escape(result.get("message") or "")
    if not ok:
        fail(f"[red]job {escape(name)} failed: {message}[/]")
    console.print(f"job {escape(name)} ran" + (f": {message}" if message else ""),
                  highlight=False)
