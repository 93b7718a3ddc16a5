"""A case's arrays in a working precision (the precisions of emulate.py): cast, rounded to
bfloat16, or for the fp8 profile the linear maps V3 ships in FP8 kept as stored (fp8.BlockFP8);
a stored FP8 checkpoint's weights read as the precision reads them.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from refimpl import fp8
from refimpl.layout import FP8_PROJECTIONS

from .. import OraclesError
from ..format.schema import Case

PRECISIONS = ("float64", "float32", "bf16", "fp8")
BF16 = np.dtype(ml_dtypes.bfloat16)
_KEEP_F32 = ("bias", "e_score_correction_bias", "_scale_inv")  # stored float32 in every checkpoint


def round_bf16(x):
    """Round to the nearest bfloat16, keep float32 storage."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return x
    return x.astype(np.float32).astype(BF16).astype(np.float32)


E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def is_fp8_weight(name: str, a) -> bool:
    """The linear maps V3 ships in FP8 (refimpl.layout.FP8_PROJECTIONS), by checkpoint name
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
    # (ml_dtypes' bfloat16 is no np.floating subtype: tested by name, or bf16-stored arrays
    # would be computed in bfloat16 arithmetic even for the float64 truth)
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype == BF16) or a.dtype == E4M3:
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
    if case.weights is not None and not isinstance(case.weights, dict):  # a user's checkpoint
        weights = case.weights.prepared(precision)  # cast per tensor as read (checkpoint_cases)
    else:
        weights = None if case.weights is None else \
            paired_fp8({k: _cast(k, v, precision) for k, v in case.weights.items()}, precision)
    return dataclasses.replace(
        case, inputs={k: _cast(k, v, precision) for k, v in case.inputs.items()}, weights=weights)


def working_dtype(precision: str):
    return np.float64 if precision == "float64" else np.float32
