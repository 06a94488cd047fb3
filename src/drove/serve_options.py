"""The options of `drove replica serve` and `drove engine serve`: one table for both parsers.

A serving process is started two ways: by the full CLI (typer: ``drove replica
serve``) and by the lean path (argparse: ``python -m drove replica serve``, what
the agent runs, so that typer, click and rich never load in a process that lives
as long as its volume).  Both parsers are built from the tables below
(:mod:`drove.cli.fromtable` and :mod:`drove.launch`), so the names, types,
defaults and help of the two cannot drift apart.  Plain data: this module
imports no parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED: Any = ...
"""The default of an argument or option that must be given."""


@dataclass(frozen=True)
class Opt:
    """One argument (``positional``) or ``--option`` of a serve command.

    ``kind`` is the value's type (str, int, float, Path or bool: a bool option is a
    ``--x/--no-x`` flag); ``many`` takes the option once per value (a list).
    """

    name: str
    kind: type
    default: Any
    help: str
    positional: bool = False
    many: bool = False

    @property
    def flag(self) -> str:
        """The option as typed on the command line (``--nbd-unix``)."""
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        """Whether it must be given."""
        return self.default is REQUIRED


@dataclass(frozen=True)
class Command:
    """A serve command: what it does (its help) and its options, in order."""

    name: str
    help: str
    options: tuple[Opt, ...]


TLS_AND_LOGGING = (
    Opt("tls_cert", Path, None, "TLS certificate (PEM) for NBD"),
    Opt("tls_key", Path, None, "TLS private key (PEM)"),
    Opt("tls_ca", Path, None, "CA that client certificates must chain to"),
    Opt("tls_required", bool, False, "refuse NBD clients that do not start TLS"),
    Opt("log_level", str, "info", "debug, info, warning"),
)

NBD = Opt("nbd", str, "127.0.0.1:10809", "NBD TCP address HOST:PORT ('none' to disable)")
NBD_UNIX = Opt("nbd_unix", str, None, "also serve NBD on this unix socket")

REPLICA = Command(
    "replica",
    "Serve DIR: the head as NBD export 'head' (and ''), snapshots as 'snapshot/NAME'.\n\n"
    "Prints one JSON line with the bound addresses once it is ready. Stops cleanly on "
    "SIGTERM or Ctrl-C (flushing the head).",
    (
        Opt("directory", Path, REQUIRED, "replica directory (made if --size is given)",
            positional=True),
        Opt("size", str, None, "volume size to create, e.g. 10G"),
        NBD,
        NBD_UNIX,
        Opt("control", str, "127.0.0.1:10810", "control API address HOST:PORT"),
        *TLS_AND_LOGGING,
    ),
)

ENGINE = Command(
    "engine",
    "Serve volume NAME over NBD, mirroring every write to each --replica (and to the "
    "--local-replica it serves itself).\n\n"
    "Prints one JSON line with the bound addresses once it is ready. At start it finds "
    "the replicas holding every acknowledged write (by generation) and rebuilds the "
    "others online. Stops cleanly on SIGTERM or Ctrl-C.",
    (
        Opt("name", str, REQUIRED, "volume name (also the NBD export name)", positional=True),
        Opt("replica", str, None,
            "a replica's control URL, or NAME=URL; repeat for each replica", many=True),
        Opt("local_replica", str, None,
            "NAME=DIR: a replica this engine serves itself from DIR (data locality: no "
            "replica process, reads stay in-process); made when DIR holds none"),
        Opt("local_nbd", str, "127.0.0.1:0",
            "NBD TCP address of the local replica's snapshot and layer exports "
            "(rebuilds of other replicas, backups)"),
        Opt("local_control", str, "127.0.0.1:0", "control API address of the local replica"),
        Opt("size", str, None, "volume size, e.g. 10G (default: the replicas')"),
        NBD,
        NBD_UNIX,
        Opt("control", str, "127.0.0.1:10820", "control API address HOST:PORT"),
        Opt("timeout", float, 8.0, "seconds before a silent replica is set to ERR"),
        Opt("quorum_wait", float, 15.0,
            "with a --local-replica and others: seconds a write waits for a replica outside "
            "this process (the local one alone never acknowledges it) before failing"),
        Opt("state_file", Path, None,
            "file recording the highest generation written (refuses stale replicas)"),
        Opt("rebuild", bool, True, "rebuild stale replicas at start"),
        Opt("epoch", int, None,
            "fencing epoch issued by the manager; without it the engine takes one above "
            "the highest its replicas report"),
        Opt("fence_all", bool, False,
            "refuse to start unless every replica takes this engine's epoch (a forced "
            "takeover: the engine replaced may still write to a replica not fenced); nothing "
            "is claimed when one does not answer"),
        Opt("handoff", str, None,
            "listen on this unix socket (mode 0600, same user only) for a successor engine "
            "taking the volume over: a live upgrade (drove.engine.handoff)"),
        Opt("takeover", str, None,
            "take the volume over from the engine listening on this --handoff socket, with "
            "its NBD listeners and open client connections (its --nbd and --nbd-unix), "
            "instead of listening; needs an --epoch above the running engine's"),
        Opt("key_file", Path, None,
            "encrypt the volume (AES-XTS-256) with the data key in this file (128 hex "
            "digits; the file must be the user's alone, mode 0600): never on the command line"),
        *TLS_AND_LOGGING,
    ),
)

COMMANDS = {c.name: c for c in (REPLICA, ENGINE)}
"""kind (replica, engine) -> its serve command."""
