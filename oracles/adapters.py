"""`--adapter oracles.adapters:refimpl_float32` (and _bf16, _fp8): the name the docs and
scripts use for refimpl as a candidate (oracles/engines/reference.py), and the adapter loading
functions of oracles/checking/candidates.py under their old module name."""

from .checking.candidates import load_adapter, make_candidate, write_outputs  # noqa: F401
from .engines.reference import (RefimplAdapter, refimpl_bf16, refimpl_float32,  # noqa: F401
                                refimpl_fp8)
