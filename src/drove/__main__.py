"""`python -m drove` runs the CLI."""

from drove.cli.main import main

main()
