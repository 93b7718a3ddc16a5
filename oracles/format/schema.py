"""What a golden case is, as the reading side sees it: the Case record, how each output is
compared (by its name), which kinds are causal, and --only matching.  Nothing here computes an
output: the checker (check.py) and the suite reader (golden.py) use this module without
importing refimpl's forward pass; cases.py (the writing side) computes the outputs.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from refimpl.config import Config

# kinds whose tokens attend to earlier ones: a routing difference at position p reaches p onward
CAUSAL_KINDS = ("prefill", "decode", "mtp_prefill", "mtp_module", "schedule", "mtp_speculation")


@dataclass
class Case:
    """One golden case. `inputs` and `weights` hold arrays in their STORED dtypes (float32,
    bfloat16, e4m3, int64): every engine reads exactly these values."""

    id: str
    kind: str
    pins: str  # one sentence: what this case pins down
    inputs: dict
    params: dict = field(default_factory=dict)
    config: Config | None = None
    weights: dict | None = None  # model cases: checkpoint tensors in the HF layout
    conventions: dict = field(default_factory=dict)  # topic -> the alternative its expected follows
    expect_under: str | None = None  # a mutant name: expected values follow that alternative
    path: str | None = None  # the case directory, once written (inputs, expected)
    model_path: str | None = None  # model cases, once written: the checkpoint directory engines load
    edge: str | None = None  # a config no published model has (spec edge): why it is in the suite

    @property
    def is_model(self) -> bool:
        return self.weights is not None

    @property
    def schedule(self) -> dict | None:
        """How an engine must run the case (scenario kinds, oracles/authoring/scenarios.py), or None."""
        return self.params.get("schedule")


def output_type(name: str) -> str:
    """How an output is compared: by its name (documented in docs/conformance.md)."""
    last = name.rsplit(".", 1)[-1]
    if last == "topk_idx":
        return "indices"
    if last == "topk_weight":
        return "routing_weights"
    if last == "logits":
        return "logits"
    if last == "tokens":
        return "tokens"
    return "continuous"


def matches(case_id: str, pattern: str | None) -> bool:
    """--only: comma-separated globs."""
    if not pattern:
        return True
    return any(fnmatch.fnmatchcase(case_id, p.strip()) for p in pattern.split(","))
