"""Running a case's refimpl computation in a chosen precision.

Precisions (the tolerance profiles are calibrated from these):
- float64: the truth.
- float32: inputs and weights as float32, refimpl's float32 working dtype.
- bf16: weights and inputs rounded to bfloat16 (the gate bias stays float32, as checkpoints
  store it), float32 arithmetic, and every operator's output rounded to bfloat16 at its boundary
  through refimpl's one precision hook, `refimpl.ops.rounding(round_bf16)`: linear maps (SwiGLU's
  projections, the MTP modules' eh_proj and the heads included), RMSNorms (enorm, hnorm and
  shared_head.norm included), the attention softmax, RoPE, and each decoder layer's output; the
  router stays float32.
- fp8: bf16 as above, and the linear maps that DeepSeek-V3 ships in FP8 (attention projections,
  expert and dense FFN weights; not the embedding, lm_head, gate or eh_proj, SPEC.md section 7)
  run through refimpl's own FP8 path: weights block-quantised by fp8.quantize and multiplied by
  fp8.fp8_gemm (activations quantised per token per 128 channels by fp8.quantize_activations,
  per-128-block float32 accumulation, as DeepSeek's fp8_gemm); model cases run
  Model(fp8_activations=True) (cases._model sees the fp8.BlockFP8 weights). kv_b_proj is
  dequantised, as that path keeps it.

No refimpl function is patched for a precision: the precision is the case's arrays (`prepared`)
and the rounding policy.  Mutants (mutants.py) do patch one refimpl function each for the
duration of a run, through `patched`.
"""

from __future__ import annotations

import contextlib
import dataclasses

import ml_dtypes
import numpy as np

from refimpl import fp8, ops
from refimpl.backend import to_numpy
from refimpl.checkpoint import FP8_PROJECTIONS

from . import OraclesError
from .cases import KINDS, Case, placed

PRECISIONS = ("float64", "float32", "bf16", "fp8")
# engine modes (oracles/engines/modes.py): a base precision above plus patches of their own
MODE_PRECISIONS = ("f16_kv", "bf16_f32_experts", "fp8_kv")
BF16 = np.dtype(ml_dtypes.bfloat16)
_KEEP_F32 = ("bias", "e_score_correction_bias", "_scale_inv")  # stored float32 in every checkpoint


@contextlib.contextmanager
def patched(replacements):
    """replacements: [(module_or_class, attribute, new_value)]; restored on exit (mutants.py)."""
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


E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def is_fp8_weight(name: str, a) -> bool:
    """The linear maps V3 ships in FP8 (refimpl.checkpoint.FP8_PROJECTIONS), by checkpoint name
    (model cases) or by the short names of component cases (`q_a_proj`, `experts.3.up_proj`)."""
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    return np.ndim(a) == 2 and stem.rsplit(".", 1)[-1] in FP8_PROJECTIONS


def fp8_weight(name: str, w):
    """A weight V3 ships in FP8, held as an FP8 engine holds it: refimpl's block quantisation
    (fp8.quantize), kept as stored (fp8.BlockFP8), so that refimpl's ops.linear multiplies it
    with fp8.fp8_gemm: activations quantised per token per 128 channels, e4m3 products summed
    per 128-wide block in float32, each block scaled and accumulated in float32. kv_b_proj is
    dequantised instead, as Model(fp8_activations=True) and DeepSeek's absorbed attention use it
    (split per head, no activation quantisation)."""
    q, s = fp8.quantize(np.asarray(w, np.float64))
    if name.removesuffix(".weight").endswith("kv_b_proj"):
        return fp8.dequantize(q, s, dtype=np.float32)
    return fp8.BlockFP8(q, s)


def paired_fp8(weights: dict, precision: str) -> dict:
    """A checkpoint's stored FP8 weights (an e4m3 `<name>` with its float32 `<name>_scale_inv`,
    the FP8 model cases) as the precision holds them: kept as stored (fp8.BlockFP8, run through
    the FP8 GEMM) for the fp8 profile, dequantised (fp8.dequantize) and cast otherwise."""
    out = dict(weights)
    for name in [n for n in out if n.endswith("_scale_inv")]:
        stem = name[: -len("_scale_inv")]
        if stem in out and np.asarray(out[stem]).dtype == E4M3:
            q, s = out[stem], np.asarray(out.pop(name), np.float32)
            out[stem] = fp8.BlockFP8(q, s) if precision == "fp8" else \
                _cast(stem, fp8.dequantize(q, s, dtype=np.float64), precision)
    return out


def _cast(name, a, precision):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating) or a.dtype == E4M3:
        return a  # ids, positions, e4m3 values: as stored
    if precision == "float64":
        return a.astype(np.float64)
    if precision == "fp8" and is_fp8_weight(name, a):
        return fp8_weight(name, a)
    if precision in ("bf16", "fp8") and not name.endswith(_KEEP_F32):
        return round_bf16(a)
    return a.astype(np.float32)


def prepared(case: Case, precision: str) -> Case:
    """A copy of the case with its arrays in the working precision."""
    if precision not in PRECISIONS:
        raise OraclesError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if case.weights is not None and not isinstance(case.weights, dict):  # a checkpoint reference
        weights = case.weights.prepared(precision)  # cast per tensor as read (checkpoint_golden)
    else:
        weights = None if case.weights is None else \
            paired_fp8({k: _cast(k, v, precision) for k, v in case.weights.items()}, precision)
    return dataclasses.replace(
        case, inputs={k: _cast(k, v, precision) for k, v in case.inputs.items()}, weights=weights)


def on_device(case: Case, xp) -> Case:
    """The case with its floating-point inputs (activations, weights of component cases) copied
    to the array module xp's device, explicitly; token ids, positions and expert indices stay on
    the host, where the bookkeeping that reads them runs, and so do e4m3 arrays (CuPy has no FP8
    dtype: their bytes are copied where a weight is decoded, fp8.dequantize_bits)."""
    def place(v):
        a = np.asarray(v)
        return xp.asarray(a) if np.issubdtype(a.dtype, np.floating) and a.dtype != E4M3 else v
    return dataclasses.replace(case, inputs={k: place(v) for k, v in case.inputs.items()})


def working_dtype(precision: str):
    return np.float64 if precision == "float64" else np.float32


def run_case(case: Case, precision: str = "float64", mutant=None, alone: bool = False,
             device=None) -> dict:
    """The case's outputs from refimpl -> {name: float64 or int64 numpy array}, dataflow order.
    `mutant` (a mutants.Mutant) is patched in during the run. `alone`: the kind's standalone
    computation where it has one (the expected values of scenario kinds).  `device` (an array
    module, e.g. cupy): the case's inputs are copied there, so the component functions and the
    model (cases._model follows its inputs) run on it; the outputs are copied back."""
    kind = KINDS[case.kind]
    mode = None
    if precision in MODE_PRECISIONS:
        from .engines.modes import MODES
        mode, precision = MODES[precision], MODES[precision].base
    stack = contextlib.ExitStack()
    with stack:
        if precision in ("bf16", "fp8"):
            stack.enter_context(ops.rounding(round_bf16))
        if mode is not None:
            stack.enter_context(mode.patches())
        if mutant is not None:
            stack.enter_context(mutant.patch(case))
        # prepared inside the mutant: a candidate's own loading (dequantising a stored FP8
        # checkpoint, quantising for the fp8 profile) has its bug too
        work = prepared(case, precision)
        if device is not None:
            work = on_device(work, device)
            stack.enter_context(placed(device))
        out = (kind.alone if alone and kind.alone else kind.run)(work, working_dtype(precision))
    result = {}
    for k, v in out.items():
        v = to_numpy(v)
        if precision in ("bf16", "fp8"):
            v = round_bf16(v)
        result[k] = v.astype(np.int64 if np.issubdtype(v.dtype, np.integer) else np.float64)
    return result
