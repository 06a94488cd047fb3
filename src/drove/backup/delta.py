"""What turns a volume holding one backup into another: the blocks to write and to zero.

Two manifests map offset → block hash; a block whose hash is the same in both holds the
same bytes already, so only blocks whose hash differs are written, and blocks the old
backup had that the new one lacks (they became all zero) are zeroed.  A DR standby
(:mod:`drove.manager.standby`) restores each new backup this way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Delta:
    """The block offsets to write (from the new backup) and to zero.

    ``zero_all``: what the volume holds is unknown, so it is zeroed whole first and every
    block of the new backup written.
    """

    write: list[int]
    zero: list[int]
    zero_all: bool = False

    def to_json(self) -> dict[str, object]:
        """The delta as JSON."""
        return {"write": self.write, "zero": self.zero, "zero_all": self.zero_all}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> Delta:
        """The delta :meth:`to_json` wrote."""
        write, zero = doc.get("write"), doc.get("zero")
        if not isinstance(write, list) or not isinstance(zero, list):
            raise ValueError("a delta needs the lists write and zero")
        return cls([int(o) for o in write], [int(o) for o in zero], bool(doc.get("zero_all")))


def plan(old: dict[int, str] | None, new: dict[int, str]) -> Delta:
    """The delta from a volume holding backup ``old`` (its block map; ``{}``: a blank
    volume; None: unknown contents) to one holding backup ``new``."""
    if old is None:
        return Delta(sorted(new), [], zero_all=True)
    write = sorted(o for o, h in new.items() if old.get(o) != h)
    zero = sorted(o for o in old if o not in new)
    return Delta(write, zero)
