"""The table of external commands (tools.tsv at the repo root): command -> Debian package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).resolve().parent.parent / "tools.tsv"
SCOPES = ("serve", "test")


class TableError(ValueError):
    """A malformed tools.tsv; the message names the line."""


@dataclass(frozen=True)
class Tool:
    """One row: a command, the Debian package that provides it, and who runs it."""

    command: str
    package: str
    scope: str  # "serve": drove itself runs it; "test": only tests/ and bench/ do
    line: int


def load(path: Path = TABLE) -> dict[str, Tool]:
    """The table's rows by command (the same rules as ./dev's reader)."""
    tools: dict[str, Tool] = {}
    for n, text in enumerate(path.read_text().splitlines(), 1):
        fields = text.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 3 or fields[2] not in SCOPES or (
                len(fields) > 3 and not fields[3].startswith("#")):
            raise TableError(f"{path}:{n}: want 'command<TAB>package<TAB>serve|test': {text!r}")
        command, package, scope = fields[:3]
        if command in tools:
            raise TableError(f"{path}:{n}: {command} again (first on line "
                             f"{tools[command].line})")
        tools[command] = Tool(command, package, scope, n)
    return tools
