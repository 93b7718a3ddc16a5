"""Candidates as Python objects, and loading them from `--adapter pkg.mod:factory`.

An adapter is any object with
    supports(case) -> True, or a string saying why not (the case is skipped with that reason)
    run(case)      -> {output name: array}   (numpy, or anything np.asarray / torch accepts)
and optionally
    close()        -> None: release the engine (its threads, GPU context, server). Called once,
                      after the last case, on the thread and in the process that built the adapter
                      (check.AdapterCandidate.close, isolated.ChildCandidate.close), before the
                      process ends; a close() that raises is a warning, not a verdict.
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
import os

import numpy as np

from . import OraclesError
from .calls import split_spec
from .check import (DEFAULT_CASE_TIMEOUT, AdapterCandidate, AdapterTimeout, CaseError, _text,
                    _Worker, check_timeout)
from .golden import Golden
from refimpl.checkpoint import DTYPE_NAMES, write_safetensors_planned


class RefimplAdapter:
    """refimpl itself as a candidate, in float32 (or another precision), optionally with one
    mutant (a mutants.Mutant) patched in: the clean reference and every bug in mutants.py.
    refimpl's forward pass is imported when the adapter is first used, not with this module."""

    def __init__(self, precision: str = "float32", mutant=None):
        self.precision, self.mutant = precision, mutant

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


def adapter_factory(spec: str):
    """'pkg.mod:factory' -> a function that imports the module and calls its factory (wherever
    the candidate runs it: its worker thread, or the adapter process). Whatever goes wrong in
    the import is one OraclesError naming the spec."""
    mod_name, attr = split_spec(spec)

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

    return factory


def load_adapter(spec: str, timeout: float = DEFAULT_CASE_TIMEOUT) -> AdapterCandidate:
    """'pkg.mod:factory' -> the candidate, in this process (factory() is called once). The
    import and the factory run on the candidate's worker thread with the same timeout as each
    case; whatever goes wrong there (an exception, sys.exit, no return) is one line and exit 2.
    oracles.isolated.ChildCandidate runs the same in a child process (the command line's
    default)."""
    return make_candidate(adapter_factory(spec), spec, timeout)


def build_adapter(factory, label: str):
    """factory() -> the adapter, checked to have supports(case) and run(case); an exception or
    sys.exit in the factory is one OraclesError naming `label` (KeyboardInterrupt propagates)."""
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


def make_candidate(factory, label: str, timeout: float = DEFAULT_CASE_TIMEOUT) -> AdapterCandidate:
    """factory() -> an adapter, called on the candidate's worker thread (where every later call
    runs, so an engine built there keeps its thread) with the case timeout -> the candidate.
    An exception, sys.exit or no return in the factory is one line and exit 2 naming `label`."""
    timeout = check_timeout(timeout)
    worker = _Worker() if timeout else None
    try:
        adapter = worker.call(lambda: build_adapter(factory, label), timeout, "the factory") \
            if worker is not None else build_adapter(factory, label)
    except AdapterTimeout:
        raise OraclesError(f"{label}: building the adapter did not return within {timeout:g} s "
                           "(--case-timeout)") from None
    return AdapterCandidate(adapter, label, timeout=timeout, worker=worker)


def write_outputs(golden_path: str, candidate, out: str, only=None,
                  errors: dict | None = None, expect_digest: str | None = None) -> dict:
    """The file route driven by an adapter: CANDIDATE/cases/<id>/outputs.safetensors for every
    supported case -> {case id: skip reason} for the others. A case whose adapter call fails
    (raises, exits, times out, its process dies) gets no file; its one-line reason goes to
    `errors`. Outputs are written one tensor at a time (a lazily read candidate.Outputs from an
    adapter process is never held whole)."""
    from .schema import matches

    golden = Golden(golden_path, expect_digest=expect_digest)
    if hasattr(candidate, "bind"):  # an adapter process: the same suite, the cases in this order
        candidate.bind(golden, [cid for cid in golden.cases if matches(cid, only)])
    skipped = {}
    errors = {} if errors is None else errors
    for cid in golden.cases:
        if not matches(cid, only):
            continue
        if candidate.stuck:
            errors[cid] = f"not run: the adapter is stuck ({candidate.stuck})"
            continue
        cache = {}

        def load(cid=cid):
            if "case" not in cache:
                cache["case"] = golden.load_case(cid)
            return cache["case"]
        try:
            ok = candidate.supports(cid, load)
            if ok is not True:
                skipped[cid] = ok
                continue
            outs = candidate.outputs(cid, load)
        except CaseError as e:
            errors[cid] = str(e)
            continue
        entries = [(k, DTYPE_NAMES.get(np.dtype(v.dtype)), tuple(v.shape)) for k, v in outs.items()]
        bad = [k for k, dt, _ in entries if dt is None]
        if bad:
            errors[cid] = f"run() returned output {bad[0]!r} as {outs[bad[0]].dtype} values, which " \
                          "safetensors cannot store"
            continue
        d = os.path.join(out, "cases", cid)
        os.makedirs(d, exist_ok=True)
        write_safetensors_planned(os.path.join(d, "outputs.safetensors"), entries,
                                  lambda k: np.asarray(outs[k]))
    return skipped
