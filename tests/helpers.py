"""Shared test utilities: run the command lines as a user would, small models in memory."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

import refimpl
from refimpl.writer import random_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, module="refimpl", cwd=None):
    """Run `python -m <module> args...` with this checkout first on the path -> CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def run_main(*args, module="refimpl"):
    """The command line in this process (fast: no interpreter start) -> (exit code, stdout,
    stderr).  An exception that escapes main() is a traceback for a user: it fails the test."""
    import contextlib
    import importlib
    import io

    main = importlib.import_module(f"{module}.cli").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def tiny_model(seed=0, cfg=None, **kw):
    """The tiny preset (or cfg) with random well-scaled weights, in memory."""
    cfg = cfg or refimpl.Config.preset("tiny")
    return refimpl.Model.from_arrays(cfg, random_weights(cfg, seed), **kw)


def rel_err(a, b):
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


class Reused:
    """A candidate (checking.candidates) whose outputs are computed once per case and handed
    again when another check (another profile, with or without conditioning) asks for them, as
    oracles.engines.catalogue._Cached does: the same outputs the candidate gives every time,
    without recomputing them. Everything else (supports, label, ...) is the candidate's own."""

    def __init__(self, candidate):
        self._candidate, self._outputs = candidate, {}

    def __getattr__(self, name):
        return getattr(self._candidate, name)

    def outputs(self, case_id, load):
        if case_id not in self._outputs:
            self._outputs[case_id] = self._candidate.outputs(case_id, load)
        return self._outputs[case_id]
