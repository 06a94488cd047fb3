"""Typer commands built from a table of options (:mod:`drove.serve_options`).

Typer reads a command's parameters from its function's signature; the function
made here has the signature the table describes, so `drove replica serve` and
`drove engine serve` offer exactly what the lean argparse path
(:mod:`drove.launch`) parses from the same table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from drove.serve_options import Command, Opt


def _parameter(opt: Opt) -> inspect.Parameter:
    """The typed, annotated parameter typer turns into ``opt``."""
    kind: Any = list[opt.kind] if opt.many else opt.kind
    if opt.default is None:
        kind = kind | None
    info = typer.Argument(help=opt.help) if opt.positional else typer.Option(help=opt.help)
    default = inspect.Parameter.empty if opt.required else opt.default
    return inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, info])


def command_from_table(command: Command, body: Callable[..., None]) -> Callable[..., None]:
    """A function typer can register whose parameters are ``command``'s options.

    It calls ``body`` with every option by name.
    """
    def run(**options: Any) -> None:
        body(**options)

    params = [_parameter(opt) for opt in command.options]
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = command.help
    run.__name__ = run.__qualname__ = "serve"
    return run
