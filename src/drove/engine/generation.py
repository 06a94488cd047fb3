"""Which replicas are current after a crash: generations, persisted only when membership changes.

Longhorn writes a revision counter to every replica synchronously with every
write.  drove persists nothing per write.  Each replica stores a small engine
state (``engine.meta``, written atomically and fsynced):
``{"volume", "generation", "clean", "members"}``, beside the highest engine
epoch it has seen (:mod:`drove.replica.fence`).

The argument below rests on two assumptions.  Both are enforced by the
replicas, not hoped for:

A. **One writer per epoch, and only the newest epoch writes.**  An engine
   claims every reachable replica for its epoch before it reads any state
   (``POST /v1/epoch``, which demands an epoch above the replica's, so two
   engines never share one).  From then on the replica refuses every control
   call, generation update and head connection of a lower epoch, and it cut the
   old engine's head connections at the claim, discarding the requests they had
   queued.  So once an engine has claimed a replica, nothing an older engine
   sends — in flight, queued behind a frozen process, or sent after a
   partition heals — changes that replica.
B. **Generations only grow on a replica.**  A state update with a lower
   generation than the stored one is refused (409): a late or reordered update
   cannot step a replica back and make it look staler or newer than it is.

Rules the engine follows:

1. **Start.**  Claim the replicas, then read their states (the claim answers
   with them, after the cut: by A no older engine changes them later).
   Candidates are replicas with no incomplete layer (not mid-rebuild) whose
   state was written by the newest engine (the highest epoch recorded in the
   states), at the highest generation ``G`` that engine wrote.  Before serving any request, write
   ``generation = max(all generations seen) + 1``, ``clean = false`` to the
   replicas chosen as RW (B: always above what any of them holds).  The
   others are rebuilt.
2. **Write.**  A write is acknowledged only after every RW and WO replica
   acknowledged it (the mirror), so at that moment every member holds it.
   Nothing is acknowledged once the volume faulted (a fenced engine faults).
3. **Drop.**  When a member fails it is set to ERR, and the new generation is
   persisted on every remaining member *before* any request completes
   (:meth:`Mirror.settled` gates every acknowledgement).  Before that, the
   dropped member is asked (briefly) whether a newer engine claimed it: if so
   this engine is fenced and acknowledges nothing more.  If persisting fails
   on a member, that member is dropped too and the bump repeats; a member
   that refuses because a newer engine owns it fences this engine.
4. **Join.**  A rebuilt replica becomes RW only after each of its layers was
   verified against the source's checksum; then the generation is bumped on
   all members, including it.  A target that holds a *higher* generation than
   the volume is never overwritten: it may be the current one.
5. **Clean stop.**  After a final flush on every member, ``clean = true`` is
   written (same generation).
6. **Flush.**  A FLUSH is acknowledged only when every member flushed.

Why it is safe: take any acknowledged write ``W``, acknowledged by the engine
of epoch ``e`` at a moment when the members were ``M`` at generation ``g``.
Every replica in ``M`` holds ``W`` (rule 2; after a process kill the page
cache keeps it; after a power loss it is kept if it was followed by an
acknowledged FLUSH, rule 6).  A replica that misses ``W`` either was not in
``M`` — then it left before ``W`` was acknowledged, and by rule 3 the members
that stayed recorded a higher generation than it has before ``W`` could be
acknowledged — or it joined later, which by rule 4 means it was verified to
hold everything first.  By B no later update lowers those generations.  So
among the replicas that engine ``e`` left behind, none with the highest
generation misses an acknowledged write, and none that lags has the highest
generation.

A newer engine ``e' > e`` reads states only after claiming, and by A engine
``e`` can neither acknowledge anything that depends on a claimed replica nor
change its state afterwards: a write of ``e`` that reached only unclaimed
replicas is persisted there with a generation bump (rule 3) that ``e'`` reads
when it claims them.  So ``e'`` starts from a consistent picture.  Without A,
two engines would each bump generations and acknowledge writes on their own
subsets (split brain), and no rule about generations could reconcile them.

Among the replicas at the highest generation, the only differences are
writes that were in flight (never acknowledged) at the crash; ``clean``
tells whether there can be any.  When a candidate is unclean the engine picks
one as the source and rebuilds the others from it by delta (only ranges whose
digests differ are copied), so all replicas agree before reads are spread
over them.  The cost is nothing per write and one small fsynced file write per
replica at start, stop and membership change.

Why the epoch comes before the generation: an old engine that woke up after a
newer one took over cannot write to any replica the newer one claimed, but it
may still reach one the newer one could not (its local replica, on a host the
newer engine could not reach) and bump the generation there as it drops the
claimed ones (if none of them answers its question in time).  The two
generations are unrelated counters then; what the newer engine acknowledged
is on the replicas whose state it wrote, so those win, and the old engine's
replica is rebuilt from them.  The old engine acknowledged nothing there alone:
with other replicas in the volume, a write is acknowledged only once a replica
outside the engine's process has it (the write quorum, :mod:`drove.engine.mirror`),
and the replicas the newer engine claimed refuse the old one.  So what is lost
is only what was never acknowledged (a write in flight on the local replica).

One case the replicas alone cannot decide: if only stale replicas are
reachable, they look current.  The engine therefore also records the highest
generation it wrote in a local state file (and the manager records it in its
store); the engine refuses to start below it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReplicaState:
    """What one reachable replica reported at start."""

    name: str
    generation: int
    clean: bool
    rebuilding: bool
    volume: str | None = None
    size: int = 0
    epoch: int = 0  # of the engine that wrote the state (0: written before epochs)

    @property
    def order(self) -> tuple[int, int]:
        """How current the state is: the newer writer first, then its generation."""
        return (self.epoch, self.generation)


@dataclass
class Selection:
    """The start-up decision: who serves, who is rebuilt, from which generation."""

    generation: int
    rw: list[str] = field(default_factory=list)
    rebuild: list[str] = field(default_factory=list)
    reason: dict[str, str] = field(default_factory=dict)


class NoCurrentReplicaError(RuntimeError):
    """No reachable replica can be proven to hold every acknowledged write."""


def parse_state(name: str, info: dict[str, Any]) -> ReplicaState:
    """A ReplicaState from a replica's /v1/info answer."""
    st = info.get("engine_state") or {}
    return ReplicaState(
        name=name,
        generation=int(st.get("generation", 0)),
        clean=bool(st.get("clean", True)),
        rebuilding=bool(info.get("rebuilding", False)),
        volume=st.get("volume"),
        size=int(info.get("size", 0)),
        epoch=int(st.get("epoch") or 0),
    )


def choose(states: list[ReplicaState], volume: str, min_generation: int = 0) -> Selection:
    """Decide which replicas serve (RW) and which must be rebuilt, per the rules above."""
    usable = [s for s in states if s.volume in (None, volume)]
    sel = Selection(generation=0)
    for s in states:
        if s not in usable:
            sel.reason[s.name] = f"belongs to volume {s.volume!r}"
    complete = [s for s in usable if not s.rebuilding]
    for s in usable:
        if s.rebuilding:
            sel.rebuild.append(s.name)
            sel.reason[s.name] = "an earlier rebuild did not finish"
    if not complete:
        raise NoCurrentReplicaError(
            "no reachable replica is complete: every one is mid-rebuild or belongs elsewhere")
    top_order = max(s.order for s in complete)
    top = top_order[1]
    if max(s.generation for s in complete) < min_generation:
        raise NoCurrentReplicaError(
            f"the reachable replicas are at generation {top}, but generation {min_generation} "
            "was reached before: the current replicas are unreachable; start them")
    current = [s for s in complete if s.order == top_order]
    # A volume's size only grows; a replica smaller than the largest current one missed
    # an expand and cannot serve.
    size = max(s.size for s in current)
    current = [s for s in current if s.size == size]
    sel.generation = top
    if all(s.clean for s in current):
        sel.rw = [s.name for s in current]
    else:
        sel.rw = [current[0].name]
        for s in current[1:]:
            sel.rebuild.append(s.name)
            sel.reason[s.name] = "unclean stop: reconciled from " + current[0].name
    for s in complete:
        if s.name not in sel.rw and s.name not in sel.rebuild:
            sel.rebuild.append(s.name)
            sel.reason[s.name] = (
                "missed an expand" if s.order == top_order
                else f"stale (generation {s.generation} < {top})" if s.epoch == top_order[0]
                else f"stale (written by engine epoch {s.epoch}, generation {s.generation}; "
                     f"epoch {top_order[0]} wrote generation {top} since)")
    return sel
