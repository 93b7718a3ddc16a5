"""`--adapter oracles.mutants:NAME`: each mutant of oracles/authoring/mutants.py as a candidate
(refimpl in float32 with that one bug, oracles/engines/reference.py); MUTANTS and Mutant under
their old module name."""

from .authoring.mutants import MUTANTS, Mutant  # noqa: F401
from .engines.reference import mutant_factory


def __getattr__(name):
    if name in MUTANTS:
        return mutant_factory(name)
    raise AttributeError(name)
