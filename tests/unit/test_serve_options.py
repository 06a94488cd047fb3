"""The serve commands' one table of options, as typer and argparse read it.

`drove replica serve` / `drove engine serve` (typer, the full CLI) and `python -m
drove replica serve` / `... engine serve` (argparse, the lean path the agent runs)
are both built from drove.serve_options: the same options must parse to the
same values, and the lean path must answer --help and bad arguments itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main

from drove import launch
from drove.cli.main import app
from drove.serve_options import COMMANDS, Opt

SAMPLE = {int: "7", float: "2.5", str: "v", Path: "/v"}


def _argv(options: tuple[Opt, ...]) -> list[str]:
    """Every option given once, each flag set against its default."""
    argv: list[str] = []
    for opt in options:
        if opt.positional:
            argv.insert(0, SAMPLE[opt.kind])
        elif opt.kind is bool:
            argv.append(opt.flag.replace("--", "--no-") if opt.default else opt.flag)
        else:
            argv += [opt.flag, SAMPLE[opt.kind]]
    return argv


def _typer_serve(kind: str) -> Any:
    return typer.main.get_command(app).commands[kind].commands["serve"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_typer_and_argparse_offer_the_same_options(kind: str) -> None:
    """The same flags, and the same required ones, in both parsers."""
    command = _typer_serve(kind)
    typer_flags = {o for p in command.params for o in (*p.opts, *p.secondary_opts)
                   if o.startswith("--") and o != "--help"}
    parser = launch.parser(COMMANDS[kind])
    argparse_flags = {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}
    assert typer_flags == argparse_flags
    assert {p.name for p in command.params if p.required} == \
        {a.dest for a in parser._actions if a.required}


@pytest.mark.parametrize("kind", sorted(COMMANDS))
@pytest.mark.parametrize("given", ["all", "required"])
def test_typer_and_argparse_parse_alike(kind: str, given: str) -> None:
    """Every option given (or only the required ones): the same values, types included."""
    options = COMMANDS[kind].options
    if given == "required":
        options = tuple(o for o in options if o.required)
    argv = _argv(options)
    from_typer = _typer_serve(kind).make_context("serve", list(argv)).params
    from_argparse = vars(launch.parser(COMMANDS[kind]).parse_args(argv))
    from_typer = {k: list(v) if isinstance(v, tuple) else v for k, v in from_typer.items()}
    assert from_typer == from_argparse
    assert set(from_argparse) == {o.name for o in COMMANDS[kind].options}


def test_engine_takes_an_epoch() -> None:
    """--epoch is an optional int, None when not given."""
    parser = launch.parser(COMMANDS["engine"])
    base = ["vol", "--replica", "http://127.0.0.1:1"]
    assert parser.parse_args(base).epoch is None
    assert parser.parse_args([*base, "--epoch", "12"]).epoch == 12
    with pytest.raises(launch.Unparsed, match="--epoch: invalid int value"):
        parser.parse_args([*base, "--epoch", "twelve"])


def lean(*argv: str) -> subprocess.CompletedProcess[str]:
    """`python -X importtime -m drove ARGV`: its output, with the import log on stderr."""
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "drove", *argv],
                          capture_output=True, text=True, timeout=60)


def imported(stderr: str) -> set[str]:
    """Top-level packages an `-X importtime` log shows imported."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_lean_help_lists_the_table(kind: str) -> None:
    """`python -m drove KIND serve --help`: argparse's help from the table, no CLI loaded."""
    r = lean(kind, "serve", "--help")
    assert r.returncode == 0, r.stderr
    for opt in COMMANDS[kind].options:
        assert (opt.name if opt.positional else opt.flag) in r.stdout
        assert opt.help.split()[0] in r.stdout
    assert COMMANDS[kind].help.split(".")[0] in " ".join(r.stdout.split())
    mods = imported(r.stderr)
    assert "drove" in mods and not mods & {"typer", "click", "rich"}


def test_lean_bad_arguments_say_what_is_wrong() -> None:
    """Unknown or malformed options: usage, the reason, status 2, nothing served."""
    r = lean("replica", "serve", "/nonexistent/dir", "--bogus")
    assert r.returncode == 2
    assert "usage: drove replica serve" in r.stderr
    assert "unrecognized arguments: --bogus" in r.stderr
    assert "`drove replica serve --help` lists the options" in r.stderr
    r = lean("engine", "serve", "vol", "--epoch", "3")
    assert r.returncode == 2
    assert "no replica: give --replica URL" in r.stderr
    r = lean("engine", "serve", "vol", "--local-replica", "r0")
    assert r.returncode == 1
    assert "--local-replica 'r0': give NAME=DIR" in r.stderr
    r = lean("engine", "serve", "vol", "--replica", "http://127.0.0.1:1", "--epoch", "x")
    assert r.returncode == 2
    assert "argument --epoch: invalid int value: 'x'" in r.stderr
    r = lean("engine", "serve", "vol", "--replica", "http://127.0.0.1:1", "--epoch", "0")
    assert r.returncode == 1
    assert "--epoch must be between 1 and" in r.stderr
    assert not imported(r.stderr) & {"typer", "click", "rich"}


def test_other_commands_still_reach_the_full_cli() -> None:
    """`python -m drove version` (not a serve command) goes to the typer CLI."""
    r = lean("version")
    assert r.returncode == 0 and r.stdout.strip()
    assert "typer" in imported(r.stderr)
