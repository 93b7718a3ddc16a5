"""FP8 e4m3 block-scaled weights (paper section 3.3; SPEC.md section 7).

A linear weight is stored as e4m3fn values q with a float32 scale per 128x128 block,
`weight_scale_inv` of shape (ceil(out/128), ceil(in/128)); W[i, j] = q[i, j] * s[i//128, j//128].
Edge blocks are partial (kv_a_proj_with_mqa's 576 rows give a (5, 56) scale).
"""

from __future__ import annotations

import numpy as np

BLOCK = 128
E4M3_MAX = 448.0


def scale_shape(shape, block: int = BLOCK) -> tuple[int, int]:
    """(ceil(out/block), ceil(in/block)) for a weight of shape (out, in)."""
    return (-(-shape[0] // block), -(-shape[1] // block))


def dequantize(q, scale_inv, block: int = BLOCK, dtype=np.float64):
    """W = q * s per block: each scale covers a block x block tile, the last ones partial.

    q: [out, in] e4m3 (any float dtype); scale_inv: [ceil(out/block), ceil(in/block)] -> [out, in]"""
    out, inp = q.shape
    s = np.asarray(scale_inv, dtype=dtype)
    s_full = np.repeat(np.repeat(s, block, axis=0)[:out], block, axis=1)[:, :inp]  # [out, in]
    return np.asarray(q).astype(dtype) * s_full
