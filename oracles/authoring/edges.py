"""Edge values that expose swaps (spec sections 5, 7, 9 and 10): inputs built so that a bug
public engines shipped changes the outputs, where the default suite's other cases would not see it.

- routed_scaling_factor 2.5 with norm_topk_prob false (gate and MoE; with norm_topk_prob true it
  is gate.tiny / moe.tiny): applied twice, or skipped without the renormalisation, changes every
  routing weight.
- gate logits below -88 (`gate.logits_below_88`): a float32 sigmoid written 1 / (1 + exp(-x))
  overflows exp at x < -88.7 and returns 0; when every selected score is 0 the renormalisation is
  0 / 0. refimpl's behaviour (spec section 9, "top-k renormalisation"): the sigmoid is
  computed from exp(-|x|) (refimpl.ops.sigmoid), which in float64 is exact down to about -745
  and in float32 stays a (subnormal) positive number down to about -103; the renormalisation has
  no epsilon, so the weights are the ratio of the selected scores, i.e. the softmax of the
  selected gate logits, and O(1). Below -745 (float64) every score is exactly 0 and refimpl gives
  NaN (0 / 0): no finite weight is claimed there, and no case goes there. transformers' and
  SGLang's epsilon of 1e-20 fails this case by design (weights ~1e-20 instead of O(1)).
- an FP8 model (`model.prefill.fp8_blocks`): widths above 128 that are not multiples of 128
  (hidden 200, kv_a_proj_with_mqa 160 rows, dense FFN 264), stored as e4m3 with a
  weight_scale_inv per 128x128 block, every block of every FP8 weight at a different scale, so
  that a scale read transposed, with the wrong block size or the wrong block changes the model.
- activation and weight blocks that are all zeros or whose amax is below the 1e-4 floor
  (`fp8_act_quant.zero_and_tiny_blocks`, `fp8_quant.zero_and_tiny_blocks`): the floor keeps the
  scale finite (0 / 0 without it) and decides the tiny block's scale.

Already in the default suite, not repeated here: routed_scaling_factor != 1 with
norm_topk_prob true (the tiny preset), mscale != mscale_all_dim at factor 40
(`yarn_tables.mscale_differs`, `model.prefill.mscale_differs`), a bias difference below one bf16
ulp (`gate.bias_below_bf16`, `fw.gate.v3_bias_below_bf16`).
"""

from __future__ import annotations

import numpy as np

from refimpl import fp8
from refimpl.layout import FP8_QUANT_CONFIG, is_fp8_weight
from refimpl.writer import random_weights
from refimpl.config import Config, RopeScaling

from ..format.schema import Case
from .draws import case_rng, designed, seed
from .kinds import routing_margin
from .margins import plant_routing

F32 = np.float32


def no_norm_topk(tiny) -> Config:
    """Sigmoid scoring with norm_topk_prob false and routed_scaling_factor 2.5."""
    return tiny(norm_topk_prob=False, routed_scaling_factor=2.5)


def gate_logits_below_88_case(cid, cfg, tokens=12):
    """Every gate logit u . e_i in about [-94.5, -91.5]: one channel carries -93, the others
    add noise of standard deviation 0.5."""
    rng = case_rng(cid)
    d, e = cfg.hidden_size, cfg.n_routed_experts
    u = rng.normal(0, 1, (tokens, d))
    w = rng.normal(0, 0.5 * (d - 1) ** -0.5, (e, d))
    u[:, 0], w[:, 0] = 10.0, -9.3
    inputs = {"u": u.astype(F32), "gate_weight": w.astype(F32)}
    if cfg.uses_bias:
        inputs["bias"] = decisive_bias(rng, cfg)
    return Case(cid, "gate", "gate logits near -93: a float32 sigmoid 1/(1+exp(-x)) gives 0 and "
                             "the renormalisation 0/0; the weights are the softmax of the selected "
                             "logits", inputs, config=cfg)


def decisive_bias(rng, cfg, margin=0.1) -> np.ndarray:
    """A gate bias whose expert choice (scores ~0 next to it) is decided by more than `margin`
    at the group and the expert level, so that no profile forgives it (draws until one is)."""
    for _ in range(1000):
        b = rng.normal(0, 0.5, cfg.n_routed_experts).astype(F32)
        if routing_margin(np.zeros((1, cfg.n_routed_experts)), b, cfg)[0] > margin:
            return b
    raise AssertionError("no decisive bias drawn")


def fp8_model_config() -> Config:
    """Widths above 128, none a multiple of 128 where the checkpoint has FP8 blocks to cut."""
    return Config(
        vocab_size=128, hidden_size=200, intermediate_size=264, moe_intermediate_size=136,
        num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=144, q_lora_rank=136,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        scoring_func="sigmoid", topk_method="noaux_tc", rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=64, beta_fast=32.0,
                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=512, num_nextn_predict_layers=0,
        extra={"architectures": ["DeepseekV3ForCausalLM"], "torch_dtype": "float32",
               "quantization_config": dict(FP8_QUANT_CONFIG)})


def fp8_blocks_weights(cfg, rng) -> dict:
    """Random weights in the published FP8 layout: each FP8 projection's 128x128 blocks first
    scaled by a different power 2^u, u uniform in [-2, 2] (so that every block has its own
    scale), then block-quantised (refimpl.fp8.quantize) to e4m3 + a float32 weight_scale_inv;
    the rest float32."""
    out = {}
    for name, a in plant_routing(cfg, random_weights(cfg, seed(rng), mtp=False), rng).items():
        if is_fp8_weight(name) and a.ndim == 2:
            rows, cols = fp8.scale_shape(a.shape)
            f = np.exp2(rng.uniform(-2, 2, (rows, cols)))
            a = a * np.repeat(np.repeat(f, fp8.BLOCK, 0), fp8.BLOCK, 1)[:a.shape[0], :a.shape[1]]
            out[name], out[name + "_scale_inv"] = fp8.quantize(a)
        else:
            out[name] = a.astype(F32)
    return out


def fp8_model_case(cid, batch=1, seq=9):
    rng = case_rng(cid)
    cfg = fp8_model_config()
    w = fp8_blocks_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64)
    return designed(Case(cid, "prefill", "an FP8 checkpoint at widths 136-264, none a multiple of "
                                         "128: every 128x128 block at its own scale (partial "
                                         "edge blocks)", {"input_ids": ids}, config=cfg, weights=w))


def act_zero_and_tiny_case(cid, tokens=4, k=300):
    """Token 0: channels 0-127 all zero, 128-255 amax 3e-6 (below the 1e-4 floor), the partial
    block 256-299 normal; token 1: its middle block zero; the rest normal."""
    rng = case_rng(cid)
    x = rng.normal(0, 1, (tokens, k))
    x[0, :128] = 0.0
    x[0, 128:256] *= 1e-6
    x[1, 128:256] = 0.0
    return Case(cid, "fp8_act_quant", "activation blocks that are all zero or have amax below "
                                      "the 1e-4 floor", {"x": x.astype(F32)})


def weight_zero_and_tiny_case(cid, shape=(300, 200)):
    rng = case_rng(cid)
    w = rng.normal(0, shape[1] ** -0.5, shape)
    w[:128, :128] = 0.0
    w[128:256, :128] *= 1e-5
    return Case(cid, "fp8_quant", "weight blocks that are all zero or have amax below the 1e-4 floor",
                {"w": w.astype(F32)})


# What each edge-value case exposes: the bug it is built to show (docs/conformance.md section 1's
# table is generated from this and each case's `pins`).
EXPOSES = {
    "gate.no_norm_topk_prob": "routed_scaling_factor skipped when there is no renormalisation, or "
                              "applied twice (with norm_topk_prob true: `gate.tiny`)",
    "moe.no_norm_topk_prob": "the same, through a whole MoE layer (with norm_topk_prob true: "
                             "`moe.tiny`)",
    "gate.logits_below_88": "a float32 sigmoid 1 / (1 + exp(-x)) returns 0 below -88.7 and the "
                            "renormalisation is 0/0; an epsilon of 1e-20 gives weights ~1e-20",
    "model.prefill.fp8_blocks": "scales read transposed, with the wrong block size or from the "
                                "wrong block, inside the model path",
    "fp8_act_quant.zero_and_tiny_blocks": "a missing amax clamp: 0/0 for the zero block, another "
                                          "scale for the tiny one",
    "fp8_quant.zero_and_tiny_blocks": "a missing amax clamp: 0/0 for the zero block, another scale "
                                      "for the tiny one",
}


def default_cases(tiny, gate_case, moe_case):
    """The edge-value cases of the default suite (each one's bug in EXPOSES)."""
    return [
        ("gate.no_norm_topk_prob", lambda c: gate_case(
            c, no_norm_topk(tiny), pins="norm_topk_prob false, routed_scaling_factor 2.5: the "
                                        "weights are 2.5 s_i, not renormalised")),
        ("moe.no_norm_topk_prob", lambda c: moe_case(
            c, no_norm_topk(tiny), pins="MoE with norm_topk_prob false, routed_scaling_factor 2.5")),
        ("gate.logits_below_88", lambda c: gate_logits_below_88_case(c, tiny())),
        ("model.prefill.fp8_blocks", lambda c: fp8_model_case(c)),
        ("fp8_act_quant.zero_and_tiny_blocks", lambda c: act_zero_and_tiny_case(c)),
        ("fp8_quant.zero_and_tiny_blocks", lambda c: weight_zero_and_tiny_case(c)),
    ]
