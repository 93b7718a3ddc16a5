"""RMSNorm (spec section 2): used before attention and FFN, on c^Q, on c^KV, after the last
layer and in MTP."""

from __future__ import annotations

from .backend import array_module
from .ops import boundary


def rms_norm(x, weight, eps: float):
    """y = x / sqrt(mean(x^2) + eps) * w, over the last axis, in x's precision.

    x: [..., d]; weight: [d]."""
    xp = array_module(x)
    ms = xp.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    return boundary(x / xp.sqrt(ms + eps) * weight)
