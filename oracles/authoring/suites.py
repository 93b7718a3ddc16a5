"""The suites: smoke, default, full-width, conventions, engine, scenarios (scenarios.py).

A suite is a list of (case id, builder). Each builder draws from its own generator (draws.py:
`numpy.random.default_rng([SUITE_SEED, crc32(case id)])`), so a case's inputs depend only on its
id and the seed, and regenerating gives byte-identical files. Drawn cases use draws.draw_config
and the input draws below; named edge cases are explicit builders (edges.py for edge values).
"""

from __future__ import annotations

import numpy as np

from refimpl import fp8, mla, names, rope
from refimpl.config import Config, RopeScaling
from refimpl.layout import attention_shapes
from refimpl.writer import random_tensor, random_weights

from .. import OraclesError
from ..format.schema import Case
from . import edges, margins, readings, scenarios
from .draws import (BF16, F32, SUITE_SEED, case_rng, designed, draw_config, model_weights,  # noqa: F401
                    mtp_weights, seed, tiny, tiny_mtp, v3)

# ---------------------------------------------------------------------------------------------
# Component builders
# ---------------------------------------------------------------------------------------------

def rms_norm_case(cid, n=6, d=64, eps=1e-6, scale=1.0):
    rng = case_rng(cid)
    return Case(cid, "rms_norm", f"RMSNorm over {d} channels, eps {eps:g}",
                {"x": rng.normal(0, scale, (n, d)).astype(F32),
                 "weight": rng.uniform(0.5, 1.5, d).astype(F32)}, params={"eps": eps})


def yarn_case(cid, cfg, positions, pins):
    return Case(cid, "yarn_tables", pins, {"positions": np.asarray(positions, np.int64)},
                config=cfg)


def rope_case(cid, cfg, positions, batch=1, heads=2, pins="RoPE on adjacent pairs"):
    rng = case_rng(cid)
    x = rng.normal(0, 1, (batch, len(positions), heads, cfg.qk_rope_head_dim)).astype(F32)
    return Case(cid, "rope_apply", pins, {"x": x, "positions": np.asarray(positions, np.int64)},
                config=cfg)


def _attn_inputs(rng, cfg, store):
    k_seed = seed(rng)
    return {k[:-len(".weight")]: random_tensor(names.attention(0) + k, s, k_seed).astype(store)
            for k, s in attention_shapes(cfg).items()}


def mla_case(cid, cfg, batch, seq, form, store=F32, pins=None):
    rng = case_rng(cid)
    inputs = _attn_inputs(rng, cfg, store)
    inputs["x"] = rng.normal(0, 1, (batch, seq, cfg.hidden_size)).astype(store)
    return Case(cid, "mla", pins or f"MLA {form} form, {seq} tokens", inputs, params={"form": form},
                config=cfg)


def mla_decode_case(cid, cfg, batch, start, store=F32, pins=None):
    """The cache holds `start` tokens made by the same weights from random hidden states."""
    rng = case_rng(cid)
    inputs = _attn_inputs(rng, cfg, store)
    w = {k: np.asarray(v, np.float64) for k, v in inputs.items()}
    prefix = rng.normal(0, 1, (batch, start, cfg.hidden_size))
    c_kv, k_pre = mla.latent_kv(prefix, w, cfg.kv_lora_rank)
    cos, sin = rope.cos_sin(np.arange(start), rope.inv_freq(cfg), rope.cos_sin_factor(cfg))
    inputs["cache_c_kv"] = c_kv.astype(store)
    inputs["cache_k_rope"] = rope.apply_rope(k_pre, cos, sin).astype(store)
    inputs["x"] = rng.normal(0, 1, (batch, 1, cfg.hidden_size)).astype(store)
    return Case(cid, "mla_decode", pins or f"one decode step at position {start} (absorbed form)",
                inputs, params={"form": "absorbed"}, config=cfg)


def gate_case(cid, cfg, tokens=16, bias_mean=0.0, bias_std=0.05, pins="router", store=F32):
    rng = case_rng(cid)
    d, e = cfg.hidden_size, cfg.n_routed_experts
    inputs = {"u": rng.normal(0, 1, (tokens, d)).astype(store),
              "gate_weight": rng.normal(0, d ** -0.5, (e, d)).astype(store)}
    if cfg.uses_bias:
        inputs["bias"] = rng.normal(bias_mean, bias_std, e).astype(F32)
    return Case(cid, "gate", pins, inputs, config=cfg)


def gate_ties_case(cid, cfg, near=False):
    """Every odd expert is a copy of the even one before it (exact score ties inside groups) and
    the second half of the groups copies the first (exact group-score ties); `near` adds 1e-6
    to the copies' bias: near-ties, decided by the bias alone. Three experts per token, so that
    a tie falls on the boundary of the chosen set."""
    cfg = cfg.replace(num_experts_per_tok=3)
    case = gate_case(cid, cfg, pins="exact ties" if not near else "near-ties (bias 1e-6 apart)")
    w, b = case.inputs["gate_weight"], case.inputs["bias"]
    w[1::2] = w[0::2]
    b[1::2] = b[0::2] + (np.float32(1e-6) if near else np.float32(0))
    half = cfg.n_routed_experts // 2
    w[half:] = w[:half]
    b[half:] = b[:half]
    return case


def gate_bf16_resolution_case(cid, cfg=None, store=F32):
    """The decision rests on a bias difference (3e-3) that bf16 cannot hold: experts 2 and 5
    score identically, 5 has the larger float32 bias (1.503 vs 1.5, both 1.5 in bf16, whose
    spacing there is 2^-7), K - 1 experts of the same group are certain picks (bias +4), the
    rest certain misses (bias -4), so the K-th pick is 5, or 2 when the bias is rounded to
    bf16. The difference is 3 times the f16_kv profile's margin floor (1e-3): only the profiles
    that emulate a bf16 gate forgive it."""
    cfg = cfg or Config.preset("tiny").replace(n_group=1, topk_group=1, num_nextn_predict_layers=0)
    case = gate_case(cid, cfg, tokens=4, pins="a bias difference below bf16 resolution decides",
                     store=store)
    w, b = case.inputs["gate_weight"], case.inputs["bias"]
    certain = [0, 7, 9, 10, 11, 12, 13, 14][: cfg.num_experts_per_tok - 1]
    assert max(certain) < cfg.experts_per_group
    w[5] = w[2]
    b[:] = -4.0
    b[certain] = 4.0
    b[2], b[5] = 1.5, 1.503
    return case


def moe_case(cid, cfg, tokens=12, pins="one MoE layer", bias_mean=0.0):
    rng = case_rng(cid)
    w = random_weights(cfg.replace(num_hidden_layers=cfg.first_k_dense_replace + 1), seed(rng),
                       mtp=False)
    p = names.mlp(cfg.first_k_dense_replace)
    inputs = {"x": rng.normal(0, 1, (tokens, cfg.hidden_size)).astype(F32)}
    for name, a in w.items():
        if name.startswith(p):
            short = name[len(p):]
            short = {"gate.weight": "gate_weight", "gate.e_score_correction_bias": "bias"}.get(
                short, short.removesuffix(".weight"))
            inputs[short] = a.astype(F32)
    if "bias" in inputs:
        inputs["bias"] = (inputs["bias"] + np.float32(bias_mean)).astype(F32)
    return Case(cid, "moe", pins, inputs, config=cfg)


def fp8_case(cid, shape, pins):
    rng = case_rng(cid)
    w = rng.normal(0, shape[1] ** -0.5, shape)
    w[: min(128, shape[0]), : min(128, shape[1])] *= 50  # blocks of very different ranges
    q, s = fp8.quantize(w)
    return Case(cid, "fp8_dequant", pins, {"q": q, "scale_inv": s})


# ---------------------------------------------------------------------------------------------
# Model builders
# ---------------------------------------------------------------------------------------------

def prefill_case(cid, cfg, batch=2, seq=12, pins="prefill", bias_mean=0.0, design=True):
    rng = case_rng(cid)
    w = model_weights(cfg, rng, bias_mean=bias_mean, design=design)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64)
    case = Case(cid, "prefill", pins, {"input_ids": ids}, config=cfg, weights=w)
    if not design:
        case.params["near_ties"] = "random routing weights: near-tie tokens expected"
        return case
    return designed(case)


def decode_case(cid, cfg, prefill, steps, batch=2, pins=None):
    rng = case_rng(cid)
    w = model_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (batch, prefill + steps)).astype(np.int64)
    return designed(Case(cid, "decode", pins or f"decode {steps} tokens after a prefill of {prefill}",
                         {"input_ids": ids}, params={"prefill": prefill}, config=cfg, weights=w))


def greedy_case(cid, cfg, prompt=6, new=10, pins="greedy stream"):
    rng = case_rng(cid)
    w = model_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (1, prompt)).astype(np.int64)
    w = margins.plant_stream_margins(cfg, w, ids[0], new)
    return designed(Case(cid, "greedy", pins, {"input_ids": ids}, params={"max_new_tokens": new},
                         config=cfg, weights=w), stream=True)


def mtp_prefill_case(cid, cfg, batch=2, seq=10, pins=None):
    rng = case_rng(cid)
    w = mtp_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64)
    return designed(Case(cid, "mtp_prefill", pins or f"teacher-forced MTP, depth {cfg.num_nextn_predict_layers}",
                         {"input_ids": ids}, config=cfg, weights=w))


def mtp_module_case(cid, cfg, k=1, seq=6):
    rng = case_rng(cid)
    w = mtp_weights(cfg, rng)
    inputs = {"input_ids": rng.integers(0, cfg.vocab_size, (1, seq)).astype(np.int64),
              "h_prev": rng.normal(0, 1, (1, seq, cfg.hidden_size)).astype(F32)}
    return designed(Case(cid, "mtp_module", f"MTP module {k} on given tokens t_(i+k) and h^(k-1)",
                         inputs, params={"k": k}, config=cfg, weights=w))


def speculative_case(cid, cfg, depth, prompt=5, new=10):
    rng = case_rng(cid)
    w = mtp_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (1, prompt)).astype(np.int64)
    w = margins.plant_stream_margins(cfg, w, ids[0], new)
    return designed(Case(cid, "speculative", f"greedy speculative decoding, {depth} draft(s) per round",
                         {"input_ids": ids}, params={"max_new_tokens": new, "depth": depth},
                         config=cfg, weights=w), stream=True)


def training_case(cid, experts=16, k=4, tokens=12, vocab=64, depth=2):
    rng = case_rng(cid)
    scores = (1 / (1 + np.exp(-rng.normal(0, 1, (tokens, experts))))).astype(F32)
    idx = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int64)
    seq = tokens  # MTP tokens [b, T + 1]; depth k logits [b, T + 1 - k, V]
    inputs = {"scores": scores, "idx": idx, "bias": rng.normal(0, 0.05, experts).astype(F32),
              "tokens": rng.integers(0, vocab, (2, seq)).astype(np.int64)}
    for d in range(1, depth + 1):
        inputs[f"mtp_logits.{d}"] = rng.normal(0, 2, (2, seq - d, vocab)).astype(F32)
    return Case(cid, "training", "balance loss, bias update, MTP loss", inputs,
                params={"alpha": 1e-4, "gamma": 1e-3, "lam": 0.3, "depth": depth})


def _fp8_cases():
    """FP8 quantisation cases (weights and activations, non-128-aligned)."""
    def weight(cid, shape):
        rng = case_rng(cid)
        w = rng.normal(0, shape[1] ** -0.5, shape)
        w[:128, :128] *= 50
        return Case(cid, "fp8_quant", f"block quantisation of a {shape[0]} x {shape[1]} weight",
                    {"w": w.astype(F32)})

    def acts(cid, shape):
        rng = case_rng(cid)
        x = rng.normal(0, 1, shape)
        x[0, :100] *= 1e3  # one token with a very different range in its first block
        return Case(cid, "fp8_act_quant", f"activation quantisation of [{shape[0]}, {shape[1]}]",
                    {"x": x.astype(F32)})
    return [("fp8_quant.unaligned", lambda c: weight(c, (576, 200))),
            ("fp8_act_quant.unaligned", lambda c: acts(c, (6, 300)))]


def _mtp_cases():
    """MTP, speculative decoding and training-time cases."""
    return [
        ("mtp_prefill.tiny", lambda c: mtp_prefill_case(c, tiny_mtp(1))),
        ("mtp_prefill.depth2", lambda c: mtp_prefill_case(c, tiny_mtp(2), batch=1, seq=9,
                                                          pins="MTP depth 2 (module 2 fed by module 1)")),
        ("mtp_module.k1", lambda c: mtp_module_case(c, tiny_mtp(1), k=1)),
        ("mtp_module.k2", lambda c: mtp_module_case(c, tiny_mtp(2), k=2)),
        ("speculative.depth1", lambda c: speculative_case(c, tiny_mtp(1), 1)),
        ("speculative.depth2", lambda c: speculative_case(c, tiny_mtp(2), 2)),
        ("training.basic", lambda c: training_case(c)),
    ]


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------

def as_v2(cfg: Config) -> Config:
    """Labelled as published V2-routing models are: model_type deepseek_v2, DeepseekV2ForCausalLM
    (engines pick their V2 code, which has group_limited_greedy and softmax scoring, by these)."""
    return cfg.replace(model_type="deepseek_v2",
                       extra={**cfg.extra, "architectures": ["DeepseekV2ForCausalLM"]})


def _v2_routing():
    return as_v2(tiny(scoring_func="softmax", topk_method="group_limited_greedy",
                      norm_topk_prob=False))


# Configs no published model has, kept because the spec allows them: each model case built on
# one says so in the manifest ("edge") and engines may refuse it.
EDGE = {
    "q_lora_null": "q_lora_rank null with 3 layers: published no-q-lora models (V2-Lite) have "
                   "27 layers, and llama.cpp infers q-lora from the layer count",
    "no_shared_experts": "n_shared_experts 0: every published V2/V3 model has shared experts",
}


def edge(build, why):
    def builder(cid):
        case = build(cid)
        case.edge = EDGE[why]
        return case
    return builder


def smoke():
    return [
        ("rms_norm.basic", lambda c: rms_norm_case(c)),
        ("gate.tiny", lambda c: gate_case(c, tiny())),
        ("mla.tiny.naive", lambda c: mla_case(c, tiny(), 1, 5, "naive")),
        ("model.prefill.tiny", lambda c: prefill_case(c, tiny(), batch=1, seq=6)),
    ] + _mtp_cases()[:1]


def default():
    t = tiny()
    cases = [
        ("rms_norm.basic", lambda c: rms_norm_case(c)),
        ("rms_norm.large_values", lambda c: rms_norm_case(c, d=96, eps=1e-5, scale=1e3)),
        ("yarn_tables.v3", lambda c: yarn_case(
            c, v3(), [0, 1, 7, 4095, 4096, 100000],
            "V3 YaRN frequencies and tables at positions around and far beyond 4096")),
        ("yarn_tables.tiny", lambda c: yarn_case(c, t, np.arange(0, 80, 7), "tiny YaRN tables")),
        ("yarn_tables.no_yarn", lambda c: yarn_case(c, tiny(rope_scaling=None), np.arange(9),
                                                    "plain RoPE")),
        ("yarn_tables.mscale_differs", lambda c: yarn_case(
            c, tiny(rope_scaling=RopeScaling(40.0, 64, 32.0, 1.0, 1.0, 0.707)), np.arange(0, 70, 9),
            "cos/sin factor m(mscale)/m(mscale_all_dim) != 1, softmax uses mscale_all_dim")),
        ("rope_apply.v3", lambda c: rope_case(c, v3(), [0, 1, 4095, 4096, 100000], heads=3,
                                              pins="V3 RoPE beyond the original context")),
        ("rope_apply.tiny", lambda c: rope_case(c, t, np.arange(10), batch=2)),
        ("mla.tiny.naive", lambda c: mla_case(c, t, 2, 7, "naive")),
        ("mla.tiny.absorbed", lambda c: mla_case(c, t, 2, 7, "absorbed")),
        ("mla.one_token", lambda c: mla_case(c, t, 1, 1, "naive", pins="a one-token sequence")),
        ("mla.q_lora_null", lambda c: mla_case(c, tiny(q_lora_rank=None), 1, 6, "naive",
                                               pins="q_lora_rank null: direct q_proj")),
        ("mla_decode.start5", lambda c: mla_decode_case(c, t, 2, 5)),
        ("mla_decode.beyond_original", lambda c: mla_decode_case(
            c, t, 1, 70, pins="decode at position 70, past the original 64")),
        ("gate.tiny", lambda c: gate_case(c, t)),
        ("gate.negative_biased", lambda c: gate_case(
            c, t, bias_mean=-0.8, bias_std=0.3, pins="biased scores below zero (mask must be -inf)")),
        ("gate.exact_ties", lambda c: gate_ties_case(c, t)),
        ("gate.near_ties", lambda c: gate_ties_case(c, t, near=True)),
        ("gate.bias_below_bf16", lambda c: gate_bf16_resolution_case(c)),
        ("gate.softmax_scoring", lambda c: gate_case(c, _v2_routing(),
                                                     pins="softmax scoring, max group score, no bias")),
        ("moe.tiny", lambda c: moe_case(c, t)),
        ("moe.negative_biased", lambda c: moe_case(c, t, bias_mean=-0.8,
                                                   pins="MoE layer with biased scores below zero")),
        ("fp8_dequant.unaligned", lambda c: fp8_case(c, (576, 200),
                                                     "non-128-aligned FP8 blocks (576 x 200)")),
        ("fp8_dequant.aligned", lambda c: fp8_case(c, (256, 256), "whole 128x128 blocks")),
        ("model.prefill.tiny", lambda c: prefill_case(c, t)),
        ("model.prefill.one_token", lambda c: prefill_case(c, t, batch=2, seq=1,
                                                          pins="one-token sequences")),
        ("model.prefill.negative_biased", lambda c: prefill_case(
            c, t, bias_mean=-0.8, pins="gate biases near -0.8: many biased scores below zero")),
        ("model.prefill.beyond_original", lambda c: prefill_case(
            c, t, batch=1, seq=80, pins="positions 0..79, past original_max_position_embeddings 64")),
        ("model.prefill.mscale_differs", lambda c: prefill_case(
            c, tiny(rope_scaling=RopeScaling(40.0, 64, 32.0, 1.0, 1.0, 0.707)), batch=1, seq=10,
            pins="mscale 1.0 vs mscale_all_dim 0.707: the softmax uses mscale_all_dim")),
        ("model.prefill.near_ties", lambda c: prefill_case(
            c, tiny(rope_scaling=RopeScaling(40.0, 64, 32.0, 1.0, 1.0, 0.707)), batch=1, seq=10,
            design=False, pins="random routing weights (no designed margins): near-tie tokens "
                               "that a lower precision resolves either way, forgiven")),
        ("model.prefill.q_lora_null", edge(lambda c: prefill_case(
            c, tiny(q_lora_rank=None), batch=1, seq=8, pins="q_lora_rank null"), "q_lora_null")),
        ("model.prefill.no_shared_experts", edge(lambda c: prefill_case(
            c, tiny(n_shared_experts=0), batch=1, seq=8, pins="no shared expert"),
            "no_shared_experts")),
        ("model.prefill.no_yarn", lambda c: prefill_case(c, tiny(rope_scaling=None), batch=1, seq=8,
                                                        pins="plain RoPE (no rope_scaling)")),
        ("model.prefill.softmax_scoring", lambda c: prefill_case(c, _v2_routing(), batch=1, seq=8,
                                                                pins="softmax scoring (V2 routing)")),
        ("model.decode.start5", lambda c: decode_case(c, t, prefill=5, steps=4)),
        ("model.decode.start1", lambda c: decode_case(c, t, prefill=1, steps=5, batch=1)),
        ("model.greedy.tiny", lambda c: greedy_case(c, t)),
    ]
    cases += _mtp_cases() + _fp8_cases()
    cases += edges.default_cases(tiny, gate_case, moe_case)
    cases += readings.default_cases(tiny, prefill_case)
    cases += scenarios.default_cases(tiny, tiny_mtp)
    for i in range(4):
        cases.append((f"gate.drawn{i}", lambda c: gate_case(c, draw_config(case_rng(c + "/cfg")),
                                                             pins="drawn config and inputs")))
    for i in range(2):
        cases.append((f"mla.drawn{i}", lambda c: mla_case(c, draw_config(case_rng(c + "/cfg")), 2, 6,
                                                          ["naive", "absorbed"][int(c[-1]) % 2],
                                                          pins="drawn config and inputs")))
        cases.append((f"moe.drawn{i}", lambda c: moe_case(c, draw_config(case_rng(c + "/cfg")),
                                                          pins="drawn config and inputs")))
    for i in range(3):
        cases.append((f"model.prefill.drawn{i}", lambda c: prefill_case(
            c, draw_config(case_rng(c + "/cfg")), batch=2, seq=9, pins="drawn config and inputs")))
    return cases


def full_width():
    """Components at the real V3 shapes (few tokens, real dimensions); weights stored bf16."""
    c3 = v3()
    return [
        ("fw.rms_norm.7168", lambda c: rms_norm_case(c, n=4, d=7168)),
        ("fw.rms_norm.kv_latent", lambda c: rms_norm_case(c, n=4, d=512)),
        ("fw.yarn_tables.v3", lambda c: yarn_case(
            c, c3, [0, 1, 4095, 4096, 100000, 163839], "V3 YaRN tables up to 163839")),
        ("fw.rope_apply.v3", lambda c: rope_case(c, c3, [0, 4095, 4096, 100000], heads=128)),
        ("fw.gate.v3", lambda c: gate_case(c, c3, tokens=8, store=BF16,
                                           pins="256 experts in 8 groups, 4 kept, 8 active")),
        ("fw.gate.v3_negative_biased", lambda c: gate_case(
            c, c3, tokens=8, bias_mean=-2.0, bias_std=0.1, store=BF16,
            pins="every biased score below zero: 8 picks from 128 kept experts")),
        ("fw.gate.v3_bias_below_bf16", lambda c: gate_bf16_resolution_case(c, c3, store=BF16)),
        ("fw.mla.v3", lambda c: mla_case(c, c3, 1, 3, "naive", store=BF16,
                                         pins="MLA at 7168 / 128 heads / q-lora 1536 / kv-lora 512")),
        ("fw.mla_decode.v3", lambda c: mla_decode_case(c, c3, 1, 3, store=BF16)),
        ("fw.fp8_dequant.kv_a", lambda c: fp8_case(c, (576, 7168),
                                                   "kv_a_proj_with_mqa shape: scale (5, 56)")),
    ]


def conventions():
    """For each topic of spec section 9, the same inputs with expected values under each
    alternative; the check report says which alternative a candidate follows.

    Top-k ties: every token's choice rests on exact ties (gate.exact_ties's inputs). The
    lower_index and higher_index cases do not forgive exact ties (params exact_ties "decided"),
    so they tell the two rules apart; "unspecified" forgives them, as the other suites do, so an
    engine that breaks ties some other way passes it and is not failed (NOT_FOLLOWED for the
    rest), while wrong router scores fail all three. (Every token is tied, so where ties are
    forgiven no expert weight is compared: the default suite checks those.)"""
    t = tiny()
    decided = {"exact_ties": "decided"}
    topics = [
        ("yarn_activation", lambda c: prefill_case(c, t, batch=1, seq=10,
                                                   pins="YaRN when the run is shorter than the original"),
         [("always", None), ("only_when_extended", "yarn_only_when_extended")]),
        ("group_mask", lambda c: gate_case(c, t, bias_mean=-0.8, bias_std=0.3,
                                           pins="masked groups when biased scores are below zero"),
         [("neg_inf", None), ("zero", "zero_group_mask")]),
        ("gate_precision", lambda c: gate_bf16_resolution_case(c),
         [("float32", None), ("bf16_bias", "bf16_gate_bias"), ("bf16_gate", "bf16_gate")]),
        ("group_score", lambda c: gate_case(c, t, tokens=32, pins="how a group is scored"),
         [("top2_sum", None), ("max", "group_score_max")]),
        ("softmax_mscale", lambda c: prefill_case(
            c, tiny(rope_scaling=RopeScaling(40.0, 64, 32.0, 1.0, 1.0, 0.707)), batch=1, seq=8,
            pins="which YaRN factor scales the softmax"),
         [("mscale_all_dim", None), ("mscale", "mscale_not_all_dim"), ("none", "no_softmax_mscale")]),
        ("rope_layout", lambda c: rope_case(c, t, np.arange(6), pins="which dimensions RoPE pairs"),
         [("adjacent_pairs", None), ("rotate_half", "rotate_half_rope")]),
        ("mtp_concat", lambda c: mtp_prefill_case(c, tiny_mtp(1), batch=1, seq=8,
                                                  pins="order of eh_proj's input"),
         [("embedding_first", None), ("hidden_first", "mtp_concat_swapped")]),
        ("mtp_h0", lambda c: mtp_prefill_case(c, tiny_mtp(1), batch=1, seq=8,
                                              pins="which main hidden state feeds module 1"),
         [("final_norm", None), ("pre_norm", "mtp_pre_norm_h0")]),
        ("latent_norm_eps", lambda c: readings.eps_case(c, t, batch=1, seq=8),
         [("class_default", None), ("rms_norm_eps", "latent_norm_eps_from_config")]),
        ("topk_ties", lambda c: gate_ties_case(c, t),
         [("lower_index", None, decided), ("higher_index", "ties_higher_index", decided),
          ("unspecified", None)]),
    ]
    cases = []
    for topic, build, alternatives in topics:
        for alt, mutant, *params in alternatives:
            def builder(cid, build=build, topic=topic, alt=alt, mutant=mutant, params=params):
                case = build(f"conv.{topic}")  # the same inputs for every alternative
                case.id = cid
                case.conventions = {topic: alt}
                case.expect_under = mutant
                case.params.update(*params)
                return case
            cases.append((f"conv.{topic}.{alt}", builder))
    return cases


def scenario_suite():
    """The serving scenarios at the real MLA widths (engine_config), so that vLLM's CPU MLA
    kernel runs them; the decode past 4096 on a context of 5120 (YaRN factor 80)."""
    return scenarios.suite(engine_config, lambda depth: engine_config(num_nextn_predict_layers=depth),
                           lambda: engine_config(rope_scaling=RopeScaling(80.0, 64, 32.0, 1.0, 1.0, 1.0),
                                                 max_position_embeddings=5120))


def engine_config(**changes) -> Config:
    """The real per-head widths of V2/V3 attention (kv_lora_rank 512, qk_rope_head_dim 64,
    qk_nope_head_dim 128, v_head_dim 128: the 576-wide latent that vLLM's CPU MLA kernel and
    llama.cpp's MLA path are built for) with few heads, layers and experts and a small
    vocabulary; YaRN active from an original context of 64."""
    return tiny(vocab_size=384, hidden_size=256, intermediate_size=256, moe_intermediate_size=64,
                num_hidden_layers=2, kv_lora_rank=512, q_lora_rank=128, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8,
                num_experts_per_tok=2).replace(**changes)


def engine():
    """Model cases only, at the real attention widths (engine_config): what an engine that only
    runs real shapes can load."""
    e = engine_config()
    v2 = as_v2(engine_config(scoring_func="softmax", topk_method="group_limited_greedy",
                             norm_topk_prob=False,
                             rope_scaling=RopeScaling(40.0, 64, 32.0, 1.0, 0.707, 0.707)))
    return [
        ("model.prefill.basic", lambda c: prefill_case(c, e, batch=2, seq=10)),
        ("model.prefill.negative_biased", lambda c: prefill_case(
            c, e, batch=1, seq=10, bias_mean=-0.8,
            pins="gate biases near -0.8: many biased scores below zero")),
        ("model.prefill.beyond_original", lambda c: prefill_case(
            c, e, batch=1, seq=72, pins="positions 0..71, past original_max_position_embeddings 64")),
        ("model.prefill.mscale_differs", lambda c: prefill_case(
            c, engine_config(rope_scaling=RopeScaling(40.0, 64, 32.0, 1.0, 1.0, 0.707)), batch=1,
            seq=10, pins="mscale 1.0 vs mscale_all_dim 0.707: the softmax uses mscale_all_dim")),
        ("model.prefill.softmax_scoring", lambda c: prefill_case(
            c, v2, batch=1, seq=10, pins="DeepSeek-V2 routing: softmax scores, group_limited_greedy "
                                         "(max per group), mscale = mscale_all_dim = 0.707")),
        ("model.decode.start5", lambda c: decode_case(c, e, prefill=5, steps=4, batch=1)),
        ("model.greedy.basic", lambda c: greedy_case(c, e, prompt=6, new=8)),
        ("model.prefill.rms_norm_eps", lambda c: readings.eps_case(c, e, batch=1, seq=10)),
    ]


SUITES = {"smoke": smoke, "default": default, "full-width": full_width, "conventions": conventions,
          "scenarios": scenario_suite, "engine": engine}
SUITE_DOCS = {
    "smoke": "a few cases, seconds: one of each main kind",
    "default": "every case kind, with named edge cases, edge values, config values that separate "
               "readings, small serving scenarios, drawn cases and labelled spec-edge configs; "
               "model cases on designed routing and stream margins",
    "full-width": "components at the real V3 dimensions (hidden 7168, 128 heads, q-lora 1536, "
                  "kv-lora 512, 256 experts in 8 groups, the real YaRN config); weights stored bf16",
    "conventions": "each spec section 9 alternative, labelled, to learn which one an engine follows",
    "scenarios": "serving schedules at the real MLA widths of the engine suite (so vLLM's CPU "
                 "MLA kernel runs them): chunked prefill, a final one-token prefill chunk, "
                 "prefixes shared at block multiples and one off, ragged and mixed batches, "
                 "preemption, decode past 256, 512, 1024 and 4096, MTP speculation at depth 2 "
                 "and 3; expected: each request alone",
    "engine": "model cases only, at the real attention widths (kv-lora 512, rope 64, nope 128, "
              "v 128; 4 heads, 2 layers, 8 experts, vocab 384) that engines built for real "
              "shapes (vLLM's CPU MLA kernel) load",
}


def suite_cases(name: str):
    if name not in SUITES:
        raise OraclesError(f"suite {name!r} is unknown; choose one of {', '.join(SUITES)}")
    return SUITES[name]()
