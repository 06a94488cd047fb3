"""`python -m drove` runs the CLI (`replica serve` and `engine serve` without its libraries)."""

from drove.launch import main

main()
