"""`python -m refimpl`: the refimpl command line (cli.py)."""

import sys

from .cli import main

sys.exit(main())
