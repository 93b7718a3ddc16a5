"""The few array operations every section shares: linear maps, SiLU, softmax and log-softmax, a
top-k whose ties go to the lower index, and the one hook for emulating a lower precision
(`rounding` / `boundary`)."""

from __future__ import annotations

import contextlib
import contextvars

from .backend import array_module, stable_argsort

# ---- precision emulation: one explicit hook ------------------------------------------------------
#
# refimpl computes in its working dtype (float64 or float32).  An engine running in bf16 stores
# every operator's output in bf16; to measure what that costs (oracles' tolerance calibration),
# a caller runs refimpl inside `with rounding(policy):` and every operator boundary passes its
# output through policy(array) -> array.  The boundaries are where DeepSeek's own inference code
# (inference/model.py, run with torch.set_default_dtype(torch.bfloat16)) stores a tensor:
# ops.linear, norm.rms_norm, ops.softmax (attention probabilities), rope.apply_rope, SwiGLU's
# silu(gate) and its product with up (moe.swiglu), the residual stream after attention and after
# the FFN (layer.py), each routed expert's weighted output, the running sum of the routed experts
# (`accumulate`: one rounding per add, in ascending expert index) and the MoE block's output;
# so the MTP modules' enorm / hnorm / eh_proj / shared_head.norm and the output heads are
# rounded like every other.  The router runs with rounding suspended (`rounding(None)`), as
# engines compute the gate in float32.  Outside a `with` nothing is rounded, and every hook is
# the identity: float64 and float32 results do not depend on it, bit for bit.
_POLICY = contextvars.ContextVar("refimpl_rounding", default=None)


@contextlib.contextmanager
def rounding(policy):
    """Within the block, boundary(x) returns policy(x) (None: no rounding)."""
    token = _POLICY.set(policy)
    try:
        yield
    finally:
        _POLICY.reset(token)


def boundary(x):
    """x, an operator's output, as the active rounding policy keeps it (x itself when none)."""
    policy = _POLICY.get()
    return x if policy is None else policy(x)


def accumulate(terms, order=None):
    """sum_j terms[:, j] for terms [n, k, ...]: a sum an engine accumulates in its stored
    precision.  Without a rounding policy, the working dtype's sum over axis 1 in the order given
    (terms.sum(axis=1)).  With one, as DeepSeek's inference code adds its routed experts into a
    bf16 tensor (`y = torch.zeros_like(x)`, then `y[idx] += expert(x[idx]) * weights[idx, top,
    None]` for each expert in ascending index: inference/model.py:682-689): from zero, one term
    at a time, taken in `order` (an [n, k] index into axis 1 per row; None: as given), the
    running sum passed through the policy after each add.   [n, k, ...] -> [n, ...]"""
    policy = _POLICY.get()
    if policy is None:
        return terms.sum(axis=1)
    xp = array_module(terms)
    rows = xp.arange(terms.shape[0])
    acc = xp.zeros(terms.shape[:1] + terms.shape[2:], dtype=terms.dtype)
    for j in range(terms.shape[1]):
        acc = policy(acc + (terms[:, j] if order is None else terms[rows, order[:, j]]))
    return acc


def linear(x, weight):
    """y = x W^T with the checkpoint's [out, in] weight layout.   [..., in] -> [..., out]
    The weight's type decides the product, here and only here: an array multiplies as below; a
    weight kept in its stored format computes its own (`weight.product(x)`: fp8.BlockFP8 runs the
    emulated FP8 GEMM), so this file needs no storage format."""
    if not hasattr(weight, "__array__"):  # numpy and cupy arrays have it; fp8.BlockFP8 does not
        return boundary(weight.product(x).astype(x.dtype))
    # one 2-d product (a batched 3-d one would copy W^T per call on cupy)
    y = x.reshape(-1, x.shape[-1]) @ weight.T  # [n, in] -> [n, out]
    return boundary(y.reshape(*x.shape[:-1], weight.shape[0]))


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
    return boundary(e / xp.sum(e, axis=axis, keepdims=True))


def log_softmax(x, axis=-1):
    """log softmax with max-subtraction: (x - max) - log(sum(exp(x - max))), in x's precision
    (losses and the checker's KL metric pass float64)."""
    xp = array_module(x)
    z = x - xp.max(x, axis=axis, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=axis, keepdims=True))


def topk_indices(x, k: int):
    """Indices of the k largest entries along the last axis, largest first; equal values keep
    their order, so ties go to the LOWER index (a stable descending sort).   [..., n] -> [..., k]"""
    return stable_argsort(-x, axis=-1)[..., :k]
