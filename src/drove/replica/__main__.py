"""`python -m drove.replica DIR [options]`: `drove replica serve` in a lean process."""

import sys

from drove.launch import serve

serve("replica", sys.argv[1:], prog_name="drove")
