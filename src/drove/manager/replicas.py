"""A volume's replicas one at a time: placing new ones, starting a replica's process,
recording its failure (with back-off), and removing one with its data."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

from drove.agent.processes import ProcessStartError
from drove.cluster.remoteagent import AgentError, AgentUnreachableError
from drove.manager.agents import Agents
from drove.manager.disks import Disks
from drove.manager.engines import Engines
from drove.manager.errors import ApiError
from drove.manager.events import EventFn
from drove.manager.locality import DISABLED
from drove.manager.placement import PlacementError, place
from drove.manager.records import Records
from drove.manager.settings import Settings
from drove.manager.unrecorded import Unrecorded
from drove.manager.volumekey import volume_key


class Replicas:
    """Places, starts, fails and removes the replicas of volumes."""

    def __init__(self, *, records: Records, disks: Disks, engines: Engines, agents: Agents,
                 settings: Settings, event: EventFn) -> None:
        self._records = records
        self._disks = disks
        self._engines = engines
        self._agents = agents
        self._settings = settings
        self._event = event
        self._unrecorded = Unrecorded(agents, event)

    def place(self, doc: dict[str, Any], count: int,
              only_node: str | None = None) -> list[dict[str, Any]]:
        """Place ``count`` more replicas of ``doc`` (PlacementError says why not).

        With data locality the node the volume is (or will be) attached on is
        preferred; ``only_node`` restricts the choice to that node's disks.
        """
        all_disks = self._disks.all()
        # A failed replica on a disk that is gone is what is being replaced: its disk's
        # node, zone and fault set must not keep the replacement out.
        used_names = {r["disk"] for r in doc["replicas"]
                      if r["state"] not in ("abandoned",)
                      and not (r["state"] == "failed"
                               and self._disks.state(r["disk"]) != "ready")}
        used = [d for d in all_disks if d["name"] in used_names]
        if only_node is not None:
            all_disks = [d for d in all_disks if d["node"] == only_node]
            if not all_disks:
                raise PlacementError(f"node {only_node} has no disk")
        prefer = (self._records.attach_node(doc)
                  if self._records.locality(doc) != DISABLED else None)
        chosen = place(count, doc["size"], all_disks, pool=doc["pool"], used=used,
                       overprovision_percent=self._settings.get("over_provisioning_percent"),
                       prefer_node=prefer,
                       nodes=self._disks.node_docs())
        out = []
        for d in chosen:
            doc["next_replica"] = doc.get("next_replica", 0) + 1
            name = f"{doc['name']}-r{doc['next_replica']}"
            path = Path(d["path"]) / "replicas" / f"{name}-{secrets.token_hex(3)}"
            out.append({"name": name, "disk": d["name"], "node": d["node"], "path": str(path),
                        "state": "pending", "proc": None, "error": None, "retry_at": 0})
        return out

    async def start(self, doc: dict[str, Any], rep: dict[str, Any]) -> bool:
        """Start ``rep``'s process; False (recorded as failed) if its disk or process fails."""
        why = self._disks.problem(rep)
        if why:
            self.fail(doc, rep, why)
            return False
        if rep["state"] == "failed" and rep.get("proc"):
            # Its host was cut off when it failed, so the stop never reached it: that
            # process still holds the replica's directory, and goes before a new one starts.
            await self.stop(rep, 5.0)
        try:
            agent = self._agents.for_replica(rep)
            try:
                proc = await asyncio.to_thread(agent.start_replica, doc["name"], rep,
                                               doc["size"], volume_key(doc))
            except ProcessStartError:
                # A process an earlier start left, never recorded (its manager was killed,
                # or the answer was lost), may hold the directory: once it is stopped, again.
                if not await self._unrecorded.stop_replica(doc, rep, _LEFT_OVER):
                    raise
                proc = await asyncio.to_thread(agent.start_replica, doc["name"], rep,
                                               doc["size"], volume_key(doc))
        except (ProcessStartError, AgentError) as exc:
            self.fail(doc, rep, f"process did not start: {exc}")
            return False
        except AgentUnreachableError as exc:
            self.fail(doc, rep, str(exc))
            return False
        rep.update(proc=proc.to_json(), state="running", error=None)
        self._records.save(doc)
        return True

    async def stop(self, rep: dict[str, Any], timeout: float = 30.0) -> bool:
        """Stop ``rep``'s process, if it has one; False when its node's agent did not answer
        (the process may still run)."""
        try:
            await asyncio.to_thread(self._agents.for_replica(rep).stop, rep.get("proc"), timeout)
        except AgentUnreachableError as exc:
            # Its host is down or cut off: its process cannot write for an engine that is
            # gone, nor for a newer one (fenced by epoch); its agent stops it later.
            self._event("replica-stop-unreachable", f"replica {rep['name']}: {exc}", None,
                        "warning")
            return False
        return True

    def fail(self, doc: dict[str, Any], rep: dict[str, Any], why: str) -> None:
        """Record ``rep`` as failed because ``why``; the healer retries it, backing off."""
        # The first retry is immediate; a replica failing again and again backs off.
        failures = rep.get("failures", 0)
        delay = min(300.0, self._settings.get("failed_replica_retry_seconds") * (2 ** failures)
                    if failures else 0.0)
        if rep["state"] != "failed":
            self._event("replica-failed", f"replica {rep['name']} on disk {rep['disk']} "
                        f"failed: {why}", doc["name"], level="warning")
        rep.update(state="failed", error=why, retry_at=time.time() + delay,
                   failures=failures + 1, rebuilding=False)
        self._records.save(doc)

    async def remove(self, doc: dict[str, Any], rep: dict[str, Any]) -> None:
        """Take ``rep`` out of the engine (when attached), stop it and delete its data."""
        if doc["state"] == "attached" and doc.get("engine"):
            await self._engines.forget(doc, rep["name"])
        await self.stop(rep)
        try:
            # By its own node's agent: the directory is on that host, not necessarily here.
            agent = self._agents.for_replica(rep)
            await asyncio.to_thread(agent.remove_replica_data, rep["path"])
        except (AgentUnreachableError, ApiError) as exc:
            # Its node is down: the healer deletes the data when the disk is back.
            rep["state"] = "abandoned"
            self._event("replica-removed", f"replica {rep['name']} removed from disk "
                        f"{rep['disk']}; its data goes when the disk is back ({exc})",
                        doc["name"], "warning")
            return
        doc["replicas"].remove(rep)
        self._event("replica-removed", f"replica {rep['name']} removed from disk {rep['disk']}",
                    doc["name"])


_LEFT_OVER = ("left by an earlier start of the replica: a manager stopped after its agent "
              "started it, before it recorded it, or a start whose answer was lost")
