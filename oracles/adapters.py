"""Candidates as Python objects, and loading them from `--adapter pkg.mod:factory`.

An adapter is any object with
    supports(case) -> True, or a string saying why not (the case is skipped with that reason)
    run(case)      -> {output name: array}   (numpy, or anything np.asarray / torch accepts)
where `case` has .id, .kind, .params, .inputs (numpy arrays as stored), .config (refimpl Config or
None), .weights (model cases: the checkpoint tensors) and .path (the case directory, holding
config.json and model.safetensors for model cases).

Scenario cases (kinds `schedule` and `mtp_speculation`, oracles/scenarios.py) also have
.schedule (= .params["schedule"]; None for every other case): how the engine must run the
requests, e.g. for `schedule`

    {"format": 1, "requests": 2, "steps": [
        {"op": "forward", "batch": [[0, 20]]},                          # one forward: request 0's next 20 tokens
        {"op": "share_prefix", "request": 1, "from": 0, "length": 20},  # request 1 reuses those 20 cache entries
        {"op": "forward", "batch": [[0, 5], [1, 7]]},                   # one batch: 5 more of 0, 7 of 1
        {"op": "forward", "batch": [[1, 1]], "repeat": 3}]}             # three decode steps of request 1

with request r's tokens in .inputs["request.<r>.input_ids"] [1, n_r], and outputs named
request.<r>.logits (required) and request.<r>.<trace name> over the positions the schedule
computes for r. An engine that cannot run a schedule as written returns a reason from
supports(case) (the case is skipped, never passed); running the requests some other way would
not test the path the case is for. oracles.scenarios.expand(schedule, lengths) checks a schedule
and unrolls it into one entry per forward.
"""

from __future__ import annotations

import importlib
import math
import os

import numpy as np

from . import OraclesError
from .check import DEFAULT_CASE_TIMEOUT, AdapterCandidate, AdapterTimeout, CaseError, _text, _Worker
from .golden import Golden
from refimpl.checkpoint import write_safetensors


class RefimplAdapter:
    """refimpl itself as a candidate, in float32 (or another precision), optionally with one
    mutant (a mutants.Mutant) patched in: the clean reference and every bug in mutants.py.
    refimpl's forward pass is imported when the adapter is first used, not with this module."""

    def __init__(self, precision: str = "float32", mutant=None):
        self.precision, self.mutant = precision, mutant
        # the profile that emulates this candidate's mode (oracles check picks it by default)
        self.mode = precision if precision != "float64" else "float32"

    def supports(self, case):
        from .cases import KINDS
        return True if case.kind in KINDS else f"kind {case.kind!r} is not known to this refimpl"

    def run(self, case):
        from .emulate import run_case
        return run_case(case, self.precision, self.mutant)


def refimpl_float32():
    return RefimplAdapter("float32")


def refimpl_float64():
    return RefimplAdapter("float64")


def refimpl_bf16():
    return RefimplAdapter("bf16")


def refimpl_fp8():
    return RefimplAdapter("fp8")


def load_adapter(spec: str, timeout: float = DEFAULT_CASE_TIMEOUT) -> AdapterCandidate:
    """'pkg.mod:factory' -> the candidate (factory() is called once). The import and the factory
    run on the candidate's worker thread with the same timeout as each case; whatever goes
    wrong there (an exception, sys.exit, no return) is one line and exit 2."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise OraclesError(f"--adapter {spec!r} must look like pkg.module:factory")

    def factory():
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise OraclesError(f"--adapter {spec}: cannot import {mod_name} ({e})") from None
        except BaseException as e:  # noqa: BLE001 - anything the module does at import
            if isinstance(e, KeyboardInterrupt):
                raise
            raise OraclesError(f"--adapter {spec}: importing {mod_name} raised "
                               f"{type(e).__name__}: {_text(e)}") from None
        f = getattr(mod, attr, None)
        if f is None or not callable(f):
            raise OraclesError(f"--adapter {spec}: {mod_name} has no callable {attr}")
        return f()

    return make_candidate(factory, spec, timeout)


def make_candidate(factory, label: str, timeout: float = DEFAULT_CASE_TIMEOUT) -> AdapterCandidate:
    """factory() -> an adapter, called on the candidate's worker thread (where every later call
    runs, so an engine built there keeps its thread) with the case timeout -> the candidate.
    An exception, sys.exit or no return in the factory is one line and exit 2 naming `label`."""
    if not (timeout >= 0 and math.isfinite(timeout)):
        raise OraclesError(f"--case-timeout {timeout!r}: must be a number of seconds >= 0")
    worker = _Worker() if timeout else None

    def make():
        try:
            adapter = factory()
        except OraclesError:
            raise
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            raise OraclesError(f"{label}: the factory raised {type(e).__name__}: {_text(e)}") from None
        if not (callable(getattr(adapter, "supports", None)) and callable(getattr(adapter, "run", None))):
            raise OraclesError(f"{label}: the factory's object needs supports(case) and run(case)")
        return adapter

    try:
        adapter = worker.call(make, timeout, "the factory") if worker is not None else make()
    except AdapterTimeout:
        raise OraclesError(f"{label}: building the adapter did not return within {timeout:g} s "
                           "(--case-timeout)") from None
    return AdapterCandidate(adapter, label, timeout=timeout, worker=worker)


def write_outputs(golden_path: str, candidate: AdapterCandidate, out: str, only=None,
                  errors: dict | None = None, expect_digest: str | None = None) -> dict:
    """The file route driven by an adapter: CANDIDATE/cases/<id>/outputs.safetensors for every
    supported case -> {case id: skip reason} for the others. A case whose adapter call fails
    (raises, exits, times out) gets no file; its one-line reason goes to `errors`."""
    from .schema import matches

    golden = Golden(golden_path, expect_digest=expect_digest)
    skipped = {}
    errors = {} if errors is None else errors
    for cid in golden.cases:
        if not matches(cid, only):
            continue
        if candidate.stuck:
            errors[cid] = f"not run: the adapter is stuck ({candidate.stuck})"
            continue
        case = golden.load_case(cid)
        try:
            ok = candidate.supports(cid, lambda: case)
            if ok is not True:
                skipped[cid] = ok
                continue
            outs = candidate.outputs(cid, lambda: case)
        except CaseError as e:
            errors[cid] = str(e)
            continue
        d = os.path.join(out, "cases", cid)
        os.makedirs(d, exist_ok=True)
        write_safetensors(os.path.join(d, "outputs.safetensors"),
                          {k: np.ascontiguousarray(v) for k, v in outs.items()})
    return skipped
