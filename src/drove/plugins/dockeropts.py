"""The options of `docker volume create -d drove --opt NAME=VALUE`, checked all at once.

Every problem is reported together, each naming its option, so one refused
`docker volume create` says everything that is wrong with it. Nothing is created
before the options are known to be good.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from drove import units

FILESYSTEMS = ("ext4", "xfs")
KNOWN = ("size", "replicas", "pool", "fs", "from-snapshot", "from-backup", "instant",
         "preempt")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

FS_LABEL = "fs"
"""The volume label recording the filesystem its first mount makes (when blank)."""
PREEMPT_LABEL = "preempt"
"""The volume label that lets a mount on another host take the volume over (libStorage's
``preempt``): ``true`` moves it, anything else refuses."""


class OptionsError(ValueError):
    """Bad options; the message names every one of them."""


@dataclass(frozen=True)
class CreateOptions:
    """What `docker volume create` asked for, checked."""

    size: int | None = None
    replicas: int | None = None
    pool: str | None = None
    fs: str | None = None
    snapshot: tuple[str, str] | None = None  # (volume, snapshot) of from-snapshot
    backup: str | None = None
    instant: bool = False
    preempt: bool | None = None

    @property
    def empty(self) -> bool:
        """True when no option was given (Docker creates volumes named by `-v` so)."""
        return self == CreateOptions()

    def labels(self) -> dict[str, str]:
        """The labels the new volume gets."""
        out = {}
        if self.fs is not None:
            out[FS_LABEL] = self.fs
        if self.preempt is not None:
            out[PREEMPT_LABEL] = "true" if self.preempt else "false"
        return out


def parse(opts: dict[str, Any] | None) -> CreateOptions:
    """The checked options; OptionsError naming every unknown or bad one."""
    opts = dict(opts or {})
    problems: list[str] = []
    unknown = sorted(k for k in opts if k not in KNOWN)
    if unknown:
        problems.append(f"unknown option(s) {', '.join(unknown)} (drove takes "
                        f"{', '.join(KNOWN)})")
    values: dict[str, Any] = {}
    for key in KNOWN:
        if key not in opts:
            continue
        raw = opts[key]
        if not isinstance(raw, str):
            problems.append(f"option {key}: give a string, not {raw!r}")
            continue
        try:
            values[key] = _CHECK[key](raw)
        except ValueError as exc:
            problems.append(f"option {key}={raw!r}: {exc}")
    problems += _combinations(values)
    if problems:
        raise OptionsError("; ".join(problems))
    return CreateOptions(size=values.get("size"), replicas=values.get("replicas"),
                         pool=values.get("pool"), fs=values.get("fs"),
                         snapshot=values.get("from-snapshot"),
                         backup=values.get("from-backup"),
                         instant=values.get("instant", False),
                         preempt=values.get("preempt"))


def parse_size(text: str) -> int:
    """Bytes of a size like 10G, 512M, 64MiB or 1073741824; a multiple of 4 KiB."""
    n = units.parse_size(text)
    if n <= 0 or n % 4096:
        raise ValueError("must be a positive multiple of 4 KiB")
    return n


def _replicas(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 10:
        raise ValueError("must be a whole number from 1 to 10")
    return int(text)


def _name(text: str) -> str:
    if not NAME_RE.match(text):
        raise ValueError("a name of a-z 0-9 . _ -, starting with a letter or digit")
    return text


def _fs(text: str) -> str:
    if text not in FILESYSTEMS:
        raise ValueError(f"must be one of {', '.join(FILESYSTEMS)}")
    return text


def _snapshot(text: str) -> tuple[str, str]:
    volume, at, snap = text.partition("@")
    if not at or not NAME_RE.match(volume) or not NAME_RE.match(snap):
        raise ValueError("give VOLUME@SNAPSHOT")
    return volume, snap


def _bool(text: str) -> bool:
    if text.lower() not in _BOOLS:
        raise ValueError("must be true or false")
    return _BOOLS[text.lower()]


_CHECK = {"size": parse_size, "replicas": _replicas, "pool": _name, "fs": _fs,
          "from-snapshot": _snapshot, "from-backup": _name, "instant": _bool,
          "preempt": _bool}


def _combinations(values: dict[str, Any]) -> list[str]:
    """What the options cannot mean together."""
    problems = []
    sources = [k for k in ("from-snapshot", "from-backup") if k in values]
    if len(sources) > 1:
        problems.append("give from-snapshot or from-backup, not both")
    if sources and "size" in values:
        problems.append(f"size with {sources[0]}: the volume has its source's size (grow it "
                        "later with `drove volume expand`)")
    if "from-snapshot" in values and "pool" in values:
        problems.append("pool with from-snapshot: a linked clone lives beside its source's "
                        "replicas")
    if "instant" in values and "from-backup" not in values:
        problems.append("instant applies to from-backup only")
    return problems
