"""`drove volume ...`: create, attach, resize, re-replicate and delete volumes (via the manager)."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from drove.cli import space
from drove.cli.client import Manager, labels_text, local_time, show_table, with_manager
from drove.cli.output import (
    JsonOpt,
    PoolOpt,
    ReplicasOpt,
    console,
    emit,
    err_console,
    fail,
    parse_labels,
)
from drove.cli.qos import (
    BandwidthLimitOpt,
    BurstOpt,
    IopsLimitOpt,
    ReadBandwidthLimitOpt,
    ReadIopsLimitOpt,
    WriteBandwidthLimitOpt,
    WriteIopsLimitOpt,
    qos_body,
    qos_text,
)
from drove.units import format_size, parse_size

app = typer.Typer(help="Volumes: create, attach, resize, change replicas, delete.",
                  no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="volume name", show_default=False)]
LabelOpt = Annotated[list[str] | None, typer.Option(
    "--label", "-l", help="KEY=VALUE, repeatable", show_default=False)]
TimeoutOpt = Annotated[float | None, typer.Option(
    help="give up after this many seconds (default: wait until done)", show_default=False)]

HEALTH_STYLE = {"healthy": "green", "degraded": "yellow", "faulted": "bold red"}
MODE_STYLE = {"RW": "green", "WO": "yellow", "ERR": "red"}


class Fs(StrEnum):
    """Filesystems the manager can make on attach."""

    ext4 = "ext4"
    xfs = "xfs"


class Locality(StrEnum):
    """Data locality: where a volume's data lives relative to its attach node."""

    disabled = "disabled"
    best_effort = "best-effort"
    strict_local = "strict-local"


LocalityOpt = Annotated[Locality | None, typer.Option(
    "--data-locality", show_default=False,
    help="disabled (every replica its own process), best-effort (one replica on the attach "
         "node, served by the engine itself) or strict-local (exactly one replica, there); "
         "default: the setting default_data_locality (best-effort)")]


def styled(value: str | None, styles: dict[str, str]) -> str:
    """``value`` in its colour (escaped)."""
    text = escape(value or "")
    style = styles.get(value or "")
    return f"[{style}]{text}[/]" if style else text


def _path(name: str) -> str:
    return f"/v1/volumes/{name}"


def _where(v: dict[str, Any]) -> str:
    return v.get("mountpoint") or v.get("device") or v.get("nbd_uri") or ""


def _rebuild_percent(rebuild: dict[str, Any] | None) -> str:
    if not rebuild:
        return ""
    total = rebuild.get("total") or 0
    return f"{100 * rebuild.get('done', 0) / total:.0f}%" if total else "0%"


@app.command()
@with_manager
def create(
    mgr: Manager,
    name: NameArg,
    size: Annotated[int | None, typer.Option(parser=parse_size, show_default=False,
                                             help="size, e.g. 10G, 512M, or bytes")] = None,
    replicas: ReplicasOpt = None,
    pool: PoolOpt = None,
    label: LabelOpt = None,
    data_locality: LocalityOpt = None,
    standby_of: Annotated[str | None, typer.Option(
        "--standby-of", show_default=False,
        help="a DR standby: follow the backups of this volume on the backup target "
             "(restoring each new one; no --size: it is the backups')")] = None,
    iops_limit: IopsLimitOpt = None,
    bandwidth_limit: BandwidthLimitOpt = None,
    read_iops_limit: ReadIopsLimitOpt = None,
    write_iops_limit: WriteIopsLimitOpt = None,
    read_bandwidth_limit: ReadBandwidthLimitOpt = None,
    write_bandwidth_limit: WriteBandwidthLimitOpt = None,
    burst: BurstOpt = None,
    encrypted: Annotated[bool, typer.Option(
        "--encrypted", help="encrypt every sector in the engine (AES-XTS-256) with a new "
                            "data key wrapped by the manager's key-encryption key "
                            "(`drove serve --kek-file`)")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create volume NAME and place its replicas (nothing runs until it is attached).

    Examples:

        drove volume create db --size 10G

        drove volume create logs --size 2G --replicas 2 --pool ssd --label app=pg

        drove volume create cache --size 1G --data-locality strict-local

        drove volume create db-dr --standby-of db   (then `drove volume activate db-dr`)

        drove volume create web --size 5G --iops-limit 500 --bandwidth-limit 100M

        drove volume create secret --size 1G --encrypted
    """
    if standby_of is not None and size is not None:
        fail("a standby is the size of its source's backups: give --size or --standby-of, "
             "not both")
    if standby_of is None and size is None:
        fail("--size is required (or --standby-of VOLUME for a DR standby)")
    body: dict[str, Any] = {"name": name, "labels": parse_labels(label)}
    if size is not None:
        body["size"] = size
    if standby_of is not None:
        body["standby_of"] = standby_of
    if replicas is not None:
        body["replicas"] = replicas
    if pool is not None:
        body["pool"] = pool
    if data_locality is not None:
        body["data_locality"] = data_locality.value
    if encrypted:
        body["encrypted"] = True
    if qos := qos_body(iops_limit, bandwidth_limit, read_iops_limit, write_iops_limit,
                    read_bandwidth_limit, write_bandwidth_limit, burst):
        body["qos"] = qos
    v = mgr.post("/v1/volumes", body)
    if emit(v, json_out):
        return
    disks = ", ".join(r["disk"] for r in v.get("replicas", []))
    console.print(f"volume [bold]{escape(v['name'])}[/] created: {format_size(v['size'])}, "
                  f"{v['replica_count']} replica(s) on {escape(disks) or '(none yet)'}, "
                  f"data locality {escape(v.get('data_locality') or '?')}",
                  highlight=False)
    if v.get("standby"):
        console.print(f"a DR standby of volume {escape(v['standby']['of'])}: it restores its "
                      f"backups as they appear; `drove volume activate {v['name']}` makes it "
                      "an ordinary volume", style="dim", highlight=False)
        return
    console.print(f"attach it with `drove volume attach {v['name']}` "
                  "(add --mount PATH for a filesystem)", style="dim", highlight=False)


@app.command()
@with_manager
def activate(
    mgr: Manager,
    name: NameArg,
    force: Annotated[bool, typer.Option(
        "--force", help="when the newest backup cannot be restored, activate on the last "
                        "one restored completely")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Make DR standby NAME an ordinary volume: it restores the newest backup of the volume
    it follows (checking the target once more), then may be attached.

    Example:

        drove volume activate db-dr && drove volume attach db-dr --mount /mnt/db
    """
    v = mgr.post(f"{_path(name)}/activate", {"force": force})
    if emit(v, json_out):
        return
    console.print(f"volume [bold]{escape(v['name'])}[/] activated on backup "
                  f"{escape((v.get('labels') or {}).get('drove.restored-from') or '?')}; "
                  f"attach it with `drove volume attach {v['name']}`", highlight=False)


@app.command("list")
@with_manager
def list_volumes(mgr: Manager, json_out: JsonOpt = False) -> None:
    """List volumes with size, state, health and where they are attached."""
    volumes = mgr.get("/v1/volumes")
    if emit(volumes, json_out):
        return
    if not volumes:
        console.print("no volumes: create one with `drove volume create NAME --size 10G`",
                      highlight=False)
        return
    rows = [[escape(v["name"]), format_size(v["size"]), v["replica_count"],
             escape(v.get("data_locality") or ""), escape(v.get("pool") or ""),
             v["state"] + (f" (standby of {escape(v['standby']['of'])})"
                           if v.get("standby") else ""),
             styled(v["health"], HEALTH_STYLE), escape(_where(v)),
             escape(_clone_of(v)), escape(labels_text(v.get("labels")))] for v in volumes]
    show_table("volumes", ["name", "size>", "replicas>", "locality", "pool", "state",
                           "health", "attached at", "clone of", "labels"], rows)


def _clone_of(v: dict[str, Any]) -> str:
    """VOLUME@SNAPSHOT a linked clone shares its base with, else ''."""
    c = v.get("clone_of")
    return f"{c['volume']}@{c['snapshot']}" if c else ""


@app.command()
@with_manager
def get(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Show volume NAME: state, health, where it is attached, its replicas, and its space:
    the actual size on each replica's disk, the data the head and each snapshot hold and
    what deleting each snapshot would free (and why).

    With --json, prints the API's Volume object (docs/api.md), e.g.

        drove volume get db --json | jq -r .health
    """
    v = mgr.get(_path(name), space=True)
    if emit(v, json_out):
        return
    show_volume(v)
    space.show_space(v.get("space"))


def standby_facts(sb: dict[str, Any] | None) -> list[tuple[str, str]]:
    """What `volume get` shows of a DR standby (nothing for an ordinary volume)."""
    if not sb:
        return []
    restored = (f"{sb['backup']} (created {local_time(sb.get('backup_created'))}, restored "
                f"{local_time(sb.get('restored_at'))})" if sb.get("backup") else "none yet")
    lag = sb.get("lag_seconds")
    facts = [("standby of", f"{sb.get('of')} (activate with `drove volume activate`)"),
             ("restored backup", restored),
             ("lag", "" if lag is None else f"{lag:.0f} s" + (
                 f", newer backup {sb.get('newest_backup')} pending" if sb.get("behind")
                 else ""))]
    last = sb.get("last_restore") or {}
    if last:
        facts.append(("last restore", f"{last.get('blocks_written')} block(s) written "
                                      f"({format_size(last.get('bytes_written') or 0)}), "
                                      f"{last.get('blocks_zeroed')} zeroed"
                                      + (", in full" if last.get("full") else "")))
    if sb.get("error"):
        facts.append(("error", sb["error"]))
    return facts


def show_volume(v: dict[str, Any]) -> None:
    """A summary of the volume and a table of its replicas."""
    console.print(f"[bold]{escape(v['name'])}[/]  {format_size(v['size'])}  {v['state']}  "
                  f"{styled(v['health'], HEALTH_STYLE)}", highlight=False)
    facts: list[tuple[str, str]] = [("replica count", str(v["replica_count"])),
                                    ("data locality", v.get("data_locality") or "")]
    if v.get("pool"):
        facts.append(("pool", v["pool"]))
    if v.get("labels"):
        facts.append(("labels", labels_text(v["labels"])))
    if qos_text(v.get("qos")):
        facts.append(("QoS limits", qos_text(v.get("qos"))))
    facts.append(("created", local_time(v.get("created"))))
    facts += standby_facts(v.get("standby"))
    clone = v.get("clone") or {}
    if clone.get("parent"):
        p = clone["parent"]
        shared, owned = clone.get("shared_bytes"), clone.get("owned_bytes")
        facts.append(("clone of", f"{p['volume']}@{p['snapshot']}" + (
            f" (a replica shares {format_size(shared)}, owns {format_size(owned)})"
            if shared is not None else "")))
    if clone.get("dependants"):
        facts.append(("clones", ", ".join(clone["dependants"])))
    for key, label in (("nbd_uri", "nbd"), ("nbd_unix", "nbd socket"), ("device", "device")):
        if v.get(key):
            # The engine's export serves its own host only (setting engine_nbd_listen).
            local = key == "nbd_unix" or "//127.0.0.1:" in v[key]
            where = f" (on node {v['node']})" if local and v.get("node") else ""
            facts.append((label, v[key] + where))
    if v.get("mountpoint"):
        facts.append(("mounted at", v["mountpoint"] + (f" ({v['fs']})" if v.get("fs") else "")))
    if v.get("engine"):
        facts.append(("engine", f"pid {v['engine'].get('pid')}, "
                                f"drove {v['engine'].get('version') or 'unknown'}, "
                                f"epoch {v['engine'].get('epoch')}, "
                                f"control {v['engine'].get('control_url')}"))
    quorum = v.get("write_quorum") or {}
    if quorum.get("required") and quorum.get("met") is False:
        facts.append(("writes", f"waiting (up to {quorum.get('wait_seconds')} s each, then "
                                "EIO): no replica outside the engine's process takes them; "
                                "since " + time.strftime(
                                    "%Y-%m-%d %H:%M:%S",
                                    time.localtime(quorum.get("lost_since") or 0))))
    rb = v.get("rebuild")
    if rb:
        facts.append(("rebuild", f"{rb.get('replica')}: {_rebuild_percent(rb)} "
                                 f"({format_size(rb.get('done', 0))} of "
                                 f"{format_size(rb.get('total', 0))})"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    for key, value in facts:
        grid.add_row(key, escape(value))
    console.print(grid)
    replicas = v.get("replicas") or []
    if not replicas:
        return
    errors = any(r.get("error") for r in replicas)
    rows = []
    for r in replicas:
        # A local replica has no process: the engine serves it (its pid is the engine's).
        row = [escape(r["name"]), escape(r.get("node") or ""), escape(r.get("disk") or ""),
               styled(r.get("mode"), MODE_STYLE), r.get("state"),
               "local" if r.get("local") else "", r.get("pid"),
               _rebuild_percent(r.get("rebuild"))]
        if errors:
            row.append(escape(r.get("error") or ""))
        rows.append(row)
    columns = (["name", "node", "disk", "mode", "state", "local", "pid>", "rebuild>"]
               + (["error"] if errors else []))
    show_table("replicas", columns, rows)


@app.command()
@with_manager
def clone(
    mgr: Manager,
    src: Annotated[str, typer.Argument(
        help="the volume to clone (with --from-backup: the new volume's name only)",
        show_default=False)],
    new: Annotated[str | None, typer.Argument(help="the new volume's name",
                                              show_default=False)] = None,
    from_backup: Annotated[str | None, typer.Option(
        "--from-backup", show_default=False,
        help="clone a backup instead: the new volume serves at once, its data fetched from "
             "the backup as it is read and filled in the background (an instant restore)")] = None,
    snapshot: Annotated[str | None, typer.Option(
        "--snapshot", "-s", show_default=False,
        help="the snapshot to clone (default: take one now)")] = None,
    replicas: ReplicasOpt = None,
    label: LabelOpt = None,
    full: Annotated[bool, typer.Option(
        help="then copy what it shares in the background (a task): a full, independent "
             "copy")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Make volume NEW a linked clone of SRC's snapshot: ready at once, whatever the size.

    Its replicas share the snapshot's layers on their disks (hard links, no copy);
    writes to it never change SRC or other clones.  Deleting the snapshot while clones
    depend on it only hides it.

    Examples:

        drove volume clone db db-test --snapshot before-upgrade

        drove volume clone db db-copy --full

        drove volume clone --from-backup backup-1a2b db-test
    """
    if from_backup is not None:
        _clone_backup(mgr, from_backup, [a for a in (src, new) if a is not None],
                      snapshot=snapshot, full=full, replicas=replicas, label=label,
                      json_out=json_out)
        return
    if new is None:
        fail("give the volume to clone and the new volume's name: drove volume clone SRC NEW "
             "(or drove volume clone --from-backup BACKUP NEW)")
    body: dict[str, Any] = {"name": new, "labels": parse_labels(label), "full": full}
    if snapshot is not None:
        body["snapshot"] = snapshot
    if replicas is not None:
        body["replicas"] = replicas
    v = mgr.post(_path(src) + "/clone", body)
    if emit(v, json_out):
        return
    c = v.get("clone_of") or {}
    console.print(f"volume [bold]{escape(v['name'])}[/] cloned from "
                  f"{escape(c.get('volume', src))}@{escape(c.get('snapshot', '?'))}: "
                  f"{format_size(v['size'])}, {len(v.get('replicas', []))} replica(s)",
                  highlight=False)
    pending = [r["disk"] for r in v.get("replicas", []) if r.get("state") == "pending"]
    if pending:
        console.print(f"{len(pending)} replica(s) on disk(s) without the base layers "
                      f"({escape(', '.join(pending))}) are copied there after the first "
                      "attach", style="dim", highlight=False)
    if v.get("task"):
        console.print(f"flattening in the background: task {v['task']['id']} "
                      f"(`drove task wait {v['task']['id']}`)", highlight=False)


def _clone_backup(mgr: Manager, backup: str, names: list[str], *, snapshot: str | None,
                  full: bool, replicas: int | None, label: list[str] | None,
                  json_out: bool) -> None:
    """`clone --from-backup B NEW`: an instant restore of B into NEW (then its labels)."""
    if len(names) != 1:
        fail("with --from-backup give only the new volume's name: "
             "drove volume clone --from-backup BACKUP NEW")
    if snapshot is not None:
        fail("--snapshot names a snapshot of a volume; a backup is one point in time already: "
             "leave --snapshot out with --from-backup")
    if full:
        fail("--full is implied with --from-backup: the background fill copies the whole "
             "backup; leave --full out")
    labels = parse_labels(label)  # checked before anything is made
    new = names[0]
    body: dict[str, Any] = {"volume": new, "replicas": replicas, "instant": True}
    task = mgr.post(f"/v1/backups/{backup}/restore", body)
    if labels:
        mgr.patch(_path(new), {"labels": labels})
    if emit({"task": task["id"], "volume": new, "backup": backup}, json_out):
        return
    console.print(f"volume [bold]{escape(new)}[/] serves backup {escape(backup)} now "
                  f"(attached: `drove volume get {escape(new)}`); the rest is filled by task "
                  f"{escape(task['id'])} (`drove task wait {escape(task['id'])}`)",
                  highlight=False)


@app.command()
@with_manager
def flatten(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Copy what linked clone NAME shares with its source into its own files (a task, online
    or offline), so it stands alone and its source's snapshot can go."""
    task = mgr.post(_path(name) + "/flatten", {})
    if not emit(task, json_out):
        console.print(f"flattening {escape(name)}: task {task['id']} "
                      f"(`drove task wait {task['id']}`)", highlight=False)


@app.command()
@with_manager
def scrub(
    mgr: Manager,
    name: NameArg,
    snapshot: Annotated[bool, typer.Option(
        "--snapshot", help="snapshot the head first (labelled drove.scrub), so the data it "
                           "holds is compared too; without it only snapshots are")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Compare the replicas of attached volume NAME layer by layer (digests computed where the
    data is) and repair a copy that differs from the good one; waits for the task."""
    from drove.cli import task as tasks

    task = mgr.post(_path(name) + "/scrub", {"snapshot": snapshot})
    done = tasks.wait(mgr, task, quiet=json_out)
    res = done.get("result") or {}
    if not json_out:
        for f in res.get("findings", []):
            state = "repaired" if f["repaired"] else "NOT repaired"
            console.print(f"replica {escape(f['replica'])}: layer {escape(f['layer'])} "
                          f"(snapshot {escape(str(f['snapshot']))}) differs at offset "
                          f"{f['offset']} (+{f['length']}), blocks {f['blocks'][:8]}: {state}"
                          + (f" from {escape(f['source'])}" if f["source"] else "")
                          + f" [{escape(f['decided_by'])}]", highlight=False)
        if done.get("state") == "succeeded":
            console.print(f"scrubbed {escape(name)}: {res.get('layers', 0)} layer(s), "
                          f"{format_size(res.get('bytes', 0))}, {res.get('repaired', 0)} "
                          "range(s) repaired", highlight=False)
    elif emit(done, json_out) and done.get("state") == "succeeded":
        return
    tasks.check(done)


@app.command()
@with_manager
def delete(
    mgr: Manager,
    name: NameArg,
    force: Annotated[bool, typer.Option(help="detach it first if it is attached")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete volume NAME and all its data, snapshots included.

    Refused while the volume is attached, unless --force.
    """
    res = mgr.delete(_path(name), force=force)
    if not emit(res, json_out):
        console.print(f"volume {escape(name)} deleted", highlight=False)


@app.command()
@with_manager
def expand(
    mgr: Manager,
    name: NameArg,
    size: Annotated[int, typer.Option(parser=parse_size, show_default=False,
                                      help="new size, e.g. 20G (volumes only grow)")],
    json_out: JsonOpt = False,
) -> None:
    """Grow volume NAME to --size (online when attached; grow its filesystem yourself).

    Example: drove volume expand db --size 20G
    """
    v = mgr.post(_path(name) + "/expand", {"size": size})
    if not emit(v, json_out):
        console.print(f"volume {escape(v['name'])} is now {format_size(v['size'])}",
                      highlight=False)


@app.command()
@with_manager
def attach(
    mgr: Manager,
    name: NameArg,
    mount: Annotated[str | None, typer.Option(
        show_default=False,
        help="also give the host a block device with a filesystem mounted here "
             "(made on first use)")] = None,
    fs: Annotated[Fs, typer.Option(help="filesystem to make with --mount")] = Fs.ext4,
    node: Annotated[str | None, typer.Option(
        show_default=False,
        help="run the engine (and mount) on this node (default: the manager's own)")] = None,
    force: Annotated[bool, typer.Option(
        "--force",
        help="take the volume over on --node while the node of its engine is down "
             "(heartbeat lost): a new epoch fences every replica reached, the replicas on "
             "the down node are rebuilt, its old engine is stopped when it returns")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Attach volume NAME: start its replicas and engine, serve it over NBD.

    Prints the NBD URI (any NBD client opens it); with --mount also the device
    and the mount point. With --json prints the Volume object (nbd_uri, device,
    mountpoint).

    Examples:

        drove volume attach db

        drove volume attach db --mount /mnt/db --fs xfs

        drove volume attach db --node host2

        drove volume attach db --node host3 --force   # host2 (its engine's) is down
    """
    body = {"mount": os.path.abspath(os.path.expanduser(mount)) if mount else None,
            "fs": fs.value, "node": node, "force": force}
    with nullcontext() if json_out else err_console.status(f"attaching {name}…"):
        v = mgr.post(_path(name) + "/attach", body)
    if emit(v, json_out):
        return
    console.print(f"volume [bold]{escape(v['name'])}[/] attached "
                  f"({styled(v['health'], HEALTH_STYLE)})", highlight=False)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    grid.add_row("nbd_uri", escape(v.get("nbd_uri") or ""))
    if v.get("device"):
        grid.add_row("device", escape(v["device"]))
    if v.get("mountpoint"):
        grid.add_row("mountpoint", escape(v["mountpoint"]))
    console.print(grid)
    if v.get("health") != "healthy":
        console.print(f"it is {v.get('health')}: `drove volume wait {v['name']}` follows "
                      "its repair", style="yellow", highlight=False)


@app.command("upgrade-engine")
@with_manager
def upgrade_engine(mgr: Manager, name: NameArg, json_out: JsonOpt = False) -> None:
    """Replace attached volume NAME's engine by one of this drove, live.

    The old engine drains and hands its NBD sockets and client connections (a
    mounted filesystem's too) to the new one, which takes a new epoch: nothing is
    detached, clients see no error. If the new engine fails, the old one serves on
    and the command fails saying why. With --json prints the Volume object, with
    ``upgrade``: from and to (pid, version, epoch).

    Example: drove volume upgrade-engine db
    """
    with nullcontext() if json_out else err_console.status(f"upgrading the engine of {name}…"):
        v = mgr.post(_path(name) + "/upgrade-engine")
    if emit(v, json_out):
        return
    was, now = v["upgrade"]["from"], v["upgrade"]["to"]
    console.print(f"volume [bold]{escape(v['name'])}[/]: engine upgraded live, pid "
                  f"{was['pid']} -> {now['pid']}, drove {escape(str(was['version']))} -> "
                  f"{escape(str(now['version']))}, epoch {was['epoch']} -> {now['epoch']}",
                  highlight=False)


@app.command()
@with_manager
def detach(
    mgr: Manager,
    name: NameArg,
    force: Annotated[bool, typer.Option(
        help="stop the volume even if its mount cannot be released")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Detach volume NAME: unmount, release the device, stop its engine and replicas."""
    v = mgr.post(_path(name) + "/detach", {"force": force})
    if not emit(v, json_out):
        console.print(f"volume {escape(v['name'])} detached", highlight=False)


@app.command()
@with_manager
def update(
    mgr: Manager,
    name: NameArg,
    replicas: Annotated[int | None, typer.Option(
        min=1, max=10, show_default=False,
        help="new number of copies (new ones are rebuilt online)")] = None,
    label: Annotated[list[str] | None, typer.Option(
        "--label", "-l", show_default=False,
        help="set label KEY=VALUE (other labels stay), repeatable")] = None,
    remove_label: Annotated[list[str] | None, typer.Option(
        show_default=False, help="remove label KEY, repeatable")] = None,
    data_locality: LocalityOpt = None,
    iops_limit: IopsLimitOpt = None,
    bandwidth_limit: BandwidthLimitOpt = None,
    read_iops_limit: ReadIopsLimitOpt = None,
    write_iops_limit: WriteIopsLimitOpt = None,
    read_bandwidth_limit: ReadBandwidthLimitOpt = None,
    write_bandwidth_limit: WriteBandwidthLimitOpt = None,
    burst: BurstOpt = None,
    wait: Annotated[bool, typer.Option(
        help="follow the rebuild until the volume is healthy")] = True,
    timeout: TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Change the replica count, data locality or QoS limits of volume NAME (live), or labels.

    With a new replica count or data locality it then shows the rebuild's
    progress until the volume is healthy again (Ctrl-C stops watching, not the
    rebuild; --no-wait returns at once).

    Examples:

        drove volume update db --replicas 3

        drove volume update db --data-locality disabled

        drove volume update db --label tier=gold --remove-label old

        drove volume update db --write-iops-limit 200 --bandwidth-limit 0
    """
    qos = qos_body(iops_limit, bandwidth_limit, read_iops_limit, write_iops_limit,
                   read_bandwidth_limit, write_bandwidth_limit, burst)
    if replicas is None and not label and not remove_label and data_locality is None \
            and not qos:
        fail("nothing to change: give --replicas N, --data-locality X, --label KEY=VALUE, "
             "--remove-label KEY or a QoS limit (--iops-limit N, --bandwidth-limit SIZE, ...)")
    body: dict[str, Any] = {"qos": qos} if qos else {}
    if replicas is not None:
        body["replicas"] = replicas
    if data_locality is not None:
        body["data_locality"] = data_locality.value
    if label or remove_label:
        labels = dict(mgr.get(_path(name)).get("labels") or {})
        labels.update(parse_labels(label))
        for key in remove_label or []:
            labels.pop(key, None)
        body["labels"] = labels
    v = mgr.patch(_path(name), body)
    live = replicas is not None or data_locality is not None
    if live and wait and v.get("state") != "detached":
        v = watch(mgr, name, timeout=timeout, quiet=json_out)
    if emit(v, json_out):
        return
    console.print(f"volume {escape(v['name'])}: {v['replica_count']} replica(s), "
                  f"data locality {escape(v.get('data_locality') or '?')}, "
                  f"{styled(v['health'], HEALTH_STYLE)}"
                  + (f", labels {escape(labels_text(v['labels']))}" if v.get("labels") else "")
                  + (f", QoS {escape(qos_text(v.get('qos')))}" if qos_text(v.get("qos")) else ""),
                  highlight=False)
    if live and v.get("state") == "detached":
        console.print("it is detached: the change applies when it is attached",
                      style="dim", highlight=False)


@app.command()
@with_manager
def wait(mgr: Manager, name: NameArg, timeout: TimeoutOpt = None,
         json_out: JsonOpt = False) -> None:
    """Wait until volume NAME is healthy, showing rebuild progress.

    Exits 1 if it is faulted, detached and not healthy, or still not healthy
    after --timeout seconds. With --json prints the final Volume object.

    Example: drove volume wait db --timeout 600 && echo ready
    """
    v = watch(mgr, name, timeout=timeout, quiet=json_out)
    if not emit(v, json_out):
        console.print(f"volume {escape(name)} is {styled(v['health'], HEALTH_STYLE)} "
                      f"({v['replica_count']} replica(s))", highlight=False)


def settled(v: dict[str, Any]) -> bool:
    """Healthy, with the wanted number of replicas and no rebuild running."""
    reps = v.get("replicas") or []
    return (v.get("health") == "healthy" and len(reps) == v.get("replica_count")
            and not v.get("rebuild")
            and (v.get("state") != "attached" or all(r.get("mode") == "RW" for r in reps)))


def watch(mgr: Manager, name: str, *, timeout: float | None = None, quiet: bool = False,
          interval: float = 0.5) -> dict[str, Any]:
    """Poll volume ``name`` with a progress bar until :func:`settled`.

    Fails (exit 1) when it is faulted, detached but not healthy (nothing repairs
    it then), or on ``timeout``; Ctrl-C stops watching (exit 130).
    """
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    deadline = None if timeout is None else time.monotonic() + timeout
    progress = Progress(SpinnerColumn(), "{task.description}", BarColumn(),
                        TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                        console=err_console, transient=True, disable=quiet)
    try:
        with progress:
            task = progress.add_task(name, total=None, detail="")
            rebuilding = None
            while True:
                v = mgr.get(_path(name))
                if settled(v):
                    return v
                _check_hopeless(v)
                reps = v.get("replicas") or []
                rw = sum(1 for r in reps if r.get("mode") == "RW")
                desc = f"{name}: {v.get('state')}, {v.get('health')}, {rw}/{v['replica_count']} RW"
                rb = v.get("rebuild") or next(
                    ({"replica": r["name"], **r["rebuild"]} for r in reps if r.get("rebuild")),
                    None)
                if rb and rb.get("replica") != rebuilding:
                    progress.reset(task)  # a new rebuild: its own rate and time left
                rebuilding = rb.get("replica") if rb else None
                if rb:
                    done, total = rb.get("done") or 0, rb.get("total") or 0
                    progress.update(task, description=f"{desc}, rebuilding {rebuilding}",
                                    total=total or None, completed=done,
                                    detail=f"{format_size(done)}/{format_size(total)}")
                else:
                    catching_up = [r["name"] for r in reps if r.get("mode") == "WO"]
                    if catching_up:
                        desc += f", rebuilding {', '.join(catching_up)}"
                    progress.update(task, description=desc, total=None, completed=0, detail="")
                if deadline is not None and time.monotonic() >= deadline:
                    fail(f"volume {name} is still {v.get('health')} after {timeout:g} s "
                         f"({rw} of {v['replica_count']} replicas RW); `drove volume get "
                         f"{name}` and `drove event list --volume {name}` tell why")
                time.sleep(interval)
    except KeyboardInterrupt:
        fail(f"stopped watching; volume {name} goes on healing: "
             f"`drove volume wait {name}` watches again", code=130)


def _check_hopeless(v: dict[str, Any]) -> None:
    name = v["name"]
    if v.get("health") == "faulted":
        fail(f"volume {name} is faulted: no replica can serve it; `drove volume get {name}` "
             f"and `drove event list --volume {name}` tell why")
    if v.get("state") == "detached":
        fail(f"volume {name} is detached and {v.get('health')}: it is repaired only while "
             f"attached; `drove volume attach {name}`")


app.command("trim")(space.trim)  # fstrim where drove mounted the volume (drove.cli.space)
