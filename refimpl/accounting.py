"""Parameter and cache arithmetic: the headline numbers (671B total, 37B active, MLA's KV-cache
saving), derived from the config through the same tensor plan the checkpoint writer uses
(spec section 8).  Nothing here is hard-coded for one model.

Counting conventions (stated, because published figures differ on them):
- "total" is the main model without the MTP module (the 671B of the paper's title).
- "active per token" counts every tensor a token touches, with the embedding and lm_head as whole
  matrices (the paper's 37B); "without embedding" drops model.embed_tokens only.
- routed experts are active num_experts_per_tok at a time; the gate and its bias always are.
- MTP "unique" parameters leave out the stored copies of the embedding and head
  (embed_tokens, shared_head.head), which the module shares with the main model.
"""

from __future__ import annotations

import math

from .layout import STORAGE_BYTES, layer_plan, storage_plan, tensor_plan
from .names import layer_of
from .config import Config

CONTEXT_128K = 128 * 1024  # tokens in a "128K" context
CACHE_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4, "fp64": 8}

# components of a decoder layer, by the checkpoint name below model.layers.N.
COMPONENTS = ("norms", "attention", "dense_ffn", "gate", "shared_experts", "routed_experts",
              "mtp_extra", "mtp_copies")


def component(name: str) -> str:
    """The part of the model a tensor belongs to, from its checkpoint name."""
    if layer_of(name) is None:
        return {"model.embed_tokens.weight": "embedding", "lm_head.weight": "head",
                "model.norm.weight": "norms"}[name]
    rest = name.split(".", 3)[3]
    if rest.startswith("self_attn."):
        return "attention"
    if rest.startswith("mlp.experts."):
        return "routed_experts"
    if rest.startswith("mlp.shared_experts."):
        return "shared_experts"
    if rest.startswith("mlp.gate."):
        return "gate"
    if rest.startswith("mlp."):
        return "dense_ffn"
    if rest.startswith(("embed_tokens.", "shared_head.head.")):
        return "mtp_copies"  # stored copies of the shared embedding and head (spec section 6)
    if rest.startswith(("eh_proj.", "enorm.", "hnorm.", "shared_head.norm.")):
        return "mtp_extra"
    return "norms"  # input_layernorm, post_attention_layernorm


def numel(shape) -> int:
    return math.prod(shape)


def by_component(plan: dict) -> dict[str, int]:
    """{component: parameters} for a name -> shape plan."""
    out: dict[str, int] = {}
    for name, shape in plan.items():
        c = component(name)
        out[c] = out.get(c, 0) + numel(shape)
    return out


def active_of(cfg: Config, counts: dict[str, int]) -> int:
    """Parameters one token touches in a set of layers: all but the routed experts, plus
    num_experts_per_tok of the equally sized routed experts (eqs. 12-13)."""
    routed = counts.get("routed_experts", 0)
    per_expert_share = routed * cfg.num_experts_per_tok // cfg.n_routed_experts if routed else 0
    return sum(v for k, v in counts.items() if k != "routed_experts") + per_expert_share


def layer_summary(cfg: Config, layer: int) -> dict:
    """One decoder layer (an MTP layer too): kind, parameters by component, total and active."""
    counts = by_component(layer_plan(cfg, layer))
    kind = "mtp" if layer >= cfg.num_hidden_layers else ("moe" if cfg.is_moe_layer(layer) else "dense")
    ffn = {k: counts[k] for k in ("dense_ffn", "gate", "shared_experts", "routed_experts") if k in counts}
    return {"layer": layer, "kind": kind, "components": counts, "total": sum(counts.values()),
            "active": active_of(cfg, counts),
            "ffn_total": sum(ffn.values()), "ffn_active": active_of(cfg, ffn)}


def kv_cache(cfg: Config, cache_dtype: str = "bf16", context: int = CONTEXT_128K) -> dict:
    """MLA's latent cache (c^KV and k^R: d_c + d_R values per token per layer, spec section 4)
    against the baseline of a full multi-head cache with the same heads: K of n_h*(d_h + d_h^R)
    and V of n_h*v_head_dim per token per layer.  Main-model layers only (not the MTP module)."""
    nbytes = CACHE_DTYPE_BYTES[cache_dtype]
    layers = cfg.num_hidden_layers
    mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return {
        "baseline": (f"full multi-head attention caching K ({cfg.num_attention_heads} heads x "
                     f"{cfg.qk_head_dim}) and V ({cfg.num_attention_heads} heads x "
                     f"{cfg.v_head_dim}) per token per layer"),
        "cache_dtype": cache_dtype, "layers": layers, "context_tokens": context,
        "mla_values_per_token_per_layer": mla,
        "mha_values_per_token_per_layer": mha,
        "mla_bytes_per_token": mla * layers * nbytes,
        "mha_bytes_per_token": mha * layers * nbytes,
        "mla_bytes_context": mla * layers * nbytes * context,
        "mha_bytes_context": mha * layers * nbytes * context,
        "mla_fraction_of_mha": mla / mha,
    }


def storage_totals(cfg: Config, fp8: bool = True, mtp: bool = True) -> dict:
    """Tensor count and bytes of the checkpoint make-checkpoint would write (the real layout when
    fp8), by dtype - from the plan, without writing anything."""
    plan = storage_plan(cfg, fp8=fp8, mtp=mtp)
    by_dtype: dict[str, list] = {}
    for dtype, shape in plan.values():
        t = by_dtype.setdefault(dtype, [0, 0])
        t[0] += 1
        t[1] += numel(shape) * STORAGE_BYTES[dtype]
    return {"tensors": len(plan), "bytes": sum(b for _, b in by_dtype.values()),
            "by_dtype": {k: {"tensors": n, "bytes": b} for k, (n, b) in sorted(by_dtype.items())}}


def active_bytes_per_token(cfg: Config, fp8: bool = True, mtp: bool = False) -> int:
    """Stored bytes one decode token must read (batch 1, nothing cached): every tensor it
    touches as stored (FP8 with scales, when fp8), num_experts_per_tok of the routed experts,
    and one row of the embedding."""
    total = 0
    for name, (dtype, shape) in storage_plan(cfg, fp8=fp8, mtp=mtp).items():
        nbytes = numel(shape) * STORAGE_BYTES[dtype]
        c = component(name.replace("_scale_inv", ""))
        if c == "routed_experts":
            nbytes = nbytes * cfg.num_experts_per_tok // cfg.n_routed_experts
        elif c in ("embedding", "mtp_copies") and "embed_tokens" in name:
            nbytes = shape[-1] * STORAGE_BYTES[dtype]  # one row: a lookup
        total += nbytes
    return total


def summary(cfg: Config, cache_dtype: str = "bf16") -> dict:
    """Everything `refimpl info` prints for a config."""
    main = by_component(tensor_plan(cfg, mtp=False))
    total = sum(main.values())
    active = active_of(cfg, main)
    mtp_layers = range(cfg.num_hidden_layers, cfg.num_layers_with_mtp)
    mtp = {}
    for layer in mtp_layers:
        for k, v in by_component(layer_plan(cfg, layer)).items():
            mtp[k] = mtp.get(k, 0) + v
    mtp_total = sum(mtp.values())
    layers = [layer_summary(cfg, i) for i in range(cfg.num_layers_with_mtp)]
    return {
        "total_params": total,
        "active_params_per_token": active,
        "active_params_per_token_without_embedding": active - main.get("embedding", 0),
        "main_components": main,
        "mtp_params": mtp_total,
        "mtp_params_unique": mtp_total - mtp.get("mtp_copies", 0),
        "mtp_active_params_per_token_unique": active_of(cfg, mtp) - mtp.get("mtp_copies", 0),
        "total_params_with_mtp": total + mtp_total,
        "layers": layers,
        "kv_cache": kv_cache(cfg, cache_dtype),
        "checkpoint_fp8": storage_totals(cfg, fp8=True),
        "fp8_bytes_read_per_decode_token": active_bytes_per_token(cfg, fp8=True),
    }
