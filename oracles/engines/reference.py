"""refimpl itself as a candidate: the clean reference in a chosen precision, and every mutant
(authoring/mutants.py) as a candidate of its own.

    oracles check GOLDEN --adapter oracles.adapters:refimpl_float32
    oracles check GOLDEN --adapter oracles.mutants:zero_group_mask

These adapters run refimpl's forward pass through the authoring layer's case kinds
(authoring.emulate.run_case), so they sit with the engines, above authoring; `oracles.adapters`
and `oracles.mutants` are the names the command lines above use (oracles/adapters.py,
oracles/mutants.py re-export them).
"""

from __future__ import annotations

from refimpl.backend import device_module

from ..authoring.cases import KINDS
from ..authoring.emulate import run_case
from ..authoring.mutants import MUTANTS


class RefimplAdapter:
    """refimpl itself as a candidate, in float32 (or another precision), optionally with one
    mutant (a mutants.Mutant) patched in: the clean reference and every bug in mutants.py."""

    def __init__(self, precision: str = "float32", mutant=None, device=None):
        self.precision, self.mutant = precision, mutant
        self.device = None if device in (None, "cpu") else device  # "gpu" or an array module
        # the profile that emulates this candidate's mode (oracles check picks it by default)
        self.mode = precision if precision != "float64" else "float32"

    def supports(self, case):
        return True if case.kind in KINDS else f"kind {case.kind!r} is not known to this refimpl"

    def run(self, case):
        xp = None if self.device is None else device_module(self.device)
        return run_case(case, self.precision, self.mutant, device=xp)


def refimpl_float32():
    return RefimplAdapter("float32")


def refimpl_bf16():
    return RefimplAdapter("bf16")


def refimpl_fp8():
    return RefimplAdapter("fp8")


def mutant_factory(name: str):
    """The `--adapter oracles.mutants:NAME` factory: refimpl in float32 with that mutant."""
    def factory():
        return RefimplAdapter(precision="float32", mutant=MUTANTS[name])
    factory.__name__ = name
    what = "one allowed alternative" if MUTANTS[name].allowed else "one bug"
    factory.__doc__ = f"refimpl in float32 with {what}: {MUTANTS[name].bug}"
    return factory
