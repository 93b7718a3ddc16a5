"""One decoder layer (paper Figure 2; spec sections 2, 4, 5) and what its attention reads: the
pre-norm residual block, its feed-forward part (dense SwiGLU or DeepSeekMoE), the attention
context every layer of one forward shares, and the latent cache MLA keeps.

    h = h + MLA(RMSNorm(h))          eqs. (1)-(11), mla.attention_block
    h = h + FFN_i(RMSNorm(h))        SwiGLU, or DeepSeekMoE eq. (12), moe.moe_ffn

The main model (model.py) runs these layers in a loop; the MTP modules (mtp.py) run one each as
TRM_k (eq. 22).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import mla, moe, names
from .config import Config
from .errors import InputError
from .norm import rms_norm
from .ops import boundary
from .trace import ignore
from .weights import ExpertView, LazyGroup, WeightStore


@dataclass
class LatentCache:
    """What MLA caches: per layer the normalised c^KV [batch, max_len, d_c] and the roped k^R
    [batch, max_len, d_R], i.e. d_c + d_R values per token per layer (576 for V3). `length`
    tokens are filled; the next forward continues at position `length`."""

    c_kv: list
    k_rope: list
    length: int = 0
    # MTP module k (mtp.py) uses slot num_hidden_layers + k - 1 and has its own filled length
    mtp_lengths: list = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.c_kv[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.c_kv[0].shape[1]


@dataclass
class AttentionContext:
    """What every layer of one forward shares besides its weights: the RoPE tables of the new
    tokens' positions, the causal mask [s, t], where the tokens start in the cache, the softmax
    scale, the MLA form, and the latent cache (None: attend over the new tokens only)."""

    cos: object
    sin: object
    mask: object
    start: int
    scale: float
    form: str  # "naive" or "absorbed"
    cache: LatentCache | None = None
    # forced routing (moe.route's `forced`): {checkpoint layer: {(row, index): experts [K]}},
    # index = the token's position (a decoder layer) or its MTP index (an MTP module); forced()
    routes: dict | None = None

    def slot(self, layer: int):
        """The cache slot of `layer`, (c_kv [b, T, d_c], k_rope [b, T, d_R]), or None."""
        return None if self.cache is None else (self.cache.c_kv[layer], self.cache.k_rope[layer])

    def forced(self, layer: int, batch: int, s: int):
        """moe.route's `forced` for `layer` over this forward's b x s new tokens (indices start ..
        start+s-1), or None: the routes of those tokens, flattened to row * s + index - start."""
        at = (self.routes or {}).get(layer)
        if not at:
            return None
        mine = [(r * s + i - self.start, e) for (r, i), e in sorted(at.items())
                if 0 <= r < batch and self.start <= i < self.start + s]
        if not mine:
            return None
        return np.array([t for t, _ in mine], np.int64), np.array([e for _, e in mine], np.int64)


def decoder_layer(h, w: WeightStore, cfg: Config, i: int, context: AttentionContext, record=ignore):
    """Decoder layer i (MTP layers included): the pre-norm residual block of Figure 2,

        h = h + MLA(RMSNorm(h))          eqs. (1)-(11), mla.attention_block
        h = h + FFN(RMSNorm(h))          SwiGLU, or DeepSeekMoE eq. (12), moe.moe_ffn

    h [b, s, d] -> [b, s, d].  record: attn_norm, the attention block's names, h_attn, ffn_norm,
    the router's names (MoE layers), ffn_out, hidden."""
    eps = cfg.rms_norm_eps
    x = rms_norm(h, w.get(names.input_norm(i)), eps)
    record("attn_norm", x)
    # the residual stream is stored after each add: an operator boundary (ops.rounding)
    h = boundary(h + mla.attention_block(x, w.group(names.attention(i), names.attention_keys(cfg)),
                                         cfg, context.cos, context.sin, context.mask, context.scale,
                                         context.form, context.slot(i), context.start, record))
    record("h_attn", h)
    x = rms_norm(h, w.get(names.post_attention_norm(i)), eps)
    record("ffn_norm", x)
    f = ffn(x, w, cfg, i, record, context.forced(i, x.shape[0], x.shape[1]))
    record("ffn_out", f)
    h = boundary(h + f)  # the layer's output: an operator boundary (ops.rounding)
    record("hidden", h)
    return h


def ffn(x, w: WeightStore, cfg: Config, i: int, record=ignore, forced=None):
    """Layer i's feed-forward block without the residual: one SwiGLU in the first
    first_k_dense_replace layers, DeepSeekMoE (shared + gated routed experts) after.
    forced: moe.route's forced routing of some tokens (an MoE layer only)."""
    if not cfg.is_moe_layer(i):
        if forced is not None:
            raise InputError(f"forced routing for layer {i}, which is dense")
        return moe.swiglu(x, **w.group(names.mlp(i), names.FFN_PROJ))
    bias = w.optional(names.gate_bias(i)) if cfg.uses_bias else None  # the checkpoint decides
    shared = LazyGroup(w, names.shared_experts(i), names.FFN_PROJ) if cfg.n_shared_experts else None
    return moe.moe_ffn(x, w.get(names.gate_weight(i)), bias, ExpertView(w, i), shared, cfg, record,
                       forced)
