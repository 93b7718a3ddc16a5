"""Candidates as Python objects, and loading them from `--adapter pkg.mod:factory`.

An adapter is any object with
    supports(case) -> True, or a string saying why not (the case is skipped with that reason)
    run(case)      -> {output name: array}   (numpy, or anything np.asarray / torch accepts)
where `case` has .id, .kind, .params, .inputs (numpy arrays as stored), .config (refimpl Config or
None), .weights (model cases: the checkpoint tensors) and .path (the case directory, holding
config.json and model.safetensors for model cases).
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
