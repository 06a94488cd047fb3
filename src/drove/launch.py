"""`drove replica serve` and `drove engine serve` without the CLI's libraries.

A serving process lives as long as its volume and should hold only what it
serves with: typer, click and rich (the CLI's tables, colours and help) would
stay resident in every replica and engine process for nothing.  So
``python -m drove replica serve ...`` and ``python -m drove engine serve ...``
(and ``python -m drove.replica ...``, ``python -m drove.engine ...``) parse
their options here with argparse -- the same options, defaults and checks as
the typer commands in :mod:`drove.cli.replica` and :mod:`drove.cli.engine`,
which call the same functions below.  Anything this parser does not take as
it is (``--help``, a bad option, a missing argument) goes to the full CLI,
which prints its usual help or usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from drove.units import parse_address, parse_size


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


def serve_engine(name: str, replica: list[str], size: str | None, nbd: str,
                 nbd_unix: str | None, control: str, timeout: float, state_file: Path | None,
                 rebuild: bool, tls_cert: Any, tls_key: Any, tls_ca: Any, tls_required: bool,
                 log_level: str) -> None:
    """Serve a volume over its replicas until SIGTERM/SIGINT (the body of `drove engine serve`)."""
    from drove.engine.generation import NoCurrentReplicaError
    from drove.engine.process import serve_engine
    from drove.service import run

    _logging(log_level)
    try:
        nbd_addr = None if nbd == "none" else parse_address(nbd)
        ctl_addr = parse_address(control)
        size_bytes = parse_size(size) if size is not None else 0
        replicas = [parse_replica(spec, i) for i, spec in enumerate(replica)]
    except ValueError as exc:
        fail(str(exc))
    if len({n for n, _ in replicas}) != len(replicas):
        fail("replica names must be unique")
    if timeout <= 0:
        fail("--timeout must be positive")
    tls = tls_options(tls_cert, tls_key, tls_ca, tls_required)
    try:
        run(lambda: serve_engine(name, size_bytes, replicas, nbd=nbd_addr, unix=nbd_unix,
                                 control=ctl_addr, timeout=timeout, state_file=state_file,
                                 auto_rebuild=rebuild, tls=tls, tls_required=tls_required))
    except NoCurrentReplicaError as exc:
        fail(f"{exc}")
    except OSError as exc:
        _os_error(exc)


# ------------------------------------------------------------------ argv


class Unparsed(Exception):
    """The lean parser does not take these arguments as they are: the full CLI answers."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Unparsed(message)


def _parser(prog: str) -> _Parser:
    return _Parser(prog=prog, add_help=False, allow_abbrev=False)


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path)
    p.add_argument("--tls-required", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--log-level", default="info")


def replica_parser() -> argparse.ArgumentParser:
    """The options of `drove replica serve` (those of :func:`drove.cli.replica.serve`)."""
    p = _parser("drove replica serve")
    p.add_argument("directory", type=Path)
    p.add_argument("--size")
    p.add_argument("--nbd", default="127.0.0.1:10809")
    p.add_argument("--nbd-unix")
    p.add_argument("--control", default="127.0.0.1:10810")
    _tls_args(p)
    return p


def engine_parser() -> argparse.ArgumentParser:
    """The options of `drove engine serve` (those of :func:`drove.cli.engine.serve`)."""
    p = _parser("drove engine serve")
    p.add_argument("name")
    p.add_argument("--replica", action="append", required=True)
    p.add_argument("--size")
    p.add_argument("--nbd", default="127.0.0.1:10809")
    p.add_argument("--nbd-unix")
    p.add_argument("--control", default="127.0.0.1:10820")
    p.add_argument("--timeout", type=float, default=8.0)
    p.add_argument("--state-file", type=Path)
    p.add_argument("--rebuild", action=argparse.BooleanOptionalAction, default=True)
    _tls_args(p)
    return p


COMMANDS = {"replica": (replica_parser, serve_replica), "engine": (engine_parser, serve_engine)}
"""kind -> (its argv parser, the function serving it)."""


def serve(kind: str, argv: list[str], prog_name: str | None = None) -> None:
    """Run ``drove KIND serve ARGV`` (kind: replica or engine), lean when the arguments allow.

    ``prog_name`` is what usage messages call the program (click's guess by default).
    """
    parser, command = COMMANDS[kind]
    try:
        if any(a in ("-h", "--help") for a in argv) or "--" in argv:
            raise Unparsed("help")
        args = vars(parser().parse_args(argv))
    except Unparsed:
        from drove.cli.main import app

        app([kind, "serve", *argv], prog_name=prog_name)
        return
    command(**args)


def main(argv: list[str] | None = None) -> None:
    """``python -m drove``: the serve commands lean, everything else through the full CLI."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] in COMMANDS and argv[1] == "serve":
        serve(argv[0], argv[2:])
        return
    from drove.cli.main import main as cli_main

    cli_main()
