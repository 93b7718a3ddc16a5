"""Drawing a case's inputs: every builder draws from its own generator,
`numpy.random.default_rng([SUITE_SEED, crc32(case id)])`, so a case's inputs depend only on its id
and the seed (not on which other cases were generated, nor on --only), and regenerating gives
byte-identical files.

`draw_config` and the weight draws play the part of hypothesis strategies, but draw from that
seeded numpy generator, so expected values never depend on hypothesis's example database or
version.  The configs every suite starts from (the tiny preset, V3) are here too.
"""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np

from refimpl.config import Config, RopeScaling
from refimpl.writer import random_weights

from . import margins

SUITE_SEED = 20250101
F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)


def case_rng(case_id: str) -> np.random.Generator:
    return np.random.default_rng([SUITE_SEED, zlib.crc32(case_id.encode())])


def seed(rng) -> int:
    """A seed for refimpl.writer.random_weights, drawn from the case's generator."""
    return int(rng.integers(0, 2**31))


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def tiny(**changes) -> Config:
    """The tiny preset without MTP (YaRN active from an original context of 64)."""
    return Config.preset("tiny").replace(num_nextn_predict_layers=0, **changes)


def v3() -> Config:
    return Config.preset("deepseek-v3")


def draw_config(rng) -> Config:
    """A small random DeepSeek-V3 config: every feature may vary, sizes stay tiny, and the
    choices stay those of published models (at least one shared expert, q-lora on: engines infer
    "no q-lora" from the layer count of V2-Lite); spec edges are named cases (EDGE)."""
    heads = int(rng.choice([2, 4]))
    rope_dim = int(rng.choice([4, 8]))
    experts = int(rng.choice([8, 16]))
    n_group = int(rng.choice([g for g in (1, 2, 4) if experts // g >= 2]))
    topk_group = int(rng.integers(1, n_group + 1))
    k = int(rng.integers(1, min(4, topk_group * experts // n_group) + 1))
    yarn = rng.random() < 0.75
    ms = [(1.0, 1.0), (0.707, 0.707), (1.0, 0.5)][int(rng.integers(0, 3))]
    rs = RopeScaling(factor=float(rng.choice([4.0, 40.0])),
                     original_max_position_embeddings=int(rng.choice([8, 16, 64])),
                     beta_fast=32.0, beta_slow=1.0, mscale=ms[0], mscale_all_dim=ms[1]) if yarn else None
    return Config(
        vocab_size=int(rng.choice([64, 128])), hidden_size=int(rng.choice([32, 48])),
        intermediate_size=64, moe_intermediate_size=int(rng.choice([16, 24])),
        num_hidden_layers=int(rng.integers(2, 4)), num_attention_heads=heads,
        kv_lora_rank=int(rng.choice([16, 24])), q_lora_rank=int(rng.choice([24, 32])),
        qk_nope_head_dim=int(rng.choice([8, 16])), qk_rope_head_dim=rope_dim,
        v_head_dim=int(rng.choice([8, 16])), n_routed_experts=experts,
        n_shared_experts=int(rng.integers(1, 3)), num_experts_per_tok=k, n_group=n_group,
        topk_group=topk_group, first_k_dense_replace=int(rng.integers(0, 2)),
        routed_scaling_factor=float(rng.choice([1.0, 2.5])), norm_topk_prob=bool(rng.random() < 0.8),
        rope_theta=10000.0, rope_scaling=rs, max_position_embeddings=512,
        extra={"architectures": ["DeepseekV3ForCausalLM"], "torch_dtype": "float32"})


def model_weights(cfg, rng, store=F32, bias_mean=0.0, design=True):
    """Random weights (gate biases shifted by bias_mean); with `design`, routing margins planted
    (margins.plant_routing: every token routed by >= ROUTING_MARGIN at every MoE layer,
    whatever its context)."""
    w = {k: v.astype(store) for k, v in random_weights(cfg, seed(rng), mtp=False).items()}
    for k in w:
        if k.endswith("e_score_correction_bias"):
            w[k] = (w[k].astype(F32) + np.float32(bias_mean)).astype(F32)
    return margins.plant_routing(cfg, w, rng) if design else w


def designed(case, routing=True, stream=False):
    """Record in the case's params the margins its weights were built to clear (routing: True
    for ROUTING_MARGIN, or the margin)."""
    r = margins.ROUTING_MARGIN if routing is True else (routing or None)
    case.params.update(margins.design_params(r, margins.STREAM_MARGIN if stream else None))
    return case


def tiny_mtp(depth=1, **changes) -> Config:
    """The tiny preset with `depth` MTP modules."""
    return Config.preset("tiny").replace(num_nextn_predict_layers=depth, **changes)


def mtp_weights(cfg, rng, design=True):
    w = {k: v.astype(F32) for k, v in random_weights(cfg, seed(rng), mtp=True).items()}
    return margins.plant_routing(cfg, w, rng) if design else w
