"""`python -m drove.engine NAME --replica URL [options]`: `drove engine serve`, lean."""

import sys

from drove.launch import serve

serve("engine", sys.argv[1:], prog_name="drove")
