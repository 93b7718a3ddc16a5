"""Checkpoint tensor names (the Hugging Face layout of DeepSeek-V3), in one place.

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.N.{input_layernorm, post_attention_layernorm}.weight
    model.layers.N.self_attn.{q_a_proj, q_a_layernorm, q_b_proj | q_proj,
                              kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight
    model.layers.N.mlp.{gate_proj, up_proj, down_proj}.weight               (dense layers)
    model.layers.N.mlp.gate.weight, model.layers.N.mlp.gate.e_score_correction_bias
    model.layers.N.mlp.experts.E.{gate_proj, up_proj, down_proj}.weight
    model.layers.N.mlp.shared_experts.{gate_proj, up_proj, down_proj}.weight
    MTP module k at N = num_hidden_layers + k - 1: the layer above plus
    model.layers.N.{enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens}.weight

The paper's symbols for the attention keys (section 2.1.1): q_a_proj = W^DQ, q_a_layernorm is
the RMSNorm on c^Q, q_b_proj = [W^UQ; W^QR] (per head), kv_a_proj_with_mqa = [W^DKV; W^KR],
kv_a_layernorm the RMSNorm on c^KV, kv_b_proj = [W^UK; W^UV] (per head), o_proj = W^O.
"""

from __future__ import annotations

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

FFN_PROJ = ("gate_proj", "up_proj", "down_proj")  # one SwiGLU: dense FFN, shared or routed expert
ATTN_NORMS = ("q_a_layernorm", "kv_a_layernorm")
BIAS_SUFFIX = "mlp.gate.e_score_correction_bias"
MTP_EXTRA = ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens")


def attention_keys(cfg) -> tuple:
    """The short names of one MLA block's tensors (under layer(i) + 'self_attn.'); q_proj
    replaces the low-rank query pair when q_lora_rank is null (DeepSeek-V2-Lite)."""
    q = ("q_proj",) if cfg.q_lora_rank is None else ("q_a_proj", "q_a_layernorm", "q_b_proj")
    return q + ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")


def head(cfg) -> str:
    """The output head: the embedding itself when tie_word_embeddings."""
    return EMBED if cfg.tie_word_embeddings else LM_HEAD


def layer(i: int) -> str:
    """Prefix of decoder layer i (MTP layers included)."""
    return f"model.layers.{i}."


def input_norm(i: int) -> str:
    return f"{layer(i)}input_layernorm.weight"


def post_attention_norm(i: int) -> str:
    return f"{layer(i)}post_attention_layernorm.weight"


def attention(i: int) -> str:
    """Prefix of layer i's MLA tensors: attention(i) + key + '.weight'."""
    return f"{layer(i)}self_attn."


def mlp(i: int) -> str:
    """Prefix of layer i's FFN: the dense SwiGLU's projections, or the MoE's gate and experts."""
    return f"{layer(i)}mlp."


def gate_weight(i: int) -> str:
    return f"{mlp(i)}gate.weight"


def gate_bias(i: int) -> str:
    """The auxiliary-loss-free balancing bias b_i (optional: see Checkpoint)."""
    return f"{layer(i)}{BIAS_SUFFIX}"


def expert(i: int, e: int) -> str:
    """Prefix of routed expert e of layer i: expert(i, e) + proj + '.weight'."""
    return f"{mlp(i)}experts.{e}."


def shared_experts(i: int) -> str:
    return f"{mlp(i)}shared_experts."


def weight(prefix: str, key: str) -> str:
    """prefix + key + '.weight'."""
    return f"{prefix}{key}.weight"


# ---- MTP (paper section 2.2) -----------------------------------------------------------------

def mtp_layer(cfg, k: int) -> int:
    """Checkpoint (and latent cache slot) index of MTP module k: num_hidden_layers + k - 1."""
    return cfg.num_hidden_layers + k - 1


def enorm(i: int) -> str:
    return f"{layer(i)}enorm.weight"


def hnorm(i: int) -> str:
    return f"{layer(i)}hnorm.weight"


def eh_proj(i: int) -> str:
    """W_eh of eq. (21): [d, 2d]."""
    return f"{layer(i)}eh_proj.weight"


def shared_head_norm(i: int) -> str:
    return f"{layer(i)}shared_head.norm.weight"


def mtp_head(i: int) -> str:
    """The module's stored copy of the output head."""
    return f"{layer(i)}shared_head.head.weight"


def mtp_embed(i: int) -> str:
    """The module's stored copy of the embedding."""
    return f"{layer(i)}embed_tokens.weight"


def layer_of(name: str) -> int | None:
    """The decoder layer index in a tensor name, or None for embedding, final norm and head."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None
