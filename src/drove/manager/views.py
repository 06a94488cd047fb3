"""A volume as the API shows it: its stored document merged with what its engine reports,
and its health (healthy, degraded, faulted)."""

from __future__ import annotations

from typing import Any

from drove.manager import datakeys
from drove.manager.engines import rebuild_running
from drove.manager.standbystate import standby_view


def health(doc: dict[str, Any], info: dict[str, Any] | None) -> str:
    """The volume's health: from its engine's report when attached, else from its replicas."""
    live = [r for r in doc["replicas"] if r["state"] != "abandoned"]
    if info is not None:
        rw = sum(1 for r in info.get("replicas", []) if r["mode"] == "RW")
        if info.get("faulted") or rw == 0:
            return "faulted"
        ok = (rw >= doc["replica_count"] and rw == len(live)
              and all(r["state"] == "running" and not r.get("rebuilding") for r in live))
        return "healthy" if ok else "degraded"
    good = sum(1 for r in live if r["state"] in ("stopped", "running", "pending"))
    if good == 0:
        return "faulted"
    ok = good >= doc["replica_count"] and all(r["state"] != "failed" for r in live)
    return "healthy" if ok else "degraded"


def view(doc: dict[str, Any], info: dict[str, Any] | None, data_locality: str) -> dict[str, Any]:
    """The stored volume ``doc`` merged with ``info``, what its engine reported last (None
    when it is not attached), as the API shows it."""
    modes = {r["name"]: r for r in (info or {}).get("replicas", [])}
    rebuild = (info or {}).get("rebuild")
    running = rebuild if rebuild_running(rebuild) else None
    replicas = []
    for r in doc["replicas"]:
        if r["state"] == "abandoned":
            continue
        live = modes.get(r["name"])
        mode = live["mode"] if live else ("ERR" if r["state"] == "failed" else "stopped")
        prog = None
        if running and running.get("replica") == r["name"]:
            prog = {"done": running["bytes_done"], "total": running["bytes_total"]}
        replicas.append({"name": r["name"], "disk": r["disk"], "node": r["node"],
                         "path": r["path"], "mode": mode, "state": r["state"],
                         "local": bool(r.get("local")),
                         "pid": (r.get("proc") or {}).get("pid")
                         if r["state"] == "running" else None,
                         "error": r.get("error") or (live or {}).get("error"),
                         "rebuild": prog})
    host = doc.get("host") or {}
    engine = doc.get("engine")
    return {
        "name": doc["name"], "size": doc["size"], "replica_count": doc["replica_count"],
        "pool": doc["pool"], "labels": doc["labels"], "created": doc["created"],
        "data_locality": data_locality,
        "qos": doc.get("qos"),  # the QoS limits (drove.manager.qos); None: never set
        "encryption": datakeys.public(datakeys.encryption(doc)),  # None: plain
        "clone_of": ({k: doc["clone_of"][k] for k in ("volume", "snapshot")}
                     if doc.get("clone_of") else None),
        "state": "restoring" if doc.get("restoring") else doc["state"],
        "standby": standby_view(doc),
        # Serving a backup whose data is still being fetched ({"backup", "snapshot"}).
        "instant_restore": doc.get("instant_restore"),
        "node": doc.get("node") if doc["state"] == "attached" else None,
        "health": health(doc, info),
        # With a local replica: whether writes find a replica outside the engine process.
        "write_quorum": (info or {}).get("write_quorum"),
        "nbd_uri": (engine or {}).get("ready", {}).get("nbd") if engine else None,
        "nbd_unix": (engine or {}).get("ready", {}).get("nbd_unix") if engine else None,
        "device": host.get("device"), "mountpoint": host.get("mountpoint"),
        "fs": host.get("fs"),
        "engine": {"pid": engine["pid"], "control_url": engine["ready"].get("control"),
                   "epoch": doc.get("epoch"),
                   # The drove it runs (None: from before engines said it).
                   "version": engine["ready"].get("version")}
        if engine else None,
        "rebuild": ({"replica": running["replica"], "done": running["bytes_done"],
                     "total": running["bytes_total"]} if running else None),
        "replicas": replicas,
    }
