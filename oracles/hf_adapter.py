"""transformers as an `--adapter` (kept for existing scripts): the built-in engine adapter
oracles.engines.hf, which `oracles check GOLDEN --engine transformers` runs.

    oracles check GOLDEN --adapter oracles.hf_adapter:factory          (= --engine transformers)
    oracles check GOLDEN --adapter oracles.hf_adapter:factory_bf16     (--engine-option dtype=bfloat16)
"""

from __future__ import annotations

from .engines.hf import Engine


def factory():
    """float32 weights and arithmetic (check with --profile float32)."""
    return Engine({"dtype": "float32"})


def factory_bf16():
    """bfloat16 weights and activations, as engines serve the model (--profile bf16)."""
    return Engine({"dtype": "bfloat16"})
