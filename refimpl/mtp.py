"""Multi-Token Prediction (paper section 2.2, eqs. 21-23; spec section 6).

Module k (k = 1..D) works on its own sequence of indices i, aligned with the main model's
positions: at index i it combines the embedding of token t_{i+k} with h^{k-1}_i, the previous
depth's hidden state at the same index, runs one full decoder layer (MLA + MoE, causal attention
over ITS OWN indices 0..i, its own latent cache) and predicts t_{i+k+1}:

    h'^k_i = W_eh [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]          eq. (21), embedding first
    h^k_{0..}  = TRM_k(h'^k_{0..})                                  eq. (22)
    P^k_i = softmax(head(shared_head.norm(h^k_i)))   -> t_{i+k+1}   eq. (23)

For tokens t_0..t_{T-1}, depth k has the T-k indices i = 0..T-k-1 (t_{i+k} must exist); the logits
at the last index predict a token beyond the sequence. h^0_i is the main model's hidden state at
position i.  Module k lives in the checkpoint at decoder layer num_hidden_layers + k - 1
(names.mtp_layer), and in a latent cache (Model.new_cache(mtp=True)) at the same slot, with its
own filled length cache.mtp_lengths[k-1].

This file holds the equations and the conventions; TRM_k is layer.decoder_layer at the module's
layer; Model.mtp_module / Model.teacher_forced (model.py) run a module at given positions,
generate.Drafter advances the modules incrementally for speculative decoding.

Choices the paper leaves open are named in `Conventions` and recorded wherever outputs are written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import layer, names
from .backend import array_module
from .errors import RefimplError
from .norm import rms_norm
from .ops import linear
from .trace import ignore


@dataclass(frozen=True)
class Conventions:
    """The undocumented choices of the MTP path, each named with its alternatives.

    concat:  order of eh_proj's input. "embedding_first" [enorm(Emb) ; hnorm(h)] is what the
             released weights need (vLLM, SGLang, Megatron-LM, transformers); "hidden_first" is
             eq. (21) as printed.
    h0:      which main hidden state feeds module 1. "final_norm" (after the main model's final
             RMSNorm, as vLLM, SGLang and transformers do) or "pre_norm" (the last decoder layer's
             output).
    chain:   which h^k feeds module k+1 (only matters for D >= 2). "head_norm" (after
             shared_head.norm, as transformers and Megatron-LM do, and the analogue of h0 =
             final_norm) or "pre_head_norm" (the decoder layer's output, as vLLM's MTP layer
             returns it).
    weights: whose embedding and output head module k uses. "main" (model.embed_tokens and
             lm_head: the paper says they are shared; transformers ties them to the main model)
             or "module" (the copies stored under the MTP layer, embed_tokens and
             shared_head.head, which is what vLLM loads).
    positions: the RoPE position of module k's index i. "index" (i, the position of h^{k-1}_i,
             as vLLM and Megatron-LM do) or "token" (i + k, the position of t_{i+k}, as
             transformers does). RoPE scores depend only on position differences, so logits agree
             to rounding; the cached k^R differ by a rotation.
    first_embedding: Emb(t_k) at module k's first index i = 0. "keep" (the token's embedding,
             as the paper's eq. (21) and transformers compute it) or "zero" (zeroed, as vLLM and
             SGLang do at position 0; spec section 9.2).
    """

    concat: str = "embedding_first"
    h0: str = "final_norm"
    chain: str = "head_norm"
    weights: str = "main"
    positions: str = "index"
    first_embedding: str = "keep"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v not in CHOICES[f.name]:
                raise RefimplError(f"MTP convention {f.name}={v!r} is not one of "
                                   f"{', '.join(CHOICES[f.name])}")

    def as_dict(self) -> dict:
        """{name: choice}, for manifests and JSON reports."""
        return dataclasses.asdict(self)


CHOICES = {"concat": ("embedding_first", "hidden_first"), "h0": ("final_norm", "pre_norm"),
           "chain": ("head_norm", "pre_head_norm"), "weights": ("main", "module"),
           "positions": ("index", "token"), "first_embedding": ("keep", "zero")}
DEFAULT = Conventions()


# ---- eq. (21) ------------------------------------------------------------------------------------

def combine(emb, h_prev, enorm, hnorm, eh_proj, eps: float, concat: str = "embedding_first"):
    """eq. (21): h' = W_eh [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)] (order per `concat`).
    emb, h_prev: [b, s, d]; eh_proj: [d, 2d] -> [b, s, d]"""
    xp = array_module(emb)
    e = rms_norm(emb, enorm, eps)
    h = rms_norm(h_prev, hnorm, eps)
    parts = [e, h] if concat == "embedding_first" else [h, e]
    return linear(xp.concatenate(parts, axis=-1), eh_proj)  # [b, s, 2d] -> [b, s, d]


# ---- eqs. (21)-(23): one module on a chunk of indices --------------------------------------------

def embedding_name(cfg, k: int, conv: Conventions = DEFAULT) -> str:
    """The checkpoint name of the embedding table module k uses (see Conventions.weights)."""
    return names.mtp_embed(names.mtp_layer(cfg, k)) if conv.weights == "module" else names.EMBED


def head_name(cfg, k: int, conv: Conventions = DEFAULT) -> str:
    """The checkpoint name of the output head module k uses (see Conventions.weights)."""
    return names.mtp_head(names.mtp_layer(cfg, k)) if conv.weights == "module" else names.head(cfg)


def embedding(weights, cfg, k: int, tokens_k, start: int, conv: Conventions = DEFAULT):
    """Emb(t_{i+k}) for module k at indices start..: tokens_k int [b, s] -> [b, s, d], read by
    rows (a budget never holds a whole vocabulary-sized matrix); index 0 zeroed under
    first_embedding="zero"."""
    emb = weights.rows(embedding_name(cfg, k, conv), np.asarray(tokens_k))
    if conv.first_embedding == "zero" and start == 0:
        emb = emb.copy()
        emb[:, 0] = 0.0
    return emb


def transformer(weights, cfg, k: int, x, context, record=ignore):
    """eq. (22): TRM_k, one full decoder layer (layer.decoder_layer) at the module's checkpoint
    layer, attending through `context` (the chunk's positions, the module's own cache slot).
    record: the decoder layer's names under `layer.`."""
    return layer.decoder_layer(x, weights, cfg, names.mtp_layer(cfg, k), context,
                               lambda name, value: record("layer." + name, value))


def module_forward(weights, cfg, k: int, emb, h_prev, context, conv: Conventions = DEFAULT,
                   record=ignore):
    """MTP module k, eqs. (21)-(23), on a chunk of its indices.

    emb [b, s, d] = Emb(t_{i+k}) (`embedding`), h_prev [b, s, d] = h^{k-1}_i; context: the
    layer.AttentionContext of the chunk's positions (Model.mtp_module makes it); weights: a
    store with get / linear by checkpoint name.
    -> (h^k [b, s, d] as fed to module k+1 (Conventions.chain), logits [b, s, vocab]).
    record: embed, h_prev, eh_proj, the decoder layer's names under layer., head_norm, logits,
    hidden."""
    module_layer = names.mtp_layer(cfg, k)  # the module's decoder layer in the checkpoint
    record("embed", emb)
    record("h_prev", h_prev)
    x = combine(emb, h_prev, weights.get(names.enorm(module_layer)),
                weights.get(names.hnorm(module_layer)), weights.get(names.eh_proj(module_layer)),
                cfg.rms_norm_eps, conv.concat)  # eq. (21)
    record("eh_proj", x)
    h = transformer(weights, cfg, k, x, context, record)  # eq. (22)
    hn = rms_norm(h, weights.get(names.shared_head_norm(module_layer)), cfg.rms_norm_eps)
    record("head_norm", hn)
    logits = weights.linear(hn, head_name(cfg, k, conv))  # eq. (23), before the softmax
    record("logits", logits)
    out = hn if conv.chain == "head_norm" else h
    record("hidden", out)
    return out, logits
