"""A catalogue of mutants: each one a bug that public DeepSeek-V3 implementations shipped
(spec sections 9 and 10), made by patching ONE function for the duration of a run: a refimpl
function, or for the mixed-batch split the scenario runner's batch mask
(oracles.authoring.scenarios.batch_mask), which drives refimpl through a serving schedule.

They serve twice: tests show the default suite fails every mutant and names the right first
intermediate (tests/oracles/test_mutants.py), and the conventions suite uses the ones that are
a published alternative (YaRN only when extended, 0-masked groups, bf16 gate) to label which
convention an engine follows.

Each mutant is also a candidate: `oracles check GOLDEN --adapter oracles.mutants:zero_group_mask`
(oracles.engines.reference builds it: refimpl in float32 with the mutant patched in).
`ties_higher_index` is not a bug but an allowed alternative (`allowed=True`: torch.topk leaves
the order of ties unspecified): the default suite passes it and the conventions suite labels it.

Adding one: a function (case) -> context manager, registered with its spec topic and the bug
in one line, usually replacing one function of a refimpl module (the module attribute the math
looks up, e.g. moe.group_mask, rope.softmax_scale) through `patched`:

    @_register("my_bug", "spec topic", "what the buggy implementation does")
    def _patch_my_bug(case):
        return patched([(moe, "routing_weights", my_buggy_routing_weights)])

A run applies it as `emulate.run_case(case, precision, MUTANTS["my_bug"])`; replacements that
produce an operator's output should pass it through `ops.boundary`, like the function they
replace, so that the bf16 and fp8 runs round it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np

from refimpl import fp8, layer, mla, model, moe, mtp, names, norm, rope
from refimpl.backend import array_module
from refimpl.ops import boundary, topk_indices
from refimpl.trace import ignore

from . import scenarios
from .patching import patched


@dataclass(frozen=True)
class Mutant:
    name: str
    spec_topic: str  # the row of spec section 9.1 (or the bug class of section 10) it belongs to
    bug: str  # what the buggy implementation does
    patch: Callable  # (case) -> context manager
    allowed: bool = False  # not a bug: an alternative the checker accepts (the default suite passes)


MUTANTS: dict[str, Mutant] = {}


def _register(name, topic, bug, allowed=False):
    def deco(fn):
        MUTANTS[name] = Mutant(name, topic, bug, fn, allowed)
        return fn
    return deco


def extent(case) -> int:
    """How many positions the run spans: DeepSeek's model.py compares its runtime max_seq_len
    with original_max_position_embeddings; the smallest such setting that fits the case."""
    inp, p = case.inputs, case.params
    if case.kind in ("prefill", "decode", "mtp_prefill", "mtp_module"):
        return inp["input_ids"].shape[1]
    if case.kind in ("greedy", "speculative"):
        return inp["input_ids"].shape[1] + p["max_new_tokens"]
    if case.kind in ("yarn_tables", "rope_apply"):
        return int(np.max(inp["positions"])) + 1
    if case.kind == "mla":
        return inp["x"].shape[1]
    if case.kind == "mla_decode":
        return inp["cache_c_kv"].shape[1] + 1
    if case.kind == "schedule":
        return max(v.shape[1] for k, v in inp.items() if k.endswith("input_ids"))
    if case.kind == "mtp_speculation":
        return inp["input_ids"].shape[1] + p["max_new_tokens"]
    return 0


# ---- routing ----------------------------------------------------------------------------------

@_register("zero_group_mask", "expert-group mask",
           "masks experts of dropped groups with 0.0 instead of -inf: wrong picks when s + b < 0")
def _patch_zero_group_mask(case):
    return patched([(moe, "group_mask", functools.partial(moe.group_mask, fill=0.0))])


@_register("bias_in_weights", "bias in weights",
           "uses the biased scores s + b as routing weights")
def _patch_bias_in_weights(case):
    original_route = moe.route

    def route(u, gate_weight, bias, cfg, forced=None):
        s, idx, _ = original_route(u, gate_weight, bias, cfg, forced)
        biased = s if (bias is None or not cfg.uses_bias) else s + bias.astype(s.dtype)
        return s, idx, moe.routing_weights(biased, idx, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    return patched([(moe, "route", route)])


@_register("group_score_max", "group score",
           "scores a group by its best expert (V2 style) instead of the sum of its top two")
def _patch_group_score_max(case):
    return patched([(moe, "group_scores", lambda biased, n_group, method:
                     biased.reshape(biased.shape[0], n_group, -1).max(axis=-1))])


def _bf16(x):
    return np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.asarray(x).dtype)


@_register("group_score_top2_for_v2", "group score",
           "scores V2's group_limited_greedy groups by their top-2 sum (V3's rule) instead of "
           "their best expert (llama.cpp: GGUF has no topk_method)")
def _patch_group_score_top2_for_v2(case):
    base = moe.group_scores
    return patched([(moe, "group_scores", lambda biased, n_group, method:
                     base(biased, n_group, "noaux_tc"))])


@_register("bf16_gate_bias", "gate precision",
           "casts e_score_correction_bias to bf16 when loading")
def _patch_bf16_gate_bias(case):
    original = moe.select_experts

    def select(scores, bias, *a):
        return original(scores, None if bias is None else _bf16(bias), *a)
    return patched([(moe, "select_experts", select)])


@_register("bf16_gate", "gate precision",
           "runs the whole gate in bf16 (DeepSeek's model.py): inputs, gate weight, bias and "
           "scores rounded to bf16")
def _patch_bf16_gate(case):
    original_scores, original_select = moe.router_scores, moe.select_experts

    def scores(u, w, func):
        return _bf16(original_scores(_bf16(u), _bf16(w), func))

    def select(s, bias, *a):
        return original_select(s, None if bias is None else _bf16(bias), *a)
    return patched([(moe, "router_scores", scores), (moe, "select_experts", select)])


def _topk_higher_index(x, k: int):
    """The k largest along the last axis, largest first, ties to the HIGHER index."""
    return x.shape[-1] - 1 - topk_indices(x[..., ::-1], k)


@_register("ties_higher_index", "top-k ties",
           "breaks exact ties between groups or experts by the higher index (torch.topk leaves "
           "the order unspecified)", allowed=True)
def _patch_ties_higher_index(case):
    return patched([(moe, "topk_indices", _topk_higher_index)])


@_register("group_score_top_k_over_m", "group score",
           "scores a group by the sum of its top (top_k // topk_group) biased scores, not its "
           "top two (right only where top_k // topk_group == 2, as in V3's 8 // 4)")
def _patch_group_score_top_k_over_m(case):
    cfg = case.config
    if cfg is None:
        return contextlib.nullcontext()
    n = cfg.num_experts_per_tok // cfg.topk_group
    original = moe.group_scores

    def group_scores(biased, n_group, topk_method):
        if topk_method != "noaux_tc":
            return original(biased, n_group, topk_method)
        g = biased.reshape(biased.shape[0], n_group, -1)  # [T, G, E/G]
        return -np.sort(-g, axis=-1)[..., :n].sum(axis=-1)  # n == 0: every group scores 0
    return patched([(moe, "group_scores", group_scores)])


# ---- RoPE / YaRN ------------------------------------------------------------------------------

@_register("no_softmax_mscale", "mscale",
           "leaves out YaRN's m(s, mscale_all_dim)^2 factor on the softmax scale")
def _patch_no_softmax_mscale(case):
    return patched([(rope, "softmax_scale", lambda cfg: cfg.qk_head_dim ** -0.5)])


@_register("mscale_not_all_dim", "mscale",
           "scales the softmax by m(s, mscale)^2 where m(s, mscale_all_dim)^2 belongs")
def _patch_mscale_not_all_dim(case):
    def scale(cfg):
        rs = cfg.rope_scaling
        s = cfg.qk_head_dim ** -0.5
        return s if rs is None else s * rope.yarn_mscale(rs.factor, rs.mscale) ** 2
    return patched([(rope, "softmax_scale", scale)])


@_register("mscale_read_as_mscale_all_dim", "mscale",
           "never reads rope_scaling.mscale (takes it equal to mscale_all_dim): the cos/sin "
           "factor m(mscale)/m(mscale_all_dim) becomes 1 (llama.cpp)")
def _patch_mscale_read_as_mscale_all_dim(case):
    return patched([(rope, "cos_sin_factor", lambda cfg: 1.0)])


@_register("yarn_factor_from_ratio", "YaRN factor",
           "takes YaRN's factor s as max_position_embeddings / original_max_position_embeddings "
           "instead of rope_scaling.factor for the frequencies and the cos/sin factor "
           "(transformers 4.x _compute_yarn_parameters; the softmax kept rope_scaling.factor)")
def _patch_yarn_factor_from_ratio(case):
    def with_ratio(f):
        def g(cfg):
            rs = cfg.rope_scaling
            if rs is None:
                return f(cfg)
            ratio = cfg.max_position_embeddings / rs.original_max_position_embeddings
            return f(cfg.replace(rope_scaling=dataclasses.replace(rs, factor=float(ratio))))
        return g
    return patched([(rope, name, with_ratio(getattr(rope, name)))
                    for name in ("inv_freq", "cos_sin_factor")])


def _apply_rope_halves(x, cos, sin):
    """The bug: rotates (x_i, x_{i + d/2}) (rotate-half) on weights laid out in adjacent pairs."""
    xp = array_module(x)
    c, s = rope.pair_tables(x, cos, sin)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return boundary(xp.concatenate([a * c - b * s, a * s + b * c], axis=-1))


@_register("rotate_half_rope", "rope layout",
           "applies rotate-half RoPE to the checkpoint's interleaved (adjacent-pair) weights")
def _patch_rotate_half_rope(case):
    return patched([(rope, "apply_rope", _apply_rope_halves), (mla, "apply_rope", _apply_rope_halves)])


@_register("yarn_only_when_extended", "YaRN activation",
           "applies YaRN (frequencies and softmax factor) only when the run's length exceeds "
           "original_max_position_embeddings (DeepSeek's model.py)")
def _patch_yarn_only_when_extended(case):
    rs = case.config.rope_scaling if case.config is not None else None
    if rs is None or extent(case) > rs.original_max_position_embeddings:
        return contextlib.nullcontext()
    plain = {name: getattr(rope, name) for name in ("inv_freq", "softmax_scale", "cos_sin_factor")}
    return patched([(rope, name, (lambda f: lambda cfg: f(cfg.replace(rope_scaling=None)))(f))
                    for name, f in plain.items()])


# ---- MTP --------------------------------------------------------------------------------------

def _mtp_convention(**change):
    return patched([(mtp, "DEFAULT", dataclasses.replace(mtp.DEFAULT, **change))])


_register("mtp_concat_swapped", "MTP concat",
          "feeds eh_proj [hnorm(h) ; enorm(Emb)], eq. (21) as printed, to weights trained "
          "embedding first")(lambda case: _mtp_convention(concat="hidden_first"))
_register("mtp_pre_norm_h0", "MTP h0",
          "feeds module 1 the last decoder layer's output before the final norm")(
    lambda case: _mtp_convention(h0="pre_norm"))


# ---- serving paths (spec section 10; the scenario cases, oracles/authoring/scenarios.py) -------------
#
# attention_naive / attention_absorbed get q [b, s, ...] and keys [b, t, ...]: t > s means the
# forward continues a cached context (keys 0..t-s-1) with s new tokens; s == 1 is a decode step.

def _partial(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask):
    """Attention over a part of the keys -> (o [b, s, H, d_v], lse [b, s, H]): the natural-log
    log-sum-exp of each query's scores (-inf where it sees none of them), the way a chunked
    kernel returns its partial result."""
    b, s, n_heads, d_nope = q_nope.shape
    w_uk, w_uv = mla.split_kv_b(kv_b_proj, n_heads, d_nope)
    q_lat = q_nope.transpose(0, 2, 1, 3) @ w_uk  # [b, H, s, d_c]
    scores = (q_lat @ c_kv[:, None].transpose(0, 1, 3, 2)
              + q_rope.transpose(0, 2, 1, 3) @ k_rope[:, None].transpose(0, 1, 3, 2)) * scale
    scores = np.where(mask, scores, -np.inf)  # [b, H, s, t]
    m = scores.max(axis=-1, keepdims=True)
    safe = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(scores - safe)
    total = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = (np.log(total) + safe)[..., 0]
        o_lat = boundary(e / total) @ c_kv[:, None]  # [b, H, s, d_c]
    o = o_lat @ w_uv.transpose(0, 2, 1)  # [b, H, s, d_v]
    return o.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1)


def _chunked_attention(bug):
    """Attention of a chunk over cached context + itself as a chunked-prefill kernel does it: the
    context part and the new part separately, merged by their log-sum-exps,
        o = (e^lse_ctx o_ctx + e^lse_new o_new) / (e^lse_ctx + e^lse_new),
    with one `bug` in the merge. Decode steps and forwards without context are left alone."""
    def wrap(original):
        def attend(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask):
            s, t = q_nope.shape[1], c_kv.shape[1]
            if s == 1 or t == s:
                return original(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask)
            c = t - s
            o1, l1 = _partial(q_nope, q_rope, c_kv[:, :c], k_rope[:, :c], kv_b_proj, scale, mask[:, :c])
            o2, l2 = _partial(q_nope, q_rope, c_kv[:, c:], k_rope[:, c:], kv_b_proj, scale, mask[:, c:])
            if bug == "base2":  # the context's lse in base 2, merged as if natural
                l1 = l1 / np.log(2.0)
            empty = ~np.isfinite(l1)
            if bug == "finite_empty":  # an empty context: lse 0 and output 0, not -inf
                l1 = np.where(empty, 0.0, l1)
            o1 = np.where(empty[..., None], 0.0, o1)
            m = np.maximum(np.where(np.isfinite(l1), l1, -np.inf), l2)
            w1, w2 = np.exp(l1 - m), np.exp(l2 - m)  # exp(-inf) = 0 for an empty context
            return ((w1[..., None] * o1 + w2[..., None] * o2) / (w1 + w2)[..., None]).astype(q_nope.dtype)
        return attend
    return patched([(mla, "attention_naive", wrap(mla.attention_naive)),
                    (mla, "attention_absorbed", wrap(mla.attention_absorbed))])


_register("lse_base2_merge", "chunked prefill",
          "merges a chunk's attention with its cached context using the context's log-sum-exp "
          "in base 2 as if it were natural (a chunked-prefix kernel)")(
    lambda case: _chunked_attention("base2"))
_register("empty_chunk_finite_lse", "chunked prefill",
          "merges an EMPTY context part (a request with nothing cached, batched with requests "
          "that have a context) with a finite log-sum-exp 0 instead of -inf")(
    lambda case: _chunked_attention("finite_empty"))


@_register("mixed_batch_missplit", "mixed batch",
           "splits a forward that mixes decode tokens and a prefill at the wrong offset: the "
           "first prefill token is run with the last decode token's attention metadata")
def _patch_mixed_batch_missplit(case):
    original = scenarios.batch_mask

    def batch_mask(segments, n_slots):
        mask = original(segments, n_slots)
        rows = np.cumsum([0] + [n for n, _, _ in segments])
        decode = [j for j, (n, _, _) in enumerate(segments) if n == 1]
        prefill = [j for j, (n, _, _) in enumerate(segments) if n > 1]
        if decode and prefill:  # one row off at the decode/prefill boundary
            mask[rows[prefill[0]]] = mask[rows[decode[-1]]]
        return mask
    return patched([(scenarios, "batch_mask", batch_mask)])


@_register("kv_stride_drift", "KV layout",
           "an MLA decode kernel reads V (d_c wide) with its own stride inside a cache laid out "
           "[c_kv ; k_rope] per token: after the first KV block of 256 tokens V drifts")
def _patch_kv_stride_drift(case):
    original = mla.attention_absorbed

    def attend(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask):
        b, s, n_heads, d_nope = q_nope.shape
        t, d_c = c_kv.shape[1], c_kv.shape[2]
        if s != 1 or t <= 256:
            return original(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask)
        flat = np.concatenate([c_kv, k_rope], axis=-1).reshape(b, -1)  # the cache's memory
        width = flat.shape[1] // t
        v = c_kv.copy()
        for j in range(256, t):  # block 2 on: V advances d_c per token, K advances width
            off = 256 * width + (j - 256) * d_c
            v[:, j] = flat[:, off:off + d_c]
        w_uk, w_uv = mla.split_kv_b(kv_b_proj, n_heads, d_nope)
        q_lat = q_nope.transpose(0, 2, 1, 3) @ w_uk  # [b, H, 1, d_c]
        scores = (q_lat @ c_kv[:, None].transpose(0, 1, 3, 2)
                  + q_rope.transpose(0, 2, 1, 3) @ k_rope[:, None].transpose(0, 1, 3, 2)) * scale
        p = mla.softmax(np.where(mask, scores, -np.inf), axis=-1)
        o = (p @ v[:, None]) @ w_uv.transpose(0, 2, 1)  # [b, H, 1, d_v]
        return o.transpose(0, 2, 1, 3).astype(q_nope.dtype)
    return patched([(mla, "attention_absorbed", attend)])


@_register("decode_no_softmax_mscale", "mscale",
           "leaves YaRN's m(s, mscale_all_dim)^2 out of the softmax scale in decode steps only "
           "(an FP8-KV decode path; prefill correct)")
def _patch_decode_no_softmax_mscale(case):
    rs = case.config.rope_scaling if case.config is not None else None
    if rs is None:
        return contextlib.nullcontext()
    m2 = rope.yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2

    def wrap(original):
        def attend(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask):
            if q_nope.shape[1] == 1 and c_kv.shape[1] > 1:  # a decode step
                scale = scale / m2
            return original(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask)
        return attend
    return patched([(mla, "attention_naive", wrap(mla.attention_naive)),
                    (mla, "attention_absorbed", wrap(mla.attention_absorbed))])


# ---- routing weights and the residual (spec section 9) ------------------------------------

@_register("rsf_twice", "routed scaling factor",
           "applies routed_scaling_factor twice (folded into the grouped top-k and again after)")
def _patch_rsf_twice(case):
    original = moe.routing_weights
    return patched([(moe, "routing_weights", lambda s, idx, norm, rsf: original(s, idx, norm, rsf) * rsf)])


@_register("rsf_skipped_without_norm", "routed scaling factor",
           "skips routed_scaling_factor when norm_topk_prob is false")
def _patch_rsf_skipped_without_norm(case):
    original = moe.routing_weights
    return patched([(moe, "routing_weights",
                     lambda s, idx, norm, rsf: original(s, idx, norm, rsf if norm else 1.0))])


@_register("single_expert_not_renormalised", "top-k renormalisation",
           "skips the renormalisation when one expert is chosen (num_experts_per_tok 1 with "
           "norm_topk_prob): the weight is s_i x routed_scaling_factor, not routed_scaling_factor "
           "(MLX-LM: `if top_k > 1 and norm_topk_prob`)")
def _patch_single_expert_not_renormalised(case):
    original = moe.routing_weights
    return patched([(moe, "routing_weights", lambda s, idx, norm, rsf:
                     original(s, idx, norm and idx.shape[-1] > 1, rsf))])


@_register("sigmoid_underflow", "top-k renormalisation",
           "computes the gate sigmoid as 1 / (1 + exp(-x)) in the working precision: 0 below "
           "-88.7 in float32, and 0/0 when every selected score is 0")
def _patch_sigmoid_underflow(case):
    original = moe.router_scores

    def scores(u, gate_weight, scoring_func):
        if scoring_func != "sigmoid":
            return original(u, gate_weight, scoring_func)
        wd = np.promote_types(u.dtype, np.float32)
        logits = u.astype(wd) @ gate_weight.astype(wd).T
        with np.errstate(over="ignore"):
            return (1 / (1 + np.exp(-logits))).astype(wd)
    return patched([(moe, "router_scores", scores)])


@_register("topk_renorm_epsilon", "top-k renormalisation",
           "adds 1e-20 to the renormalisation's denominator (transformers, SGLang): weights "
           "~1e-20 when every selected score is below 1e-20")
def _patch_topk_renorm_epsilon(case):
    def weights(scores, idx, norm_topk_prob, rsf):
        g = np.take_along_axis(scores, idx, axis=-1)
        if norm_topk_prob:
            g = g / (g.sum(axis=-1, keepdims=True) + 1e-20)
        return g * rsf
    return patched([(moe, "routing_weights", weights)])


@_register("residual_rescaled_dense", "residual scaling",
           "an fp16 overflow workaround that divides the residual stream by "
           "routed_scaling_factor once per dense layer and never multiplies it back")
def _patch_residual_rescaled_dense(case):
    original = layer.decoder_layer

    def decoder_layer(h, w, cfg, i, context, record=ignore):
        if cfg.is_moe_layer(i):
            return original(h, w, cfg, i, context, record)
        f = cfg.routed_scaling_factor

        def rec(name, value):
            record(name, value / f if name == "hidden" else value)
        return original(h, w, cfg, i, context, rec) / f
    return patched([(layer, "decoder_layer", decoder_layer)])


# ---- RMSNorm eps (spec sections 2 and 9) -----------------------------------------------------

@_register("rms_norm_eps_ignored", "RMSNorm eps",
           "every RMSNorm at the class default eps 1e-6, whatever rms_norm_eps says (DeepSeek's "
           "inference/model.py: its ModelArgs carries no eps)")
def _patch_rms_norm_eps_ignored(case):
    def rms_norm(x, weight, eps):
        return norm.rms_norm(x, weight, 1e-6)
    return patched([(m, "rms_norm", rms_norm) for m in (layer, model, mtp, scenarios)])


@_register("latent_norm_eps_from_config", "latent norm eps",
           "q_a_layernorm and kv_a_layernorm at rms_norm_eps instead of the class default 1e-6 "
           "(vLLM, SGLang, llama.cpp)")
def _patch_latent_norm_eps_from_config(case):
    eps = case.config.rms_norm_eps if case.config is not None else mla.LATENT_NORM_EPS
    return patched([(mla, "LATENT_NORM_EPS", eps)])


# ---- MTP (spec section 6) -----------------------------------------------------------------

_register("mtp_chain_pre_norm", "MTP chain",
          "feeds module k+1 (the drafts at step >= 2) module k's output before shared_head.norm")(
    lambda case: _mtp_convention(chain="pre_head_norm"))
_register("mtp_zero_first_embedding", "MTP embedding",
          "zeroes the embedding at index 0 of each module (position 0)")(
    lambda case: _mtp_convention(first_embedding="zero"))


@_register("mtp_no_head_norm", "MTP head norm",
           "skips shared_head.norm: the head reads the module's decoder output directly")
def _patch_mtp_no_head_norm(case):
    def module_forward(weights, cfg, k, emb, h_prev, context, conv=mtp.DEFAULT, record=ignore):
        """mtp.module_forward, eqs. (21)-(23), with the head norm left out."""
        L = names.mtp_layer(cfg, k)
        record("embed", emb)
        record("h_prev", h_prev)
        x = mtp.combine(emb, h_prev, weights.get(names.enorm(L)), weights.get(names.hnorm(L)),
                        weights.get(names.eh_proj(L)), cfg.rms_norm_eps, conv.concat)
        record("eh_proj", x)
        h = mtp.transformer(weights, cfg, k, x, context, record)
        hn = h  # the bug: no rms_norm(h, shared_head.norm)
        record("head_norm", hn)
        logits = weights.linear(hn, mtp.head_name(cfg, k, conv))
        record("logits", logits)
        out = hn if conv.chain == "head_norm" else h
        record("hidden", out)
        return out, logits
    return patched([(mtp, "module_forward", module_forward)])


# ---- FP8 weights and activations (spec section 7) ------------------------------------------

def _dequantize_with(change_scale):
    original = fp8.dequantize

    def dequantize(q, scale_inv, block=fp8.BLOCK, dtype=np.float64, out=None):
        return original(q, change_scale(np.asarray(scale_inv), q.shape, block), block, dtype, out)
    return patched([(fp8, "dequantize", dequantize)])


def _transposed(s, shape, block):
    rows, cols = s.shape
    return s.reshape(cols, rows).T  # the [rows, cols] buffer read as [cols, rows]


def _partial_block(s, shape, block):
    s = s.copy()
    if shape[0] % block and s.shape[0] > 1:
        s[-1] = s[-2]
    if shape[1] % block and s.shape[1] > 1:
        s[:, -1] = s[:, -2]
    return s


_register("fp8_scale_transposed", "FP8 scales",
          "reads weight_scale_inv transposed (its [rows, cols] buffer as [cols, rows])")(
    lambda case: _dequantize_with(_transposed))
_register("fp8_partial_block_scale", "FP8 scales",
          "gives a partial edge block (a dimension not a multiple of 128) the scale of the block "
          "before it (block count by floor division)")(
    lambda case: _dequantize_with(_partial_block))
_register("fp8_pow2_scale_not_requantised", "FP8 scales",
          "rounds the stored scales up to powers of two (UE8M0) without requantising the "
          "e4m3 values")(
    lambda case: _dequantize_with(
        lambda s, shape, block: (2.0 ** np.ceil(np.log2(s.astype(np.float64)))).astype(np.float32)))


@_register("fp8_dequant_to_bf16", "FP8 dequantisation",
           "dequantises a stored FP8 checkpoint into bf16 (e4m3 values cast to bf16, times the "
           "scale, rounded to bf16) whatever precision the model then runs in (MLX-LM's "
           "sanitize)")
def _patch_fp8_dequant_to_bf16(case):
    original = fp8.dequantize

    def dequantize(q, scale_inv, block=fp8.BLOCK, dtype=np.float64):
        w = original(q, scale_inv, block, np.float32)
        return np.asarray(w).astype(ml_dtypes.bfloat16).astype(dtype)
    return patched([(fp8, "dequantize", dequantize)])


@_register("e4m3fnuz_read", "FP8 format",
           "reads e4m3fn bytes as e4m3fnuz (exponent bias 8): every value halved")
def _patch_e4m3fnuz_read(case):
    original = fp8.value_table  # every decode goes through it (decode_e4m3, dequantize, _bits)
    return patched([(fp8, "value_table", lambda dtype: original(dtype) / 2)])


@_register("fp8_amax_unclamped", "FP8 activation scale",
           "computes a block's scale as amax / 448 without the 1e-4 floor: 0/0 for a block of "
           "zeros, another scale for a tiny one")
def _patch_fp8_amax_unclamped(case):
    return patched([(fp8, "SCALE_FLOOR", 0.0)])
