"""DeepSeekMoE (paper section 2.1.2, eqs. 12-16; spec section 5).

The gate scores every routed expert (eq. 15), a bias steers only the SELECTION (eq. 16,
auxiliary-loss-free load balancing), selection is limited to the best groups of experts
(node-limited routing, section 2.1.2: M groups chosen by the sum of their top K_r/M = 2 biased
scores; `group_mask`), the weights come from the unbiased scores (eqs. 13-14) times the
routed scaling factor (2.5 for V3: a config value, not in eq. 13), and the output adds shared
and routed SwiGLU experts (eq. 12, `moe_ffn`). Ties go to the lower index, for groups and for
experts.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, stable_argsort, to_numpy
from .errors import InputError
from .ops import accumulate, boundary, linear, rounding, sigmoid, silu, softmax, topk_indices
from .trace import ignore


def moe_ffn(x, gate_weight, bias, experts, shared, cfg, record=ignore, forced=None):
    """The DeepSeekMoE block, eq. (12) without the residual:

        sum_{i<=N_s} FFN^(s)_i(u) + sum_{i<=N_r} g_i FFN^(r)_i(u)

    with the gate g of eqs. (13)-(16) (`route`).  x [..., d] -> [..., d].
    gate_weight [E, d]: the centroids e_i; bias [E] or None (the checkpoint has none);
    experts[e] -> {gate_proj, up_proj, down_proj} of routed expert e (read when routed to);
    shared: {gate_proj, up_proj, down_proj} (the N_s shared experts as one SwiGLU of width
    N_s * moe_intermediate_size) or None.
    forced: None, or (tokens [n], experts [n, K]): token tokens[j] (an index into the flattened
    lead axes) routed to experts[j] instead of its own choice (`route`).
    record: router_scores [..., E], topk_idx [..., K], topk_weight [..., K]."""
    lead, d = x.shape[:-1], x.shape[-1]
    u = x.reshape(-1, d)  # [T, d]
    scores, idx, g = route(u, gate_weight, bias, cfg, forced)
    record("router_scores", scores.reshape(*lead, -1))
    record("topk_idx", idx.reshape(*lead, -1))
    record("topk_weight", g.reshape(*lead, -1))
    out = routed_experts(u, idx, g, experts)
    if shared is not None:
        out = boundary(out + swiglu(u, **shared))  # stored: `y + z` (ops.rounding)
    return out.reshape(*lead, d)


def swiglu(x, gate_proj, up_proj, down_proj):
    """FFN(x) = down(silu(gate(x)) * up(x)) [arxiv 2002.05202 eq. 5].   [..., d] -> [..., d]
    silu(gate(x)) and the product are operator outputs an engine stores (ops.boundary), as
    DeepSeek's `w2(F.silu(w1(x)) * w3(x))` does in bf16."""
    return linear(boundary(boundary(silu(linear(x, gate_proj))) * linear(x, up_proj)), down_proj)


def router_scores(u, gate_weight, scoring_func: str):
    """eq. (15): s_i,t = sigmoid(u_t . e_i) (V3), or softmax over experts (V2 configs).
    Computed in at least float32 and never rounded to a lower emulated precision (engines run
    the gate in float32; ops.rounding).   u: [T, d], gate_weight: [E, d] -> [T, E]"""
    xp = array_module(u)
    wd = xp.promote_types(u.dtype, xp.float32)
    with rounding(None):
        logits = linear(u.astype(wd, copy=False), gate_weight.astype(wd, copy=False))
        return sigmoid(logits) if scoring_func == "sigmoid" else softmax(logits, axis=-1)


def group_scores(biased, n_group: int, topk_method: str):
    """Score of each expert group: sum of its top-2 biased scores (noaux_tc, V3), or its best
    score (group_limited_greedy, V2).   [T, E] -> [T, n_group]"""
    xp = array_module(biased)
    g = biased.reshape(biased.shape[0], n_group, -1)  # [T, G, E/G]
    if topk_method == "noaux_tc":
        top2 = -xp.sort(-g, axis=-1)[..., :2]
        return top2[..., 0] + top2[..., 1]
    return g.max(axis=-1)


def group_mask(biased, n_group: int, topk_group: int, topk_method: str, fill=float("-inf")):
    """Node-limited routing (section 2.1.2): keep the experts of the topk_group best groups by
    group_scores (ties to the lower group index) and replace every other expert's biased score
    by `fill`: -inf, so that no excluded expert is ever chosen (0 would let one in when every
    kept s + b is negative).   [T, E] -> [T, E]"""
    xp = array_module(biased)
    e = biased.shape[-1]
    kept = topk_indices(group_scores(biased, n_group, topk_method), topk_group)  # [T, topk_group]
    groups = (kept[:, :, None] == xp.arange(n_group)).any(axis=1)  # [T, G]
    experts = xp.repeat(groups, e // n_group, axis=-1)  # [T, E]
    return xp.where(experts, biased, fill)


def select_experts(scores, bias, n_group: int, topk_group: int, top_k: int, topk_method: str):
    """eq. (16) with group-limited routing: the top_k experts by s + b among the topk_group best
    groups (group_mask).  Largest first, ties to the lower index.
    scores [T, E], bias [E] or None -> indices [T, top_k]"""
    biased = scores if bias is None else scores + bias.astype(scores.dtype, copy=False)
    if topk_method != "greedy" and topk_group < n_group:
        biased = group_mask(biased, n_group, topk_group, topk_method)
    return topk_indices(biased, top_k)


def routing_weights(scores, idx, norm_topk_prob: bool, routed_scaling_factor: float):
    """eqs. (13)-(14): g'_i = s_i for the selected experts (the bias never enters), normalised to
    sum 1 when norm_topk_prob, then times routed_scaling_factor (a config value, 2.5 for V3; not
    in eq. 13, applied once).   -> [T, top_k]"""
    xp = array_module(scores)
    g = xp.take_along_axis(scores, idx, axis=-1)
    if norm_topk_prob:
        g = g / g.sum(axis=-1, keepdims=True)
    return g * routed_scaling_factor


def route(u, gate_weight, bias, cfg, forced=None):
    """The whole gate for one layer.   u: [T, d] -> (scores [T, E], idx [T, K], weights [T, K]).

    forced: None, or (tokens [n], experts [n, K]): for each tokens[j], eq. (16)'s choice is
    replaced by the set experts[j] (distinct indices in [0, E)), put in the order the selection
    lists experts (largest biased score first, ties to the lower index), so that forcing a token
    to its own choice changes nothing; its weights come from eqs. (13)-(14) at those experts."""
    s = router_scores(u, gate_weight, cfg.scoring_func)
    b = bias if cfg.uses_bias else None
    idx = select_experts(s, b, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.topk_method)
    if forced is not None:
        idx = force_experts(idx, s if b is None else s + b.astype(s.dtype, copy=False), forced)
    return s, idx, routing_weights(s, idx, cfg.norm_topk_prob, cfg.routed_scaling_factor)


def force_experts(idx, biased, forced):
    """idx [T, K] with the rows of `forced` = (tokens [n], experts [n, K]) replaced, each forced
    set ordered by biased score [T, E] descending, ties to the lower index (as topk_indices
    orders a selection). A new array; bad tokens or experts raise InputError."""
    xp = array_module(idx)
    t, k = idx.shape
    e = biased.shape[-1]
    tokens = np.asarray(to_numpy(forced[0]), dtype=np.int64).reshape(-1)
    chosen = np.asarray(to_numpy(forced[1]), dtype=np.int64)
    if not len(tokens) and not chosen.size:
        return idx
    chosen = chosen.reshape(len(tokens), -1) if len(tokens) else chosen.reshape(0, -1)
    if chosen.shape[1] != k:
        raise InputError(f"forced experts: {chosen.shape[1]} per token, the model selects {k}")
    if len(np.unique(tokens)) != len(tokens) or ((tokens < 0) | (tokens >= t)).any():
        raise InputError(f"forced experts: token indices must be distinct and in [0, {t})")
    srt = np.sort(chosen, axis=-1)
    if ((chosen < 0) | (chosen >= e)).any() or (k > 1 and (srt[:, 1:] == srt[:, :-1]).any()):
        raise InputError(f"forced experts: each token needs {k} distinct experts in [0, {e})")
    scores = np.take_along_axis(np.asarray(to_numpy(biased[tokens]), np.float64), chosen, axis=-1)
    # largest first, ties to the lower index: sort by (-score, expert)
    order = np.lexsort((chosen, -scores), axis=-1)
    out = idx.copy()
    out[xp.asarray(tokens)] = xp.asarray(np.take_along_axis(chosen, order, axis=-1), dtype=idx.dtype)
    return out


def routed_experts(x, idx, weights, experts):
    """sum_i g_i FFN^r_i(x) with tokens grouped by expert: one SwiGLU per ACTIVE expert over all
    of its tokens, no loop over tokens.  Each token's K contributions are summed in selection
    order, so the result does not depend on how tokens were grouped.  Under an emulated storage
    precision (ops.rounding) each weighted output g_i FFN^r_i(x) is stored (the weight too, as
    DeepSeek's `weights.type_as(x)`) and the K of them are added one at a time in ascending
    expert index, the running sum stored after each add (ops.accumulate: DeepSeek's inference
    code, inference/model.py:682-689); without one both are the identity.

    x [T, d], idx [T, K], weights [T, K]; experts[e] -> dict(gate_proj, up_proj, down_proj)
    (a list, or a lazy view that loads expert e on demand) -> [T, d]"""
    xp = array_module(x)
    t, k = idx.shape
    flat = idx.reshape(-1)  # slot t*K + j holds token t's j-th expert
    order = stable_argsort(flat)
    sorted_experts = to_numpy(flat[order])
    bounds = (sorted_experts[1:] != sorted_experts[:-1]).nonzero()[0] + 1
    starts = [0, *bounds.tolist()]
    ends = [*bounds.tolist(), t * k]
    if hasattr(experts, "prefetch"):  # a lazy view may start reading the active experts now
        experts.prefetch(sorted_experts[starts].tolist())
    w_flat = weights.reshape(-1)
    contrib = xp.zeros((t * k, x.shape[-1]), dtype=x.dtype)
    for a, b in zip(starts, ends):
        slots = order[a:b]
        y = swiglu(x[slots // k], **experts[int(sorted_experts[a])])
        contrib[slots] = boundary(y * boundary(w_flat[slots, None].astype(x.dtype, copy=False)))
    # eq. (12)'s sum over the token's K experts; stored per add in ascending expert index
    return accumulate(contrib.reshape(t, k, -1), order=stable_argsort(idx, axis=-1))
