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
import os

import numpy as np

from . import OraclesError
from .check import AdapterCandidate
from .golden import Golden
from refimpl.checkpoint import write_safetensors


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


def load_adapter(spec: str) -> AdapterCandidate:
    """'pkg.mod:factory' -> the candidate (factory() is called once)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise OraclesError(f"--adapter {spec!r} must look like pkg.module:factory")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise OraclesError(f"--adapter {spec}: cannot import {mod_name} ({e})") from None
    try:
        factory = getattr(mod, attr)
    except AttributeError:
        raise OraclesError(f"--adapter {spec}: {mod_name} has no {attr}") from None
    adapter = factory()
    if not (hasattr(adapter, "supports") and hasattr(adapter, "run")):
        raise OraclesError(f"--adapter {spec}: the factory's object needs supports(case) and run(case)")
    return AdapterCandidate(adapter, spec)


def write_outputs(golden_path: str, candidate: AdapterCandidate, out: str, only=None) -> dict:
    """The file route driven by an adapter: CANDIDATE/cases/<id>/outputs.safetensors for every
    supported case -> {case id: skip reason} for the others."""
    from .cases import matches

    golden = Golden(golden_path)
    skipped = {}
    for cid in golden.cases:
        if not matches(cid, only):
            continue
        case = golden.load_case(cid)
        ok = candidate.adapter.supports(case)
        if ok is not True:
            skipped[cid] = str(ok)
            continue
        outs = candidate.adapter.run(case)
        d = os.path.join(out, "cases", cid)
        os.makedirs(d, exist_ok=True)
        write_safetensors(os.path.join(d, "outputs.safetensors"),
                          {k: np.ascontiguousarray(v) for k, v in outs.items()})
    return skipped
