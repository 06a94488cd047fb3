"""Stopping the processes of a volume that its record does not name.

A manager killed after a node's agent started a volume's engine or a replica process,
but before it stored that process in the volume's record, leaves it running: the
engine holds its local replica's directory (a lock), a replica process its replica's,
so the volume could never start again.  Before a volume's processes start afresh (and
when they are stopped) every agent concerned is asked to stop those of the volume it
runs but the record does not name: the engine's node first (an engine stop flushes to
its replicas), then the other nodes of its replicas.

A node whose agent does not answer is skipped (with an event), so it never holds up the
rest: a replica process left there cannot write for a newer engine (the epoch fence) and
keeps only its own replica from starting, until its agent answers again (a replica start
that fails asks it to stop such a process, then tries once more).  The engine's node not
answering, no engine starts there anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from drove.cluster.remoteagent import AgentError, AgentUnreachableError
from drove.manager.agents import Agents
from drove.manager.errors import ApiError
from drove.manager.events import EventFn


class Unrecorded:
    """Asks agents to stop a volume's processes that its record does not name."""

    def __init__(self, agents: Agents, event: EventFn) -> None:
        self._agents = agents
        self._event = event

    def _wanted(self, doc: dict[str, Any], engine_node: str | None,
                keep_from: list[dict[str, Any]], only: set[str] | None = None
                ) -> dict[str | None, tuple[dict[str, str], list[int]]]:
        """Per node: ({replica name: directory} there, pids the records name there)."""
        nodes: dict[str | None, tuple[dict[str, str], list[int]]] = {engine_node: ({}, [])}
        for r in doc["replicas"]:
            if only is not None and r["name"] not in only:
                continue
            # (A replica whose disk was removed has no node, nor a process left to stop.)
            if (where := self._agents.node_of_replica(r)) is not None:
                nodes.setdefault(where, ({}, []))[0][r["name"]] = r["path"]
        for d in keep_from:
            if (d.get("engine") or {}).get("pid") and d.get("node") in nodes:
                nodes[d.get("node")][1].append(d["engine"]["pid"])
            for r in d["replicas"]:
                where = self._agents.node_of_replica(r)
                if (r.get("proc") or {}).get("pid") and where in nodes:
                    nodes[where][1].append(r["proc"]["pid"])
        return nodes

    async def _ask(self, node: str | None, name: str, replicas: dict[str, str],
                   keep: list[int], reason: str, missed: dict[str, str], *, engines: bool
                   ) -> list[tuple[str | None, dict[str, Any]]]:
        """One node's agent stops what it runs of volume ``name`` but ``keep``."""
        # (Not skipped when its heartbeats stopped: a manager that just started sees
        # every node so until they heartbeat again, and a node that is down answers no
        # connection.)
        try:
            agent = self._agents.for_node(node)
            stopped = await asyncio.to_thread(agent.stop_unrecorded, name, replicas, keep,
                                              reason, engines)
        except (AgentUnreachableError, AgentError, ApiError, OSError) as exc:
            missed[str(node)] = str(exc)
            return []
        return [(node, s) for s in stopped]

    async def stop(self, doc: dict[str, Any], *, reason: str,
                   engine_node: str | None = None,
                   keep_from: list[dict[str, Any]] | None = None,
                   only: set[str] | None = None) -> list[str]:
        """Have the agents stop every engine of ``doc``'s volume on ``engine_node``
        (default its node), then every process of its replicas (those named in ``only``,
        default all) on their nodes, but those ``keep_from`` (default ``[doc]``) records
        name; the nodes whose agents did not answer (an event says so, another what was
        stopped).

        An engine of the volume on another node is not looked for: a volume taken over
        left it there, and that node's agent stops it (stale) and releases its host
        device when it heartbeats again.
        """
        name = doc["name"]
        engine_node = engine_node or doc.get("node")
        if engine_node is None:
            # (No agent of its own: then no engine of a never-attached volume either.)
            with contextlib.suppress(ApiError):
                engine_node = self._agents.default_node
        nodes = self._wanted(doc, engine_node, [doc] if keep_from is None else keep_from,
                             only)
        missed: dict[str, str] = {}
        reps, keep = nodes.pop(engine_node)
        # The engines first: stopping one flushes it to its replica processes.
        found = ([] if engine_node is None else
                 await self._ask(engine_node, name, reps, keep, reason, missed, engines=True))
        for more in await asyncio.gather(*(
                self._ask(n, name, r, k, reason, missed, engines=False)
                for n, (r, k) in nodes.items())):
            found += more
        self._report(name, found, missed, reason)
        return list(missed)

    async def stop_replica(self, doc: dict[str, Any], rep: dict[str, Any], reason: str) -> bool:
        """Have ``rep``'s node's agent stop the processes serving its directory that
        ``doc`` does not name; whether any was stopped."""
        where = self._agents.node_of_replica(rep)
        if where is None:
            return False
        _, keep = self._wanted(doc, where, [doc])[where]
        missed: dict[str, str] = {}
        found = await self._ask(where, doc["name"], {rep["name"]: rep["path"]}, keep, reason,
                                missed, engines=False)
        self._report(doc["name"], found, missed, reason)
        return bool(found)

    def _report(self, name: str, found: list[tuple[str | None, dict[str, Any]]],
                missed: dict[str, str], reason: str) -> None:
        """The events saying what was stopped and where nothing could be looked for."""
        if found:
            what = ", ".join(f"{s.get('kind')} {s.get('name')} (pid {s.get('pid')}"
                             + (f", node {n})" if n else ")") for n, s in found)
            self._event("volume-unrecorded-stopped", f"volume {name}: stopped {what}, which "
                        f"its record did not name ({reason}): left running, they would hold "
                        "its replicas' directories", name, level="warning")
        if missed:
            self._event("volume-unrecorded-unchecked", f"volume {name}: processes an earlier "
                        "run may have left could not be looked for on node(s) "
                        + "; ".join(f"{n}: {why}" for n, why in missed.items())
                        + ": a replica whose directory such a process holds fails to start "
                        "until its agent answers again", name, level="warning")
