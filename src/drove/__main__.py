"""`python -m drove`: `replica serve` and `engine serve` lean (drove.launch), else the CLI."""

import sys

from drove.serve_options import COMMANDS


def main() -> None:
    """Serve without loading typer, click or rich where the arguments allow; else the CLI."""
    argv = sys.argv[1:]
    if len(argv) >= 2 and argv[0] in COMMANDS and argv[1] == "serve":
        from drove.launch import serve

        serve(argv[0], argv[2:])
        return
    from drove.cli.main import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
