"""The manager's parts, built and wired together in one place.

Volumes (:class:`~drove.manager.core.Manager`), tasks, backups and jobs know
nothing of one another's modules: each is handed here the narrow interface it
needs (the event log, the backup activity that may hold a volume, the volumes a
backup reads and restores into), so no module of the manager imports one that
builds on it.
"""

from __future__ import annotations

from pathlib import Path

from drove.agent.node import NodeAgent
from drove.manager.backups import BackupActivity, Backups
from drove.manager.core import Manager
from drove.manager.datakeys import DataKeys
from drove.manager.events import EventLog
from drove.manager.jobs import Jobs
from drove.manager.standby import Standbys
from drove.manager.store import Store
from drove.manager.tasks import Tasks


class ManagerApp:
    """Volumes, tasks, backups and jobs over one store, started and stopped together."""

    def __init__(self, store: Store, agent: NodeAgent | None, data_dir: Path, *,
                 cluster_token_file: Path | None = None, node: str | None = None,
                 keys: DataKeys | None = None) -> None:
        self.store = store
        self.events = EventLog(store)
        self.tasks = Tasks(store, self.events)
        activity = BackupActivity(self.tasks)
        self.manager = Manager(store, agent, data_dir, event=self.events, guard=activity,
                               cluster_token_file=cluster_token_file, node=node, keys=keys)
        self.backups = Backups(self.manager, self.tasks, activity)
        self.jobs = Jobs(self.manager, self.backups, self.tasks)
        self.standbys = Standbys(self.manager, self.backups, self.tasks)

    async def start(self) -> None:
        """Settle what a previous run left, bring volumes back, then start the scheduler."""
        # Tasks and restores first: a volume half restored is deleted, not attached again.
        self.tasks.recover()
        await self.backups.abandon_restores()
        await self.manager.start()
        self.jobs.start()
        self.standbys.start()

    async def stop(self) -> None:
        """Stop the scheduler, the standbys' follower and the tasks, then detach the volumes."""
        await self.standbys.stop()
        await self.jobs.stop()
        await self.tasks.stop()
        self.backups.close()
        await self.manager.stop()

    # ------------------------------------------------ several managers (etcd)

    def register(self) -> None:
        """What every manager of a cluster does at start: register its own node (if any)."""
        self.manager.register()

    async def lead(self) -> None:
        """Take up the leader's work: settle tasks and restores a dead leader left, adopt
        the attached volumes, heal, run the jobs."""
        self.tasks.recover()
        await self.backups.abandon_restores()
        await self.manager.lead()
        self.jobs.start()
        self.standbys.start()

    async def step_down(self) -> None:
        """Stop the leader's work (healer, scheduler, tasks); volumes stay attached.

        Each part stops even when another fails to (etcd away, say); the first failure
        is raised after.
        """
        failures: list[Exception] = []
        for stop in (self.standbys.stop, self.manager.step_down, self.jobs.stop,
                     self.tasks.stop):
            try:
                await stop()
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    async def close(self) -> None:
        """Stop a cluster manager: its work stops, every volume stays attached and serving."""
        await self.step_down()
        self.backups.close()
        await self.manager.close()
