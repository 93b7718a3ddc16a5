"""Starting an adapter's process (isolated.py): `python -m oracles.checking.isolated` in a session
of its own, with a pipe each way. Standard library only, so that the command line can start it
before it imports numpy itself (oracles/__main__.py): the two interpreters then start in
parallel, and the adapter's costs no wall time on a machine with a core to spare."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def wants_child(argv) -> bool:
    """Whether a command line will run an adapter in its own process: `check`, `run` or
    `search` with --adapter or --engine and without --in-process (a guess from the words: a
    wrong one starts a process that is killed unused)."""
    argv = list(argv)
    named = any(a in ("--adapter", "--engine") or a.startswith(("--adapter=", "--engine="))
                for a in argv)
    return (bool(argv) and argv[0] in ("check", "run", "search") and named
            and "--in-process" not in argv)


class ChildProcess:
    """One adapter process: `proc` (Popen), `to` and `frm` (the pipe ends of this side), and
    `started_at` (time.monotonic() when it was started)."""

    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "oracles.checking.isolated", str(p2c_r), str(c2p_w)],
                pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL,
                stdout=sys.__stderr__.fileno() if sys.__stderr__ is not None else subprocess.DEVNULL,
                start_new_session=True, env=env, close_fds=True)
        except OSError:
            for fd in (p2c_r, p2c_w, c2p_r, c2p_w):
                os.close(fd)
            raise
        os.close(p2c_r)
        os.close(c2p_w)
        self.to, self.frm, self.started_at = p2c_w, c2p_r, time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to its process group (its own threads and children with it), reaped, the
        pipes closed. Safe to call twice."""
        kill(self.proc)
        for fd in (self.to, self.frm):
            try:
                os.close(fd)
            except OSError:
                pass


def kill(proc) -> None:
    """SIGKILL to a child's process group, reaped (None, or an ended child: nothing to do)."""
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
