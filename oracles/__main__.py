"""`python -m oracles` and the `oracles` command: the oracles command line (cli.py). A command
that will run an adapter in its own process (`check`, `run` or `search` with --adapter or
--engine) starts that process first, before cli.py's imports (numpy, ml_dtypes): the two
interpreters start in parallel (docs/conformance.md section 5 measures it)."""

import sys

from .checking.spawn import ChildProcess, wants_child


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    child = None
    if wants_child(argv):
        try:
            child = ChildProcess()
        except OSError:  # the command starts one itself, and says why it cannot
            child = None
    try:
        from .cli import main as command_line  # after the adapter's process has started

        return command_line(argv, prespawned=child)
    finally:
        if child is not None:  # unused (a bad option, --help): killed; used: already ended
            child.kill()


if __name__ == "__main__":
    sys.exit(main())
