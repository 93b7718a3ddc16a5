"""Engine precision modes, emulated in refimpl for calibration: the tolerance profiles
f16_kv, bf16_f32_experts and fp8_kv (tolerance.py) come from running each case again in one of
these modes, exactly as the float32, bf16 and fp8 profiles come from emulate.py's precisions.

- f16_kv: llama.cpp's default (type_k = type_v = f16). float32 weights and arithmetic; the
  latent cache entries (c_kv and the roped k_rope) rounded to float16 where attention reads
  them, and the operands multiplied with them rounded to float16 too (the queries, and the
  attention probabilities that weight the values): GGML's CPU matrix product converts its
  second operand to the cache's type (vec_dot_type f16).
- bf16_f32_experts: a bf16 model run as MLX-LM runs it on a CPU, whose GatherMM refuses bf16:
  the bf16 profile (weights rounded to bf16, every operator's output rounded at its boundary),
  except the routed experts, whose GEMMs run in float32 on the bf16 weight values with no
  rounding inside or at the end of each expert, and whose weighted outputs are summed in one
  float32 reduction, not per add (MLX-LM sums them in one `(y * scores[..., None]).sum(axis=-2)`,
  mlx_lm/models/deepseek_v3.py:282, and its SwitchGLU returns float32 here); the MoE block's
  output with the shared expert is rounded as in bf16 (more rounding than MLX-LM's float32 sum
  there, which keeps the tolerance on the safe side).
- fp8_kv: vLLM's kv_cache_dtype fp8 (e4m3, scale 1.0 without calibration) on a bf16 model:
  the bf16 profile, and the latent cache entries rounded to float8_e4m3fn (saturating at 448)
  where attention reads them; queries and probabilities stay bf16 (the cache is dequantised).

The bf16 rounding is refimpl's own hook (ops.rounding); the cache modes wrap the two attention
forms (mla.attention_naive / attention_absorbed, which mla.attention_block calls with the cache
entries it reads) and float32_experts suspends the rounding inside moe.routed_experts, each for
the duration of a `with` block (module attributes replaced, then restored).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np

from refimpl import mla, moe, ops

from .patching import patched

F16 = np.dtype(np.float16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def round_to(x, dtype):
    """Round to the nearest value of dtype (float16, e4m3 saturating), keep float32 storage."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return x
    x = x.astype(np.float32)
    if dtype == E4M3:
        x = np.clip(x, -E4M3_MAX, E4M3_MAX)
    return x.astype(dtype).astype(np.float32)


def _kv_rounded(attend, cache_dtype, operand_dtype):
    @functools.wraps(attend)
    def wrapper(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask):
        if operand_dtype is not None:
            q_nope, q_rope = round_to(q_nope, operand_dtype), round_to(q_rope, operand_dtype)
        return attend(q_nope, q_rope, round_to(c_kv, cache_dtype), round_to(k_rope, cache_dtype),
                      kv_b_proj, scale, mask)
    return wrapper


def _softmax_rounded(softmax, dtype):
    @functools.wraps(softmax)
    def wrapper(*a, **k):
        return round_to(softmax(*a, **k), dtype)
    return wrapper


def kv_cache(cache_dtype, operand_dtype=None):
    """The latent cache (and optionally the operands multiplied with it) rounded."""
    reps = [(mla, f, _kv_rounded(getattr(mla, f), cache_dtype, operand_dtype))
            for f in ("attention_naive", "attention_absorbed")]
    if operand_dtype is not None:
        reps.append((mla, "softmax", _softmax_rounded(mla.softmax, operand_dtype)))
    return patched(reps)


def float32_experts():
    """The routed experts computed with the rounding hook suspended: float32 GEMMs on the
    bf16-rounded weights the case already holds, nothing rounded inside or at the end, and the
    K weighted outputs summed in float32 (ops.accumulate without a policy)."""
    routed = moe.routed_experts

    @functools.wraps(routed)
    def wrapper(*a, **k):
        with ops.rounding(None):
            return routed(*a, **k)
    return patched([(moe, "routed_experts", wrapper)])


@dataclass(frozen=True)
class Mode:
    base: str  # the emulate.py precision it starts from
    patches: Callable  # () -> context manager
    doc: str


MODES = {
    "f16_kv": Mode("float32", lambda: kv_cache(F16, F16),
                   "float32, latent cache and the operands multiplied with it in float16"),
    "bf16_f32_experts": Mode("bf16", float32_experts,
                             "bf16, routed-expert GEMMs in float32 on bf16 weights"),
    "fp8_kv": Mode("bf16", lambda: kv_cache(E4M3),
                   "bf16, latent cache in float8 e4m3 (scale 1)"),
}
