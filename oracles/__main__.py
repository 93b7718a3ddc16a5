"""`python -m oracles`: the oracles command line (cli.py)."""

import sys

from .cli import main

sys.exit(main())
