"""Is a candidate's routing explained by its own router input? (docs/conformance.md section 3)

A near-tie the candidate resolved the other way is forgiven because rounding can move the
router scores across the margin. Most of that rounding is in the router's INPUT (the
layer's ffn_norm output), and a candidate that reports its ffn_norm shows which input it had.
From that input the router scores can be recomputed in float64; what remains is the router's
own arithmetic in the profile's precision, which is small and can be bounded. A token whose
chosen experts no score vector within that bound of the recomputed one would select is not a
near-tie decided by rounding: it is routed by another rule (llama.cpp's top-2 group score for
DeepSeek-V2, a 0.0 group mask), and fails.

The bound, per token and expert (float64; u32 = 2^-24, u16 = 2^-8 the unit roundoff of bfloat16,
d the hidden size):

    z_j = u . w_j (the router logit from the candidate's input u, the stored gate weight w_j)
    E_j = |u . (w'_j - w_j)|  +  gamma_d sum_i |u_i| |w'_ji|
          the gate weight as the profile holds it (w' = w rounded to bfloat16 for the bf16-based
          profiles, as stored otherwise: both the stored and the rounded weight are covered),
          and a float32 dot product of d terms (gamma_d: summation_error)
    sigmoid scores:  delta_j = E_j sigma'(zeta_j) + 4 u32
          (mean value theorem: zeta_j the point of [z_j - E_j, z_j + E_j] nearest 0, where the
          sigmoid's slope sigma' = sigma (1 - sigma) <= 1/4 is largest on that interval)
    softmax scores:  delta_j = s_j ((1 + 8 u32) exp(E_j + max_k E_k) - 1)
          (s'_j / s_j = exp(e_j) sum_k s_k / sum_k s_k exp(e_k) for logit errors |e_k| <= E_k)
    biased score:    + 2 u32 (1 + |s_j| + |b_j|)          (the float32 sum with the bias)

The bf16-based profiles also allow a gate computed wholly in bfloat16, as DeepSeek's own
inference code does it (inference/model.py:576-583, Gate.forward: `linear(x, self.weight)` on a bf16
input and weight gives bf16 logits, `scores.sigmoid()` gives bf16 scores; the bias is added in
float32, or in bf16 by an engine that casts it: catalogue mutants bf16_gate and bf16_gate_bias,
allowed there, docs/conformance.md section 6). For them E_j and delta_j also hold

    E_j + |(bf16(u) - u) . w'_j|              the input rounded to bf16 (its exact effect; zero
                                               for an input the candidate reports in bf16)
    E_j + h(|z_j| + E_j)                       the logit rounded to bf16
    delta_j + h(s_j + delta_j)                 the score rounded to bf16 (after the sigmoid or
                                               softmax)
    delta_j + |bf16(b_j) - b_j|                the bias rounded to bf16 (its exact effect)

h(x) the largest rounding error to bfloat16 of a value of magnitude at most x (half the spacing
of bf16 numbers at x: 2^(e - 9) for x in [2^(e-1), 2^e), at most u16 x), each term the largest
error of that step, so that a router that does every step in bf16, or any subset of them, stays
within delta.

and the choice C of a token is explained when it passes every necessary condition for being
the selection of some scores within delta of the recomputed ones (lo = s + b - delta,
hi = s + b + delta): at most topk_group groups hold C; every expert of C's groups outside C
has lo <= min over C of hi; the groups that certainly outrank one of C's groups (their group
score from lo exceeds its group score from hi) fit in the remaining topk_group - |groups(C)|
places, and their experts also have lo <= min over C of hi. Only a token that fails one of
these is unexplained: an honest run in the profile's precision never is.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from refimpl import names
from refimpl.checkpoint import Checkpoint

U32 = 2.0 ** -24
U16 = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits): |bf16(x) - x| <= U16 |x|
# the gate weight as each profile holds it: None (as stored, float32) or "bf16" (rounded)
GATE_WEIGHT = {"float32": None, "f16_kv": None, "bf16": "bf16", "fp8": "bf16",
               "bf16_f32_experts": "bf16", "fp8_kv": "bf16"}


def scores(u, gate_weight, bias, scoring_func: str):
    """Router scores and biased scores in float64 from inputs u [T, d]: (s, s + b) [T, E]."""
    z = np.asarray(u, np.float64) @ np.asarray(gate_weight, np.float64).T
    if scoring_func == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
    else:
        z = z - z.max(axis=-1, keepdims=True)
        s = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return s, (s if bias is None else s + np.asarray(bias, np.float64))


def summation_error(d: int) -> float:
    """gamma for a float32 dot product of d terms: |computed - exact| <= gamma sum |x_i y_i|.
    The smaller of the worst case d u / (1 - d u) (any summation order) and Higham and Mary's
    probabilistic bound exp(lambda sqrt(d) u + d u^2 / (1 - u)) - 1 with lambda = 10, which holds
    with probability at least 1 - 2 d exp(-lambda^2 (1 - u)^2 / 2) (1 - 3e-18 for d = 7168)
    when the rounding errors are independent and of mean zero (SIAM J. Sci. Comput. 41(5),
    2019, Theorem 2.4): the worst case grows with d and would forgive everything at V3's
    width (d = 7168: 4.3e-4 against 5.1e-5)."""
    worst = d * U32 / (1 - d * U32)
    lam = 10.0
    prob = float(np.expm1(lam * np.sqrt(d) * U32 + d * U32 * U32 / (1 - U32)))
    return min(worst, prob)


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def half_spacing_bf16(x):
    """The largest |bf16(y) - y| over |y| <= x (round to nearest; normal numbers): half the
    spacing of bfloat16 numbers at x, 2^(e - 9) for x in [2^(e-1), 2^e)."""
    x = np.asarray(x, np.float64)
    _, e = np.frexp(np.abs(x))
    return np.where(x == 0, 0.0, np.ldexp(1.0, e - 9))


def sigmoid_slope(z, err):
    """The sigmoid's largest slope on [z - err, z + err] (its point nearest 0)."""
    zeta = np.clip(0.0, z - err, z + err)
    sg = 1.0 / (1.0 + np.exp(-zeta))
    return sg * (1.0 - sg)


def bound(u, gate_weight, bias, scoring_func: str, profile: str):
    """(biased scores, delta) [T, E] from the candidate's router inputs u [T, d] (float64,
    the stored gate weight): a candidate that computes its router in the profile's precision
    from u has biased scores within delta of these (the module's docstring)."""
    u = np.asarray(u, np.float64)
    w = np.asarray(gate_weight, np.float64)
    s, biased = scores(u, w, bias, scoring_func)
    bf16_gate = GATE_WEIGHT.get(profile) == "bf16"
    if bf16_gate:  # the weight held in bf16: its exact effect
        w_held = _bf16(gate_weight)
        err_z = np.abs(u @ (w_held - w).T)
        err_z = err_z + np.abs((_bf16(u) - u) @ w_held.T)  # the input rounded: its exact effect
    else:
        w_held, err_z = w, 0.0
    err_z = err_z + summation_error(w.shape[-1]) * (np.abs(u) @ np.abs(w_held).T)  # [T, E]
    z = u @ w.T
    if bf16_gate:  # the logit rounded to bf16
        err_z = err_z + half_spacing_bf16(np.abs(z) + err_z)
    if scoring_func == "sigmoid":
        delta = err_z * sigmoid_slope(z, err_z) + 4 * U32
    else:
        delta = s * ((1 + 8 * U32) * np.exp(err_z + np.max(err_z, axis=-1, keepdims=True)) - 1)
    b = 0.0 if bias is None else np.abs(np.asarray(bias, np.float64))
    delta = delta + 2 * U32 * (1 + np.abs(s) + b)
    if bf16_gate:  # the score rounded to bf16, and the bias
        delta = delta + half_spacing_bf16(s + delta)
        if bias is not None:
            delta = delta + np.abs(_bf16(bias) - np.asarray(bias, np.float64))
    return biased, delta


def _group_score(x, n_group: int, topk_method: str):
    g = x.reshape(x.shape[0], n_group, -1)
    if topk_method == "noaux_tc":
        top2 = -np.sort(-g, axis=-1)[..., :2]
        return top2.sum(-1) if g.shape[-1] > 1 else top2[..., 0]
    return g.max(-1)


def explained(chosen, biased, delta, n_group: int, topk_group: int, topk_method: str):
    """Per token: can the expert set chosen [T, K] be the selection (topk_group best groups,
    then the K best experts in them, by biased score) of some scores within delta of `biased`?
    Necessary conditions only (see the module's docstring): False means certainly not."""
    chosen = np.asarray(chosen, np.int64)
    t, e = biased.shape
    lo, hi = biased - delta, biased + delta
    grouped = topk_method != "greedy" and topk_group < n_group
    per = e // n_group
    ok = np.ones(t, bool)
    in_c = np.zeros((t, e), bool)
    np.put_along_axis(in_c, chosen, True, axis=-1)
    min_hi = np.take_along_axis(hi, chosen, axis=-1).min(-1)  # [T]
    if not grouped:
        rival = np.where(in_c, -np.inf, lo).max(-1)
        return ok & (rival <= min_hi)
    g_lo, g_hi = _group_score(lo, n_group, topk_method), _group_score(hi, n_group, topk_method)
    mine = in_c.reshape(t, n_group, per).any(-1)  # [T, G] the groups holding C
    n_mine = mine.sum(-1)
    ok &= n_mine <= topk_group
    weakest = np.where(mine, g_hi, np.inf).min(-1)  # [T]
    must = ~mine & (g_lo > weakest[:, None])  # groups that certainly outrank one of C's
    ok &= must.sum(-1) <= topk_group - n_mine
    compete = np.repeat(mine | must, per, axis=-1) & ~in_c  # experts that must not beat C
    rival = np.where(compete, lo, -np.inf).max(-1)
    return ok & (rival <= min_hi)


def gate_layer(name: str, cfg) -> int | None:
    """The checkpoint layer of a routing output: [request.<r>.]layers.N.topk_idx -> N,
    mtp.k.layer.topk_idx -> names.mtp_layer(cfg, k); None for the component kinds."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "request":
        parts = parts[2:]
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    if len(parts) == 4 and parts[0] == "mtp" and parts[1].isdigit() and parts[2] == "layer":
        return names.mtp_layer(cfg, int(parts[1]))
    return None


class CheckpointTensors:
    """The gate tensors of a case of a user's checkpoint (format/checkpoint_ref.CheckpointRef,
    its digest already checked), read one at a time from the checkpoint's files as they are
    asked for: the routing check needs a layer's gate weight and bias, not the model."""

    def __init__(self, path: str):
        self.ckpt = Checkpoint(path)

    def __contains__(self, name) -> bool:
        return name in self.ckpt

    def __getitem__(self, name):
        return self.ckpt.weight(name, np.float64)

    def get(self, name, default=None):
        return self[name] if name in self else default


def explainer(cand: dict, model, profile: str):
    """explain(routing name, c_idx, flipped) for taint.collect: True where a flipped token's
    expert set is explained by the candidate's own router input (its `ffn_norm` output of the
    same layer) within the profile's router arithmetic (`bound`, `explained`); None (cannot
    tell) where the candidate does not report that input or the case has no such gate.
    model() -> (the case's checkpoint tensors, its Config) or None, called when first needed.
    explain's cut: the sequence cut of the outputs compared (taint.taint_cut)."""

    def explain(name, c_idx, flipped, cut=lambda a: a):
        u = cand.get(name[: -len("topk_idx")] + "ffn_norm")
        got = model() if u is not None else None
        if got is None:
            return None
        weights, cfg = got
        layer = gate_layer(name, cfg)
        if layer is None or names.gate_weight(layer) not in weights:
            return None
        u = cut(np.asarray(u))
        k = c_idx.shape[-1]
        if u.shape[:-1] != c_idx.shape[:-1] or u.dtype.kind != "f":
            return None  # the ffn_norm output itself is judged (and failed) as an output
        u = u.astype(np.float64).reshape(-1, u.shape[-1])
        w = np.asarray(weights[names.gate_weight(layer)], np.float32)
        if not np.isfinite(u).all() or u.shape[-1] != w.shape[-1]:
            return None
        bias = weights.get(names.gate_bias(layer)) if cfg.uses_bias else None
        at = np.flatnonzero(np.asarray(flipped, bool).reshape(-1))
        biased, delta = bound(u[at], w, bias, cfg.scoring_func, profile)
        ok = explained(np.asarray(c_idx).reshape(-1, k)[at], biased, delta, cfg.n_group,
                       cfg.topk_group, cfg.topk_method)
        good = np.ones(u.shape[0], bool)
        good[at] = ok
        return good.reshape(np.shape(flipped))
    return explain
