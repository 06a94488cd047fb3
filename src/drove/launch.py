"""`drove replica serve` and `drove engine serve` without the CLI's libraries.

A serving process lives as long as its volume and should hold only what it
serves with: typer, click and rich (the CLI's tables, colours and help) would
stay resident in every replica and engine process for nothing.  So
``python -m drove replica serve ...`` and ``python -m drove engine serve ...``
(and ``python -m drove.replica ...``, ``python -m drove.engine ...``) parse
their options here with argparse, built from the same table
(:mod:`drove.serve_options`) as the typer commands in :mod:`drove.cli.replica`
and :mod:`drove.cli.engine`, which call the same functions below.  ``--help``
and usage errors are argparse's, generated from that table; this module never
loads the full CLI.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

from drove.serve_options import COMMANDS, Command, Opt
from drove.units import parse_address, parse_size

MAX_EPOCH = 10**18 - 1
"""The largest epoch a replica takes (18 digits)."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` as an error (as the CLI's ``fail`` does, without colour) and exit."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def tls_options(cert: Any, key: Any, ca: Any, required: bool) -> Any:
    """The server TLS context for --tls-cert/--tls-key/--tls-ca/--tls-required (or None)."""
    from drove.service import server_tls_context

    if cert or key:
        if not (cert and key):
            fail("TLS needs both --tls-cert and --tls-key")
        return server_tls_context(str(cert), str(key), str(ca) if ca else None)
    if required:
        fail("--tls-required needs --tls-cert and --tls-key")
    return None


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(message)s")


def _os_error(exc: OSError) -> NoReturn:
    fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


def serve_replica(directory: Path, size: str | None, nbd: str, nbd_unix: str | None,
                  control: str, tls_cert: Any, tls_key: Any, tls_ca: Any, tls_required: bool,
                  log_level: str) -> None:
    """Serve a replica directory until SIGTERM/SIGINT (the body of `drove replica serve`)."""
    from drove.replica.errors import ReplicaError
    from drove.replica.process import ReplicaSetupError, serve_replica
    from drove.service import run

    _logging(log_level)
    try:
        nbd_addr = None if nbd == "none" else parse_address(nbd)
        ctl_addr = parse_address(control)
        size_bytes = parse_size(size) if size is not None else None
    except ValueError as exc:
        fail(str(exc))
    if nbd_addr is None and nbd_unix is None:
        fail("nothing to serve on: give --nbd HOST:PORT or --nbd-unix PATH")
    tls = tls_options(tls_cert, tls_key, tls_ca, tls_required)
    try:
        run(lambda: serve_replica(directory, size_bytes, nbd=nbd_addr, unix=nbd_unix,
                                  control=ctl_addr, tls=tls, tls_required=tls_required))
    except (ReplicaSetupError, ReplicaError) as exc:
        fail(str(exc))  # the message names the file or the process holding the lock
    except OSError as exc:
        _os_error(exc)


def parse_replica(spec: str, index: int) -> tuple[str, str]:
    """NAME=URL or URL (named r<index>) -> (name, url)."""
    name, sep, url = spec.partition("=")
    if not sep:
        name, url = f"r{index}", spec
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"replica {spec!r}: give the replica's control URL, "
                         "e.g. http://127.0.0.1:10810 (or NAME=URL)")
    return name, url


def parse_local(spec: str) -> tuple[str, Path]:
    """NAME=DIR -> (name, directory)."""
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise ValueError(f"--local-replica {spec!r}: give NAME=DIR, e.g. r0=/var/lib/drove/r0")
    return name, Path(directory)


def serve_engine(name: str, replica: list[str] | None, local_replica: str | None,
                 local_nbd: str, local_control: str, size: str | None, nbd: str,
                 nbd_unix: str | None, control: str, timeout: float, quorum_wait: float,
                 state_file: Path | None,
                 rebuild: bool, epoch: int | None, fence_all: bool, handoff: str | None,
                 takeover: str | None, key_file: Path | None, tls_cert: Any,
                 tls_key: Any, tls_ca: Any, tls_required: bool, log_level: str) -> None:
    """Serve a volume over its replicas until SIGTERM/SIGINT (the body of `drove engine serve`)."""
    from drove.engine.generation import NoCurrentReplicaError
    from drove.engine.handoff import HandoffError
    from drove.engine.process import serve_engine
    from drove.service import run

    _logging(log_level)
    try:
        nbd_addr = None if nbd == "none" else parse_address(nbd)
        ctl_addr = parse_address(control)
        size_bytes = parse_size(size) if size is not None else 0
        replicas = [parse_replica(spec, i) for i, spec in enumerate(replica or [])]
        local = parse_local(local_replica) if local_replica is not None else None
        local_nbd_addr = None if local_nbd == "none" else parse_address(local_nbd)
        local_ctl_addr = parse_address(local_control)
    except ValueError as exc:
        fail(str(exc))
    names = [n for n, _ in replicas] + ([local[0]] if local else [])
    if not names:
        fail("no replica: give --replica URL (repeat for each) and/or --local-replica NAME=DIR",
             2)
    if len(set(names)) != len(names):
        fail("replica names must be unique")
    if timeout <= 0:
        fail("--timeout must be positive")
    if quorum_wait < 0:
        fail("--quorum-wait must be 0 or more seconds")
    if epoch is not None and not 1 <= epoch <= MAX_EPOCH:
        fail(f"--epoch must be between 1 and {MAX_EPOCH}, not {epoch}")
    if takeover is not None and epoch is None:
        fail("--takeover needs --epoch, above the running engine's (the manager issues it)")
    tls = tls_options(tls_cert, tls_key, tls_ca, tls_required)
    data_key = None
    if key_file is not None:
        from drove.engine.crypt import read_key_file

        try:
            data_key = read_key_file(key_file)
        except (OSError, ValueError) as exc:
            fail(f"--key-file {key_file}: {exc}")
    try:
        run(lambda: serve_engine(name, size_bytes, replicas, nbd=nbd_addr, unix=nbd_unix,
                                 control=ctl_addr, timeout=timeout, state_file=state_file,
                                 auto_rebuild=rebuild, epoch=epoch, tls=tls,
                                 tls_required=tls_required, local=local,
                                 local_nbd=local_nbd_addr, local_control=local_ctl_addr,
                                 quorum_wait=quorum_wait, fence_all=fence_all,
                                 data_key=data_key, handoff=handoff, takeover=takeover))
    except (NoCurrentReplicaError, HandoffError) as exc:
        fail(f"{exc}")
    except OSError as exc:
        _os_error(exc)


# ------------------------------------------------------------------ argv


class Unparsed(Exception):
    """The arguments do not fit the command's options (the message says how)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Unparsed(message)


class _Help(argparse.HelpFormatter):
    """Keeps the description's paragraphs; shows defaults that say something."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(p, width, initial_indent=indent,
                                          subsequent_indent=indent)
                            for p in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        return f"{action.help} (default: %(default)s)" if shown else str(action.help)


def _add(parser: argparse.ArgumentParser, opt: Opt) -> None:
    if opt.positional:
        parser.add_argument(opt.name, type=opt.kind, help=opt.help)
    elif opt.kind is bool:
        parser.add_argument(opt.flag, action=argparse.BooleanOptionalAction,
                            default=opt.default, help=opt.help)
    elif opt.many:
        # Not given: an empty list, as typer says.
        parser.add_argument(opt.flag, type=opt.kind, action="append", required=opt.required,
                            default=None if opt.required else list(opt.default or ()),
                            help=opt.help)
    else:
        parser.add_argument(opt.flag, type=opt.kind, required=opt.required,
                            default=None if opt.required else opt.default, help=opt.help)


def parser(command: Command, prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of ``command``'s options (its usage errors raise Unparsed)."""
    p = _Parser(prog=prog or f"drove {command.name} serve", description=command.help,
                formatter_class=_Help, allow_abbrev=False)
    for opt in command.options:
        _add(p, opt)
    return p


BODIES = {"replica": serve_replica, "engine": serve_engine}
"""kind -> the function serving it, called with every option by name."""


def serve(kind: str, argv: list[str], prog_name: str | None = None) -> None:
    """Run ``drove KIND serve ARGV`` (kind: replica or engine) with argparse.

    ``--help`` prints the options and exits; arguments that do not fit print the
    usage and the reason, and exit with status 2 (as the full CLI does).
    ``prog_name`` is what help and usage call the program (``drove`` by default).
    """
    p = parser(COMMANDS[kind], f"{prog_name or 'drove'} {kind} serve")
    try:
        args = p.parse_args(argv)
    except Unparsed as exc:
        p.print_usage(sys.stderr)
        fail(f"{exc} (`{p.prog} --help` lists the options)", 2)
    BODIES[kind](**vars(args))
