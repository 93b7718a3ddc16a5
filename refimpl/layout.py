"""The checkpoint's tensor layout, pure (no I/O): every tensor name and shape a config implies
(the tensor plan), which linear maps the published checkpoint stores in FP8, and the stored
dtype of each tensor (the storage plan).

The tensor names themselves are in names.py (spec sections 4-7); the plan here says which of
them a config implies, with their shapes.  checkpoint.py reads checkpoints, writer.py writes them.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import names
from .config import Config
from .errors import CheckpointError
from .fp8 import BLOCK, scale_shape
from .names import BIAS_SUFFIX, layer_of

# safetensors dtype names -> numpy dtypes (ml_dtypes for bf16 and fp8)
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
STORAGE_BYTES = {k: v.itemsize for k, v in DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# The tensor plan: what a config implies
# ---------------------------------------------------------------------------------------------

def attention_shapes(cfg: Config) -> dict[str, tuple]:
    """Short name (under self_attn.) -> shape, for one MLA block."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    s = {}
    if cfg.q_lora_rank is None:
        s["q_proj.weight"] = (h * cfg.qk_head_dim, d)
    else:
        s["q_a_proj.weight"] = (cfg.q_lora_rank, d)
        s["q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        s["q_b_proj.weight"] = (h * cfg.qk_head_dim, cfg.q_lora_rank)
    s["kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, d)
    s["kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
    s["kv_b_proj.weight"] = (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    s["o_proj.weight"] = (d, h * cfg.v_head_dim)
    return s


def ffn_shapes(d: int, inter: int) -> dict[str, tuple]:
    return {"gate_proj.weight": (inter, d), "up_proj.weight": (inter, d),
            "down_proj.weight": (d, inter)}


def layer_plan(cfg: Config, layer: int) -> dict[str, tuple]:
    """Every tensor of decoder layer `layer` (MTP layers included) -> shape."""
    d, i = cfg.hidden_size, layer
    plan = {names.input_norm(i): (d,), names.post_attention_norm(i): (d,)}
    plan.update({names.attention(i) + k: v for k, v in attention_shapes(cfg).items()})
    if cfg.is_moe_layer(layer):
        plan[names.gate_weight(i)] = (cfg.n_routed_experts, d)
        if cfg.uses_bias:
            plan[names.gate_bias(i)] = (cfg.n_routed_experts,)
        for e in range(cfg.n_routed_experts):
            plan.update({names.expert(i, e) + k: v
                         for k, v in ffn_shapes(d, cfg.moe_intermediate_size).items()})
        if cfg.n_shared_experts:
            shared = cfg.n_shared_experts * cfg.moe_intermediate_size
            plan.update({names.shared_experts(i) + k: v for k, v in ffn_shapes(d, shared).items()})
    else:
        plan.update({names.mlp(i) + k: v for k, v in ffn_shapes(d, cfg.intermediate_size).items()})
    if layer >= cfg.num_hidden_layers:  # an MTP module
        plan[names.enorm(i)] = (d,)
        plan[names.hnorm(i)] = (d,)
        plan[names.eh_proj(i)] = (d, 2 * d)
        plan[names.shared_head_norm(i)] = (d,)
        plan[names.mtp_head(i)] = (cfg.vocab_size, d)
        plan[names.mtp_embed(i)] = (cfg.vocab_size, d)
    return plan


def mtp_stored(cfg: Config, stored, depths: int | None = None) -> bool:
    """Whether the tensor names `stored` hold MTP modules 1..depths (default: all
    num_nextn_predict_layers) completely, the optional gate bias aside: the one MTP-presence
    check (Checkpoint.has_mtp, WeightStore.has_mtp)."""
    n = cfg.num_nextn_predict_layers if depths is None else depths
    return n >= 1 and all(name in stored for k in range(1, n + 1)
                          for name in layer_plan(cfg, names.mtp_layer(cfg, k))
                          if not name.endswith(BIAS_SUFFIX))


def tensor_plan(cfg: Config, mtp: bool = True) -> dict[str, tuple]:
    """name -> shape for the whole checkpoint, in dataflow order."""
    plan = {names.EMBED: (cfg.vocab_size, cfg.hidden_size)}
    n = cfg.num_layers_with_mtp if mtp else cfg.num_hidden_layers
    for layer in range(n):
        plan.update(layer_plan(cfg, layer))
    plan[names.FINAL_NORM] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        plan[names.LM_HEAD] = (cfg.vocab_size, cfg.hidden_size)
    return plan


# Linear weights stored as FP8 e4m3 with a float32 `<name>_scale_inv` in the published
# checkpoint (spec section 7): every projection of attention and of the FFNs (dense, shared,
# routed), in the MTP layer's decoder block too.  eh_proj, the gate, norms, embedding and head
# are not.
FP8_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")


def role_of(name: str) -> str:
    """What a tensor is, in words, for error messages."""
    if name.endswith("e_score_correction_bias"):
        return "gate bias"
    if name.endswith("mlp.gate.weight"):
        return "router gate"
    parts = name.split(".")
    if len(parts) >= 2 and "norm" in parts[-2]:
        return "norm weight"
    if "embed_tokens" in name:
        return "embedding"
    if name.endswith(("lm_head.weight", "shared_head.head.weight")):
        return "output head"
    if name.endswith("_proj.weight"):
        return "projection"
    return "weight"


def is_fp8_weight(name: str) -> bool:
    """True for the linear weights the published checkpoint stores as FP8 e4m3 (spec section 7)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in FP8_PROJECTIONS \
        and layer_of(name) is not None


def storage_plan(cfg: Config, fp8: bool = True, mtp: bool = True,
                 store_dtype: str = "bfloat16") -> dict[str, tuple[str, tuple]]:
    """name -> (safetensors dtype, shape) of every tensor make-checkpoint writes, scales included.

    fp8=True is the published layout (README_WEIGHTS; spec sections 6-7): FP8 projections,
    each followed by an F32 `<name>_scale_inv` of shape (ceil(out/128), ceil(in/128)); the rest
    BF16, except the gate bias, kept F32.  The MTP layer's stored embedding and head copies are
    BF16 like the main ones.  For deepseek-v3 this gives the published 91,991 tensors and
    688,574,839,360 bytes."""
    return {n: (d, s) for n, d, s in stored_entries(tensor_plan(cfg, mtp=mtp), fp8, store_dtype)}


STORE_DTYPES = {"float64": np.float64, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


FLOAT_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16"}
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [BLOCK, BLOCK]}


def stored_entries(shapes: dict, fp8: bool, store_dtype: str) -> list[tuple[str, str, tuple]]:
    """[(stored name, safetensors dtype, shape)] for logical tensors name -> shape: FP8
    projections with their scales when fp8 (spec section 7), the rest in store_dtype, the
    gate bias float32 or better (as published)."""
    if store_dtype not in FLOAT_DTYPE_NAMES:
        raise CheckpointError(f"store dtype {store_dtype!r} is not one of {', '.join(FLOAT_DTYPE_NAMES)}")
    float_dtype = FLOAT_DTYPE_NAMES[store_dtype]
    out = []
    for name, shape in shapes.items():
        if fp8 and is_fp8_weight(name) and len(shape) == 2:
            out.append((name, "F8_E4M3", tuple(shape)))
            out.append((name + "_scale_inv", "F32", scale_shape(shape)))
        elif name.endswith("e_score_correction_bias") and STORAGE_BYTES[float_dtype] < 4:
            out.append((name, "F32", tuple(shape)))
        else:
            out.append((name, float_dtype, tuple(shape)))
    return out
