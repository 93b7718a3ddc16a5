"""Running a case's refimpl computation in a chosen precision, with refimpl functions patched.

Precisions (the tolerance profiles are calibrated from these):
- float64: the truth.
- float32: inputs and weights as float32, refimpl's float32 working dtype.
- bf16: weights and inputs rounded to bfloat16 (the gate bias stays float32, as checkpoints
  store it), float32 arithmetic, and every operator's output rounded to bfloat16 at its boundary
  (linear maps, norms, softmax, rope, SwiGLU, each decoder layer's residual stream).
- fp8: bf16 as above, and the linear maps that DeepSeek-V3 ships in FP8 (attention projections,
  expert and dense FFN weights; not the embedding, lm_head, gate or eh_proj, SPEC.md section 7)
  use e4m3 weights with 128x128 block scales and e4m3 activations with per-token, per-128-channel
  scales (refimpl.fp8's quantisers where this refimpl has them, the same rules otherwise).

Patching replaces module attributes of refimpl for the duration of a `with` block and restores
them after; refimpl itself has no switch for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import ml_dtypes
import numpy as np

from refimpl import fp8, mla, model, moe, rope
from refimpl.ops import silu

from . import OraclesError
from .cases import KINDS, Case

PRECISIONS = ("float64", "float32", "bf16", "fp8")
BF16 = np.dtype(ml_dtypes.bfloat16)
_KEEP_F32 = ("bias", "e_score_correction_bias")  # stored float32 in every checkpoint


@contextlib.contextmanager
def patched(replacements):
    """replacements: [(module_or_class, attribute, new_value)]; restored on exit."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in replacements]
    try:
        for obj, name, value in replacements:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def round_bf16(x):
    """Round to the nearest bfloat16, keep float32 storage."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return x
    return x.astype(np.float32).astype(BF16).astype(np.float32)


def _rounding(f):
    @functools.wraps(f)
    def wrapper(*a, **k):
        out = f(*a, **k)
        if isinstance(out, tuple):
            return tuple(round_bf16(o) if o is not None else None for o in out)
        return round_bf16(out)
    return wrapper


def bf16_boundaries():
    """Round every operator's output to bf16 (see the module docstring). The gate's own linear
    map is left in float32 (refimpl computes router scores in at least float32, as HF does)."""
    targets = [(mla, "linear"), (mla, "rms_norm"), (mla, "softmax"), (mla, "apply_rope"),
               (model, "linear"), (model, "rms_norm"), (moe, "swiglu"), (rope, "apply_rope")]
    reps = [(obj, name, _rounding(getattr(obj, name))) for obj, name in targets]
    reps.append((model.Model, "decoder_layer", _rounding(model.Model.decoder_layer)))
    return patched(reps)


E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj")


def is_fp8_weight(name: str, a) -> bool:
    """The linear maps V3 ships in FP8: by checkpoint name (model cases) or short name."""
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    return np.ndim(a) == 2 and stem.rsplit(".", 1)[-1] in _FP8_LINEARS


def fp8_weight(w):
    """Block quantise and dequantise a weight (s = max(amax, 1e-4) / 448 per 128x128 tile)."""
    if hasattr(fp8, "quantize"):
        q, s = fp8.quantize(np.asarray(w, np.float64))
    else:
        from .suites import quantize_fp8
        q, s = quantize_fp8(np.asarray(w, np.float64))
    return fp8.dequantize(q, s, dtype=np.float64).astype(np.float32)


def fp8_activations(x, block: int = fp8.BLOCK):
    """Quantise and dequantise activations per token per 128 channels, in float32."""
    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if hasattr(fp8, "quantize_activations"):
        q, s = fp8.quantize_activations(x2, block)
        q = np.asarray(q).astype(np.float32)
    else:
        amax = np.maximum.reduceat(np.abs(x2), np.arange(0, k, block), axis=1)
        s = (np.maximum(amax, 1e-4) / 448.0).astype(np.float32)
        q = (x2 / np.repeat(s, block, axis=1)[:, :k]).astype(E4M3).astype(np.float32)
    return (q * np.repeat(s, block, axis=1)[:, :k]).reshape(x.shape)


def fp8_linears():
    """FP8 activations into every FP8 linear map (the weights are FP8 already, see prepared)."""
    def mla_linear(x, w):
        return fp8_activations(x) @ np.asarray(w, np.float32).T

    def swiglu(x, gate_proj, up_proj, down_proj):  # dense FFN, shared and routed experts
        xa = fp8_activations(x)
        return fp8_activations(silu(xa @ gate_proj.T) * (xa @ up_proj.T)) @ down_proj.T
    return patched([(mla, "linear", mla_linear), (moe, "swiglu", swiglu)])


def _cast(name, a, precision):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating) or a.dtype == E4M3:
        return a  # ids, positions, e4m3 values: as stored
    if precision == "float64":
        return a.astype(np.float64)
    if precision == "fp8" and is_fp8_weight(name, a):
        return fp8_weight(a)
    if precision in ("bf16", "fp8") and not name.endswith(_KEEP_F32):
        return round_bf16(a)
    return a.astype(np.float32)


def prepared(case: Case, precision: str) -> Case:
    """A copy of the case with its arrays in the working precision."""
    if precision not in PRECISIONS:
        raise OraclesError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return dataclasses.replace(
        case, inputs={k: _cast(k, v, precision) for k, v in case.inputs.items()},
        weights=None if case.weights is None else
        {k: _cast(k, v, precision) for k, v in case.weights.items()})


def working_dtype(precision: str):
    return np.float64 if precision == "float64" else np.float32


def run_case(case: Case, precision: str = "float64", mutant: str | None = None) -> dict:
    """The case's outputs from refimpl -> {name: float64 or int64 numpy array}, dataflow order.
    `mutant` names an entry of mutants.MUTANTS whose patch is active during the run."""
    from .mutants import MUTANTS

    kind = KINDS[case.kind]
    work = prepared(case, precision)
    stack = contextlib.ExitStack()
    with stack:
        if precision == "fp8":
            stack.enter_context(fp8_linears())  # inside the bf16 rounding of their outputs
        if precision in ("bf16", "fp8"):
            stack.enter_context(bf16_boundaries())
        if mutant is not None:
            stack.enter_context(MUTANTS[mutant].patch(case))
        out = kind.run(work, working_dtype(precision))
    result = {}
    for k, v in out.items():
        v = np.asarray(v)
        if precision in ("bf16", "fp8"):
            v = round_bf16(v)
        result[k] = v.astype(np.int64 if np.issubdtype(v.dtype, np.integer) else np.float64)
    return result
