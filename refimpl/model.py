"""The model (paper Figure 2; spec sections 2-6): embedding, decoder layers, final norm, output
head, and on top the MTP modules (Figure 3; their equations are in mtp.py).

    h = Emb(tokens)
    for each layer i:  h = layer.decoder_layer(h)        h + MLA(RMSNorm(h)), then + FFN_i(RMSNorm(h))
    logits = Head(RMSNorm(h))

One decoder layer, its attention context and the latent cache are in layer.py; the math in
mla.py (attention_block, eqs. 1-11), moe.py (moe_ffn, eqs. 12-16), norm.py, rope.py and mtp.py
(eqs. 21-23); weights come from weights.WeightStore by their checkpoint names (names.py); named
intermediates go through trace.recorder.  This file is the loop and its API: positions, the
causal mask, prefill and incremental decode, the MTP modules over a sequence.
"""

from __future__ import annotations

import os

import numpy as np

from . import layer, mla, mtp, names, rope
from .backend import device_module, to_numpy, working_dtype
from .checkpoint import Checkpoint
from .config import Config
from .errors import InputError, RefimplError
from .norm import rms_norm
from .layer import AttentionContext, LatentCache
from .trace import recorder
from .weights import ArraySource, WeightStore, shared_tensors, weight_budget

MLA_FORMS = ("naive", "absorbed", "auto")


class Model:
    """A DeepSeek-V3 (or V2) model over a weight source. Use `load()` for a checkpoint directory
    or `Model.from_arrays()` for weights in memory."""

    def __init__(self, cfg: Config, source, dtype="float64", device="cpu", mla_form="auto",
                 max_memory: int | None = None, fp8_activations: bool = False):
        if mla_form not in MLA_FORMS:
            raise RefimplError(f"mla_form {mla_form!r} is not one of {', '.join(MLA_FORMS)}")
        self.cfg = cfg
        self.dtype = working_dtype(dtype)
        self.device = device
        self.xp = device_module(device)
        self.mla_form = mla_form
        if fp8_activations and device != "cpu":
            raise RefimplError("fp8_activations (the FP8 GEMM emulation) runs on the cpu only")
        self.max_memory = max_memory
        self.weights = WeightStore(source, self.xp, self.dtype, fp8_linears=fp8_activations)
        if max_memory is not None:
            self.weights.max_bytes = weight_budget(self.weights, cfg, max_memory)
        self.inv_freq = rope.inv_freq(cfg)
        self.cos_sin_factor = rope.cos_sin_factor(cfg)
        self.softmax_scale = rope.softmax_scale(cfg)
        # progress(iterable, desc=...) -> iterable, e.g. tqdm: set by the command line on a
        # terminal so a long forward shows its layers; None (quiet) for library use.
        self.progress = None

    @classmethod
    def from_arrays(cls, cfg: Config, arrays: dict, **kw) -> "Model":
        return cls(cfg, ArraySource(cfg, arrays), **kw)

    # ---- cache ---------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, max_len: int | None = None, mtp: bool = False) -> LatentCache:
        """An empty latent cache for `batch` rows of up to `max_len` tokens (default: 4096, or
        max_position_embeddings if smaller: V3's 163,840 positions would be 46 GB in float64).
        With mtp=True it also has one slot per MTP module (num_nextn_predict_layers more, each
        with its own length in mtp_lengths)."""
        cfg, xp = self.cfg, self.xp
        max_len = min(4096, cfg.max_position_embeddings) if max_len is None else max_len
        if max_len < 1 or max_len > cfg.max_position_embeddings:
            raise InputError(f"cache max_len {max_len} must be in 1..max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        n = cfg.num_layers_with_mtp if mtp else cfg.num_hidden_layers
        return LatentCache(
            c_kv=[xp.zeros((batch, max_len, cfg.kv_lora_rank), self.dtype) for _ in range(n)],
            k_rope=[xp.zeros((batch, max_len, cfg.qk_rope_head_dim), self.dtype) for _ in range(n)],
            mtp_lengths=[0] * (cfg.num_nextn_predict_layers if mtp else 0))

    def attention_context(self, positions, n_keys: int, start: int, cache=None,
                          query_index=None, routes=None) -> AttentionContext:
        """What every layer of one forward shares, for new tokens at RoPE `positions` [s]
        attending causally to key indices 0..n_keys-1 (query_index [s]: the tokens' own indices,
        default `positions`); routes: see forward."""
        q = positions if query_index is None else query_index
        cos, sin = rope.cos_sin(positions, self.inv_freq, self.cos_sin_factor, self.xp, self.dtype)
        form = self.mla_form
        if form == "auto":
            form = "absorbed" if start > 0 else "naive"
        return AttentionContext(cos, sin, mla.causal_mask(q, np.arange(n_keys), self.xp), start,
                    self.softmax_scale, form, cache, routes)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, tokens, cache: LatentCache | None = None, trace: dict | None = None,
                mtp: bool = False, mtp_conventions=None, routes: dict | None = None):
        """tokens int [batch, seq] -> logits [batch, seq, vocab] (working dtype, on the device).

        With a cache, the tokens continue at position cache.length and the cache advances.
        With a trace dict, the named intermediates are stored in it in dataflow order.
        With mtp=True (teacher forcing over the whole sequence, no cache), returns
        (logits, [mtp logits of depth k = 1..D, each [batch, seq-k, vocab]]): module k at index i
        predicts t_{i+k+1} (mtp.py; conventions from mtp.Conventions, default mtp.DEFAULT).

        routes (None: every token routed by the gate): {checkpoint layer: {(row, index):
        experts}}: the token of batch row `row` at position `index` (an MTP layer: MTP index)
        goes to the K given experts in that MoE layer instead of its own choice (moe.route's
        `forced`); everything else, downstream included, is computed as usual."""
        if mtp:
            return self._forward_mtp(tokens, cache, trace, mtp_conventions, routes)
        h = self.hidden_states(tokens, cache, trace, routes=routes)
        return self.logits(h, trace)

    def hidden_states(self, tokens, cache=None, trace=None, final_norm=True, routes=None):
        """The final hidden state after the last norm: [batch, seq, d] (with final_norm=False,
        the last decoder layer's output, before that norm); routes: see forward."""
        cfg = self.cfg
        tokens = self.check_tokens(tokens)
        b, s = tokens.shape
        start = 0
        if cache is not None:
            start = cache.length
            if cache.batch != b:
                raise InputError(f"tokens have batch {b} but the cache was made for {cache.batch}")
            if start + s > cache.max_len:
                raise InputError(f"{s} tokens at position {start} overflow the cache of "
                                 f"{cache.max_len} positions")
        if start + s > cfg.max_position_embeddings:
            raise InputError(f"positions up to {start + s - 1} exceed max_position_embeddings "
                             f"({cfg.max_position_embeddings})")
        context = self.attention_context(np.arange(start, start + s), start + s, start, cache,
                                         routes=routes)
        h = self.weights.rows(names.EMBED, tokens)  # [b, s] -> [b, s, d]
        recorder(trace)("embed", h)
        layers = range(cfg.num_hidden_layers)
        if self.progress is not None:
            layers = self.progress(layers, desc=f"forward of {b}x{s} tokens", unit="layer")
        for i in layers:
            if i + 1 < cfg.num_hidden_layers:  # the disk reads layer i+1 while layer i computes
                self.weights.prefetch(shared_tensors(cfg, i + 1))
            h = layer.decoder_layer(h, self.weights, cfg, i, context, recorder(trace, f"layers.{i}."))
        if cache is not None:
            cache.length = start + s
        if not final_norm:
            return h
        h = rms_norm(h, self.weights.get(names.FINAL_NORM), cfg.rms_norm_eps)
        recorder(trace)("final_hidden", h)
        return h

    def logits(self, h, trace=None):
        """The output head: [batch, seq, d] -> [batch, seq, vocab]."""
        out = self.weights.linear(h, names.head(self.cfg))
        recorder(trace)("logits", out)
        return out

    def check_tokens(self, tokens) -> np.ndarray:
        """Integer ids of rank 2, each in [0, vocab_size)."""
        t = to_numpy(tokens)
        if t.ndim != 2:
            raise InputError(f"tokens must be an integer array [batch, seq], got rank {t.ndim}")
        if not np.issubdtype(t.dtype, np.integer):
            raise InputError(f"tokens must be integers, got dtype {t.dtype}")
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise InputError(f"tokens must hold at least one id, got shape {list(t.shape)}")
        bad = (t < 0) | (t >= self.cfg.vocab_size)
        if bad.any():
            where = tuple(int(x) for x in np.argwhere(bad)[0])
            raise InputError(f"token id {int(t[where])} at {list(where)} is outside the "
                             f"vocabulary [0, {self.cfg.vocab_size})")
        return t.astype(np.int64)

    # ---- MTP modules (Figure 3; the equations are in mtp.py) ------------------------------------
    def has_mtp(self, depths: int | None = None) -> bool:
        """True when the weights hold every MTP module 1..depths (default: all)."""
        return self.weights.has_mtp(self.cfg, depths)

    def _forward_mtp(self, tokens, cache, trace, conv, routes=None):
        if cache is not None:
            raise InputError("forward(mtp=True) is teacher-forced over a whole sequence and takes "
                             "no cache; decode incrementally with generate.Drafter")
        if not self.has_mtp():
            raise InputError("forward(mtp=True): the weights hold no MTP layers (layer "
                             f"{self.cfg.num_hidden_layers} and on)")
        conv = conv or mtp.DEFAULT
        tokens = self.check_tokens(tokens)
        h0, h = self.main_hidden(tokens, None, trace, conv, routes)
        logits = self.logits(h, trace)
        return logits, self.teacher_forced(tokens, h0, trace, conv, routes=routes)

    def main_hidden(self, tokens, cache=None, trace=None, conv: mtp.Conventions = mtp.DEFAULT,
                    routes=None):
        """(h^0 for module 1, the main model's final hidden state after its norm) for `tokens`.
        With conv.h0 == "pre_norm", h^0 is the last decoder layer's output. routes: see forward."""
        if conv.h0 == "final_norm":
            h = self.hidden_states(tokens, cache, trace, routes=routes)
            return h, h
        pre = self.hidden_states(tokens, cache, trace, final_norm=False, routes=routes)
        return pre, rms_norm(pre, self.weights.get(names.FINAL_NORM), self.cfg.rms_norm_eps)

    def mtp_module(self, k: int, tokens_k, h_prev, start: int = 0, cache=None, trace=None,
                   conv: mtp.Conventions = mtp.DEFAULT, routes=None):
        """MTP module k on the indices start .. start+s-1 of its sequence (mtp.module_forward).

        tokens_k int [b, s]: tokens_k[:, j] = t_{start+j+k};  h_prev [b, s, d]: h^{k-1}_{start+j}.
        With a cache (made with mtp=True), attends over the module's cached indices 0..start-1 too
        and writes indices start.. into slot names.mtp_layer(cfg, k) (it does NOT move
        cache.mtp_lengths: the caller decides which indices are committed).  Without a cache start
        must be 0.  -> (h^k [b, s, d] as fed to module k+1 (Conventions.chain), logits
        [b, s, vocab]).  routes: see forward (keyed by names.mtp_layer(cfg, k) and MTP index)."""
        cfg = self.cfg
        s = tokens_k.shape[1]
        if cache is None and start != 0:
            raise RefimplError("mtp_module without a cache must start at index 0")
        idx = np.arange(start, start + s)
        pos = idx + (k if conv.positions == "token" else 0)
        if pos[-1] >= cfg.max_position_embeddings:
            raise InputError(f"MTP module {k}: position {int(pos[-1])} exceeds "
                             f"max_position_embeddings ({cfg.max_position_embeddings})")
        # causal over the module's own indices; RoPE at the convention's positions
        context = self.attention_context(pos, start + s, start, cache, query_index=idx,
                                         routes=routes)
        emb = mtp.embedding(self.weights, cfg, k, tokens_k, start, conv)
        return mtp.module_forward(self.weights, cfg, k, emb, h_prev, context, conv,
                                  recorder(trace, f"mtp.{k}."))

    def teacher_forced(self, tokens, h0, trace=None, conv: mtp.Conventions = mtp.DEFAULT,
                       depths=None, routes=None) -> list:
        """Every module over a whole sequence, without a cache (training-time view).

        tokens int [b, T]; h0 [b, T, d] (main_hidden's first result).  Returns D arrays, the k-th
        [b, T-k, vocab]: logits of module k at index i, predicting t_{i+k+1} (empty when T <= k)."""
        tokens = np.asarray(tokens)
        b, T = tokens.shape
        h = h0
        out = []
        for k in range(1, (self.cfg.num_nextn_predict_layers if depths is None else depths) + 1):
            if T - k <= 0:
                out.append(self.xp.zeros((b, 0, self.cfg.vocab_size), self.dtype))
                continue
            # routes by keyword, and only when given: a pipeline's mtp_module takes none
            h, logits = self.mtp_module(k, tokens[:, k:], h[:, :T - k], 0, None, trace, conv,
                                        **({} if routes is None else {"routes": routes}))
            out.append(logits)
        return out


def load(path: str | os.PathLike, dtype="float64", device="cpu", mla_form="auto",
         max_memory: int | None = None, fp8_activations: bool = False) -> Model:
    """Open a checkpoint directory (HF layout): reads config.json and the safetensors headers,
    checks every tensor the config implies is present with its shape and every FP8 scale fits
    its weight; tensor bodies are read when first used.

    max_memory (bytes): keep the process under it by releasing the least recently used weights
    (see WeightStore).  fp8_activations: run FP8-stored projections as an FP8 engine does
    (activations quantised per token per 128 channels, float32 accumulation; fp8.fp8_gemm)."""
    ckpt = Checkpoint(path)
    ckpt.check_against_config()
    ckpt.check_scales()
    return Model(ckpt.config, ckpt, dtype=dtype, device=device, mla_form=mla_form,
                 max_memory=max_memory, fp8_activations=fp8_activations)
