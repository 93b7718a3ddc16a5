"""Model cases whose config breaks a coincidence at which different readings of a config field
agree, so that an engine that reads the field another way fails (spec section 9).

Most model cases share values at which the readings agree: rms_norm_eps 1e-6 (the RMSNorm class
default, which some implementations use whatever the config says), top-k / topk_group = 2 (the
paper's and Megatron-LM's K_r/M top scores per group equal the top 2 that DeepSeek's code and
the engines sum), a YaRN factor equal to max_position_embeddings / original_max_position_
embeddings (older transformers computed it that way), and more than one routed expert per token
(MLX-LM renormalises only then). Each case here breaks one of them, and the mutant of the other
reading (oracles/authoring/mutants.py) fails it:

| case | value | the other reading (mutant) |
|---|---|---|
| `model.prefill.rms_norm_eps` | rms_norm_eps 1e-2; the embedding, o_proj and down_proj x 0.1, q_a_proj and kv_a_proj_with_mqa x 0.1, so that mean(x^2) is 0.005-0.03 where the norms read it | every norm at 1e-6 (`rms_norm_eps_ignored`, DeepSeek's model.py); the latent norms at rms_norm_eps (`latent_norm_eps_from_config`, vLLM, SGLang, llama.cpp) |
| `model.prefill.top_k_over_m` | 3 experts per token from 1 of 4 groups: K/M = 3 | groups scored by their top 3 (`group_score_top_k_over_m`) |
| `model.prefill.yarn_factor_not_ratio` | factor 40, original 64, max_position_embeddings 128 (ratio 2), positions 0-79 | the factor taken as the ratio (`yarn_factor_from_ratio`, transformers 4.x) |
| `model.prefill.v2_group_top2` | V2 routing, 2 experts per token; a dropped group with two decoys whose sum beats a kept group's best | V3's top-2 group score for V2 too (`group_score_top2_for_v2`, llama.cpp) |
| `model.prefill.single_expert` | num_experts_per_tok 1, norm_topk_prob true; codes with 0s, so that some chosen experts score 1/2 | no renormalisation for one expert (`single_expert_not_renormalised`, MLX-LM) |

Routing margins are designed as in every model case (oracles/authoring/margins.py).
"""

from __future__ import annotations

import numpy as np

from refimpl import names
from refimpl.config import Config, RopeScaling

from refimpl.writer import random_weights

from ..format.schema import Case
from . import margins
from .draws import F32, case_rng, designed, seed

EPS = 1e-2
RESIDUAL_SCALE = 0.1  # the residual stream's mean square: about 0.01-0.03
LATENT_SCALE = 0.1  # c_q and c_kv's: about 0.005


def small_norm_weights(cfg: Config, rng) -> dict:
    """Weights whose hidden states and latents are small enough that eps = 1e-2 changes every
    RMSNorm by 20-40%: the embedding and every projection that writes into the residual stream
    (o_proj, down_proj) x RESIDUAL_SCALE (routing codes planted at that amplitude),
    q_a_proj and kv_a_proj_with_mqa x LATENT_SCALE."""
    w = {k: v.astype(F32) for k, v in random_weights(cfg, seed(rng), mtp=False).items()}
    for k in w:
        if k == names.EMBED or k.endswith(("o_proj.weight", "down_proj.weight")):
            w[k] = (w[k] * RESIDUAL_SCALE).astype(F32)
        elif k.endswith(("q_a_proj.weight", "kv_a_proj_with_mqa.weight")):
            w[k] = (w[k] * LATENT_SCALE).astype(F32)
    return margins.plant_routing(cfg, w, rng, amplitude=RESIDUAL_SCALE)


def eps_case(cid, cfg, batch=1, seq=10):
    rng = case_rng(cid)
    cfg = cfg.replace(rms_norm_eps=EPS)
    w = small_norm_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64)
    return designed(Case(cid, "prefill", f"rms_norm_eps {EPS:g} with hidden states and latents of "
                                         "mean square 0.005-0.03: every norm's eps matters, the "
                                         "latent norms' at 1e-6", {"input_ids": ids},
                         config=cfg, weights=w))


def top_k_over_m(tiny) -> Config:
    return tiny(num_experts_per_tok=3, topk_group=1)


def yarn_not_ratio(tiny) -> Config:
    rs = RopeScaling(40.0, 64, 32.0, 1.0, 1.0, 1.0)
    return tiny(rope_scaling=rs, max_position_embeddings=128)


def default_cases(tiny, prefill_case):
    """The config-separating cases of the default suite."""
    return [
        ("model.prefill.rms_norm_eps", lambda c: eps_case(c, tiny(), batch=2, seq=10)),
        ("model.prefill.top_k_over_m", lambda c: prefill_case(
            c, top_k_over_m(tiny), batch=2, seq=10,
            pins="3 experts from 1 of 4 groups: groups scored by their top 2, not top K/M = 3")),
        ("model.prefill.yarn_factor_not_ratio", lambda c: prefill_case(
            c, yarn_not_ratio(tiny), batch=1, seq=80,
            pins="YaRN factor 40 while max_position_embeddings / original is 128 / 64 = 2")),
        ("model.prefill.single_expert", lambda c: single_expert_case(c, tiny(num_experts_per_tok=1))),
        ("model.prefill.v2_group_top2", lambda c: v2_decoy_case(c, v2_two_experts(tiny))),
    ]


def v2_two_experts(tiny) -> Config:
    """V2 routing (softmax scores, group_limited_greedy: a group scored by its best expert) with
    2 experts per token from 2 of 4 groups."""
    cfg = tiny(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
               num_experts_per_tok=2)
    return cfg.replace(model_type="deepseek_v2",  # labelled as published V2 models are (suites.as_v2)
                       extra={**cfg.extra, "architectures": ["DeepseekV2ForCausalLM"]})


V2_MARGIN = 0.08  # under softmax scores the two rules part only within a narrower window


def v2_decoy_case(cid, cfg, batch=2, seq=12):
    """Softmax scoring, a group scored by its best expert: for about half the tokens a dropped
    group holds two "decoy" experts, each V2_MARGIN or more below the best of either kept group
    but together above one of them, so that a group scored by its top-2 sum (V3's rule, which
    llama.cpp applies to V2 too) keeps the decoys' group instead. Scales 0.4-1 cover this model's
    residual stream (RMS 1.2-2.2 at its MoE layers)."""
    rng = case_rng(cid)
    w = {k: v.astype(F32) for k, v in random_weights(cfg, seed(rng), mtp=False).items()}
    w = margins.plant_routing(cfg, w, rng, margin=V2_MARGIN, scales=(0.4, 1.0), on=(0.5, 0.5),
                              decoy=(0.38, 0.40))
    ids = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64)
    return designed(Case(cid, "prefill", "V2 routing with two experts per token: a dropped group "
                                         "with two decoys beats a kept group by its top-2 sum, "
                                         "not by its best expert", {"input_ids": ids},
                         config=cfg, weights=w), routing=V2_MARGIN)


def single_expert_case(cid, cfg, batch=2, seq=10):
    """One routed expert per token with norm_topk_prob: the renormalised weight is
    routed_scaling_factor. Codes include 0 (scores near 1/2), so that the chosen expert's score
    is often far from 1 and skipping the renormalisation changes its weight."""
    rng = case_rng(cid)
    w = {k: v.astype(F32) for k, v in random_weights(cfg, seed(rng), mtp=False).items()}
    w = margins.plant_routing(cfg, w, rng, levels=(-1.0, 0.0, 1.0))
    ids = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64)
    return designed(Case(cid, "prefill", "one routed expert per token, norm_topk_prob true: its "
                                         "weight is routed_scaling_factor, whatever its score",
                         {"input_ids": ids}, config=cfg, weights=w))
