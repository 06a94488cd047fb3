"""One writer per replica: the epoch fence.

Every engine start gets an **epoch**, a number that only grows (the manager
issues it from its store; an engine run by hand takes one above the highest its
replicas report).  A replica keeps the highest epoch it has seen, durably, and:

* refuses control calls that carry a lower epoch (the ``Drove-Epoch`` header;
  409 ``StaleEpochError``), and mutating calls that carry none once it has an
  epoch (a person at the shell passes ``--epoch``);
* refuses head NBD connections of a lower epoch.  The epoch travels in the
  export name, ``head@epoch=N``: no protocol extension, and any NBD client can
  be the engine in a test.  Plain ``head`` (and ``""``) is served read-write
  while the replica has never seen an epoch, so a bare replica stays usable by
  hand, and read-only after (people and tools may still look at it);
* when a higher epoch arrives (a claim, a control call or a head connection),
  persists it first (fsynced), then cuts every head connection of a lower
  epoch at once: the requests those connections had queued, in the socket or
  in the server's buffers, are discarded unexecuted.  The old engine sees its
  replicas gone and fails its I/O; it can never write here again.

Snapshot and layer exports are read-only (backups, exports, rebuild sources)
and are not fenced.  ``prepare_rebuild`` and ``revert`` cut *all* head
connections, whatever their epoch, so that no request queued before them
(from a replica process that was stopped, say) lands in the new head.

A claim (``POST /v1/epoch``) demands an epoch strictly above the replica's:
two engines that picked the same number cannot both pass it, so two engines
never hold one epoch on the same replica.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("drove.replica")

EPOCH_HEADER = "drove-epoch"
"""The control API request header carrying the caller's epoch (lower-case, as HTTP/1.1 sees it)."""

NOTHING_CLAIMED = "nothing was claimed"
"""What an engine that refused to start says when no replica saw its epoch (the
manager may then issue that epoch again)."""

_HEAD_EPOCH = re.compile(r"head@epoch=([0-9]{1,18})")


class StaleEpochError(Exception):
    """A caller's epoch is lower than the replica's: a newer engine owns it."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


def head_export_name(epoch: int) -> str:
    """The head export name an engine of ``epoch`` opens."""
    return f"head@epoch={epoch}"


def parse_head_epoch(name: str) -> int | None:
    """The epoch of a ``head@epoch=N`` export name; None for any other name."""
    m = _HEAD_EPOCH.fullmatch(name)
    return int(m.group(1)) if m else None


def parse_epoch_header(value: str) -> int:
    """The epoch in a ``Drove-Epoch`` header (ValueError unless a positive integer)."""
    text = value.strip()
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise ValueError(f"Drove-Epoch must be a positive integer, not {value!r}")
    return int(text)


class Fence:
    """The replica's epoch, and the head exports it has handed out, by epoch."""

    def __init__(self, replica: Any) -> None:
        self._replica = replica  # drove.replica.chain.Replica: holds the epoch durably
        self._heads: weakref.WeakSet[Any] = weakref.WeakSet()
        self._cut: Callable[[Callable[[Any], bool]], int] | None = None
        self._on_advance: list[Callable[[int], None]] = []

    def bind(self, cut: Callable[[Callable[[Any], bool]], int]) -> None:
        """Use ``cut(which)`` (NbdServer.cut_connections) to drop connections."""
        self._cut = cut

    def on_advance(self, func: Callable[[int], None]) -> None:
        """Call ``func(epoch)`` whenever a newer epoch took over (stop the old engine's work)."""
        self._on_advance.append(func)

    @property
    def epoch(self) -> int:
        """The highest epoch seen (0: never)."""
        return self._replica.epoch

    def admit(self, epoch: int | None, what: str) -> None:
        """Let a caller of ``epoch`` (None: it sent none) go on, raising the fence if higher.

        Raises StaleEpochError when ``epoch`` is below the replica's.
        """
        current = self._replica.epoch
        if epoch is None:
            if current:
                raise StaleEpochError(
                    f"{what}: this replica belongs to an engine of epoch {current}; go through "
                    f"that engine, or pass the epoch (--epoch {current}, header Drove-Epoch)",
                    current)
            return
        if epoch < current:
            raise StaleEpochError(
                f"{what}: epoch {epoch} is stale: a newer engine (epoch {current}) owns this "
                "replica", current)
        if epoch > current:
            self.advance(epoch)

    def claim(self, epoch: int) -> None:
        """Take the replica for a starting engine: ``epoch`` must be above the current one."""
        current = self._replica.epoch
        if epoch <= current:
            raise StaleEpochError(
                f"cannot claim epoch {epoch}: this replica is at epoch {current} already "
                "(another engine started with it or a newer one)", current)
        self.advance(epoch)

    def advance(self, epoch: int) -> None:
        """Persist ``epoch`` (higher than the current one), then cut lower head connections."""
        old = self._replica.epoch
        self._replica.set_epoch(epoch)  # durable before anything acts on it
        cut = self._cut_heads(lambda head: head.epoch < epoch)
        log.warning("epoch %d -> %d: %d stale head connection(s) cut", old, epoch, cut)
        for func in self._on_advance:
            func(epoch)

    def cut_all(self, why: str) -> int:
        """Cut every head connection (before the head is replaced under them)."""
        cut = self._cut_heads(lambda head: True)
        if cut:
            log.info("%s: %d head connection(s) cut", why, cut)
        return cut

    def _cut_heads(self, which: Callable[[Any], bool]) -> int:
        victims = {head for head in list(self._heads) if which(head)}
        for head in victims:
            head.revoke()  # refuses writes even before its connection is gone
        if self._cut is None or not victims:
            return 0
        return self._cut(lambda export: export in victims)

    def track(self, head: Any) -> Any:
        """Remember a head export handed to one connection; returns it."""
        self._heads.add(head)
        return head
