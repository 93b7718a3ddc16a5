"""The few array operations every section shares: linear maps, SiLU, a masked softmax and a
top-k whose ties go to the lower index."""

from __future__ import annotations

from .backend import array_module, stable_argsort
from .fp8 import BlockFP8, fp8_gemm


def linear(x, weight):
    """y = x W^T with the checkpoint's [out, in] weight layout.   [..., in] -> [..., out]
    A weight kept as stored FP8 (fp8.BlockFP8) goes through the emulated FP8 GEMM."""
    if isinstance(weight, BlockFP8):
        return fp8_gemm(x, weight).astype(x.dtype)
    # one 2-d product (a batched 3-d one would copy W^T per call on cupy)
    y = x.reshape(-1, x.shape[-1]) @ weight.T  # [n, in] -> [n, out]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def silu(x):
    """SiLU(x) = x * sigmoid(x), written with exp of a non-positive number only (no overflow)."""
    return x * sigmoid(x)


def sigmoid(x):
    """1 / (1 + e^-x), stable for large |x|."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    r = xp.where(x >= 0, 1.0, e).astype(x.dtype, copy=False)  # numerator: 1 or e^-|x|
    r /= 1.0 + e
    return r


def softmax(x, axis=-1):
    """exp(x - max) / sum(exp(x - max)); entries at -inf get exactly 0."""
    xp = array_module(x)
    m = xp.max(x, axis=axis, keepdims=True)
    e = xp.exp(x - m)
    return e / xp.sum(e, axis=axis, keepdims=True)


def topk_indices(x, k: int):
    """Indices of the k largest entries along the last axis, largest first; equal values keep
    their order, so ties go to the LOWER index (a stable descending sort).   [..., n] -> [..., k]"""
    return stable_argsort(-x, axis=-1)[..., :k]
